"""The message body sent from the spool file: a push producer, dot-stuffed
(or, for a BDAT chunk, ``stuff=False``: the octets as they are, no ".").

Memory stays flat however big the message: one chunk is read at a time,
and the transport pauses the producer when its buffer is full.  The
dot-stuffing (relay.common.dotstuff) carries across chunk boundaries.  The
producer is given what it uses of the connection (its transport, clock,
and how to fail it), not the protocol object: relay.outbound.clientproto
creates it, and nothing here needs to know that protocol.
"""

from __future__ import annotations

from typing import IO, Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from relay.common import dotstuff
from relay.outbound.replies import ConversationError
from relay.outbound.request import MessageFile

CHUNK = 64 * 1024


class Consumer(Protocol):
    """What the producer uses of the transport."""

    def write(self, data: bytes) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class MessageProducer:
    """Reads the spool file in chunks and writes it dot-stuffed.

    A "." is doubled at the very start of the message and after every LF
    (so after every CRLF, whatever chunk boundary falls between the CRLF and
    the dot; doubling after a bare LF too keeps a lenient next hop from
    seeing an end of data we did not mean).  The bytes are otherwise sent
    exactly as stored; CRLF is added before ".\\r\\n" only when the message
    does not already end with one.

    ``fail(exc)`` gives up on the connection; ``lost()`` says whether it is
    gone (its ConversationError); ``finished()`` is called once the whole
    message and its "." are written, before the returned Deferred fires.
    """

    def __init__(
        self,
        transport: Consumer,
        clock: Any,  # IReactorTime
        message: MessageFile,
        block_timeout: float,
        *,
        fail: Callable[[ConversationError], None],
        lost: Callable[[], ConversationError | None],
        finished: Callable[[], None],
        stuff: bool = True,
    ):
        self.transport = transport
        self.clock = clock
        self.path = message.path
        self.offset = message.offset
        self.remaining = message.size
        self.size = message.size
        self.block_timeout = block_timeout
        self._fail = fail
        self._lost = lost
        self._finished = finished
        self.stuffer: dotstuff.Stuffer | None = dotstuff.Stuffer() if stuff else None
        self.paused = False
        self.finished = False
        self.sent = 0  # message bytes read and written so far (for tests/logs)
        self.d: defer.Deferred[None] = defer.Deferred()
        self.file: IO[bytes] | None = None
        self.timer: Any = None  # IDelayedCall

    def start(self) -> defer.Deferred[None]:
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 - closed by _close()
            self.file.seek(self.offset)
        except OSError as e:
            self._local_error(f"cannot read the queued message {self.path}: {e.strerror}")
            return self.d
        self.transport.registerProducer(self, True)
        self._arm()
        self.resumeProducing()
        return self.d

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.block_timeout)
        else:
            self.timer = self.clock.callLater(self.block_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self._fail(ConversationError("timeout", "message body"))

    def pauseProducing(self) -> None:
        self.paused = True  # the timer runs on: a stalled peer times out

    def resumeProducing(self) -> None:
        self.paused = False
        if self.finished:
            return
        self._arm()
        t = self.transport
        while not self.paused and not self.finished and self._lost() is None:
            if self.remaining == 0:
                self._finish()
                if self.stuffer is not None:
                    t.write(self.stuffer.end())
                self.d.callback(None)
                return
            assert self.file is not None  # open from start() until finished
            try:
                chunk = self.file.read(min(CHUNK, self.remaining))
            except OSError as e:
                self._local_error(f"cannot read the queued message {self.path}: {e.strerror}")
                return
            if not chunk:
                # Never end a truncated message with "." - abort, so the
                # server throws the transaction away.
                self._local_error(f"queued message {self.path} is shorter than its recorded size {self.size}")
                return
            self.remaining -= len(chunk)
            self.sent += len(chunk)
            t.write(self.stuffer.feed(chunk) if self.stuffer is not None else chunk)

    def stopProducing(self) -> None:
        self._close()

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        self._close()
        self.transport.unregisterProducer()
        self._finished()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _local_error(self, detail: str) -> None:
        self.finished = True
        self._disarm()
        self._close()
        exc = ConversationError("local", "message body", detail)
        if not self.d.called:
            self.d.errback(exc)
        self._fail(exc)

    def connection_lost(self, exc: ConversationError) -> None:
        self.finished = True
        self._disarm()
        self._close()
        if not self.d.called:
            self.d.errback(ConversationError(exc.kind, "message body", exc.detail))
