"""The trace the SMTP server adds to a message: its Received header (RFC 5321
4.4), and the protocol name that header, the envelope and the log give.

What a client chose (its HELO name, a TLS cipher's name, a recipient) is
cut to printable ASCII without the characters that would end a comment
(``sanitize``) before it goes into a header.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any

_UNSAFE = str.maketrans({c: "?" for c in "()\\"})


def sanitize(text: str, limit: int = 255) -> str:
    """Keep only printable ASCII without parentheses/brackets trouble."""
    text = text[:limit]
    if text.isascii() and text.isprintable() and " " not in text:
        return text.translate(_UNSAFE)
    return "".join(c if 33 <= ord(c) <= 126 and c not in "()\\" else "?" for c in text)


def protocol_name(esmtp: bool, tls_active: bool, authenticated: bool) -> str:
    """SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848)."""
    if not esmtp:
        return "SMTP"
    p = "ESMTP"
    if tls_active:
        p += "S"
    if authenticated:
        p += "A"
    return p


_last_date: tuple[int, str] = (-1, "")


def date_header(ts: float) -> str:
    """RFC 5322 date in local time, computed once per second."""
    global _last_date
    sec = int(ts)
    if _last_date[0] != sec:
        utc = datetime.datetime.fromtimestamp(sec, datetime.timezone.utc)
        _last_date = (sec, email.utils.format_datetime(email.utils.localtime(utc)))
    return _last_date[1]


def received_header(*, helo: str | None, client_ip: str, hostname: str, proto: str, queue_id: str,
                    tls_active: bool, tls_info: dict[str, Any] | None, recipient: str | None,
                    now: float, hide_client: bool = False) -> bytes:
    """The Received header of a message received over SMTP; ``recipient``:
    the one accepted recipient, if there is only one; ``hide_client``
    (private submission): no "from" clause, so neither the client's HELO
    name nor its IP address (as Postfix's smtpd_hide_client_session).  A
    UTF-8 recipient (SMTPUTF8: the parser let no control or bidi character
    through) is written in UTF-8, as RFC 6532 allows in such a message."""
    tls = ""
    if tls_active and tls_info:
        ti = tls_info
        tls = (f"\r\n\t(using {sanitize(str(ti.get('version')))} with cipher "
               f"{sanitize(str(ti.get('cipher')))} ({int(ti.get('bits') or 0)} bits))")
    elif tls_active:
        tls = "\r\n\t(using TLS)"
    rc = ""
    if recipient is not None and not recipient.isascii() and recipient.isprintable() and len(recipient) <= 300:
        rc = f"\r\n\tfor <{recipient.translate(_UNSAFE).replace(' ', '?')}>"
    elif recipient is not None:
        rc = f"\r\n\tfor <{sanitize(recipient, 300)}>"
    origin = "" if hide_client else f"from {helo} ([{client_ip}])\r\n\t"
    hdr = (
        f"Received: {origin}by {hostname} (twisted-relay) with {proto} id {queue_id}"
        f"{tls}{rc};\r\n\t{date_header(now)}\r\n"
    )
    return hdr.encode("ascii", "replace") if not rc or rc.isascii() else hdr.encode("utf-8", "replace")
