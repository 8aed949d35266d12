"""CHUNKING (RFC 3030): ``BDAT <size> [LAST]`` on the inbound server.

Its own module so that relay.smtp.server stays the dialogue of the other
commands; ``ChunkingSession`` sits between the connection (lines, bytes)
and the server (which subclasses it) and holds the BDAT state machine:

* After a BDAT command line exactly <size> octets of message data follow,
  read in raw mode (``mode == "bdat"``: the connection hands every byte to
  ``_data_input`` until the count is met, then reads command lines again).
  No dot-unstuffing, no terminator: a "." line or CRLF.CRLF inside a chunk
  is message text.
* The octets are always consumed, whatever the reply: a BDAT without a
  transaction (503, RFC 3030 4.2), a refused or failed chunk: so nothing a
  client put inside a chunk is ever read as a command.  A malformed BDAT
  line (no count) cannot be skipped: 501 and the session ends.
* The content obeys the rules of DATA (``ChunkReader``, the same checks as
  relay.smtp.dataread.DataReader): bare CR or LF, lines over 1000 octets,
  smtp.max_message_size (counted before the chunk is read: 552 5.3.4 once
  its octets are consumed), the Received hop count, and the same
  relay.smtp.transfer.Transfer (Received header, header rewriting, spool).
  BINARYMIME is not offered, so a chunk is text under the rules of text.
* Streaming: each piece of a chunk goes to the spool file as it arrives;
  only an incomplete last line (at most 1000 octets) is carried over.
* A non-LAST chunk is answered "250 2.0.0 <n> octets received" once read;
  LAST goes through the path of DATA's end (``_end_of_data``): 250 only
  after the durable commit.  A failed chunk ends the transaction: the
  chunks a pipelining client already sent get 503 (RFC 3030 2: "accept and
  discard additional BDAT chunks already in the pipeline").
* DATA after BDAT in one transaction: 503.  RSET, a new EHLO, a lost
  connection: the partial message is discarded (the incoming file removed).
"""

from __future__ import annotations

from typing import Any

from relay.smtp.connection import SMTPConnection
from relay.smtp.dataread import MAX_LINE, bare_cr_or_lf, long_line, note_lines
from relay.smtp.transfer import Transfer

BDAT_SYNTAX = "5.5.4 Syntax: BDAT chunk-size [LAST]"
MAX_SIZE_DIGITS = 20  # a count longer than this is nonsense, not a chunk


class ChunkReader:
    """The checks of DataReader over BDAT chunks: no unstuffing, no
    terminator (the session counts octets), the same errors ("bare",
    "long", "size", "io"); the same attributes the Transfer and the
    session read (error, received, eight_bit, size, done)."""

    __slots__ = ("max_size", "carry", "size", "error", "in_headers", "received", "done", "eight_bit")

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.carry = b""  # an incomplete line, carried to the next piece or chunk
        self.size = 0  # octets of message data announced so far
        self.error: str | None = None
        self.in_headers = True
        self.received = 0
        self.done = False
        self.eight_bit = False

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            self.carry = b""

    def announce(self, size: int) -> None:
        """A chunk of size octets comes: past the limit, the message is bad
        (its octets are read and thrown away)."""
        self.size += size
        if self.size > self.max_size:
            self.fail("size")

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """Message text to store (complete lines) from a piece of a chunk."""
        if self.error is not None:
            return b"", None
        data = self.carry + chunk if self.carry else chunk
        cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0
        text, self.carry = data[:cut], data[cut:]
        if len(self.carry) > MAX_LINE + 1:
            self.fail("long")
            return b"", None
        return self._check(text), None

    def end(self) -> tuple[bytes, bytes | None]:
        """The LAST chunk is read: the rest of the message (a last line
        without CRLF gets one, as the spool's messages all end in CRLF)."""
        self.done = True
        if self.error is not None:
            return b"", b""
        text, self.carry = self.carry, b""
        return self._check(text + b"\r\n" if text else b""), b""

    def _check(self, text: bytes) -> bytes:
        if not text:
            return b""
        if bare_cr_or_lf(text):
            self.fail("bare")
            return b""
        if long_line(text):
            self.fail("long")
            return b""
        note_lines(self, text)
        return text


