"""Delivery status notifications (RFC 3464, RFC 3462 multipart/report).

One report per message and per event, for the recipients that failed (or
are delayed) in that event.  The report is built as bytes with CRLF line
endings and explicit MIME structure, with the email package doing what it
is good at (dates, message ids, header encoding): the returned headers of
the original message are copied byte for byte into text/rfc822-headers,
which the email package's generator would re-encode.  Tests parse the
result back with the email package.

A message that came with SMTPUTF8 (``smtputf8=True``) gets RFC 6533's
internationalized report: report-type global-delivery-status, the status
part as message/global-delivery-status with ``utf-8;`` address types for
UTF-8 addresses (utf-8-address form, raw UTF-8), the returned content as
message/global-headers or message/global, the texts in UTF-8 where an
address is; the queue sends such a notice with SMTPUTF8 (relay.queue.notices).
A message without it gets the report it always got, byte for byte.
"""

from __future__ import annotations

import email.utils
import secrets
from dataclasses import dataclass
from email.header import Header
from typing import Callable, Iterable, Protocol

from relay.common.dsn import FAILURE, orcpt_field, wants

FAILED = "failed"
DELAYED = "delayed"
SUCCESS = "success"  # a report of delivered / relayed recipients (NOTIFY=SUCCESS, RFC 3461)
DELIVERED = "delivered"
RELAYED = "relayed"
MAX_RETURNED_HEADERS = 64 * 1024


@dataclass(frozen=True)
class Failure:
    """One recipient in a report."""

    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1"
    diagnostic: str  # the remote reply ("550 5.1.1 ...") or our reason
    original: str | None = None  # ORCPT, when it differs
    remote_mta: str | None = None  # the host that answered
    diagnostic_type: str = "smtp"
    last_attempt: float | None = None
    will_retry_until: float | None = None
    action: str | None = None  # the Action field; None: the report's kind (failed, delayed)
    orcpt: str | None = None  # the client's ORCPT ("addr-type;xtext"): the Original-Recipient field


ADMIN_RETURN = "message returned to sender by the mail administrator"


class OpenRecipient(Protocol):
    """What admin_returns reads of a queued recipient (relay.queue.envelope.Recipient)."""

    @property
    def address(self) -> str: ...
    @property
    def orcpt(self) -> str | None: ...
    @property
    def reply(self) -> str: ...


def admin_returns(recipients: Iterable[OpenRecipient], dsn_of: Callable[[str], tuple[str | None, str | None]],
                  limited: bool, now: float) -> tuple[list[Failure], list[tuple[str, str | None]]]:
    """``relayctl queue bounce`` of the open ``recipients``, live
    (relay.queue.actions) and offline (relay.admin.offline) alike, under the
    rules of an ordinary bounce (relay.queue.outcomes): a recipient whose
    NOTIFY has no FAILURE is bounced without a notice.  ``dsn_of`` is the
    envelope's (NOTIFY, ORCPT) of an address, ``limited`` its backscatter
    mark.  Returns (the failures to report, with their ORCPT; (address,
    NOTIFY) of those not reported).  Here, not in relay.queue, because
    relayctl's offline verbs must not import Twisted."""
    failures: list[Failure] = []
    silent: list[tuple[str, str | None]] = []
    for r in recipients:
        notify, orcpt = dsn_of(r.address)
        if not wants(notify, FAILURE, limited):
            silent.append((r.address, notify))
            continue
        failures.append(Failure(
            r.address, "5.0.0", ADMIN_RETURN + (f"; last error: {r.reply}" if r.reply else ""),
            original=r.orcpt, last_attempt=now, diagnostic_type="x-relay", orcpt=orcpt))
    return failures, silent


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False, usegmt=True)


def _clean(text: str, limit: int = 900, utf8: bool = False) -> str:
    """One header-safe line: no CR/LF/control characters, bounded length;
    with ``utf8`` (a global report) printable non-ASCII characters stay
    (never C1 controls, line or paragraph separators, surrogates)."""
    t = "".join(c if 32 <= ord(c) < 127 or (utf8 and _printable_utf8(c)) else " " for c in text)
    return " ".join(t.split())[:limit]


