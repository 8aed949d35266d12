"""Neutralising untrusted text in log lines (no Twisted here: pure functions).

Log lines are read by people on terminals and by programs (grep, fail2ban,
log shippers).  Much of what a line shows comes from the other side of a
connection: addresses, HELO names, user names, a next hop's reply.  None of
that may be able to pass for something the relay wrote itself, so every
field is rendered here before it reaches a line:

* every field: characters that are not printable (C0 and C1 controls, DEL,
  U+2028/U+2029, bidi overrides and other format characters, lone
  surrogates, spaces other than U+0020) are written as ``\\xNN``, ``\\uNNNN``
  or ``\\UNNNNNNNN``: a field can never start a line or drive a terminal;
* untrusted fields (``FIELD_KINDS``) also escape the backslash (so the
  escapes above are unambiguous) and, by their place in a line, the
  characters that delimit them there:

  - addresses (shown in ``<...>``): space, ``<``, ``>``, ``[``, ``]``; a
    domain literal (``user@[192.0.2.1]``) is kept as it is;
  - names (HELO, user names, file names, queue ids; shown bare): any
    white space, ``<``, ``>``, ``[``, ``]``, ``"``; a HELO that is exactly an
    address literal (``[192.0.2.1]``) is kept;
  - free text (replies, reasons, errors): controls and backslashes only;
    inside it, an address or name of the same event (a refused address
    quoted in a reply, a user name in an error) is shown escaped as in its
    own field.

A line longer than ``MAX_LINE`` characters is cut (``bound_lines``): no
reader splits it, so no part of a field ever starts a line elsewhere.

For normal input every function returns its argument unchanged (the same
object), so the lines scripts grep stay exactly as they were; only unusual
input is rendered differently.  JSON logs keep the exact values in their
fields (JSON's own escaping keeps them on one line, with ``ensure_ascii``
no raw control character) and show the neutralised line in ``text``.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Iterable

__all__ = ["control", "text", "token", "address", "helo", "multiline", "FIELD_KINDS", "neutralise",
           "format_fields"]


def _escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _escape(value: str, bad: re.Pattern | None, keep: str = "") -> str:
    out = []
    for c in value:
        if (c.isprintable() or c in keep) and c != "\\" and (bad is None or not bad.match(c)):
            out.append(c)
        else:
            out.append("\\\\" if c == "\\" else _escape_char(c))
    return "".join(out)


def control(value: str) -> str:
    """Any field: non-printable characters escaped (nothing else)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _escape_char(c) for c in value)


def multiline(value: str) -> str:
    """A traceback: keeps its newlines (the line writer indents what follows
    them, so no line of it can pass for a line of its own) and tabs."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() or c in "\n\t" else _escape_char(c) for c in value)


def text(value: str) -> str:
    """Untrusted free text (a reply, a reason): controls and backslashes escaped."""
    if value.isprintable() and "\\" not in value:
        return value
    return _escape(value, None)


_TOKEN_BAD = re.compile(r'[\s<>\[\]"\\]')


def token(value: str) -> str:
    """An untrusted name shown bare (``user=NAME``): no white space or brackets."""
    # (printable excludes every white space but " "; "in" is faster than a regex)
    if (value.isprintable() and " " not in value and "[" not in value and "]" not in value and "<" not in value
            and ">" not in value and '"' not in value and "\\" not in value):
        return value
    return _escape(value, _TOKEN_BAD)


_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f.:]+\]\Z", re.IGNORECASE)


def helo(value: str) -> str:
    """The client's HELO name (shown before ``[client_ip]``)."""
    if value[:1] == "[" and _LITERAL.match(value):
        return value
    return token(value)


_ADDR_BAD = re.compile(r"[\s<>\[\]\\]")


def address(value: str) -> str:
    """An untrusted address shown in ``<...>``."""
    if (value.isprintable() and " " not in value and "[" not in value and "]" not in value and "<" not in value
            and ">" not in value and "\\" not in value):
        return value
    local, at, domain = value.rpartition("@")
    if at and _LITERAL.match(domain):
        shown = _escape(local, _ADDR_BAD) + "@" + domain
        return value if shown == value else shown
    return _escape(value, _ADDR_BAD)


# Field names of relay events whose values come from outside, and how each is
# shown.  Any other string field gets ``control``.  A new event field that
# carries a peer's words belongs here.
FIELD_KINDS: dict[str, Callable[[str], str]] = {
    # addresses, always shown as <...>
    "sender": address, "rcpt": address, "to": address, "orig_to": address, "recipient": address,
    "orig_sender": address, "address": address, "orig_address": address, "header": token,
    # names shown bare
    "helo": helo, "user": token, "sasl_username": token, "name": token, "queue_id": token,
    "dsn_id": token, "client": token, "dest": token,
    # free text
    "reply": text, "reason": text, "why": text, "error": text, "err": text, "line": text,
    "diagnostic": text, "problem": text,
    # failures written by workers (relay.runtime.worker.EventPipe)
    "traceback": multiline,
}
_QUOTED_FIELDS = tuple(k for k, v in FIELD_KINDS.items() if v in (address, token, helo))
_FREE_TEXT_FIELDS = tuple(k for k, v in FIELD_KINDS.items() if v is text)
_SCALARS = (int, float, bool, type(None))

