"""One message as POP3 sends it: CRLF, TOP's cut, dot-stuffing, the final ".".

Two ways with one result (tests/test_pop3_unit.RenderTests checks that they
agree): ``render`` makes a small message's whole reply at once, a few
C-level replaces and no per-line Python (the fast path of RETR); a
``Streamer`` sends a large one from its file chunk by chunk, reading the next
chunk only while the transport is not paused, so memory stays at about one
chunk plus the transport's buffer whatever the message size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.common import dotstuff
from relay.mailbox import maildir

log = Logger(namespace="relay.pop3")

# the POP3 name of the one stuffer (its input: CRLF text, see maildir.ToCRLF)
DotStuffer = dotstuff.Stuffer


class TopFilter:
    """Passes the headers, the blank line and `lines` body lines (TOP n m).

    Works on CRLF text whose chunks never end in a lone CR.  A message
    without a blank line is all headers and is sent whole, as is one whose
    body has fewer lines than asked for (RFC 1939).
    """

    def __init__(self, lines: int):
        self.body_left = lines
        self.in_headers = True
        self.line_empty = True
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while True:
            i = data.find(b"\r\n", pos)
            if i < 0:
                if len(data) > pos:
                    self.line_empty = False
                return data
            empty = self.line_empty and i == pos
            pos = i + 2
            self.line_empty = True
            if self.in_headers:
                if empty:
                    self.in_headers = False
                    if self.body_left <= 0:
                        self.done = True
                        return data[:pos]
            else:
                self.body_left -= 1
                if self.body_left <= 0:
                    self.done = True
                    return data[:pos]


def render(data: bytes, top: int | None) -> bytes:
    """A whole small message as it goes on the wire (CRLF, TOP, stuffing, end).

    The fast path of RETR: a few C-level replaces, no per-line Python.
    """
    if b"\r" in data:
        text = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    else:
        text = data.replace(b"\n", b"\r\n")
    if top is not None:
        text = TopFilter(top).feed(text)
    return dotstuff.stuff_message(text)


class Streamer:
    """Sends one large message from a thread-read file, chunk by chunk.

    Driven by the connection's producer callbacks (``pause``, ``resume``,
    ``stop``).  It takes what it uses: ``run_blocking`` (a Deferred for a
    call in the disk pool: the reads and the close), ``write`` (straight to
    the transport), ``touch`` (the connection's idle timer) and ``abort``
    (drop the connection: a read failed halfway).
    """

    def __init__(self, fileobj: IO[bytes], top: int | None, *,
                 run_blocking: Callable[..., defer.Deferred[Any]], write: Callable[[bytes], object],
                 touch: Callable[[], None], abort: Callable[[], None]):
        self.file: IO[bytes] | None = fileobj
        self.run_blocking = run_blocking
        self.write = write
        self.touch = touch
        self.abort = abort
        self.conv = maildir.ToCRLF()
        self.top = TopFilter(top) if top is not None else None
        self.stuffer = DotStuffer()
        self.paused = False
        self.reading = False
        self.stopped = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        self._next()
        return self.done

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._next()

    def stop(self) -> None:
        self.stopped = True
        if not self.reading:
            self._close()
            if not self.done.called:
                self.done.callback(None)

    def _next(self) -> None:
        if self.paused or self.reading or self.stopped or self.done.called or self.file is None:
            return
        self.reading = True
        d = self.run_blocking(self.file.read, maildir.CHUNK)
        d.addCallbacks(self._got, self._failed)

    def _got(self, chunk: bytes) -> None:
        self.reading = False
        if self.stopped:
            self.stop()
            return
        if chunk:
            text = self.conv.feed(chunk)
        else:
            text = self.conv.flush()
        if self.top is not None:
            text = self.top.feed(text)
        out = self.stuffer.feed(text)
        finished = not chunk or (self.top is not None and self.top.done)
        if finished:
            out += self.stuffer.end()
        if out:
            self.write(out)
        self.touch()
        if finished:
            self._close()
            self.done.callback(None)
        else:
            self._next()

    def _failed(self, f: Failure) -> None:
        self.reading = False
        path = getattr(self.file, "name", "?")  # before _close() drops the file
        self._close()
        log.failure("pop3: reading {path} failed", f, path=path)
        # Part of the message is already out: never send the final "." (the
        # client would take a truncated message for a whole one); drop the line.
        self.abort()
        if not self.done.called:
            self.done.callback(None)

    def _close(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            self.run_blocking(f.close).addErrback(lambda _: None)
