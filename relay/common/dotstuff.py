"""Dot-stuffing, both directions (SMTP, RFC 5321 4.5.2; POP3, RFC 1939 3).

Pure and cheap (a few C-level replaces per chunk, no per-line Python): the
SMTP client and POP3 server stuff what they send, relay-sendmail stuffs
what it submits over SMTP, the SMTP server's DATA reader unstuffs.

Sending: a "." is doubled at the very start of the text and after every LF
(so after every CRLF, whatever chunk boundary falls between the CRLF and
the dot; doubling after a bare LF too keeps a lenient next hop from seeing
an end of data we did not mean).  The end is ".CRLF", with a CRLF before it
only when the text does not already end with one.
"""

from __future__ import annotations

END = b".\r\n"
CRLF_END = b"\r\n.\r\n"


def stuff_message(data: bytes) -> bytes:
    """A whole message as it goes on the wire: stuffed and terminated."""
    out = data.replace(b"\n.", b"\n..") if b"\n." in data else data
    if out[:1] == b".":
        out = b"." + out
    if not data or data[-2:] == b"\r\n":
        return out + END
    return out + CRLF_END


class Stuffer:
    """The same for a message sent in chunks: ``feed`` each, then ``end``."""

    __slots__ = ("at_line_start", "last2")

    def __init__(self) -> None:
        self.at_line_start = True
        self.last2 = b""  # the text's last two octets (b"": nothing yet)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        out = data.replace(b"\n.", b"\n..") if b"\n." in data else data
        if self.at_line_start and data[:1] == b".":
            out = b"." + out
        self.at_line_start = data[-1:] == b"\n"
        self.last2 = (self.last2 + data[-2:])[-2:]
        return out

    def end(self) -> bytes:
        """The termination: CRLF if the text did not end with one, then ".CRLF"."""
        if self.last2 and self.last2 != b"\r\n":
            return CRLF_END
        return END


def unstuff_lines(text: bytes) -> bytes:
    """Receiving: text of whole CRLF lines (the first at a line start, the
    end of data already cut off), each line's leading "." removed."""
    if text[:1] == b"." or b"\r\n." in text:
        return (b"\r\n" + text).replace(b"\r\n.", b"\r\n")[2:]
    return text
