"""What DKIM hashes (RFC 6376 3.4): a message's header block and its body, canonicalised, streaming.

Split from relay.intake.dkim (the keys, the choice of keys, the signature)
so each stays readable: this part is the one that reads the message.  The
header block is read on its own, in chunks, up to a bound (MessageError
past it: memory stays bounded whatever the message); the body is hashed
chunk by chunk by ``BodyHasher``, which carries across chunk boundaries a
CR split from its LF, a line's trailing white space and the empty lines at
the end, so a 100 MB message is hashed in the memory of a chunk (64 KiB).
Both canonicalisations: simple and relaxed.  Pure code, blocking.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 64 * 1024
MAX_HEADER_BYTES = 1024 * 1024
FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext


class DKIMError(Exception):
    """Base of the DKIM modules' errors (relay.intake.dkim raises its subclasses too)."""


class MessageError(DKIMError):
    """The message cannot be signed as it is (a header block past the bound,
    a line that is no header field): the caller sends it unsigned."""


# ---------------------------------------------------------------- header block

@dataclass(frozen=True)
class HeaderField:
    """One header field as it is in the message."""

    name: bytes  # before the colon, as written (trailing white space removed)
    raw: bytes  # the whole field: name, colon, value with its folding, final CRLF

    @property
    def value(self) -> bytes:
        """The field's value, folding and all, without the final CRLF."""
        return self.raw.split(b":", 1)[1][:-2]


def read_header_block(f: BinaryIO, start: int, limit: int = MAX_HEADER_BYTES) -> tuple[bytes, int]:
    """(header block up to and with its last CRLF, file offset of the body).

    Read in chunks up to the empty line: at most limit bytes of headers, then
    MessageError (a bound on memory whatever the message).  No empty line
    before the end of the file: all of it is headers and the body is empty."""
    f.seek(start)
    buf = b""
    while True:
        if buf.startswith(b"\r\n"):
            return b"", start + 2
        i = buf.find(b"\r\n\r\n", max(0, len(buf) - CHUNK - 3))
        if i + 2 > limit or (i < 0 and len(buf) > limit):
            raise MessageError(f"the header block is longer than {limit} bytes")
        if i >= 0:
            return buf[:i + 2], start + i + 4
        chunk = f.read(CHUNK)
        if not chunk:
            block = buf if buf.endswith(b"\r\n") or not buf else buf + b"\r\n"
            return block, start + len(buf)
        buf += chunk


def header_block_of(data: bytes, start: int, limit: int = MAX_HEADER_BYTES) -> tuple[bytes, int]:
    """read_header_block for a message held in memory (data from start): the same answer, no copy of the body."""
    if data.startswith(b"\r\n", start):
        return b"", start + 2
    i = data.find(b"\r\n\r\n", start)
    if i < 0:
        if len(data) - start > limit:
            raise MessageError(f"the header block is longer than {limit} bytes")
        rest = data[start:]
        return (rest if rest.endswith(b"\r\n") or not rest else rest + b"\r\n"), len(data)
    if i - start + 2 > limit:
        raise MessageError(f"the header block is longer than {limit} bytes")
    return data[start:i + 2], i + 4


