"""The POP3 server (RFC 1939, 2449, 2595, 3206, 5034) over local Maildirs.

Written on ``twisted.internet.protocol`` rather than ``twisted.mail.pop3``,
whose POP3 class has no STLS, advertises capabilities it lacks, deletes at
DELE instead of QUIT, answers pipelined commands through many small writes
(~44 ms per RETR with Nagle + delayed ACK) and whose MaildirMailbox breaks
on Python 3 and changes UIDLs when files move.

What this module guarantees, and why:

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
  by ``factory.limiter``, a relay.runtime.connlimit counter that the relay shares
  between its POP3 listeners and, with workers, between its processes, as
  SMTP's); more get -ERR [SYS/TEMP]
  and are closed.  Messages up to INLINE_MAX
  octets are read inline (a page-cache read of a few KB costs less than a
  thread hop), as are the renames above (metadata only, no fsync).
* Large messages are streamed: the protocol is the transport's push
  producer, and reads the next chunk only when the transport has drained.
* The mailbox is locked (flock, see relay.mailbox.maildir.MailboxLock) from login
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

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from twisted.internet import defer, interfaces, task, tcp
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.common import dotstuff, sasl
from relay.common.address import AddressError, parse_mailbox
from relay.common.idle import IdleTimer
from relay.mailbox import maildir
from relay.mailbox.users import UserDB, UsersFileError, normalize_user
from relay.runtime import endpoints
from relay.runtime.connlimit import LocalCounter

log = Logger(namespace="relay.pop3")

MAX_COMMAND = 255  # octets including CRLF (RFC 2449 section 4)
MAX_SASL_LINE = 2048  # a base64 SASL response line (user + password + authzid)
MAX_INPUT_BUFFER = 64 * 1024  # pipelined input held before we stop reading
INLINE_MAX = 64 * 1024  # messages up to this size are read on the reactor
SEEN_BATCH = 256  # more retrieved messages than this waiting: move them in a thread
SEEN_INLINE = 4  # moved to cur/ on the reactor after each batch of replies
IMPLEMENTATION = "twisted-relay"

_NUMBER = re.compile(rb"[0-9]{1,10}\Z")
_TOO_LONG = object()

AUTH_REQUIRES_TLS_MSG = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; "
    b"use STLS first\r\n"
)


class _CommandError(Exception):
    """Reply with this -ERR line; counts as a bad command if bad is set."""

    def __init__(self, reply: bytes, bad: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.bad = bad


def _cmd_error(text: str, bad: bool = False) -> _CommandError:
    return _CommandError(b"-ERR " + text.encode("ascii", "replace") + b"\r\n", bad)


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


def _render(data: bytes, top: int | None) -> bytes:
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


class _Streamer:
    """Sends one large message from a thread-read file, chunk by chunk.

    Driven by the protocol's producer callbacks: it reads the next chunk only
    while the transport is not paused, so memory stays at about one chunk
    plus the transport's buffer whatever the message size.
    """

    def __init__(self, proto: POP3Server, fileobj, top: int | None):
        self.proto = proto
        self.file = fileobj
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
        if self.paused or self.reading or self.stopped or self.done.called:
            return
        self.reading = True
        d = self.proto.factory.run_blocking(self.file.read, maildir.CHUNK)
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
            self.proto.transport.write(out)
        self.proto._touch()
        if finished:
            self._close()
            self.done.callback(None)
        else:
            self._next()

    def _failed(self, f: Failure) -> None:
        self.reading = False
        self._close()
        log.failure("pop3: reading {path} failed", f, path=getattr(self.file, "name", "?"))
        # Part of the message is already out: never send the final "." (the
        # client would take a truncated message for a whole one); drop the line.
        self.proto._abort()
        if not self.done.called:
            self.done.callback(None)

    def _close(self) -> None:
        f, self.file = self.file, None
        if f is not None:
            self.proto.factory.run_blocking(f.close).addErrback(lambda _: None)


class _Session:
    """The state of a logged-in session: the fixed listing and the marks."""

    def __init__(self, user: str, path: str, lock: maildir.MailboxLock, msgs: list[maildir.Message]):
        self.user = user
        self.path = path
        self.lock = lock
        self.msgs = msgs
        self.deleted: set[int] = set()
        self.retrieved = 0
        self.seen_queue: list[maildir.Message] = []
        self.next_read: int | None = None  # message index to read ahead
        self.seen_job: defer.Deferred | None = None

    def stat(self) -> tuple[int, int]:
        n = size = 0
        for i, m in enumerate(self.msgs):
            if i not in self.deleted:
                n += 1
                size += m.size
        return n, size


@implementer(interfaces.IPushProducer)
class POP3Server(Protocol):
    """One POP3 connection.  See the module docstring for the rules."""

    factory: POP3Factory

    def __init__(self, factory: POP3Factory):
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
        self.session: _Session | None = None
        self._streamer: _Streamer | None = None
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
            log.info("pop3: reject: connect from [{client_ip}]: too many connections ({count})",
                     client_ip=self.peer, count=count, reason="too_many_connections")
            self._write(b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n")
            self._close()
            return
        self._counted = True
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

    def _login_allowed(self) -> bool:
        f = self.factory
        return self.secure or not (f.tls_options is not None and f.auth_requires_tls)

    def _write(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data)
            self._unflushed = True

    def _close(self) -> None:
        """Close after the pending output (a registered producer would stall it)."""
        self._closing = True
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
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
        self._closing = True
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
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
        read ahead the message a client fetching in order will ask for next."""
        if self._lost or self._busy or self._out_paused or self._closing:
            return
        t = self.transport
        # Twisted would send the buffered replies on its next loop turn; a
        # client waiting for them would wait that turn too.  On a plain TCP
        # transport (also after STLS) doWrite() sends them now.
        if self._unflushed and self._can_flush and t.connected and not t.disconnecting:
            self._unflushed = False
            t.doWrite()
        s = self.session
        if s is not None and s.next_read is not None:
            i, s.next_read = s.next_read, None
            if i < len(s.msgs) and i not in s.deleted and s.msgs[i].size <= INLINE_MAX:
                m = s.msgs[i]
                try:
                    data = maildir.read_message(s.path, m, INLINE_MAX + 1)
                except OSError:
                    return  # RETR will read again and say what is wrong
                if len(data) <= INLINE_MAX:
                    self._prefetched = (i, b"+OK %d octets\r\n" % m.size + _render(data, None))
        if s is not None and s.seen_queue and s.seen_job is None:
            # While the client reads the reply: a rename or two (no fsync; a
            # metadata update of microseconds) costs less here than handing
            # them to a thread, whose GIL contention would slow this loop.
            batch, s.seen_queue = s.seen_queue[:SEEN_INLINE], s.seen_queue[SEEN_INLINE:]
            for m in batch:
                try:
                    maildir.mark_seen(s.path, m)
                except OSError as e:
                    log.warn("pop3: cannot mark {path} as seen: {err}", path=m.path, err=str(e))  # noqa: G010

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
                raise _cmd_error(f"Line too long (max {MAX_COMMAND} octets with CRLF)", bad=True)
            if not line.endswith(b"\r"):
                self._sasl = None
                raise _cmd_error("Line must end with CRLF", bad=True)
            line = line[:-1]
            if b"\r" in line:
                self._sasl = None
                raise _cmd_error("Bare CR in command line", bad=True)
            if self._sasl is not None:
                result = self._sasl_response(line)
            else:
                result = self._command(line)
        except _CommandError as e:
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
                raise _cmd_error(f"{name} is not valid in the {state} state", bad=True)
            raise _cmd_error("Unknown command", bad=True)
        return handler(self, arg)

    @staticmethod
    def _no_args(arg: bytes, name: str) -> None:
        if arg.strip(b" "):
            raise _cmd_error(f"{name} takes no arguments", bad=True)

    # AUTHORIZATION state

    def do_CAPA(self, arg: bytes) -> None:
        self._no_args(arg, "CAPA")
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.session is None:
            if self._login_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STLS")
        caps.append(f"IMPLEMENTATION {IMPLEMENTATION}")
        body = "\r\n".join(caps[1:])
        self._write(f"+OK Capability list follows\r\n{body}\r\n.\r\n".encode("ascii"))

    def do_NOOP(self, arg: bytes) -> None:
        self._no_args(arg, "NOOP")
        self._write(b"+OK\r\n")

    def do_STLS(self, arg: bytes) -> None:
        self._no_args(arg, "STLS")
        f = self.factory
        if self.secure:
            raise _cmd_error("TLS is already active", bad=True)
        if f.tls_options is None:
            raise _cmd_error("STLS is not available (no certificate configured)", bad=True)
        self._write(b"+OK Begin TLS negotiation\r\n")
        # Command injection: anything that came with or after the STLS line,
        # before the handshake, is thrown away, never executed inside TLS.
        del self._buf[:]
        self._pos = 0
        self._discarding = False
        self._user = None
        self._tls_started = True
        self.transport.startTLS(f.tls_options)

    def do_USER(self, arg: bytes) -> None:
        if not self._login_allowed():
            raise _CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        name = arg.strip(b" ")
        if not name:
            raise _cmd_error("Syntax: USER <address>", bad=True)
        self._user = name.decode("utf-8", "replace")
        # Always +OK: whether the account exists is not disclosed.
        self._write(b"+OK Send your password\r\n")

    def do_PASS(self, arg: bytes):
        if not self._login_allowed():
            self._user = None
            raise _CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        if self._user is None:
            raise _cmd_error("Send USER first", bad=True)
        user, self._user = self._user, None
        return self._login(user, arg, "USER/PASS")

    def do_AUTH(self, arg: bytes):
        parts = arg.split(None, 1)
        if not self._login_allowed():
            raise _CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        if not parts:
            # The pre-RFC 5034 form: list the mechanisms.
            self._write(b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n")
            return None
        mech = parts[0].upper()
        if mech != b"PLAIN":
            raise _cmd_error("Unsupported authentication mechanism (only PLAIN)", bad=True)
        if len(parts) == 1:
            self._sasl = "PLAIN"
            self._write(b"+ \r\n")
            return None
        return self._sasl_plain(parts[1].strip())

    def _sasl_response(self, line: bytes):
        self._sasl = None
        if line.strip() == b"*":
            self._write(b"-ERR Authentication cancelled\r\n")
            return None
        return self._sasl_plain(line.strip())

    def _sasl_plain(self, data: bytes):
        try:
            plain = sasl.decode_plain(data)
        except sasl.Base64Error:
            raise _cmd_error("Invalid base64 data in the SASL response", bad=True)
        except sasl.PlainFormatError:
            raise _cmd_error("Invalid SASL PLAIN response (authzid NUL authcid NUL password)", bad=True)
        if not plain.authzid_allowed:
            # Acting as another user is not supported: a failed login like any other.
            return self._login(plain.user, None, "SASL PLAIN")
        return self._login(plain.user, plain.password, "SASL PLAIN")

    def do_QUIT(self, arg: bytes):
        if self.session is None:
            self._write(b"+OK Bye\r\n")
            self._close()
            return None
        return self._quit()

    def do_APOP(self, arg: bytes) -> None:
        raise _cmd_error("APOP is not supported; use USER/PASS or AUTH PLAIN", bad=True)

    # -- login --------------------------------------------------------------
    def _login(self, name: str, password: bytes | None, method: str) -> defer.Deferred:
        f = self.factory
        started = f.reactor.seconds()
        try:
            user = normalize_user(name, tuple(f.local_domains))
            addr = parse_mailbox(name.strip())
            pw = password.decode("utf-8") if password is not None else None
        except (AddressError, UnicodeDecodeError) as e:
            log.info("pop3: login failed client={client} user={user} method={method}: {why}",
                     client=self.peer, user=name[:128], method=method, why=str(e))  # see relay.common.logsafe
            return self._failed_login(started)
        if pw is None:
            log.info("pop3: login failed client={client} user={user} method={method}: "
                     "authorization identity differs", client=self.peer, user=user, method=method)
            return self._failed_login(started)
        userdb = f.userdb
        try:
            # on the reactor (a stat, and a small file read only when it
            # changed): a user just added can log in at once, and the users
            # are never reloaded from two threads at a time
            userdb.refresh()
        except UsersFileError as e:  # keep the users we had; say why once per bad version
            log.error("pop3: {err}", err=str(e))
        root = f.mailbox_root
        d = f.run_auth(userdb.check, user, pw)

        def checked(ok: bool):
            if not ok:
                return None
            if self._lost:
                return None
            # the Maildir (lock, listing) is disk work: the disk pool
            return f.run_blocking(maildir.open_mailbox, root, addr.domain, addr.local)

        def done(result):
            if result is None:
                if self._lost:
                    return None
                log.info("pop3: login failed client={client} user={user} method={method}: "
                         "bad credentials", client=self.peer, user=user, method=method)
                return self._failed_login(started)
            path, lock, msgs = result
            if self._lost:
                lock.release()
                return None
            self.session = _Session(user, path, lock, msgs)
            n, size = self.session.stat()
            f.logged_in += 1
            log.info("pop3: login client={client} user={user} method={method} tls={tls} "
                     "messages={messages} octets={octets}", client=self.peer, user=user,
                     method=method, tls=self.secure, messages=n, octets=size)
            self._write(f"+OK Logged in, {n} messages ({size} octets)\r\n".encode("ascii"))
            return None

        def failed(fail: Failure):
            if fail.check(maildir.MailboxLocked):
                log.info("pop3: mailbox in use client={client} user={user}", client=self.peer, user=user)
                self._write(b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n")
                return None
            if fail.check(AddressError):
                return self._failed_login(started)
            log.failure("pop3: cannot open the mailbox of {user}", fail, user=user)
            self._write(b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later\r\n")
            return None

        return d.addCallback(checked).addCallbacks(done, failed)

    def _failed_login(self, started: float) -> defer.Deferred:
        f = self.factory
        self._failures += 1
        wait = max(0.0, started + f.login_failure_delay - f.reactor.seconds())

        def answer():
            if self._lost:
                return
            if self._failures >= f.max_login_failures:
                self._write(b"-ERR [AUTH] Authentication failed; too many failures, closing connection\r\n")
                self._close()
            else:
                self._write(b"-ERR [AUTH] Authentication failed\r\n")

        d = task.deferLater(f.reactor, wait, answer)
        self._delay = d
        return d.addErrback(lambda fail: fail.trap(defer.CancelledError) and None)

    # TRANSACTION state -----------------------------------------------------

    def _msg(self, arg: bytes, allow_deleted: bool = False) -> tuple[int, maildir.Message]:
        s = self.session
        assert s is not None
        if not (arg.isdigit() and len(arg) <= 10):
            arg = arg.strip(b" ")
            if not _NUMBER.match(arg):
                raise _cmd_error("Invalid message number", bad=True)
        n = int(arg)
        if not 1 <= n <= len(s.msgs):
            raise _cmd_error(f"No such message {n}")
        i = n - 1
        if i in s.deleted and not allow_deleted:
            raise _cmd_error(f"Message {n} is deleted")
        return i, s.msgs[i]

    def do_STAT(self, arg: bytes) -> None:
        self._no_args(arg, "STAT")
        n, size = self.session.stat()
        self._write(b"+OK %d %d\r\n" % (n, size))

    def do_LIST(self, arg: bytes) -> None:
        s = self.session
        if arg.strip(b" "):
            i, m = self._msg(arg)
            self._write(b"+OK %d %d\r\n" % (i + 1, m.size))
            return
        n, size = s.stat()
        lines = [b"+OK %d messages (%d octets)" % (n, size)]
        lines += [b"%d %d" % (i + 1, m.size) for i, m in enumerate(s.msgs) if i not in s.deleted]
        lines.append(b".\r\n")
        self._write(b"\r\n".join(lines))

    def do_UIDL(self, arg: bytes) -> None:
        s = self.session
        if arg.strip(b" "):
            i, m = self._msg(arg)
            self._write(b"+OK %d %s\r\n" % (i + 1, m.uid.encode("ascii")))
            return
        lines = [b"+OK Unique-ID listing follows"]
        lines += [b"%d %s" % (i + 1, m.uid.encode("ascii")) for i, m in enumerate(s.msgs)
                  if i not in s.deleted]
        lines.append(b".\r\n")
        self._write(b"\r\n".join(lines))

    def do_DELE(self, arg: bytes) -> None:
        i, _ = self._msg(arg)
        self.session.deleted.add(i)
        self._write(b"+OK Message %d marked for deletion\r\n" % (i + 1))

    def do_RSET(self, arg: bytes) -> None:
        self._no_args(arg, "RSET")
        s = self.session
        s.deleted.clear()
        n, size = s.stat()
        self._write(b"+OK Maildrop has %d messages (%d octets)\r\n" % (n, size))

    def do_RETR(self, arg: bytes):
        i, m = self._msg(arg)
        return self._send(i, m, None)

    def do_TOP(self, arg: bytes):
        parts = arg.split()
        if len(parts) != 2 or not _NUMBER.match(parts[1]):
            raise _cmd_error("Syntax: TOP <message> <lines>", bad=True)
        i, m = self._msg(parts[0])
        return self._send(i, m, int(parts[1]))

    def _send(self, i: int, m: maildir.Message, top: int | None):
        s = self.session
        head = b"+OK %d octets\r\n" % m.size if top is None else b"+OK Top of message follows\r\n"
        if m.size <= INLINE_MAX:
            pre, self._prefetched = self._prefetched, None
            if top is None:
                s.next_read = i + 1
                if pre is not None and pre[0] == i:
                    self._write(pre[1])
                    self._retrieved(m, top)
                    return None
            try:
                data = maildir.read_message(s.path, m, INLINE_MAX + 1)
            except FileNotFoundError:
                raise _cmd_error(f"[SYS/PERM] Message {i + 1} was removed by another program")
            except OSError as e:
                log.error("pop3: cannot read {path}: {err}", path=m.path, err=str(e))
                raise _cmd_error(f"[SYS/TEMP] Cannot read message {i + 1}")
            if len(data) <= INLINE_MAX:  # else it grew since the listing: stream it
                self._write(head + _render(data, top))
                self._retrieved(m, top)
                return None
        return self._stream(i, m, top, head)

    def _stream(self, i: int, m: maildir.Message, top: int | None, head: bytes) -> defer.Deferred:
        s = self.session
        d = self.factory.run_blocking(maildir.open_message, s.path, m)

        def opened(fobj):
            if self._lost:
                self.factory.run_blocking(fobj.close)
                return None
            self._write(head)
            self._streamer = _Streamer(self, fobj, top)
            if self._out_paused:
                self._streamer.pause()
            return self._streamer.start().addCallback(sent)

        def sent(_):
            self._streamer = None
            if not self._lost:
                self._retrieved(m, top)

        def failed(f: Failure):
            if f.check(FileNotFoundError):
                self._write(b"-ERR [SYS/PERM] Message %d was removed by another program\r\n" % (i + 1))
            else:
                log.failure("pop3: cannot open {path}", f, path=m.path)
                self._write(b"-ERR [SYS/TEMP] Cannot read message %d\r\n" % (i + 1))

        return d.addCallbacks(opened, failed)

    def _retrieved(self, m: maildir.Message, top: int | None) -> None:
        if top is not None:
            return  # TOP is a peek: the message stays unread
        s = self.session
        if s is None:
            return
        s.retrieved += 1
        if not m.seen and not m.queued:
            m.queued = True
            s.seen_queue.append(m)
            if s.seen_job is None and len(s.seen_queue) >= SEEN_BATCH:
                self._run_seen(s)  # a pipelined burst: move them in a thread

    def _run_seen(self, s: _Session) -> None:
        """Move retrieved messages to cur/ with the S flag, in a thread, in batches."""
        batch, s.seen_queue = s.seen_queue, []

        def work():
            for m in batch:
                try:
                    maildir.mark_seen(s.path, m)
                except OSError as e:
                    log.warn("pop3: cannot mark {path} as seen: {err}", path=m.path, err=str(e))  # noqa: G010

        def done(_):
            if s.seen_queue:
                self._run_seen(s)
            else:
                job, s.seen_job = s.seen_job, None
                job.callback(None)

        s.seen_job = s.seen_job or defer.Deferred()
        self.factory.run_blocking(work).addErrback(
            lambda f: log.failure("pop3: marking messages seen failed", f)
        ).addBoth(done)

    def _seen_idle(self, s: _Session) -> defer.Deferred:
        """Start moving what is still queued; fire when nothing is in flight."""
        if s.seen_job is None and s.seen_queue:
            self._run_seen(s)
        if s.seen_job is None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        s.seen_job.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _quit(self) -> defer.Deferred:
        s = self.session
        assert s is not None
        doomed = [m for i, m in enumerate(s.msgs) if i in s.deleted]
        gone = {id(m) for m in doomed}
        s.seen_queue = [m for m in s.seen_queue if id(m) not in gone]  # no rename before unlink
        self._quitting = d = self._seen_idle(s)
        d.addCallback(lambda _: self.factory.run_blocking(maildir.delete, s.path, doomed) if doomed else 0)

        def done(failed: int):
            self.session = None
            self._end_session(s, deleted=len(doomed) - failed, reason="QUIT")
            host = self.factory.hostname.replace("\r", "").replace("\n", "")
            if failed:
                self._write(b"-ERR [SYS/TEMP] %d of the deleted messages could not be removed\r\n" % failed)
            else:
                self._write(
                    f"+OK {host} POP3 server signing off ({len(doomed)} messages deleted)\r\n".encode(
                        "utf-8", "replace")
                )
            self._close()

        def error(f: Failure):
            log.failure("pop3: deleting messages of {user} failed", f, user=s.user)
            self.session = None
            self._end_session(s, deleted=0, reason="QUIT (delete failed)")
            self._write(b"-ERR [SYS/TEMP] Deleted messages could not be removed\r\n")
            self._close()

        d.addCallbacks(done, error)
        self._closing = True  # nothing after QUIT is read
        return d

    def _end_session(self, s: _Session, deleted: int, reason: str) -> None:
        self.factory.logged_in -= 1
        log.info("pop3: logout client={client} user={user} retrieved={retrieved} "
                 "deleted={deleted} reason={reason}", client=self.peer, user=s.user,
                 retrieved=s.retrieved, deleted=deleted, reason=reason)
        # Renames to cur/ still running in a thread finish before the lock goes.
        self._seen_idle(s).addBoth(lambda _: s.lock.release())

    _AUTH_COMMANDS: ClassVar[dict[bytes, Callable]] = {
        b"CAPA": do_CAPA, b"USER": do_USER, b"PASS": do_PASS, b"AUTH": do_AUTH,
        b"STLS": do_STLS, b"QUIT": do_QUIT, b"NOOP": do_NOOP, b"APOP": do_APOP,
    }
    _TRANS_COMMANDS: ClassVar[dict[bytes, Callable]] = {
        b"CAPA": do_CAPA, b"STAT": do_STAT, b"LIST": do_LIST, b"UIDL": do_UIDL,
        b"TOP": do_TOP, b"RETR": do_RETR, b"DELE": do_DELE, b"RSET": do_RSET,
        b"NOOP": do_NOOP, b"QUIT": do_QUIT,
    }


class POP3Factory(ServerFactory):
    """Builds POP3Server protocols for one listening endpoint.

    Every setting is a plain attribute read at the moment it is needed, so
    a config reload may reassign them (``apply_config``); sessions already
    logged in keep their mailbox.

    ``run_blocking(f, *args)`` returns a Deferred for f run in the thread
    pool (``threadpool``: the disk pool); ``run_auth`` the same for password
    checks, in ``auth_pool`` (the relay's AUTH pool), or through
    run_blocking when there is none; unit tests driving a task.Clock replace
    run_blocking with a synchronous one.
    ``open_sessions`` counts connections, ``logged_in`` the logged-in ones,
    ``limiter`` counts the connections per client address (a relay.runtime.connlimit
    counter the relay shares between factories and workers; ``connections``
    shows this process's counts).
    """

    protocol = POP3Server  # type: ignore[assignment]

    def __init__(
        self,
        *,
        hostname: str,
        mailbox_root: str,
        local_domains: Iterable[str],
        userdb: UserDB,
        tls_options: Any = None,
        auth_requires_tls: bool = True,
        reactor: Any = None,
        threadpool: Any = None,
        login_failure_delay: float = 2.0,
        idle_timeout: float = 600.0,
        max_login_failures: int = 3,
        max_bad_commands: int = 20,
        auth_pool: Any = None,
        max_connections_per_ip: int = 20,
        limiter: Any = None,
        close_grace: float = 30.0,
    ):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.hostname = hostname
        self.mailbox_root = mailbox_root
        self.local_domains = tuple(local_domains)
        self.userdb = userdb
        self.tls_options = tls_options
        self.auth_requires_tls = auth_requires_tls
        self.reactor = reactor
        self.threadpool = threadpool
        self.login_failure_delay = login_failure_delay
        self.idle_timeout = idle_timeout
        self.max_login_failures = max_login_failures
        self.max_bad_commands = max_bad_commands
        self.auth_pool = auth_pool
        self.close_grace = close_grace  # seconds a closed session waits for its last reply to drain
        self.max_connections_per_ip = max_connections_per_ip
        if limiter is None:
            limiter = LocalCounter()
        self.limiter = limiter
        self.open_sessions = 0
        self.logged_in = 0

    @property
    def connections(self) -> dict[str, int]:
        """This process's counted sessions per client address."""
        return self.limiter.counts()

    def run_blocking(self, f: Callable, *args: Any, **kwargs: Any) -> defer.Deferred:
        from twisted.internet.threads import deferToThreadPool

        pool = self.threadpool or self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, f, *args, **kwargs)

    def run_auth(self, f: Callable, *args: Any, **kwargs: Any) -> defer.Deferred:
        if self.auth_pool is None:
            return self.run_blocking(f, *args, **kwargs)
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.auth_pool, f, *args, **kwargs)

    def buildProtocol(self, addr):
        p = self.protocol(self)
        return p


def wrap_implicit_tls(factory: POP3Factory, tls_options: Any) -> TLSMemoryBIOFactory:
    """The factory to listen with on a plain TCP port for an implicit TLS
    ("ssl:995") endpoint that uses the [tls] certificate.  (An ssl: endpoint
    with its own key can listen with `factory` directly.)  The protocol sees
    an ISSLTransport, so logins are allowed and STLS is not offered.
    """
    return TLSMemoryBIOFactory(tls_options, False, factory)


def apply_config(factory: POP3Factory, config: Any, userdb: UserDB, tls_options: Any) -> None:
    """Point an existing factory at a (re)loaded relay.config.Config."""
    factory.hostname = config.hostname
    factory.mailbox_root = config.local.mailboxes
    factory.local_domains = tuple(config.local.domains)
    factory.userdb = userdb
    factory.tls_options = tls_options
    factory.auth_requires_tls = config.tls.auth_requires_tls
    factory.max_connections_per_ip = config.pop3.max_connections_per_ip


def factory_from_config(config: Any, userdb: UserDB, tls_options: Any, **kwargs: Any) -> POP3Factory:
    """A POP3Factory from a relay.config.Config; kwargs go to POP3Factory."""
    return POP3Factory(
        hostname=config.hostname,
        mailbox_root=config.local.mailboxes,
        local_domains=config.local.domains,
        userdb=userdb,
        tls_options=tls_options,
        auth_requires_tls=config.tls.auth_requires_tls,
        max_connections_per_ip=config.pop3.max_connections_per_ip,
        **kwargs,
    )


def _is_loopback_interface(spec: endpoints.EndpointSpec) -> bool:
    iface = spec.interface
    if not iface:
        return False  # all interfaces
    try:
        return ipaddress.ip_address(iface.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_login_warnings(
    listen: Iterable[str], *, tls_configured: bool, auth_requires_tls: bool = True
) -> list[str]:
    """Start-up warnings for POP3 endpoints where passwords can cross a
    non-loopback network in plaintext: no certificate configured (or
    tls.auth_requires_tls false), and an endpoint that is neither ssl: nor
    bound to a loopback address nor a UNIX socket.  The service logs each.
    """
    if tls_configured and auth_requires_tls:
        return []
    why = ("no TLS certificate is configured (tls.certificate/tls.key)" if not tls_configured
           else "tls.auth_requires_tls is false")
    out = []
    for desc in listen:
        try:
            spec = endpoints.parse(desc)
        except ValueError:
            continue  # the config check reports it
        if spec.implicit_tls or spec.kind == "unix":
            continue
        if spec.kind in ("tcp", "tcp6") and _is_loopback_interface(spec):
            continue
        where = ("is not bound to a loopback address" if spec.kind in ("tcp", "tcp6")
                 else "may not be loopback-only")
        out.append(
            f"pop3.listen: {desc} {where} and {why}: POP3 passwords and mail can cross "
            f"the network in plaintext"
        )
    return out


def startup_warnings(config: Any) -> list[str]:
    """plaintext_login_warnings for a relay.config.Config."""
    return plaintext_login_warnings(
        config.pop3.listen, tls_configured=config.tls.enabled,
        auth_requires_tls=config.tls.auth_requires_tls,
    )


__all__ = [
    "MAX_COMMAND",
    "DotStuffer",
    "POP3Factory",
    "POP3Server",
    "TopFilter",
    "apply_config",
    "factory_from_config",
    "plaintext_login_warnings",
    "startup_warnings",
    "wrap_implicit_tls",
]

