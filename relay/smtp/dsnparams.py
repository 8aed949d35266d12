"""The DSN parameters of MAIL and RCPT (RFC 3461 section 4) as the server reads them.

Kept out of relay.smtp.server so that the dialogue stays readable: this
module turns the parameters relay.common.address.split_command_argument
found into the values relay.common.dsn stores, or a DsnSyntax for a 501
5.5.4 reply that names the parameter.  A parameter given twice is refused
(501) here too: split_command_argument keeps only the last value, which
would silently pick one of two contradicting requests.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from relay.common import dsn
from relay.common.dsn import DsnRequest, DsnSyntax

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


class Refusal(NamedTuple):
    """The error reply to a MAIL or RCPT whose parameters are refused."""

    code: int
    text: str


def check_mail(text: str, path: str, params: dict[str, str | None]) -> tuple[str, str] | Refusal:
    """(RET, ENVID) of MAIL, or the 501 that names the bad or repeated parameter."""
    dup = duplicate(text, path)
    if dup is not None:
        return Refusal(501, f"5.5.4 Duplicate parameter {dup}")
    try:
        return mail(params)
    except DsnSyntax as e:
        return Refusal(501, f"5.5.4 {e}")


def check_rcpt(text: str, path: str, params: dict[str, str | None],
               esmtp: bool) -> tuple[str | None, str | None] | Refusal:
    """(NOTIFY, ORCPT) of RCPT, or the refusal: 555 for a parameter we do not
    know (or any after HELO: RFC 1869), 501 for bad syntax or a repeat."""
    if not params:
        return None, None
    unknown = [k for k in params if k not in RCPT_KEYS]
    if unknown or not esmtp:
        return Refusal(555, f"5.5.4 Unsupported parameter {(unknown or list(params))[0]}")
    dup = duplicate(text, path)
    if dup is not None:
        return Refusal(501, f"5.5.4 Duplicate parameter {dup}")
    try:
        return rcpt(params)
    except DsnSyntax as e:
        return Refusal(501, f"5.5.4 {e}")


def request(mail_dsn: tuple[str, str], per_rcpt: Sequence[tuple[str | None, str | None]], *,
            limited: bool) -> DsnRequest | None:
    """The envelope's DsnRequest of a transaction (None when nothing was asked)."""
    ret, envid = mail_dsn
    if not (ret or envid or any(n or o for n, o in per_rcpt)):
        return None
    return DsnRequest(ret, envid, [n for n, _ in per_rcpt], [o for _, o in per_rcpt], limited=limited)