class ChunkingSession(SMTPConnection):
    """The BDAT command and its chunks (see the module docstring); the
    server supplies the transaction (``_begin_message``, ``_end_of_data``)."""

    transfer: Transfer | None
    has_sender: bool
    recipients: list[Any]  # the transaction's accepted recipients (the server's)
    bdat_left = 0  # octets of the current chunk still to read
    bdat_last = False  # the current chunk is the LAST one
    bdat_size = 0  # octets announced by the current BDAT
    bdat_refusal: tuple[int, str] | None = None  # the reply to the current chunk, decided at its command

    # -- supplied by the server ---------------------------------------------
    def _begin_message(self, reader: ChunkReader) -> tuple[int, str] | None:
        """Open the message of the transaction (self.transfer); a refusal, or None."""
        raise NotImplementedError

    def _end_of_data(self, t: Transfer, stage: str = "DATA") -> None:
        raise NotImplementedError

    def _bdat_open(self) -> bool:
        """A message is being received by BDAT (between its chunks)."""
        return self.transfer is not None and isinstance(self.transfer.reader, ChunkReader)

    # -- the command ----------------------------------------------------------
    def do_BDAT(self, arg: str) -> None:
        parts = arg.split()
        if (not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > MAX_SIZE_DIGITS
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            # where this chunk ends is unknown: what follows cannot be told
            # from commands (smuggling), so the session ends here
            self.reply(501, BDAT_SYNTAX)
            self._count_error()
            self._close()
            return
        self.bdat_size = self.bdat_left = int(parts[0])
        self.bdat_last = len(parts) == 2
        self.bdat_refusal = None
        if not self._bdat_open():
            self.bdat_refusal = self._bdat_start()
        t = self.transfer
        if self.bdat_refusal is None and t is not None:
            reader = t.reader
            assert isinstance(reader, ChunkReader)
            reader.announce(self.bdat_size)
        self.mode = "bdat"
        if not self.bdat_left:
            self._bdat_done(b"")

    def _bdat_start(self) -> tuple[int, str] | None:
        if not self.has_sender:
            return (503, "5.5.1 Error: need MAIL command")
        if not self.recipients:
            return (554, "5.5.1 Error: no valid recipients")
        return self._begin_message(ChunkReader(self.cfg.smtp.max_message_size))

    # -- the chunk's octets ----------------------------------------------------
    def _bdat_input(self, chunk: bytes | None) -> None:
        """Octets in bdat mode (None: what is in buf)."""
        if chunk is None:
            n = self.bdat_left
            piece = bytes(self.buf[:n])
            del self.buf[:n]
            rest = b""
        else:
            piece, rest = chunk[: self.bdat_left], chunk[self.bdat_left:]
        self.bdat_left -= len(piece)
        t = self.transfer
        if t is not None and self.bdat_refusal is None and piece:
            t.feed(piece)
        if not self.bdat_left:
            self._bdat_done(rest)

    def _bdat_done(self, rest: bytes) -> None:
        """The chunk is read: its reply; rest (read after it) is commands."""
        if rest:
            self.buf[:0] = rest
        self.mode = "command"
        if self.bdat_refusal is not None:
            code, text = self.bdat_refusal
            self.bdat_refusal = None
            self.error(code, text)
            return
        t = self.transfer
        assert t is not None  # no refusal: the message is open
        if t.reader.error is not None:
            self._end_of_data(t, "BDAT")  # refused: logged, the transaction reset
        elif self.bdat_last:
            t.end()
            self._end_of_data(t, "BDAT")
        else:
            self.reply(250, f"2.0.0 {self.bdat_size} octets received")
