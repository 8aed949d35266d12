"""One inbound SMTP connection's input and output: command lines in, replies
out, and the limits and timers around them.

The SMTP dialogue (what each command does) is in relay.smtp.server, which
subclasses ``SMTPConnection``; this module knows lines, bytes and time:

* Replies in command order, batched into one write per input chunk
  (PIPELINING, RFC 2920); while a command waits for a Deferred (``_wait``:
  AUTH, the final DATA commit) no later command is even parsed.
* Only CRLF ends a line; a bare CR or LF is an error, never a guess.
  Command lines over 512 octets (AUTH: 12288) are refused and skipped to
  their end; DATA bytes, and BDAT chunks (mode "bdat", raw: exactly the
  announced octets, relay.smtp.chunking), go to the session's
  ``_data_input`` as they come.
* Flow control on the output side: the session is its transport's push
  producer, so while the replies are not drained no further command is
  read or handled (``_sync_reading``); a long pipelined burst is handled
  over several reactor turns.
* One idle timer (relay.common.idle), paused while the client waits for
  us; a closing session whose client does not read its replies is aborted.
* Errors and junk commands are counted: past the limits the session ends.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.tcp import Server as _TCPServer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.common import connlimit
from relay.common.fastwrite import send_now
from relay.common.idle import IdleTimer
from relay.common.tls import session_info
from relay.config import Config
from relay.smtp.context import DelayedCall, ServerContext

log = Logger(namespace="relay.smtp")

MAX_COMMAND = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE = 12288  # RFC 4954 4
MAX_ERRORS = 20
BUSY_BUFFER_LIMIT = 1 << 20
CLOSE_GRACE = 30.0  # seconds a closing session waits for its last reply to drain
# Input read (not handled) while the replies are not drained, before the
# socket is not read either.  Not 0: a TLS layer pauses us while its
# handshake is in progress, and the handshake needs the socket read.
PAUSED_INPUT_LIMIT = 64 * 1024
RAW_MODES = ("data", "bdat")  # modes in which input is message data, not lines
LINES_PER_TURN = 256  # pipelined commands handled in one reactor turn before others get theirs


class Transport(Protocol):
    """What a session uses of its transport: TCP, TLS (ITLSTransport) and
    the producer methods, together (zope's interfaces cannot say so to mypy)."""

    connected: int

    def getPeer(self) -> Any: ...

    def setTcpNoDelay(self, enabled: bool) -> None: ...

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def startTLS(self, contextFactory: Any) -> None: ...


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer)
class SMTPConnection(TwistedProtocol):
    """The input and output of one session (see the module docstring)."""

    # set by makeConnection before connectionMade
    transport: Transport  # type: ignore[assignment]  # Protocol says ITransport | None; see Transport
    has_sender = False  # a MAIL transaction is open (the session's)
    _direct = False  # a plain TCP transport: replies go straight to the socket

    def __init__(self, ctx: ServerContext, implicit_tls: bool = False):
        self.ctx = ctx
        self.cfg: Config = ctx.config
        self.implicit_tls = implicit_tls
        # a bytearray: taking a line off the front is O(1) (del buf[:n]), so
        # a megabyte of pipelined commands is not copied once per line
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.busy = False
        self.closing = False
        self.discard_line = False  # skipping the rest of an over-long line
        self._more: DelayedCall | None = None  # the call that goes on with a long pipelined burst
        self.mode = "command"  # command | data | bdat | auth
        self.idle = IdleTimer(ctx.reactor, self._idle_expired)
        self.errors = 0
        self.peer_ip = "?"
        self.tls_active = False
        self.tls_info: dict[str, Any] | None = None
        self.paused = False  # input paused: busy with a megabyte of input waiting
        self._out_paused = False  # the transport asked us to stop: replies not drained
        self._read_paused = False  # transport.pauseProducing() in effect
        self._producing = False  # registered as the transport's producer
        self._abort_call: DelayedCall | None = None  # aborts a closed session whose client does not drain
        self.junk = 0  # commands that moved no mail forward (see _junk)
        self.shutting_down = False
        self.counted = False  # counted by the per-IP limiter

    # -- what the session does with its input --------------------------------
    def _line(self, raw: bytes) -> None:
        """A command line (without its CRLF)."""
        raise NotImplementedError

    def _data_input(self, chunk: bytes | None = None) -> None:
        """DATA bytes or a BDAT chunk's octets (None: what is in buf)."""
        raise NotImplementedError

    def _abort_incoming(self) -> None:
        """Drop the message being received, if any."""
        raise NotImplementedError

    # -- connection ------------------------------------------------------
    def connectionMade(self) -> None:
        self._direct = type(self.transport) is _TCPServer
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "?")
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # noqa: BLE001 - not TCP (tests, UNIX)
            pass
        if self.implicit_tls:
            self.tls_active = True
        ctx = self.ctx
        if not ctx.accepting:
            self._send_now("421 4.3.2 Service shutting down, try again later")
            self.transport.loseConnection()
            self.closing = True
            return
        limit = self.cfg.smtp.max_connections_per_ip
        admitted, count = ctx.limiter.acquire(self.peer_ip, limit)
        if not admitted:
            self._too_many(count)
            return
        self.counted = True
        fleet = connlimit.confirm(ctx.limiter, self.peer_ip, limit)  # limits.redis: the fleet's count
        if fleet is None:
            self._welcome()
            return
        self.busy = True  # nothing read before the greeting

        def answer(got: tuple[bool, int]) -> None:
            self.busy = False
            if self.closing:
                return
            if got[0]:
                self._welcome()
            else:
                self._too_many(got[1])

        fleet.addCallback(answer).addErrback(self._internal_error)

    def _too_many(self, count: int) -> None:
        log.info("reject: connect from [{client_ip}]: too many connections ({count})",
                 client_ip=self.peer_ip, count=count, reason="too_many_connections")
        self.ctx.counters.reject("too_many_connections")
        self._send_now("421 4.7.0 Too many connections from your address, try again later")
        self.transport.loseConnection()
        self.closing = True

    def _welcome(self) -> None:
        """The greeting, once the connection is admitted."""
        ctx = self.ctx
        ctx.counters.sessions += 1
        ctx.open_sessions.add(self)
        self.transport.registerProducer(self, True)
        self._producing = True
        self._send_now(f"220 {self.cfg.hostname} ESMTP twisted-relay")
        self._arm()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disarm()
        if self._more is not None and self._more.active():
            self._more.cancel()
        self._more = None
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._producing = False
        self._abort_incoming()
        self.closing = True
        if self.counted:
            self.counted = False
            self.ctx.limiter.release(self.peer_ip)
        self.ctx.open_sessions.discard(self)

    def handshakeCompleted(self) -> None:
        self.tls_info = session_info(self.transport)
        self.tls_active = True
        self.ctx.counters.tls += 1

    # -- shutdown ----------------------------------------------------------
    def begin_shutdown(self) -> None:
        """The relay stops: close now if idle, else after this transaction."""
        self.shutting_down = True
        if self.closing:
            return
        if not self.busy and self.mode == "command" and not self.has_sender:
            self._send_now("421 4.3.2 Service shutting down, closing connection")
            self._close()

    def force_shutdown(self) -> None:
        """The grace period is over: whatever is in progress was not acknowledged."""
        if self.closing:
            return
        self._abort_incoming()
        self._send_now("421 4.3.2 Service shutting down, closing connection")
        self._close()

    # -- timers ----------------------------------------------------------
    # One idle timer per session, moved lazily (relay.common.idle).

    def _arm(self) -> None:
        if not self.closing:
            self.idle.set(self.cfg.smtp.timeout)

    def _suspend(self) -> None:
        """No idle timeout while we make the client wait (disk, AUTH delay)."""
        self.idle.pause()

    def _disarm(self) -> None:
        self.idle.cancel()

    def _idle_expired(self) -> None:
        if not self.closing:
            self._timeout()

    def _timeout(self) -> None:
        self._disarm()
        log.info("timeout after {mode} from [{client_ip}]", mode=self.mode, client_ip=self.peer_ip)
        self._send_now("421 4.4.2 Timeout exceeded, closing connection")
        self._close()

    # -- output ------------------------------------------------------------
    def reply(self, code: int, text: str) -> None:
        lines = text.split("\n")
        for ln in lines[:-1]:
            self.out.append(b"%d-%s\r\n" % (code, ln.encode("ascii", "replace")))
        self.out.append(b"%d %s\r\n" % (code, lines[-1].encode("ascii", "replace")))

    def _flush(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out = []
            t = self.transport
            if not self.closing or t.connected:
                if self._direct:
                    send_now(t, data)  # the client waits for it: no reactor round trip
                else:
                    t.write(data)

    def _send_now(self, line: str) -> None:
        self.out.append(line.encode("ascii", "replace") + b"\r\n")
        self._flush()

    def _close(self) -> None:
        self._flush()
        self.closing = True
        self._disarm()
        if self._producing:
            # a paused producer would keep loseConnection waiting for ever
            self._producing = False
            self.transport.unregisterProducer()
        if self._read_paused:
            # TLS's close needs the peer's close_notify (or its FIN) read
            self._read_paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()
        if self._abort_call is None and getattr(self.transport, "connected", False):
            # A client that does not read its last replies would hold the
            # connection (and the buffer) open: give it a grace period.
            grace = min(CLOSE_GRACE, self.cfg.smtp.timeout)
            self._abort_call = self.ctx.reactor.callLater(grace, self._abort_unread)

    def _abort_unread(self) -> None:
        self._abort_call = None
        if getattr(self.transport, "connected", False):
            log.info("[{client_ip}]: closing: the client does not read its replies", client_ip=self.peer_ip)
            self.transport.abortConnection()

    # -- flow control (IPushProducer: the transport says when its buffer is full)
    def pauseProducing(self) -> None:
        self._out_paused = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        self._out_paused = False
        if self.closing:
            return
        self._sync_reading()
        if self._more is None and not self.busy and self.buf:
            self._process()

    def stopProducing(self) -> None:
        self._producing = False  # the connection is going away (connectionLost follows)

    def _sync_reading(self) -> None:
        """Read from the socket only while nothing holds the input back: the
        replies not drained with PAUSED_INPUT_LIMIT of input waiting, a long
        burst handed over to the next reactor turn (_more), or a wait (AUTH,
        commit) with a megabyte of input behind it."""
        hold = (self._more is not None or self.paused
                or (self._out_paused and len(self.buf) >= PAUSED_INPUT_LIMIT))
        if hold and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()
        elif not hold and self._read_paused and not self.closing:
            self._read_paused = False
            self.transport.resumeProducing()

    # -- errors ----------------------------------------------------------------
    def error(self, code: int, text: str) -> None:
        """A reply to a bad command; too many of them end the session."""
        self.reply(code, text)
        self._count_error()

    def _junk(self) -> None:
        """A command that moved no mail forward has been answered: past
        smtp.junk_command_limit it counts as an error too (Postfix's
        smtpd_junk_command_limit), so the error limit ends the session."""
        limit = self.cfg.smtp.junk_command_limit
        if not limit:
            return
        self.junk += 1
        if self.junk > limit:
            self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= MAX_ERRORS and not self.closing:
            self.reply(421, "4.7.0 Too many errors, closing connection")
            log.info("reject: [{client_ip}]: too many errors", client_ip=self.peer_ip, reason="too_many_errors")
            self.ctx.counters.reject("too_many_errors")
            self._close()

    # -- input ---------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self.mode in RAW_MODES and not self.busy:
            self._arm()  # in DATA: no more than timeout without data
            if not self.buf:
                self._data_input(data)  # the common case: straight to the reader, no copy
                self._process()
                return
        self.buf += data
        self._process()

    def _process(self) -> None:
        budget = LINES_PER_TURN
        while not self.busy and not self.closing and self.buf and not self._out_paused:
            if self.mode in RAW_MODES:
                self._data_input()
                continue
            budget -= 1
            if budget < 0:
                # a flood of pipelined commands: the other sessions get their
                # turn first, then this one goes on (input paused meanwhile)
                if self._more is None:
                    self._more = self.ctx.reactor.callLater(0, self._go_on)
                    self._sync_reading()
                break
            limit = MAX_AUTH_LINE if (self.mode == "auth" or self.buf[:5].upper() == b"AUTH ") else MAX_COMMAND
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > limit or self.discard_line:
                    if not self.discard_line:
                        self.error(500, "5.5.2 Line too long")
                        self.discard_line = True
                    del self.buf[:]
                break
            line = bytes(self.buf[: i + 1])
            del self.buf[: i + 1]
            if self.discard_line:
                self.discard_line = False
                continue
            if len(line) > limit:
                self.error(500, "5.5.2 Line too long")
                continue
            if not line.endswith(b"\r\n"):
                # A bare LF ends no command here (SMTP smuggling, RFC 5321
                # 2.3.8): what follows it must never run as a command of its
                # own, and there is no telling where the client meant its line
                # to end, so say so and hang up (Postfix's
                # smtpd_forbid_bare_newline does the same).
                self.reply(521, "5.5.2 Error: bare LF received (lines must end with CRLF)")
                log.info("reject: [{client_ip}]: bare LF in a command", client_ip=self.peer_ip,
                         reason="bare_newline")
                self.ctx.counters.reject("bare_newline")
                self._close()
                break
            if b"\r" in line[:-2]:
                self.error(500, "5.5.2 Syntax error: bare CR received (lines must end with CRLF)")
                continue
            self._arm()
            self._line(line[:-2])
        if not self.busy and not self.closing and self.mode not in RAW_MODES:
            if self.shutting_down and not self.has_sender and self.mode == "command":
                self.reply(421, "4.3.2 Service shutting down, closing connection")
                self._close()
                return
            if self.out:
                self._arm()
        self._flush()
        if self.paused and (not self.busy and len(self.buf) < BUSY_BUFFER_LIMIT):
            self.paused = False
        elif self.busy and len(self.buf) > BUSY_BUFFER_LIMIT and not self.paused:
            self.paused = True
        if not self.closing:
            self._sync_reading()

    def _go_on(self) -> None:
        self._more = None
        if self.closing:
            return
        self._sync_reading()
        self._process()

    def _wait(self, d: defer.Deferred[Any]) -> None:
        """Hold later commands until d fires (its callbacks queue replies)."""
        self.busy = True
        self._suspend()

        def done(_: object) -> None:
            self.busy = False
            if self.closing:
                return
            if self.mode not in RAW_MODES:
                self._arm()
            self._process()
            self._flush()

        d.addErrback(self._internal_error).addBoth(done)

    def _internal_error(self, failure: Failure) -> None:
        log.failure("internal error in SMTP session from [{client_ip}]", failure, client_ip=self.peer_ip)
        self.reply(451, "4.3.0 Internal error, try again later")
