"""xtext (RFC 3461 section 4): the encoding of the DSN parameters ENVID and ORCPT.

xtext is printable US-ASCII from "!" to "~" except "+" and "=", with any
other octet written "+" and two hexadecimal digits.  The RFC asks for upper
case hex; a lower-case digit is accepted when decoding (a client's
spelling, not a syntax risk), and every encoding we write uses upper case.
Pure: no I/O, no other project module.
"""

from __future__ import annotations

_HEX = "0123456789ABCDEFabcdef"


class XtextError(ValueError):
    """Not xtext; the message says why (it goes into a 501 reply)."""


def decode(text: str) -> str:
    """The characters an xtext stands for (latin-1: one character per octet)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "+":
            h = text[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                raise XtextError("bad xtext: '+' not followed by two hex digits")
            out.append(chr(int(h, 16)))
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            raise XtextError(f"bad xtext: character {c!r} must be encoded")
        out.append(c)
        i += 1
    return "".join(out)


def encode(text: str) -> str:
    """The xtext of ASCII text (a non-ASCII character is encoded as its UTF-8 octets)."""
    out: list[str] = []
    for b in text.encode("utf-8"):
        c = chr(b)
        if "!" <= c <= "~" and c not in "+=":
            out.append(c)
        else:
            out.append("+%02X" % b)
    return "".join(out)
