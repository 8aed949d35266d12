"""Incremental reader of an SMTP DATA stream (pure Python, no I/O).

It finds the end of the data, undoes dot-stuffing and checks the message,
a chunk at a time with bytes methods (C speed) instead of a Python call per
line.  Rules (RFC 5321 4.1.1.4, 4.5.2, 4.5.3.1.6; SMTP smuggling):

* Only CRLF "." CRLF ends the data.  The stream is read as if preceded by
  CRLF, so a "." line at the very start ends an empty message.
* A bare CR or a bare LF anywhere makes the message bad ("bare"); reading
  goes on to the real end so that nothing after it is read as commands.
* A line longer than 1000 octets with its CRLF makes it bad ("long").
* More than max_size bytes makes it bad ("size"); nothing more is kept.
* Received headers in the header section are counted (hop limit).

A bad message stops producing output; only the terminator is searched for,
over a 4-byte tail carried between chunks, so memory stays bounded whatever
the client sends.
"""

from __future__ import annotations

from typing import Any

from relay.common.dotstuff import unstuff_lines

MAX_LINE = 998  # octets of text per line, without CRLF


# The rules of message text, one copy for DATA (DataReader) and BDAT
# (relay.smtp.chunking.ChunkReader), so that the two can never disagree on
# what smuggling looks like.

def bare_cr_or_lf(text: bytes) -> bool:
    """Whether complete lines ``text`` hold a CR or LF that is not part of CRLF."""
    crlf = text.count(b"\r\n")
    return text.count(b"\r") != crlf or text.count(b"\n") != crlf


def long_line(text: bytes) -> bool:
    """Whether a line of ``text`` is longer than MAX_LINE (RFC 5321 4.5.3.1.6)."""
    return len(text) > MAX_LINE and max(map(len, text.split(b"\r\n"))) > MAX_LINE


def note_lines(reader: Any, text: bytes) -> None:
    """What a reader learns from accepted lines: the Received headers counted
    (hop count) while in the header block, whether the text is 8-bit."""
    if reader.in_headers:
        hp = b"\r\n" + text
        end = hp.find(b"\r\n\r\n")
        if end >= 0:
            reader.in_headers = False
            hp = hp[: end + 2]
        reader.received += hp.lower().count(b"\r\nreceived:")
    if not reader.eight_bit and not text.isascii():
        reader.eight_bit = True
TERM = b"\r\n.\r\n"


class DataReader:
    __slots__ = ("max_size", "carry", "tail", "size", "error", "in_headers", "received", "done",
                 "eight_bit")

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.carry = b""  # an incomplete line (starts at a line start)
        self.tail = b""  # in bad mode: the last bytes seen, for the terminator
        self.size = 0  # bytes of message text produced (after unstuffing)
        self.error: str | None = None  # None | "bare" | "long" | "size" | "io"
        self.in_headers = True
        self.received = 0
        self.done = False
        self.eight_bit = False

    def fail(self, reason: str) -> None:
        """Mark the message bad (e.g. a write failed); keep looking for the end."""
        if self.error is None:
            self.error = reason
            self.tail = (b"\r\n" + self.carry)[-4:]
            self.carry = b""

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """Consume chunk: (message text to store, bytes after the end or None)."""
        if self.error is not None:
            pre = self.tail + chunk
            i = pre.find(TERM)
            if i >= 0:
                self.done = True
                return b"", pre[i + 5 :]
            self.tail = pre[-4:]
            return b"", None
        data = self.carry + chunk if self.carry else chunk
        pre = b"\r\n" + data
        i = pre.find(TERM)
        if i >= 0:
            text = data[:i]
            rest: bytes | None = data[i + 3 :]
            self.carry = b""
            self.done = True
        else:
            cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0
            text = data[:cut]
            self.carry = data[cut:]
            rest = None
            if len(self.carry) > MAX_LINE + 1:
                # the last line is already too long: the message is bad
                self.error = "long"
                self.tail = pre[-4:]
                self.carry = b""
                return b"", None
        if not text:
            return b"", rest
        if bare_cr_or_lf(text):
            return self._bad("bare", pre, rest)
        text = unstuff_lines(text)
        if long_line(text):
            return self._bad("long", pre, rest)
        self.size += len(text)
        if self.size > self.max_size:
            return self._bad("size", pre, rest)
        note_lines(self, text)
        return text, rest

    def _bad(self, reason: str, pre: bytes, rest: bytes | None) -> tuple[bytes, bytes | None]:
        self.error = reason
        if rest is None:
            self.tail = pre[-4:]
            self.carry = b""
        return b"", rest
