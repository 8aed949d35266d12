"""The outbound SMTP client's protocol: replies read and matched to waiters.

``ClientProtocol`` only parses replies (multi-line, strict "ddd-"/"ddd "),
matches them in order to waiters (so pipelined commands are answered in the
order sent; a pipelined group is one Deferred, ``expect_group``), runs one
timer per awaited reply, discards everything buffered after the reply to
STARTTLS (response injection), starts the TLS handshake and hands the
message to relay.outbound.msgproducer.  What to send when is the conversation's
business (relay.outbound.client, relay.outbound.handshake, relay.outbound.transactions).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.common import dotstuff
from relay.common.fastwrite import send_now
from relay.common.idle import IdleTimer
from relay.outbound.msgproducer import MessageProducer
from relay.outbound.replies import ConversationError, Reply
from relay.outbound.request import MessageFile

MAX_REPLY_LINE = 4096  # RFC 5321 says 512; be lenient, but bounded
MAX_REPLY_LINES = 256
MAX_EARLY_REPLIES = 8


class StreamTransport(TypingProtocol):
    """What the client uses of its TCP (or TLS) transport.  Twisted's
    ITransport is a zope interface that mypy reads as a plain class with
    methods lacking ``self``; this names the same methods structurally."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def startTLS(self, contextFactory: Any) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def setTcpNoDelay(self, enabled: bool) -> None: ...
    def getHandle(self) -> Any: ...


@dataclass
class _Waiter:
    d: defer.Deferred[Reply] | _Slot
    stage: str
    timeout: float
    tls_boundary: bool = False


GroupResult = list[tuple[bool, Any]]  # (True, Reply) or (False, Failure), one per command


class _Group:
    """The replies to a pipelined group of commands, as one Deferred that
    fires with [(ok, Reply or Failure)] once every one has an outcome (what
    a DeferredList of one Deferred per command gives, for less)."""

    __slots__ = ("d", "results", "left")

    def __init__(self, n: int):
        self.d: defer.Deferred[GroupResult] = defer.Deferred()
        self.results: GroupResult = [(False, None)] * n
        self.left = n

    def _set(self, i: int, ok: bool, value: Any) -> None:
        self.results[i] = (ok, value)
        self.left -= 1
        if self.left == 0:
            self.d.callback(self.results)


