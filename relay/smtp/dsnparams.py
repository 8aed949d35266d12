"""The DSN parameters of MAIL and RCPT (RFC 3461 section 4) as the server reads them.

Kept out of relay.smtp.server so that the dialogue stays readable: this
module turns the parameters relay.common.address.split_command_argument
found into the values relay.common.dsn stores, or a DsnSyntax for a 501
5.5.4 reply that names the parameter.  A parameter given twice is refused
(501) here too: split_command_argument keeps only the last value, which
would silently pick one of two contradicting requests.
"""

from __future__ import annotations

from relay.common import dsn
from relay.common.dsn import DsnSyntax

MAIL_KEYS = frozenset(("RET", "ENVID"))
RCPT_KEYS = frozenset(("NOTIFY", "ORCPT"))


def duplicate(text: str, path: str) -> str | None:
    """The first parameter key given twice in ``text`` (what follows "FROM:"
    or "TO:"; ``path`` the path split_command_argument found in it), if any."""
    seen: set[str] = set()
    for tok in text.lstrip()[len(path):].split():
        key = tok.split("=", 1)[0].upper()
        if key in seen:
            return key
        seen.add(key)
    return None


def mail(params: dict[str, str | None]) -> tuple[str, str]:
    """(RET, ENVID) of a MAIL command, "" where not given; raises DsnSyntax."""
    ret = dsn.parse_ret(params["RET"]) if "RET" in params else ""
    envid = dsn.parse_envid(params["ENVID"]) if "ENVID" in params else ""
    return ret, envid


def rcpt(params: dict[str, str | None]) -> tuple[str | None, str | None]:
    """(NOTIFY, ORCPT) of a RCPT command, None where not given; raises DsnSyntax."""
    notify = dsn.parse_notify(params["NOTIFY"]) if "NOTIFY" in params else None
    orcpt = dsn.parse_orcpt(params["ORCPT"]) if "ORCPT" in params else None
    return notify, orcpt


__all__ = ["MAIL_KEYS", "RCPT_KEYS", "DsnSyntax", "duplicate", "mail", "rcpt"]
