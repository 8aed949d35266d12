"""The message relay-sendmail reads on standard input: logical lines (LF or
CRLF; a bare CR refused), the header section (fields with their
continuation lines, an mbox "From " line dropped) and the folding of lines
over 998 octets, as Postfix does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from relay.intake.dropfile import MAX_LINE
from relay.intake.sysexits import EX_DATAERR, EX_IOERR, Fatal

MAX_HEADER_SECTION = 1 << 20
_HEADER = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


class Reader:
    """Standard input as logical lines without their line ending.

    Only LF or CRLF end a line; a CR anywhere else is refused (it would be a
    line ending to some and not to others: SMTP smuggling)."""

    def __init__(self, inp: BinaryIO, limit: int):
        self.inp = inp
        self.limit = limit
        self.lineno = 0
        self.total = 0
        self.eof = False

    def line(self) -> bytes | None:
        if self.eof:
            return None
        try:
            raw = self.inp.readline(self.limit + 2)
        except OSError as e:
            raise Fatal(EX_IOERR, f"cannot read the message from standard input: {e.strerror or e}")
        if not raw:
            self.eof = True
            return None
        self.lineno += 1
        self.total += len(raw)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        elif len(raw) >= self.limit + 2:
            raise Fatal(EX_DATAERR, f"message too big: over smtp.max_message_size ({self.limit} octets)")
        else:
            self.eof = True  # a last line without a line ending
        if b"\r" in raw:
            raise Fatal(EX_DATAERR, f"line {self.lineno}: bare CR (a carriage return not followed by a "
                                    "line feed): message refused; end lines with LF or CRLF")
        return raw


@dataclass
class Message:
    headers: list[list[bytes]]  # fields, each its lines (first + continuations)
    first_body: list[bytes]  # body lines read while looking for the end of the headers
    reader: Reader
    blank_missing: bool  # the body started without an empty line
    eight_bit: bool = False


def read_headers(rd: Reader) -> Message:
    headers: list[list[bytes]] = []
    size = 0
    first = True
    while True:
        ln = rd.line()
        if ln is None:
            return Message(headers, [], rd, False)
        if first and (ln.startswith(b"From ") or ln.lstrip(b">").startswith(b"From ")):
            first = False
            continue  # an mbox separator, as Postfix strips it
        first = False
        if ln == b"":
            return Message(headers, [], rd, False)
        if ln[:1] in (b" ", b"\t") and headers:
            headers[-1].append(ln)
        elif _HEADER.match(ln):
            headers.append([ln])
        else:
            # not a header: the body starts here, without its empty line
            return Message(headers, [ln], rd, True)
        size += len(ln) + 2
        if size > MAX_HEADER_SECTION:
            raise Fatal(EX_DATAERR, f"header section longer than {MAX_HEADER_SECTION} octets: message refused")


def field_name(f: list[bytes]) -> str:
    return f[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(f: list[bytes]) -> str:
    raw = b"".join([f[0].split(b":", 1)[1]] + f[1:])
    return raw.decode("utf-8", "replace").strip()


def fold(line: bytes, header: bool) -> list[bytes]:
    """Lines of at most MAX_LINE octets: headers fold before white space
    (lossless), else with an inserted space; body lines are broken."""
    out = []
    while len(line) > MAX_LINE:
        cut = -1
        if header:
            cut = max(line.rfind(b" ", 1, MAX_LINE), line.rfind(b"\t", 1, MAX_LINE))
        if cut > 0:
            out.append(line[:cut])
            line = line[cut:]
        else:
            out.append(line[:MAX_LINE])
            line = (b" " if header else b"") + line[MAX_LINE:]
    out.append(line)
    return out