def _printable_utf8(c: str) -> bool:
    o = ord(c)
    return o >= 0xA0 and not (0xD800 <= o <= 0xDFFF) and c not in "\u2028\u2029\ufeff"


def _addr(address: str, utf8: bool) -> str:
    """An address field's value: rfc822 for an ASCII address, RFC 6533's
    utf-8 type (utf-8-address) for a UTF-8 one in a global report."""
    if utf8 and not address.isascii():
        return f"utf-8; {_clean(address, 300, True)}"
    return f"rfc822; {_clean(address, 300)}"


def _text(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def _fold(name: str, value: str) -> str:
    """A DSN field, folded at spaces so that lines stay under 998 octets."""
    words = value.split(" ")
    lines, cur = [], f"{name}: "
    for w in words:
        if len(cur) + len(w) + 1 > 76 and cur.strip() != f"{name}:":
            lines.append(cur.rstrip())
            cur = "    " + w + " "
        else:
            cur += w + " "
    lines.append(cur.rstrip())
    return "\r\n".join(lines)


def build_report(
    *,
    kind: str,
    reporting_mta: str,
    queue_id: str,
    sender: str,
    arrival: float,
    failures: list[Failure],
    original_headers: bytes,
    now: float,
    postmaster: str | None = None,
    envid: str = "",
    full_message: bytes | None = None,
    too_big: int | None = None,
    smtputf8: bool = False,
) -> bytes:
    """The complete DSN message (headers and body) as bytes, CRLF endings.

    ``envid``: the client's ENVID (Original-Envelope-Id); ``full_message``:
    the whole message to return (RET=FULL within delivery.dsn_full_limit)
    instead of ``original_headers``; ``too_big``: RET=FULL was asked but the
    message is over that limit (the headers are returned, the text says so);
    ``smtputf8``: the original came with SMTPUTF8 (the RFC 6533 report, see
    the module docstring)."""
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    u = smtputf8
    h = _report_headers(kind, reporting_mta, sender, now, boundary, u)
    human = _human_part(kind, reporting_mta, queue_id, failures, u)
    if too_big is not None:
        human += (f"\r\nThe message is larger than {too_big} bytes: only its headers are returned.\r\n")
    status = _status_part(kind, reporting_mta, queue_id, sender, arrival, failures, envid, u)
    parts = _global_parts(h, boundary, human, status) if u else _parts(h, boundary, human, status)
    if full_message is not None:
        return b"".join(parts) + _returned_message(boundary, full_message, u)
    return b"".join(parts) + _returned_headers_part(boundary, kind, _returned_headers(original_headers), u)


def _global_parts(h: list[str], boundary: str, human: str, status: str) -> list[bytes]:
    """_parts of a global report (RFC 6533): UTF-8 where an address is."""
    human_b, status_b = _text(human), _text(status)
    eight = b"Content-Transfer-Encoding: 8bit\r\n"
    return [
        _text("\r\n".join(h)) + b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\nContent-Type: text/plain; charset="
        + (b"utf-8\r\n" + eight if not human_b.isascii() else b"us-ascii\r\n") + b"\r\n",
        human_b,
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\nContent-Type: message/global-delivery-status\r\n"
        + (eight if not status_b.isascii() else b"") + b"\r\n",
        status_b,
    ]


def _parts(h: list[str], boundary: str, human: str, status: str) -> list[bytes]:
    return [
        "\r\n".join(h).encode("ascii") + b"\r\n\r\n",
        b"This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
        human.encode("ascii", "replace"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
        status.encode("ascii", "replace"),
    ]


def _returned_message(boundary: str, message: bytes, utf8: bool = False) -> bytes:
    """3. the whole message (RET=FULL), as message/rfc822 (message/global)."""
    body = message if message.endswith(b"\r\n") else message + b"\r\n"
    ctype = b"message/global" if utf8 else b"message/rfc822"
    return b"".join([
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Undelivered Message\r\nContent-Type: " + ctype + b"\r\n"
        + (b"Content-Transfer-Encoding: 8bit\r\n" if not body.isascii() else b"") + b"\r\n",
        body,
        f"\r\n--{boundary}--\r\n".encode(),
    ])


def _returned_headers_part(boundary: str, kind: str, hdrs: bytes, utf8: bool = False) -> bytes:
    what = "Delivered" if kind == SUCCESS else "Undelivered"
    ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
    return b"".join([
        f"\r\n--{boundary}\r\n".encode(),
        f"Content-Description: {what} Message Headers\r\nContent-Type: {ctype}\r\n".encode()
        + (b"Content-Transfer-Encoding: 8bit\r\n" if not hdrs.isascii() else b"")
        + b"\r\n",
        hdrs,
        f"\r\n--{boundary}--\r\n".encode(),
    ])


def _report_headers(kind: str, reporting_mta: str, sender: str, now: float, boundary: str,
                    utf8: bool = False) -> list[str]:
    subject = ("Undelivered Mail Returned to Sender" if kind == FAILED
               else "Successful Mail Delivery Report" if kind == SUCCESS
               else "Delayed Mail (still being retried)")
    msgid = email.utils.make_msgid(domain=reporting_mta)
    from_name = Header("Mail Delivery System").encode()
    return [
        f"From: {from_name} <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(sender, 300, utf8)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={'global-' if utf8 else ''}delivery-status;"
        f'\r\n\tboundary="{boundary}"',
    ]


def _human_part(kind: str, reporting_mta: str, queue_id: str, failures: list[Failure], utf8: bool = False) -> str:
    """1. the human-readable part"""
    if kind == FAILED:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    elif kind == SUCCESS:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message was successfully delivered to the destination(s)",
            "listed below. If the message was delivered to mailbox you will",
            "receive no further notifications. Otherwise you may still receive",
            "notifications of mail delivery errors from other systems.",
        ]
    else:
        until = max((f.will_retry_until or 0) for f in failures) if failures else 0
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried" + (f" until {_date(until)}." if until else "."),
        ]
    intro += ["", f"Queue ID: {queue_id}", ""]
    for f in failures:
        where = f" (from {f.remote_mta})" if f.remote_mta else ""
        intro.append(f"<{_clean(f.recipient, 300, utf8)}>: {_clean(f.diagnostic)}{where}")
    return "\r\n".join(intro) + "\r\n"


