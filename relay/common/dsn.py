"""The DSN request of a message (RFC 3461): its syntax, its storage and what it asks for.

A client asks with MAIL parameters RET=FULL|HDRS and ENVID=xtext, and per
recipient with RCPT parameters NOTIFY=NEVER|SUCCESS,FAILURE,DELAY and
ORCPT=addr-type;xtext.  relay-sendmail's -R, -V and -N give the same.  This
module parses them (``DsnSyntax`` names the parameter, for the 501), holds
them as the envelope stores them (``DsnRequest``) and answers "does this
recipient want this kind of notice?" (``wants``), so the SMTP server, the
pickup, the queue and the outbound client share one reading.

Backscatter rule (docs/dsn.md): a request from an untrusted client (not
authenticated, not in relay.networks) is stored ``limited``: its SUCCESS and
DELAY are not honoured and not carried to the next hop, only NEVER and
FAILURE are (both reduce or keep today's notices; neither creates new mail
to a sender that may be forged).

Pure: no I/O; only relay.common.xtext.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relay.common import xtext

SUCCESS, FAILURE, DELAY, NEVER = "SUCCESS", "FAILURE", "DELAY", "NEVER"
_NOTIFY_ORDER = (SUCCESS, FAILURE, DELAY)
RETS = ("FULL", "HDRS")
MAX_ENVID = 100  # RFC 3461 4.4: the ENVID parameter (as sent) is at most 100 characters
MAX_ORCPT = 500  # RFC 3461 4.2


class DsnSyntax(ValueError):
    """A DSN parameter that is not valid: ``param`` is its name."""

    def __init__(self, param: str, why: str):
        super().__init__(f"Bad {param} parameter: {why}")
        self.param = param


def _printable(text: str) -> bool:
    return all(" " <= c <= "~" for c in text)


def _utf8_address(octets: str) -> bool:
    """An rfc822 ORCPT whose xtext octets are a UTF-8 address: Postfix sends a
    SMTPUTF8 recipient's ORCPT so (``rfc822;j+C3+B6rg@...``) where RFC 6533
    would say ``utf-8;``; taken, as long as it is valid UTF-8 without controls."""
    try:
        text = octets.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return False
    return all(c.isprintable() and c != " " for c in text if not c.isascii()) and _printable(
        "".join(c for c in text if c.isascii()))


def parse_ret(value: str | None) -> str:
    v = (value or "").upper()
    if v not in RETS:
        raise DsnSyntax("RET", "must be FULL or HDRS")
    return v


def parse_envid(value: str | None) -> str:
    """The envelope id, decoded from xtext (printable ASCII, RFC 3461 4.4)."""
    if not value:
        raise DsnSyntax("ENVID", "empty")
    if len(value) > MAX_ENVID:
        raise DsnSyntax("ENVID", f"longer than {MAX_ENVID} characters")
    try:
        text = xtext.decode(value)
    except xtext.XtextError as e:
        raise DsnSyntax("ENVID", str(e))
    if not _printable(text):
        raise DsnSyntax("ENVID", "not printable US-ASCII")
    return text


def parse_notify(value: str | None) -> str:
    """NEVER, or a subset of SUCCESS,FAILURE,DELAY in that order (canonical form)."""
    items = [v.strip().upper() for v in (value or "").split(",")]
    if not value or any(not v for v in items):
        raise DsnSyntax("NOTIFY", "empty")
    if NEVER in items:
        if len(items) > 1:
            raise DsnSyntax("NOTIFY", "NEVER cannot be combined with other values")
        return NEVER
    bad = [v for v in items if v not in _NOTIFY_ORDER]
    if bad:
        raise DsnSyntax("NOTIFY", f"unknown value {bad[0][:20]}")
    if len(set(items)) != len(items):
        raise DsnSyntax("NOTIFY", "a value is repeated")
    return ",".join(v for v in _NOTIFY_ORDER if v in items)


def parse_orcpt(value: str | None) -> str:
    """ORCPT as it is stored and carried: "addr-type;xtext", the type of
    rfc822 and utf-8 in lower case, the rest as given."""
    if not value or ";" not in value:
        raise DsnSyntax("ORCPT", "must be addr-type;address")
    if len(value) > MAX_ORCPT:
        raise DsnSyntax("ORCPT", f"longer than {MAX_ORCPT} characters")
    kind, _, addr = value.partition(";")
    if not kind or not all(c.isalnum() or c in "-_." for c in kind) or not kind.isascii():
        raise DsnSyntax("ORCPT", "bad address type")
    if not addr:
        raise DsnSyntax("ORCPT", "empty address")
    low = kind.lower()
    if low == "rfc822":
        try:
            text = xtext.decode(addr)
        except xtext.XtextError as e:
            raise DsnSyntax("ORCPT", str(e))
        if not (_printable(text) or _utf8_address(text)) or "@" not in text:
            raise DsnSyntax("ORCPT", "not an rfc822 address")
        return f"rfc822;{addr}"
    if low == "utf-8":  # RFC 6533: utf-8-addr-xtext or (with SMTPUTF8) -unitext; kept and carried as given
        try:
            xtext.decode("".join(c if c.isascii() else "x" for c in addr))
        except xtext.XtextError as e:
            raise DsnSyntax("ORCPT", str(e))
        if any(not c.isascii() and not c.isprintable() for c in addr):
            raise DsnSyntax("ORCPT", "not a utf-8 address")
        return f"utf-8;{addr}"
    return f"{kind};{addr}"


def orcpt_field(orcpt: str, utf8: bool = False) -> str:
    """The Original-Recipient field's value (RFC 3464 2.3.1): "type; address",
    rfc822 addresses decoded from xtext (Postfix does the same), others as
    given; a utf-8 one (RFC 6533 section 3) in the utf-8-address form (its
    \\x{HEX} decoded) in a global report (``utf8``), else in the 7-bit form."""
    kind, _, addr = orcpt.partition(";")
    if kind == "rfc822":
        try:
            octets = xtext.decode(addr)
        except xtext.XtextError:
            octets = addr
        if _printable(octets):
            addr = octets
        elif utf8 and _utf8_address(octets):  # Postfix's rfc822 form of a UTF-8 address, in a global report
            addr = octets.encode("latin-1").decode("utf-8")
    elif kind == "utf-8":
        addr = _EMBEDDED.sub(_unembed, addr) if utf8 else \
            "".join(c if c.isascii() else "\\x{%X}" % ord(c) for c in addr)
    return f"{kind}; {addr}"


_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unembed(m: re.Match[str]) -> str:
    """One EmbeddedUnicodeChar, decoded (a control or an invalid code point stays encoded)."""
    code = int(m.group(1), 16)
    if code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF or code > 0x10FFFF or 0x80 <= code < 0xA0:
        return m.group(0)
    return chr(code)


def rfc822_orcpt(address: str) -> str:
    """The ORCPT of a recipient that came without one (as Postfix adds it)."""
    return "rfc822;" + xtext.encode(address)


def notify_option(value: str) -> str:
    """relay-sendmail -N: "never" or a list of success, failure, delay (any case)."""
    return parse_notify(value)


def wants(notify: str | None, what: str, limited: bool = False) -> bool:
    """Whether a recipient whose NOTIFY is ``notify`` (None: not given) gets a
    ``what`` (SUCCESS, FAILURE, DELAY) notice; see the module docstring."""
    if limited and what in (SUCCESS, DELAY):
        return False
    if notify is None:
        return what in (FAILURE, DELAY)  # as without DSN: bounces and delay warnings
    return what in notify.split(",")


def effective_notify(notify: str | None, limited: bool) -> str | None:
    """The NOTIFY carried to a next hop: the request, without what is not honoured."""
    if notify is None or not limited:
        return notify
    kept = [v for v in notify.split(",") if v not in (SUCCESS, DELAY)]
    return ",".join(kept) if kept and kept != [NEVER] else NEVER


@dataclass(slots=True)
class DsnRequest:
    """What the envelope stores of a DSN request (key "dsn" of its line).

    ``notify`` and ``orcpt`` run parallel to the envelope's recipients (None:
    not given); ``envid`` is decoded; ``limited``: the backscatter rule."""

    ret: str = ""
    envid: str = ""
    notify: list[str | None] = field(default_factory=list)
    orcpt: list[str | None] = field(default_factory=list)
    limited: bool = False

    def empty(self) -> bool:
        return not (self.ret or self.envid or any(self.notify) or any(self.orcpt))

    def fit(self, n: int) -> None:
        """Pad or cut the per-recipient lists to n recipients."""
        self.notify = (list(self.notify) + [None] * n)[:n]
        self.orcpt = (list(self.orcpt) + [None] * n)[:n]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.ret:
            d["ret"] = self.ret
        if self.envid:
            d["envid"] = self.envid
        if any(self.notify):
            d["notify"] = self.notify
        if any(self.orcpt):
            d["orcpt"] = self.orcpt
        if self.limited:
            d["limited"] = True
        return d

    @classmethod
    def from_json(cls, d: Any, n: int) -> "DsnRequest":
        """From the envelope line; ValueError when it is not what to_json writes."""
        if not isinstance(d, dict):
            raise ValueError("dsn is not an object")
        ret, envid = d.get("ret", ""), d.get("envid", "")
        notify, orcpt = d.get("notify") or [None] * n, d.get("orcpt") or [None] * n
        if ret not in ("",) + RETS or not isinstance(envid, str):
            raise ValueError("bad dsn ret or envid")
        for lst in (notify, orcpt):
            if not isinstance(lst, list) or len(lst) != n or not all(x is None or isinstance(x, str) for x in lst):
                raise ValueError("bad dsn recipient list")
        return cls(ret, envid, list(notify), list(orcpt), bool(d.get("limited", False)))