def parse_header_fields(block: bytes) -> list[HeaderField]:
    """The fields of a header block, continuation lines joined to their field."""
    fields: list[tuple[bytes, list[bytes]]] = []
    lines = block.split(b"\r\n")
    for n, line in enumerate(lines[:-1], 1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise MessageError("the header block starts with a continuation line")
            fields[-1][1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not name or not FIELD_NAME.fullmatch(name):
            raise MessageError(f"header line {n} is not a field (a name and a colon)")
        fields.append((name, [line]))
    return [HeaderField(name, b"\r\n".join(parts) + b"\r\n") for name, parts in fields]


_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")


def compress_wsp(data: bytes) -> bytes:
    """Every run of spaces and tabs as one space.  Not re.sub: that makes an
    object per match (MBs for a 64 KiB chunk of short words); this makes
    a copy per halving of the longest run (and nothing for a base64 block:
    a search for one byte is memchr, for two bytes ten times slower)."""
    if b"\t" in data:
        data = data.translate(_TAB_TO_SPACE)
    elif b" " not in data:
        return data
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def canonicalize_header(fld: HeaderField, how: str) -> bytes:
    """RFC 6376 3.4.1 (simple: as is) and 3.4.2 (relaxed: name in lower case,
    unfolded, white space runs as one space, none around the value)."""
    if how == "simple":
        return fld.raw
    value = compress_wsp(fld.raw.split(b":", 1)[1].replace(b"\r\n", b"")).strip(b" ")
    return fld.name.lower() + b":" + value + b"\r\n"


@functools.lru_cache(maxsize=32)
def parse_canonicalization(c: str) -> tuple[str, str]:
    """(header, body) from a c= value: "relaxed/relaxed", "simple", ... (a body default of simple, RFC 6376 3.5)."""
    head, _, body = c.strip().lower().partition("/")
    body = body or "simple"
    if head not in ("simple", "relaxed") or body not in ("simple", "relaxed"):
        raise ValueError(f"{c!r} is not a canonicalization (simple or relaxed, header/body)")
    return head, body


# ---------------------------------------------------------------- body hash

_PARTIAL = 64 * 1024  # an incomplete line is hashed (all but its last 2 bytes) past this: memory stays bounded
_BLANKS = 32 * 1024  # empty lines hashed per update


class BodyHasher:
    """SHA-256 of a body canonicalised (RFC 6376 3.4.3 simple, 3.4.4 relaxed), fed in chunks of any size.

    Only complete lines are canonicalised; the bytes after the last CRLF wait
    for the next chunk (so a CR and its LF may arrive apart).  Empty lines are
    counted, not hashed, until text follows: those at the end of the body are
    not part of it.  An incomplete last line is hashed as it arrives: SMTP's
    DATA ends it with CRLF, so it gets its CRLF first, then its trailing
    white space goes (relaxed; verifiers that hash such a message as it is
    in a file differ among themselves).  An empty body is CRLF (simple) or
    nothing (relaxed)."""

    def __init__(self, canonicalization: str):
        if canonicalization not in ("simple", "relaxed"):
            raise ValueError(f"unknown body canonicalization {canonicalization!r}")
        self.relaxed = canonicalization == "relaxed"
        self._hash = hashlib.sha256()
        self._carry = b""  # after the last CRLF seen: an incomplete line
        self._blank = 0  # empty lines counted, not hashed yet
        self._midline = False  # the start of the current line is hashed already
        self._any = False  # anything hashed

    def update(self, data: bytes) -> None:
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\r\n") + 2
        if cut >= 2:
            self._lines(data[:cut])
            data = data[cut:]
        self._carry = data
        if len(data) > _PARTIAL:
            self._partial()

    def digest(self) -> bytes:
        if self._carry or self._midline:
            self.update(b"\r\n")
        if not self._any and not self.relaxed:
            self._hash.update(b"\r\n")
        return self._hash.digest()

    def _lines(self, block: bytes) -> None:
        """Complete lines (block ends with CRLF)."""
        if self.relaxed and (b" " in block or b"\t" in block):
            block = compress_wsp(block).replace(b" \r\n", b"\r\n")
        end = len(block) - 2  # the last line's CRLF; then count the empty lines before it, without a copy
        while end >= 2 and block.startswith(b"\r\n", end - 2):
            end -= 2
        blanks = (len(block) - end) // 2  # the last text line's CRLF and the empty lines after it
        if end > 0 or self._midline:
            self._flush_blanks()
            self._hash.update(block[:end])
            self._hash.update(b"\r\n")
            self._blank = blanks - 1
            self._any = True
        else:
            self._blank += blanks
        self._midline = False

    def _partial(self) -> None:
        """Hash most of a long incomplete line: all but a last CR (its LF may
        follow) and, relaxed, a last space (white space before CRLF goes)."""
        data = compress_wsp(self._carry) if self.relaxed else self._carry
        keep = 1 if data.endswith(b"\r") else 0
        if self.relaxed and data[:len(data) - keep].endswith(b" "):
            keep += 1
        text = data[:len(data) - keep]
        if text:
            self._flush_blanks()
            self._hash.update(text)
            self._midline = self._any = True
        self._carry = data[len(data) - keep:]

    def _flush_blanks(self) -> None:
        while self._blank:
            n = min(self._blank, _BLANKS)
            self._hash.update(b"\r\n" * n)
            self._blank -= n


def body_hash_of(data: bytes, start: int, canonicalization: str) -> bytes:
    """The body hash of data[start:], a body held in memory: BodyHasher's answer
    in a few calls on the whole body (no line of it can be past _PARTIAL, so
    nothing is hashed in parts); a longer body goes through BodyHasher."""
    if len(data) - start > _PARTIAL:
        h = BodyHasher(canonicalization)
        h.update(memoryview(data)[start:].tobytes())
        return h.digest()
    if canonicalization not in ("simple", "relaxed"):
        raise ValueError(f"unknown body canonicalization {canonicalization!r}")
    body = data[start:] if start else data
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # SMTP ends the last line (see BodyHasher)
    if canonicalization == "relaxed" and (b" " in body or b"\t" in body):
        body = compress_wsp(body).replace(b" \r\n", b"\r\n")
    end = len(body) - 2  # the last line's CRLF; the empty lines before it are not part of the body
    while end >= 2 and body.startswith(b"\r\n", end - 2):
        end -= 2
    if end > 0:
        return hashlib.sha256(memoryview(body)[:end + 2]).digest()
    return hashlib.sha256(b"" if canonicalization == "relaxed" else b"\r\n").digest()


def body_hash(f: BinaryIO, start: int, canonicalization: str, chunk_size: int = CHUNK) -> bytes:
    """The body hash (raw SHA-256) of the body from file offset start to the end, read in chunks."""
    f.seek(start)
    h = BodyHasher(canonicalization)
    while chunk := f.read(chunk_size):
        h.update(chunk)
    return h.digest()