def _status_part(kind: str, reporting_mta: str, queue_id: str, sender: str, arrival: float,
                 failures: list[Failure], envid: str = "", utf8: bool = False) -> str:
    """2. the machine-readable part (RFC 3464)"""
    per_msg = [f"Original-Envelope-Id: {_clean(envid, 100)}"] if envid else []
    per_msg += [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relay-Queue-ID: {queue_id}",
        f"X-Relay-Sender: {_addr(sender, utf8)}",
        f"Arrival-Date: {_date(arrival)}",
    ]
    blocks = ["\r\n".join(per_msg)]
    for f in failures:
        b = [f"Final-Recipient: {_addr(f.recipient, utf8)}"]
        if f.orcpt:
            b.append(f"Original-Recipient: {_clean(orcpt_field(f.orcpt, utf8), 600, utf8)}")
        elif f.original and f.original != f.recipient:
            b.append(f"Original-Recipient: {_addr(f.original, utf8)}")
        b.append(f"Action: {f.action or kind}")
        b.append(f"Status: {f.status}")
        if f.remote_mta:
            b.append(f"Remote-MTA: dns; {_clean(f.remote_mta, 255)}")
        b.append(_fold("Diagnostic-Code", f"{f.diagnostic_type}; {_clean(f.diagnostic)}"))
        if f.last_attempt:
            b.append(f"Last-Attempt-Date: {_date(f.last_attempt)}")
        if kind == DELAYED and f.will_retry_until:
            b.append(f"Will-Retry-Until: {_date(f.will_retry_until)}")
        blocks.append("\r\n".join(b))
    return "\r\n\r\n".join(blocks) + "\r\n"


def _returned_headers(original_headers: bytes) -> bytes:
    """3. the returned headers, byte for byte (bounded, cut at a line end)"""
    hdrs = original_headers[:MAX_RETURNED_HEADERS]
    if hdrs and not hdrs.endswith(b"\r\n"):
        hdrs = hdrs[: hdrs.rfind(b"\r\n") + 2] if b"\r\n" in hdrs else b""
    return hdrs
