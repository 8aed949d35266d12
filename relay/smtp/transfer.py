"""One message's DATA: the bytes after the 354 reply, read and checked by
relay.smtp.dataread, streamed into the intake's new message
(relay.intake.accept), up to the verdict at the end of the data.

Its own module so that the session (relay.smtp.server) only says when: a
``Transfer`` holds the message being received and its reader, writes what
the reader passes, and at the end says whether the message is refused (and
with what reply) or goes on to ``Intake.accept``, which makes it durable
before the session's 250.
"""

from __future__ import annotations

from typing import Protocol

from twisted.logger import Logger

from relay.intake.accept import Source
from relay.intake.rewrite import HeaderStage, log_rewrites
from relay.queue.spool import IncomingMessage
from relay.smtp.dataread import DataReader

log = Logger(namespace="relay.smtp")

# how the intake treats messages received over SMTP: no state file exists yet
SOURCE = Source(log, "{queue_id}: on_queued hook failed", state_file=False)

MAX_HOPS = 100  # Received headers (RFC 5321 6.3)

# DataReader.error -> (code, reply text, the reason counted and logged)
REJECTIONS: dict[str, tuple[int, str, str]] = {
    "bare": (550, "5.6.0 Message rejected: bare CR or LF in message data "
             "(only CRLF may end a line)", "bare_newline"),
    "long": (550, "5.6.0 Message rejected: line longer than 1000 octets in message data",
             "line_too_long"),
    "size": (552, "5.3.4 Message size exceeds fixed limit", "size"),
    "io": (452, "4.3.1 Insufficient system storage", "spool_error"),
    "hops": (554, "5.4.6 Too many hops: more than 100 Received headers (mail loop?)",
             "hops"),
}


class Reader(Protocol):
    """What a Transfer reads with: DataReader (DATA) or
    relay.smtp.chunking.ChunkReader (BDAT)."""

    error: str | None
    received: int
    eight_bit: bool

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]: ...

    def fail(self, reason: str) -> None: ...


class Transfer:
    """The DATA (or the BDAT chunks) of one message, up to the end of the data."""

    __slots__ = ("incoming", "queue_id", "reader", "_start", "stage")

    def __init__(self, incoming: IncomingMessage, max_size: int, stage: HeaderStage | None = None,
                 reader: Reader | None = None):
        self.incoming: IncomingMessage | None = incoming  # None once aborted
        self.queue_id = incoming.queue_id
        self.reader: Reader = reader if reader is not None else DataReader(max_size)
        self._start = True  # the first text of the message is still to come
        self.stage = stage  # sender rewriting of the header block (a trusted client), or None

    def feed(self, chunk: bytes) -> bytes | None:
        """Read a chunk of the data; the bytes after its end, or None while
        the data goes on."""
        text, rest = self.reader.feed(chunk)
        self._store(text, rest)
        return rest

    def end(self) -> None:
        """BDAT LAST: the data ends here (what the reader still holds is stored)."""
        text, rest = self.reader.end()  # type: ignore[attr-defined]  # a ChunkReader
        self._store(text, rest)

    def _store(self, text: bytes, rest: bytes | None) -> None:
        """Write text (rest not None: the data ended) to the spool file."""
        reader = self.reader
        if self.incoming is None or reader.error is not None:
            return
        if text and self._start:
            self._start = False
            if text[:1] in (b" ", b"\t"):
                # a first line starting with blanks would fold into our
                # Received header: end the header section there, as
                # Postfix's smtpd does
                text = b"\r\n" + text
        if self.stage is not None:
            # the rewriting holds the header block until its end (or the data's)
            text = self.stage.feed(text) + (self.stage.finish() if rest is not None else b"")
        if text:
            try:
                self.incoming.write(text)
            except OSError as e:
                log.error("{queue_id}: write to spool failed: {error}",
                          queue_id=self.incoming.queue_id, error=str(e))
                reader.fail("io")
                self.abort()

    def abort(self) -> None:
        """Nothing of this message is kept."""
        inc, self.incoming = self.incoming, None
        if inc is not None:
            inc.abort()

    def rejection(self) -> tuple[int, str, str] | None:
        """At the end of the data: (code, text, reason) if the message is
        refused (it is then aborted), None if it goes on to be queued."""
        reader = self.reader
        if reader.error is None and reader.received > MAX_HOPS:
            reader.error = "hops"
        if reader.error is None:
            if self.stage is not None:
                log_rewrites(log, self.queue_id, self.stage)
            return None
        self.abort()
        return REJECTIONS[reader.error]
