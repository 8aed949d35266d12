"""SMTPUTF8 (RFC 6531) on the inbound server: the pieces of MAIL and RCPT
that are about UTF-8, apart from relay.smtp.server (which has little room).

The connection hands command lines to the server decoded as latin-1 (one
character per octet, never an error), so that a broken line is still a line.
A MAIL or RCPT argument that is not ASCII is re-read here as UTF-8: with
SMTPUTF8 it is the address as sent (invalid UTF-8 is refused with a 5.1.x
syntax reply), without it the address is refused with RFC 6531 3.7.4.1's
553 5.6.7 whatever its bytes.
"""

from __future__ import annotations

from relay.common.address import AddressError


def command_text(arg: str) -> tuple[str, bool]:
    """The argument of MAIL or RCPT (decoded as latin-1) re-read as UTF-8:
    (the text, whether it was valid UTF-8).  Text that is not is given back
    as it was (its non-ASCII characters still refuse it)."""
    if arg.isascii():
        return arg, True
    try:
        return arg.encode("latin-1").decode("utf-8"), True
    except UnicodeError:
        return arg, False


def check_valid(text_ok: bool, smtputf8: bool) -> None:
    """Refuse an argument that is not UTF-8 in a SMTPUTF8 transaction."""
    if smtputf8 and not text_ok:
        raise AddressError("address is not valid UTF-8")


def mail_param(value: str | None) -> str | None:
    """The refusal text of MAIL's SMTPUTF8 parameter, or None if it is good
    (RFC 6531 3.4: it has no value)."""
    return None if value is None else "5.5.4 The SMTPUTF8 parameter takes no value"


def refusal(e: AddressError, what: str, status: str) -> tuple[int, str]:
    """The reply to an address that cannot be parsed: RFC 6531's 553 5.6.7
    for a non-ASCII one without SMTPUTF8, else 501 and ``status``."""
    if e.status == "5.6.7":
        return 553, f"5.6.7 {e}"
    return 501, f"{status} Bad {what} address syntax: {e}"


def protocol(name: str, smtputf8: bool) -> str:
    """The protocol name of a SMTPUTF8 transaction (RFC 6531 3.7.3: UTF8SMTP,
    UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA for ESMTP, ESMTPS, ...)."""
    return "UTF8" + name[1:] if smtputf8 and name.startswith("ESMTP") else name
