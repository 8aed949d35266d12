"""The POP3 server (RFC 1939, 2449, 2595, 3206, 5034) over local Maildirs: one connection.

Written on ``twisted.internet.protocol`` rather than ``twisted.mail.pop3``,
whose POP3 class has no STLS, advertises capabilities it lacks, deletes at
DELE instead of QUIT, answers pipelined commands through many small writes
(~44 ms per RETR with Nagle + delayed ACK) and whose MaildirMailbox breaks
on Python 3 and changes UIDLs when files move.

What the server guarantees, and why.  (POP3Server, here, is one connection;
its commands are in relay.mailbox.pop3auth and relay.mailbox.pop3transaction,
messages go on the wire through relay.mailbox.pop3message, what those share
is in relay.mailbox.pop3session, and the factory is relay.mailbox.pop3.)

* One reply = one ``transport.write`` (and TCP_NODELAY): replies never wait
  for the client's delayed ACK, and pipelined replies coalesce into few
  segments.  Commands are handled strictly one after another, so pipelined
  commands are answered in order even when one of them waits on a thread.
* Speed (poplib fetches one message per round trip, so latency is all):
  once the commands at hand are answered, a plain TCP transport is told to
  send at once (``doWrite``) instead of on the next reactor turn; then,
  while the client reads, the next message is read ahead and rendered, and
  up to SEEN_INLINE retrieved messages are renamed new/ -> cur/.
* Nothing slow runs on the reactor: password hashing, opening/listing the
  Maildir, deleting, reading large messages and bursts of renames happen in
  a thread pool (``factory.run_blocking``).  Password checks (scrypt, which
  anyone can ask for without an account) go to the small pool of their own
  the relay gives SMTP AUTH (``factory.run_auth``), never to the disk pool
  whose fsyncs stand behind every SMTP 250.
* At most ``max_connections_per_ip`` connections from one address (counted
  by ``factory.limiter``, a relay.common.connlimit counter that the relay shares
  between its POP3 listeners and, with workers, between its processes, as
  SMTP's); more get -ERR [SYS/TEMP]
  and are closed.  Messages up to INLINE_MAX
  octets are read inline (a page-cache read of a few KB costs less than a
  thread hop), as are the renames above (metadata only, no fsync).
* Large messages are streamed: the protocol is the transport's push
  producer, and reads the next chunk only when the transport has drained.
* The mailbox is locked (flock + a dot-lock that holds across hosts, see
  relay.mailbox.mboxlock.MailboxLock, kept fresh by relay.mailbox.pop3lock) from login
  until the session ends however it ends; DELE only marks, and files are
  removed only when QUIT arrives in the TRANSACTION state.
* STLS discards anything the client sent after the STLS line (command
  injection, CVE-2011-0411 class) before the handshake.
* Every line is length-limited (255 octets with CRLF, RFC 2449); only CRLF
  ends a line; a too-long line is discarded whole with an -ERR, never read
  as several commands.

Time comes from ``factory.reactor``, so unit tests drive it with task.Clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet import defer, interfaces, tcp
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.common import connlimit
from relay.common.idle import IdleTimer
from relay.mailbox.pop3auth import AuthorizationCommands
from relay.mailbox.pop3message import Streamer
from relay.mailbox.pop3session import CommandError, FactoryView, Session, Transport, cmd_error, no_args
from relay.mailbox.pop3transaction import TransactionCommands

log = Logger(namespace="relay.pop3")

MAX_COMMAND = 255  # octets including CRLF (RFC 2449 section 4)
MAX_SASL_LINE = 2048  # a base64 SASL response line (user + password + authzid)
MAX_INPUT_BUFFER = 64 * 1024  # pipelined input held before we stop reading
IMPLEMENTATION = "twisted-relay"

_TOO_LONG = object()


@implementer(interfaces.IPushProducer)
class POP3Server(AuthorizationCommands, TransactionCommands, Protocol):
    """One POP3 connection.  See the module docstring for the rules.

    Its commands are in the mixins, by RFC 1939 state: AUTHORIZATION in
    relay.mailbox.pop3auth, TRANSACTION in relay.mailbox.pop3transaction;
    this class holds the connection, its flow control, the input framing,
    the dispatch and the commands of both states (CAPA, NOOP, QUIT, STLS).
    """

    factory: FactoryView
    transport: Transport  # type: ignore[assignment]  # Protocol says ITransport | None; set at connect

    def __init__(self, factory: FactoryView):
        self.factory = factory
        self.peer = "?"
        self._buf = bytearray()
        self._pos = 0
        self._discarding = False
        self._busy = False
        self._processing = False
        self._closing = False
        self._out_paused = False
        self._in_paused = False
        self._idle: IdleTimer | None = None
        self._tls_started = False
        self._user: str | None = None
        self._sasl: str | None = None
        self._failures = 0
        self._bad = 0
        self.session: Session | None = None
        self._streamer: Streamer | None = None
        self._quitting: defer.Deferred | None = None
        self._producing = False
        self._lost = False
        self._delay: defer.Deferred | None = None
        self._unflushed = False
        self._can_flush = False
        self._prefetched: tuple[int, bytes] | None = None  # (index, RETR reply)
        self._counted = False  # counted in factory.limiter
        self._abort_call = None  # aborts a closed session whose client does not drain

    # -- connection ---------------------------------------------------------
    def connectionMade(self) -> None:
        f = self.factory
        f.open_sessions += 1
        try:
            self.peer = self.transport.getPeer().host
        except Exception:  # noqa: BLE001 - a transport without addresses (tests)
            self.peer = "?"
        admitted, count = f.limiter.acquire(self.peer, f.max_connections_per_ip)
        if not admitted:
            self._too_many(count)
            return
        self._counted = True
        fleet = connlimit.confirm(f.limiter, self.peer, f.max_connections_per_ip)  # limits.redis
        if fleet is None:
            self._greet()
            return
        self._busy = True  # nothing read before the greeting

        def answer(got: tuple[bool, int]) -> None:
            self._busy = False
            if self._lost or self._closing:
                return
            if got[0]:
                self._greet()
                self._process()
            else:
                self._too_many(got[1])

        fleet.addCallback(answer).addErrback(
            lambda fl: log.failure("pop3: connection limit check failed", fl) if not self._lost else None)

    def _too_many(self, count: int) -> None:
        log.info("pop3: reject: connect from [{client_ip}]: too many connections ({count})",
                 client_ip=self.peer, count=count, reason="too_many_connections")
        self._write(b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n")
        self._close()

    def _greet(self) -> None:
        f = self.factory
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:  # not on UNIX sockets or test transports
            try:
                nodelay(True)
            except OSError:
                log.debug("pop3: cannot set TCP_NODELAY")
        self.transport.registerProducer(self, True)
        self._producing = True
        self._can_flush = isinstance(self.transport, tcp.Connection)  # stays so after STLS
        self._idle = IdleTimer(f.reactor, self._timedOut)
        self._idle.set(f.idle_timeout)
        host = f.hostname.replace("\r", "").replace("\n", "")
        self._write(f"+OK {host} POP3 server ready\r\n".encode("utf-8", "replace"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.factory.open_sessions -= 1
        if self._counted:
            self._counted = False
            self.factory.limiter.release(self.peer)
        if self._idle is not None:
            self._idle.cancel()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._delay is not None and not self._delay.called:
            self._delay.cancel()
        if self._streamer is not None:
            self._streamer.stop()
            self._streamer = None
        s = self.session
        if s is not None:
            self.session = None
            if self._quitting is None:
                # Not QUIT: nothing is deleted (RFC 1939 section 6).
                self._end_session(s, deleted=0, reason="connection closed")

    @property
    def secure(self) -> bool:
        """True once the connection is TLS (STLS done, or an implicit TLS endpoint)."""
        return self._tls_started or interfaces.ISSLTransport.providedBy(self.transport)

    def _write(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data)
            self._unflushed = True

    def _closing_now(self) -> None:
        """Nothing more is read; stop being the transport's producer (a
        registered producer would stall the close)."""
        self._closing = True
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

    def _close(self) -> None:
        """Close after the pending output."""
        self._closing_now()
        self.transport.loseConnection()
        if self._abort_call is None and not self._lost:
            # A client that does not read its last replies would hold the
            # connection (and its place in the per-address count) for ever.
            self._abort_call = self.factory.reactor.callLater(self.factory.close_grace, self._abort_unread)

    def _abort_unread(self) -> None:
        self._abort_call = None
        if not self._lost:
            log.info("pop3: closing: the client does not read its replies client={client}", client=self.peer)
            self.transport.abortConnection()

    def _abort(self) -> None:
        self._closing_now()
        self.transport.abortConnection()

    def _touch(self) -> None:
        """Note activity: the idle deadline moves (relay.common.idle: lazily, not a
        heap operation per line; a timeout shortened meanwhile applies)."""
        if self._idle is not None:
            self._idle.set(self.factory.idle_timeout)

    def _timedOut(self) -> None:
        log.info("pop3: idle timeout, closing client={client} user={user}",
                 client=self.peer, user=self.session.user if self.session else None)
        if self._streamer is not None:
            # The client stopped reading a message: no point flushing.
            self._abort()
            return
        self._write(b"-ERR Disconnected for inactivity\r\n")
        self._close()

    # -- IPushProducer (the transport tells us when its buffer is full) ----
    def pauseProducing(self) -> None:
        self._out_paused = True
        if self._streamer is not None:
            self._streamer.pause()

    def resumeProducing(self) -> None:
        self._out_paused = False
        if self._streamer is not None:
            self._streamer.resume()
        self._process()

    def stopProducing(self) -> None:
        self._producing = False
        if self._streamer is not None:
            self._streamer.stop()

    # -- input framing ------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if (not self._buf and not self._discarding and not self._busy and not self._out_paused
                and not self._processing and len(data) <= MAX_COMMAND and data[-1:] == b"\n"
                and data.count(b"\n") == 1):
            # The common case, one whole command per read (a client waiting
            # for each reply): no buffering.
            self._processing = True
            try:
                self._touch()
                self._dispatch(data[:-1])
            finally:
                self._processing = False
            if self._buf:  # a Deferred that fired at once may have left work
                self._process()
            else:
                self._after_replies()
            return
        self._buf += data
        self._process()

    def _after_replies(self) -> None:
        """Once a batch of commands is answered: push the replies out now and
        read ahead the message a client fetching in order will ask for next
        (TransactionCommands._while_client_reads)."""
        if self._lost or self._busy or self._out_paused or self._closing:
            return
        t = self.transport
        # Twisted would send the buffered replies on its next loop turn; a
        # client waiting for them would wait that turn too.  On a plain TCP
        # transport (also after STLS) doWrite() sends them now.
        if self._unflushed and self._can_flush and t.connected and not t.disconnecting:
            self._unflushed = False
            t.doWrite()
        self._while_client_reads()
    def _line_limit(self) -> int:
        return MAX_SASL_LINE if self._sasl else MAX_COMMAND

    def _next_line(self):
        buf = self._buf
        i = buf.find(b"\n", self._pos)
        if i < 0:
            if self._discarding:
                del buf[:]
                self._pos = 0
            elif len(buf) - self._pos >= self._line_limit():
                self._discarding = True
                del buf[:]
                self._pos = 0
            return None
        start, self._pos = self._pos, i + 1
        if self._discarding or i + 1 - start > self._line_limit():
            self._discarding = False
            line = _TOO_LONG
        else:
            line = bytes(buf[start:i])
        if self._pos >= len(buf):
            del buf[:]
            self._pos = 0
        elif self._pos > 65536:
            del buf[: self._pos]
            self._pos = 0
        return line

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not (self._busy or self._closing or self._out_paused):
                line = self._next_line()
                if line is None:
                    break
                self._touch()
                self._dispatch(line)
        finally:
            self._processing = False
        pending = len(self._buf) - self._pos
        if not pending:
            self._after_replies()
        if not self._in_paused and pending > MAX_INPUT_BUFFER and not self._closing:
            self._in_paused = True
            self.transport.pauseProducing()
        elif self._in_paused and (pending < MAX_INPUT_BUFFER // 2 or self._closing):
            self._in_paused = False
            if not self._closing:
                self.transport.resumeProducing()

    def _dispatch(self, line) -> None:
        try:
            if line is _TOO_LONG:
                self._sasl = None
                raise cmd_error(f"Line too long (max {MAX_COMMAND} octets with CRLF)", bad=True)
            if not line.endswith(b"\r"):
                self._sasl = None
                raise cmd_error("Line must end with CRLF", bad=True)
            line = line[:-1]
            if b"\r" in line:
                self._sasl = None
                raise cmd_error("Bare CR in command line", bad=True)
            if self._sasl is not None:
                result = self._sasl_response(line)
            else:
                result = self._command(line)
        except CommandError as e:
            self._write(e.reply)
            if e.bad:
                self._bad_command()
            return
        except Exception:  # noqa: BLE001 - a bug must not kill the connection silently
            log.failure("pop3: internal error handling a command from {client}", client=self.peer)
            self._write(b"-ERR [SYS/TEMP] Internal server error\r\n")
            return
        if result is not None:  # a Deferred (isinstance on it is an ABC check: slow)
            self._busy = True
            result.addErrback(self._internal_error)
            result.addBoth(self._finished)

    def _internal_error(self, f: Failure) -> None:
        log.failure("pop3: internal error for {client}", f, client=self.peer)
        self._write(b"-ERR [SYS/TEMP] Internal server error\r\n")

    def _finished(self, _: Any) -> None:
        self._busy = False
        if not self._lost:
            self._process()

    def _bad_command(self) -> None:
        self._bad += 1
        if self._bad >= self.factory.max_bad_commands:
            self._write(b"-ERR Too many bad commands, closing connection\r\n")
            log.info("pop3: too many bad commands from {client}", client=self.peer)
            self._close()

    # -- commands -------------------------------------------------------------
    def _command(self, line: bytes):
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if self.session is None:
            handler = self._AUTH_COMMANDS.get(verb)
        else:
            handler = self._TRANS_COMMANDS.get(verb)
        if handler is None:
            name = verb.decode("ascii", "replace")
            if verb in self._AUTH_COMMANDS or verb in self._TRANS_COMMANDS:
                state = "TRANSACTION" if self.session else "AUTHORIZATION"
                raise cmd_error(f"{name} is not valid in the {state} state", bad=True)
            raise cmd_error("Unknown command", bad=True)
        return handler(self, arg)

    # AUTHORIZATION state

    def do_CAPA(self, arg: bytes) -> None:
        no_args(arg, "CAPA")
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.session is None:
            if self._login_allowed():
                caps += ["USER", "SASL PLAIN"]
            caps.append("UTF8 USER")  # RFC 6856: UTF-8 user names in USER/PASS and AUTH
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        body = "\r\n".join(caps[1:])
        self._write(f"+OK Capability list follows\r\n{body}\r\n.\r\n".encode("ascii"))

    def do_NOOP(self, arg: bytes) -> None:
        no_args(arg, "NOOP")
        self._write(b"+OK\r\n")

    def do_STLS(self, arg: bytes) -> None:
        no_args(arg, "STLS")
        f = self.factory
        if self.secure:
            raise cmd_error("TLS is already active", bad=True)
        if f.tls_options is None:
            raise cmd_error("STLS is not available (no certificate configured)", bad=True)
        self._write(b"+OK Begin TLS negotiation\r\n")
        # Command injection: anything that came with or after the STLS line,
        # before the handshake, is thrown away, never executed inside TLS.
        del self._buf[:]
        self._pos = 0
        self._discarding = False
        self._user = None
        self._tls_started = True
        self.transport.startTLS(f.tls_options)

    def do_QUIT(self, arg: bytes) -> defer.Deferred[Any] | None:
        if self.session is None:
            self._write(b"+OK Bye\r\n")
            self._close()
            return None
        return self._quit()

    _AUTH_COMMANDS: ClassVar[dict[bytes, Callable[..., Any]]] = {
        b"CAPA": do_CAPA, b"USER": AuthorizationCommands.do_USER, b"PASS": AuthorizationCommands.do_PASS,
        b"AUTH": AuthorizationCommands.do_AUTH, b"STLS": do_STLS, b"QUIT": do_QUIT, b"NOOP": do_NOOP,
        b"APOP": AuthorizationCommands.do_APOP, b"UTF8": AuthorizationCommands.do_UTF8,
    }
    _TRANS_COMMANDS: ClassVar[dict[bytes, Callable[..., Any]]] = {
        b"CAPA": do_CAPA, b"STAT": TransactionCommands.do_STAT, b"LIST": TransactionCommands.do_LIST,
        b"UIDL": TransactionCommands.do_UIDL, b"TOP": TransactionCommands.do_TOP,
        b"RETR": TransactionCommands.do_RETR, b"DELE": TransactionCommands.do_DELE,
        b"RSET": TransactionCommands.do_RSET, b"NOOP": do_NOOP, b"QUIT": do_QUIT,
    }