class _Slot:
    """One command of a _Group, standing in for its Deferred in _Waiter."""

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int):
        self.group = group
        self.index = index

    def callback(self, reply: Reply) -> None:
        self.group._set(self.index, True, reply)

    def errback(self, exc: BaseException | Failure) -> None:
        self.group._set(self.index, False, exc if isinstance(exc, Failure) else Failure(exc))


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """Reply parsing and waiting; the conversation lives in relay.outbound.client."""

    def __init__(self, clock: Any):  # IReactorTime
        self.clock = clock
        self._buf = b""
        self._lines: list[str] = []
        self._code: int | None = None
        self._waiters: deque[_Waiter] = deque()
        self._early: deque[Reply] = deque()
        self._reply_timer = IdleTimer(clock, self._reply_timed_out)
        self._failure: ConversationError | None = None
        self._discarding = False
        self.discarded = 0  # bytes thrown away after the reply to STARTTLS
        self.lost: ConversationError | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()  # fires when the connection is gone
        self._handshake: defer.Deferred[None] | None = None
        self._handshake_timer: Any = None  # IDelayedCall
        self.producer: MessageProducer | None = None
        self.stage = "greeting"

    @property
    def tcp(self) -> StreamTransport:
        """The transport (connected: only called after connectionMade)."""
        return cast(StreamTransport, self.transport)

    def idle_clean(self) -> bool:
        """Nothing received and not yet read (for a session parked idle)."""
        return not self._early and not self._buf

    # --------------------------------------------------------------- input
    def connectionMade(self) -> None:
        try:
            self.tcp.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            self.discarded += len(data)
            return
        self._buf += data
        while not self._discarding and self.lost is None and self._failure is None:
            i = self._buf.find(b"\r\n")
            if i < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            line, self._buf = self._buf[:i], self._buf[i + 2 :]
            self._line(line)
        if self._discarding and self._buf:
            self.discarded += len(self._buf)
            self._buf = b""

    def _line(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._protocol_error(f"malformed reply line {line[:80]!r}")
            return
        code = int(line[:3])
        if self._code is not None and code != self._code:
            self._protocol_error(f"reply code changed inside a multi-line reply ({self._code} then {code})")
            return
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            self._protocol_error("reply has too many lines")
            return
        if line[3:4] != b"-":
            reply = Reply(code, tuple(self._lines))
            self._lines, self._code = [], None
            self._reply(reply)

    def _reply(self, reply: Reply) -> None:
        if not self._waiters:
            # A reply nobody asked for yet (a server answering early); it is
            # the answer to the next command we wait for, as in a sequential
            # reader.  Too many of them is a broken or hostile server.
            self._early.append(reply)
            if len(self._early) > MAX_EARLY_REPLIES:
                self._protocol_error("too many unsolicited replies")
            return
        w = self._waiters.popleft()
        self._stop_timer()
        if w.tls_boundary:
            self._start_discarding()
        if self._waiters:
            self._start_timer(self._waiters[0])
        w.d.callback(reply)

    def _start_discarding(self) -> None:
        # Response injection: nothing the server sent after its reply to
        # STARTTLS, and before the handshake, may be believed.
        self._discarding = True
        self.discarded += len(self._buf) + sum(len(r.text) for r in self._early)
        self._buf = b""
        self._early.clear()
        self._lines, self._code = [], None

    # ------------------------------------------------------------- waiting
    def expect(self, stage: str, timeout: float, *, tls_boundary: bool = False) -> defer.Deferred[Reply]:
        """Deferred[Reply] for the next reply; fails with ConversationError."""
        if self.lost is not None:
            return defer.fail(self.lost)
        if self._early and not self._waiters:
            reply = self._early.popleft()
            if tls_boundary:
                self._start_discarding()
            return defer.succeed(reply)
        d: defer.Deferred[Reply] = defer.Deferred()
        w = _Waiter(d, stage, timeout, tls_boundary)
        self._waiters.append(w)
        if len(self._waiters) == 1:
            self._start_timer(w)
        return d

    def expect_group(self, specs: list[tuple[str, float]]) -> defer.Deferred[GroupResult]:
        """Deferred[list[(ok, Reply or Failure)]] for the next len(specs)
        replies, each (stage, timeout) timed like expect(); never fails."""
        g = _Group(len(specs))
        for i, (stage, timeout) in enumerate(specs):
            slot = _Slot(g, i)
            if self.lost is not None:
                slot.errback(self.lost)
            elif self._early and not self._waiters:
                slot.callback(self._early.popleft())
            else:
                w = _Waiter(slot, stage, timeout)
                self._waiters.append(w)
                if len(self._waiters) == 1:
                    self._start_timer(w)
        return g.d

    def send(self, *lines: bytes) -> None:
        """All lines in one write (a pipelined group is one TCP segment)."""
        t = self.transport
        if self.lost is None and t is not None:
            # the server waits for this: send it now (relay.common.fastwrite)
            send_now(t, b"".join(ln + b"\r\n" for ln in lines))

    def command(self, line: bytes, stage: str, timeout: float) -> defer.Deferred[Reply]:
        d = self.expect(stage, timeout)
        self.send(line)
        return d

    # One reply timer per connection, moved lazily (relay.common.idle): starting
    # and stopping it only sets the deadline.
    _deadline_stage = ""

    def _start_timer(self, w: _Waiter) -> None:
        self._deadline_stage = w.stage
        self._reply_timer.set(w.timeout)

    def _stop_timer(self) -> None:
        self._reply_timer.pause()

    def _cancel_timer(self) -> None:
        self._reply_timer.cancel()

    def _reply_timed_out(self) -> None:
        if self.lost is None:
            self.fail(ConversationError("timeout", self._deadline_stage))

    def _protocol_error(self, detail: str) -> None:
        self.fail(ConversationError("protocol", self.stage, detail))

    def fail(self, exc: ConversationError) -> None:
        """Give up on this connection: abort it, fail every waiter with exc."""
        if self._failure is None and self.lost is None:
            self._failure = exc
            if self.transport is not None:
                self.tcp.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        exc = self._failure
        if exc is None:
            detail = ""
            if reason is not None and not reason.check(error.ConnectionDone):
                detail = _describe_failure(reason)
            exc = ConversationError("lost", self.stage, detail)
        self.lost = exc
        self._cancel_timer()
        waiters, self._waiters = list(self._waiters), deque()
        for w in waiters:
            w.d.errback(exc)
        if self._handshake is not None and not self._handshake.called:
            self._stop_handshake_timer()
            hs, self._handshake = self._handshake, None
            hs.errback(
                ConversationError(exc.kind, "TLS handshake", exc.detail or (reason and _describe_failure(reason)) or "")
            )
        if self.producer is not None:
            self.producer.connection_lost(exc)
        self.closed.callback(None)

    # ----------------------------------------------------------------- TLS
    def start_tls(self, creator: Any, timeout: float) -> defer.Deferred[None]:
        """Start the handshake (creator: an IOpenSSLClientConnectionCreator);
        the Deferred fires when it completed."""
        self._discarding = False
        self._buf = b""
        hs: defer.Deferred[None] = defer.Deferred()
        self._handshake = hs
        self._handshake_timer = self.clock.callLater(timeout, self._handshake_timed_out)
        self.tcp.startTLS(creator)
        return hs

    def resume_plaintext(self) -> None:
        """STARTTLS was refused: carry on reading replies in plaintext."""
        self._discarding = False

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        self.fail(ConversationError("timeout", "TLS handshake"))

    def handshakeCompleted(self) -> None:
        self._stop_handshake_timer()
        if self._handshake is not None and not self._handshake.called:
            hs, self._handshake = self._handshake, None
            hs.callback(None)

    # ------------------------------------------------------------- message
    def send_small_message(self, data: bytes) -> None:
        """A message already in memory (at most CHUNK bytes): dot-stuffed and
        sent with its final "." in one write, as MessageProducer would."""
        if self.lost is not None:
            raise self.lost
        send_now(self.transport, dotstuff.stuff_message(data))

    def send_message(self, message: MessageFile, block_timeout: float, stuff: bool = True) -> defer.Deferred[None]:
        """Stream the message, dot-stuffed, then "." (not stuff: as it is,
        a BDAT chunk): fires when all is written."""
        if self.lost is not None:
            return defer.fail(self.lost)
        self.producer = MessageProducer(
            self.tcp, self.clock, message, block_timeout,
            fail=self.fail, lost=lambda: self.lost, finished=self._producer_finished, stuff=stuff,
        )
        return self.producer.start()

    def _producer_finished(self) -> None:
        self.producer = None


def _describe_failure(reason: Failure) -> str:
    v = reason.value
    if isinstance(v, SSL.Error):
        return f"TLS error: {_ssl_error_text(v)}"
    if isinstance(v, (error.ConnectionLost, error.ConnectionDone)):
        return ""  # "lost connection" already says it
    return v.__class__.__name__ + (f": {v}" if str(v) else "")


def _ssl_error_text(e: SSL.Error) -> str:
    parts = []
    for item in e.args[0] if e.args and isinstance(e.args[0], list) else []:
        if isinstance(item, tuple) and len(item) == 3:
            parts.append(str(item[2]))
    return ", ".join(parts) or str(e) or "handshake failed"