_formatter = string.Formatter()
_NAMES: dict[str, tuple[str, ...]] = {}


def format_fields(fmt: str) -> tuple[str, ...]:
    """The event fields a format string refers to ("{a.b[0]:>3}" -> "a")."""
    names = _NAMES.get(fmt)
    if names is None:
        seen = []
        try:
            for _, field, _, _ in _formatter.parse(fmt):
                if field:
                    base = re.split(r"[.\[(]", field, maxsplit=1)[0]
                    if base and base not in seen:
                        seen.append(base)
        except ValueError:
            pass  # an unformattable event: twisted's formatter says so
        names = tuple(seen)
        if len(_NAMES) < 4096:
            _NAMES[fmt] = names
    return names


def _render_object(kind: Callable[[str], str], value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        return kind(str(value))
    except Exception:  # noqa: BLE001 - a log line must never fail over a field
        return f"<unprintable {type(value).__name__}>"


_PLANS: dict[str, tuple[tuple[str, Callable[[str], str] | None], ...]] = {}
_MISSING = object()


_PRINTABLE_FORMATS: set[str] = set()


def _plan(fmt: str) -> tuple[tuple[str, Callable[[str], str] | None], ...]:
    plan = _PLANS.get(fmt)
    if plan is None:
        plan = tuple((name, FIELD_KINDS.get(name)) for name in format_fields(fmt))
        if len(_PLANS) < 4096:
            _PLANS[fmt] = plan
            if fmt.isprintable():
                _PRINTABLE_FORMATS.add(fmt)
    return plan


def neutralise(event: dict, fmt: str | None = None) -> dict:
    """``event`` with the fields its format ``fmt`` shows (default: all but
    ``log_*``) rendered for a line; the event itself when nothing needed a
    change (the common case: this runs for every line)."""
    return neutralise_checked(event, fmt)[0]


def neutralise_checked(event: dict, fmt: str | None = None) -> tuple[dict, bool]:
    """``neutralise``, and whether a shown field is an object whose str()
    was not checked (then the formatted text needs ``line_text``)."""
    objects = False
    if fmt is None:
        plan: Iterable = [(k, FIELD_KINDS.get(k)) for k in event if not k.startswith("log_") or k == "log_text"]
    else:
        plan = _plan(fmt)
        objects = fmt not in _PRINTABLE_FORMATS  # a format built from outside text, say
    changed: dict[str, Any] | None = None
    for name, kind in plan:
        value = event.get(name, _MISSING)
        if value.__class__ is str:
            if kind is None:
                if value.isprintable():
                    continue
                new = control(value)
            else:
                new = kind(value)
                if new is value:
                    continue
        elif value is _MISSING or isinstance(value, _SCALARS):
            continue
        elif kind is None:
            objects = True  # an object of an ordinary field: the whole line is checked after formatting
            continue
        else:
            new = _render_object(kind, value)
        if changed is None:
            changed = {}
        changed[name] = new
    if not changed:
        return event, objects
    # A reply quotes the address it refuses ("<a@b>: Relay access denied"), an
    # error the name it could not use: show such a value there as escaped as
    # in its own field (values too short to hold a marker are left alone).
    swaps = []
    for key in _QUOTED_FIELDS:
        raw = event.get(key)
        if key in changed and isinstance(raw, str) and len(raw) >= 8:
            shown = text(raw)
            if shown != changed[key]:
                swaps.append((shown, changed[key]))
                swaps.append((text(repr(raw)), "'" + changed[key] + "'"))  # "{name!r}: invalid ..."
    if swaps:
        for key in _FREE_TEXT_FIELDS:
            value = changed.get(key, event.get(key))
            if isinstance(value, str):
                for shown, escaped in swaps:
                    value = value.replace(shown, escaped)
                changed[key] = value
    out = dict(event)
    out.update(changed)
    return out, objects


# The longest line of a message the text log writes (characters).  A longer
# line is cut: readers split what they cannot hold (journald at LineMax,
# 48 KiB by default, makes the rest an entry of its own), and the rest of a
# line would then start with whatever the peer put there -- a next hop's
# reply can be 256 lines of 4 KiB.  At most 4 bytes a character, the cut
# line stays below journald's limit.
MAX_LINE = 8192


def bound_lines(value: str, limit: int = MAX_LINE) -> str:
    """``value`` with every line longer than ``limit`` cut, saying so."""
    if len(value) <= limit:
        return value
    out = []
    for line in value.split("\n"):
        if len(line) > limit:
            line = f"{line[:limit]}...[{len(line) - limit} more characters not logged]"
        out.append(line)
    return "\n".join(out)


def line_text(value: str) -> str:
    """The last check on a whole formatted text (an object's str(), a
    traceback): non-printable characters escaped, newlines and tabs kept
    (the line writer indents what follows a newline)."""
    return multiline(value)
