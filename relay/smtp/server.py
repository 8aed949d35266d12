"""The inbound ESMTP server: protocol and factory.

Written on twisted.internet.protocol.Protocol rather than by subclassing
twisted.mail.smtp.ESMTP, whose defects (issue 2 and 5: MAIL/RCPT parameters
thrown away, pipelined replies out of order, the rest of an over-long DATA
line read as commands, data written once per recipient, STARTTLS command
injection, a sender kept across STARTTLS) sit in the parts we would have to
replace anyway.  What this protocol guarantees:

* Replies in command order, batched into one write per input chunk
  (PIPELINING, RFC 2920); while a command waits for a Deferred (AUTH, the
  final DATA commit) no later command is even parsed.
* Only CRLF ends a line; a bare CR or LF is an error, never a guess.
  Command lines over 512 octets (AUTH: 12288) are refused and skipped to
  their end; DATA is read by relay.smtp.dataread (CRLF.CRLF only).
* Message data streams to one spool file, whatever the number of
  recipients; the 250 "queued as" reply is sent only after the file is
  fsynced, renamed into queue/ and the directory fsynced.
* After STARTTLS everything the client sent before the handshake is thrown
  away and the session starts from scratch (RFC 3207).
* Flow control on the output side: the session is its transport's push
  producer, so while the replies to a client are not drained (the
  transport's write buffer is over its bound, or TLS's is) no further
  command is read or handled; a client that pipelines commands and never
  reads the replies cannot make the relay hold them in memory.
* Commands that move no mail forward (NOOP, RSET, HELP, VRFY, HELO/EHLO)
  are bounded per session like Postfix's smtpd_junk_command_limit: past
  smtp.junk_command_limit each one also counts as an error, and the error
  limit ends the session; a message received resets the count.  So junk
  cannot keep a session (and its idle timer) alive forever.

Policy decisions come from relay.intake.policy, storage from relay.queue.spool/diskio;
this module only speaks the protocol.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.tcp import Server as _TCPServer
from twisted.logger import Logger
from zope.interface import implementer

from relay.common import sasl
from relay.common.address import Address, AddressError, parse_path, split_command_argument
from relay.common.fastwrite import send_now
from relay.common.idle import IdleTimer
from relay.intake.policy import Client, Decision
from relay.queue import spool as spoolmod
from relay.smtp.dataread import DataReader

log = Logger(namespace="relay.smtp")

MAX_COMMAND = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE = 12288  # RFC 4954 4
MAX_ERRORS = 20
MAX_AUTH_FAILURES = 3
MAX_HOPS = 100  # Received headers (RFC 5321 6.3)
BUSY_BUFFER_LIMIT = 1 << 20
CLOSE_GRACE = 30.0  # seconds a closing session waits for its last reply to drain
# Input read (not handled) while the replies are not drained, before the
# socket is not read either.  Not 0: a TLS layer pauses us while its
# handshake is in progress, and the handshake needs the socket read.
PAUSED_INPUT_LIMIT = 64 * 1024
LINES_PER_TURN = 256  # pipelined commands handled in one reactor turn before others get theirs

_VERB_OK = {
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY",
    "EXPN", "STARTTLS", "AUTH",
}


_UNSAFE = str.maketrans({c: "?" for c in "()\\"})


def _sanitize(text: str, limit: int = 255) -> str:
    """Keep only printable ASCII without parentheses/brackets trouble."""
    text = text[:limit]
    if text.isascii() and text.isprintable() and " " not in text:
        return text.translate(_UNSAFE)
    return "".join(c if 33 <= ord(c) <= 126 and c not in "()\\" else "?" for c in text)


@dataclass
class Counters:
    received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    tls: int = 0  # sessions that completed a TLS handshake (STARTTLS or implicit)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class ServerContext:
    """What the SMTP server needs from the rest of the relay.

    The service owns it and may replace its attributes (config reload);
    every new session and command reads the current values.
    """

    def __init__(
        self,
        *,
        config,
        policy,
        spool,  # diskio.AsyncSpool
        expand: Callable[[str], list[tuple[str, str | None]]],
        checker=None,  # twisted.cred checker for AUTH
        tls=None,  # relay.runtime.tls.ServerTLS or None
        on_queued: Callable[[spoolmod.QueueEntry], Any] | None = None,
        reactor=None,
        limiter=None,  # relay.runtime.connlimit counter: connections per IP for the whole relay
    ):
        from twisted.internet import reactor as default_reactor

        self.config = config
        self.policy = policy
        self.spool = spool
        self.expand = expand
        self.checker = checker
        self.tls = tls
        self.on_queued = on_queued
        self.reactor = reactor or default_reactor
        self.auth_failure_delay = 2.0
        if limiter is None:
            from relay.runtime.connlimit import LocalCounter

            limiter = LocalCounter()
        self.limiter = limiter
        self.counters = Counters()
        self.accepting = True  # False while shutting down
        self.open_sessions: set["SMTPServer"] = set()

    @property
    def connections(self) -> dict[str, int]:
        """This process's counted sessions per client IP."""
        return self.limiter.counts()


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer)
class SMTPServer(Protocol):
    """One SMTP session."""

    def __init__(self, ctx: ServerContext, submission: bool = False, implicit_tls: bool = False):
        self.ctx = ctx
        self.cfg = ctx.config
        self.submission = submission
        self.implicit_tls = implicit_tls
        # a bytearray: taking a line off the front is O(1) (del buf[:n]), so
        # a megabyte of pipelined commands is not copied once per line
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.busy = False
        self.closing = False
        self.discard_line = False  # skipping the rest of an over-long line
        self._more = None  # the call that goes on with a long pipelined burst
        self.mode = "command"  # command | data | auth
        self.idle = IdleTimer(ctx.reactor, self._idle_expired)
        self.errors = 0
        self.auth_failures = 0
        self.peer_ip = "?"
        self.tls_active = False
        self.tls_info: dict | None = None
        self.paused = False  # input paused: busy with a megabyte of input waiting
        self._out_paused = False  # the transport asked us to stop: replies not drained
        self._read_paused = False  # transport.pauseProducing() in effect
        self._producing = False  # registered as the transport's producer
        self._abort_call = None  # aborts a closed session whose client does not drain
        self.junk = 0  # commands that moved no mail forward (see _junk)
        self.shutting_down = False
        self._reset_session()

    # -- session state ---------------------------------------------------
    def _reset_session(self) -> None:
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.sender: Address | None = None
        self.has_sender = False
        self.recipients: list[Decision] = []
        self.rcpt_keys: set[str] = set()
        self.body_8bit = False
        self._abort_incoming()

    def _abort_incoming(self) -> None:
        inc = getattr(self, "incoming", None)
        self.incoming = None
        self.reader = None
        if inc is not None:
            inc.abort()

    # -- connection ------------------------------------------------------
    _direct = False

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
        admitted, count = ctx.limiter.acquire(self.peer_ip, self.cfg.smtp.max_connections_per_ip)
        if not admitted:
            log.info("reject: connect from [{client_ip}]: too many connections ({count})",
                     client_ip=self.peer_ip, count=count, reason="too_many_connections")
            ctx.counters.reject("too_many_connections")
            self._send_now("421 4.7.0 Too many connections from your address, try again later")
            self.transport.loseConnection()
            self.closing = True
            return
        self.counted = True
        ctx.counters.sessions += 1
        ctx.open_sessions.add(self)
        self.transport.registerProducer(self, True)
        self._producing = True
        self._send_now(f"220 {self.cfg.hostname} ESMTP twisted-relay")
        self._arm()

    def connectionLost(self, reason=None) -> None:
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
        if getattr(self, "counted", False):
            self.counted = False
            self.ctx.limiter.release(self.peer_ip)
        self.ctx.open_sessions.discard(self)

    def handshakeCompleted(self) -> None:
        from relay.runtime.tls import session_info

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
        if self.mode == "data" and not self.busy:
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
            if self.mode == "data":
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
        if not self.busy and not self.closing and self.mode != "data":
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

    def _line(self, raw: bytes) -> None:
        text = raw.decode("latin-1")
        if self.mode == "auth":
            self._auth_continue(text)
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb, None) if verb in _VERB_OK else None
        if handler is None:
            self.error(500, "5.5.2 Error: command not recognized")
            return
        handler(arg)

    def _wait(self, d: defer.Deferred) -> None:
        """Hold later commands until d fires (its callbacks queue replies)."""
        self.busy = True
        self._suspend()

        def done(_):
            self.busy = False
            if self.closing:
                return
            if self.mode != "data":
                self._arm()
            self._process()
            self._flush()

        d.addErrback(self._internal_error).addBoth(done)

    def _internal_error(self, failure) -> None:
        log.failure("internal error in SMTP session from [{client_ip}]", failure, client_ip=self.peer_ip)
        self.reply(451, "4.3.0 Internal error, try again later")

    # -- commands ------------------------------------------------------------
    def do_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def do_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            self.error(501, "5.5.4 Syntax: %s hostname" % ("EHLO" if esmtp else "HELO"))
            return
        self._reset_transaction()
        self.helo = _sanitize(name)
        self.esmtp = esmtp
        host = self.cfg.hostname
        if not esmtp:
            self.reply(250, host)
            self._junk()
            return
        lines = [
            host,
            "PIPELINING",
            f"SIZE {self.cfg.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.ctx.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_allowed() and self.auth_user is None and self.ctx.checker is not None:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self.reply(250, "\n".join(lines))
        self._junk()

    def _auth_allowed(self) -> bool:
        if self.tls_active:
            return True
        return self.ctx.tls is None or not self.cfg.tls.auth_requires_tls

    def do_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")
        self._junk()

    def do_RSET(self, arg: str) -> None:
        if arg.strip():
            self.error(501, "5.5.4 Syntax: RSET")
            return
        self._reset_transaction()
        self.reply(250, "2.0.0 Ok")
        self._junk()

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0 Bye")
        self._close()

    def do_HELP(self, arg: str) -> None:
        self.reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
                   + (" STARTTLS" if self.ctx.tls is not None else "")
                   + (" AUTH" if self.ctx.checker is not None else ""))
        self._junk()

    def do_VRFY(self, arg: str) -> None:
        if not arg.strip():
            self.error(501, "5.5.4 Syntax: VRFY address")
            return
        self.reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
        self._junk()

    def do_EXPN(self, arg: str) -> None:
        self.error(502, "5.5.1 EXPN is not available")

    def do_MAIL(self, arg: str) -> None:
        if self.shutting_down:
            self.reply(421, "4.3.2 Service shutting down, closing connection")
            self._close()
            return
        if self.helo is None:
            self.error(503, "5.5.1 Error: send HELO/EHLO first")
            return
        if self.has_sender:
            self.error(503, "5.5.1 Error: nested MAIL command")
            return
        if self.submission and self.auth_user is None:
            log.info("reject: MAIL from {helo}[{client_ip}]: 530 5.7.0 Authentication required",
                     helo=self.helo, client_ip=self.peer_ip, reason="auth_required")
            self.ctx.counters.reject("auth_required")
            self.error(530, "5.7.0 Authentication required")
            return
        if not arg[:5].upper() == "FROM:":
            self.error(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path, params = split_command_argument(arg[5:])
            sender = parse_path(path, allow_null=True)
        except AddressError as e:
            code = 553 if e.status == "5.6.7" else 501
            status = "5.1.7" if e.status == "5.1.3" else e.status
            self.error(code, f"{status} Bad sender address syntax: {e}")
            return
        if params and not self.esmtp:
            self.error(555, "5.5.4 MAIL parameters are not allowed after HELO")
            return
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self.error(501, "5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self.cfg.smtp.max_message_size:
                    log.info("reject: MAIL from {helo}[{client_ip}]: 552 5.3.4 Message size exceeds fixed limit "
                             "(SIZE={size}); from=<{sender}>", helo=self.helo, client_ip=self.peer_ip,
                             size=int(value), sender=path.strip().strip("<>"), reason="size")
                    self.reply(552, "5.3.4 Message size exceeds fixed limit")
                    self.ctx.counters.reject("size")
                    return
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self.error(555, "5.5.4 Unsupported BODY parameter")
                    return
                self.body_8bit = (value or "").upper() == "8BITMIME"
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted and not propagated
            else:
                self.error(555, f"5.5.4 Unsupported parameter {key}")
                return
        decision = self.ctx.policy.sender(self._client(), sender)
        if not decision.ok:
            self._reject("MAIL", decision, sender)
            return
        self.sender = sender
        self.has_sender = True
        self.reply(250, "2.1.0 Ok")

    def do_RCPT(self, arg: str) -> None:
        if not self.has_sender:
            self.error(503, "5.5.1 Error: need MAIL command")
            return
        if not arg[:3].upper() == "TO:":
            self.error(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path, params = split_command_argument(arg[3:])
            stripped = path.strip()
            if stripped.strip("<>").lower() == "postmaster" and self.cfg.local.domains:
                rcpt = Address("postmaster", self.cfg.local.domains[0])
            else:
                rcpt = parse_path(path)
        except AddressError as e:
            code = 553 if e.status == "5.6.7" else 501
            self.error(code, f"{e.status} Bad recipient address syntax: {e}")
            return
        if params:
            self.error(555, f"5.5.4 Unsupported parameter {next(iter(params))}")
            return
        if len(self.recipients) >= self.cfg.smtp.max_recipients:
            self.reply(452, "4.5.3 Error: too many recipients")
            return
        decision = self.ctx.policy.recipient(self._client(), rcpt)
        if not decision.ok:
            self._reject("RCPT", decision, rcpt)
            return
        if decision.address not in self.rcpt_keys:
            self.rcpt_keys.add(decision.address)
            self.recipients.append(decision)
        self.reply(250, "2.1.5 Ok")

    def _client(self) -> Client:
        return Client(self.peer_ip, self.auth_user)

    def _reject(self, stage: str, decision: Decision, addr) -> None:
        reason = ("relay_denied" if decision.status == "5.7.1" and stage == "RCPT"
                  else "unknown_user" if decision.status == "5.1.1" else "sender")
        log.info(
            "reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}> to=<{rcpt}>",
            stage=stage, helo=self.helo, client_ip=self.peer_ip, reply=decision.reply,
            sender=str(self.sender or "") if stage == "RCPT" else str(addr or ""),
            rcpt=str(addr) if stage == "RCPT" else "", reason=reason,
        )
        self.ctx.counters.reject(reason)
        self.error(decision.code, f"{decision.status} {decision.text}")

    def do_DATA(self, arg: str) -> None:
        if arg.strip():
            self.error(501, "5.5.4 Syntax: DATA")
            return
        if not self.has_sender:
            self.error(503, "5.5.1 Error: need MAIL command")
            return
        if not self.recipients:
            self.error(554, "5.5.1 Error: no valid recipients")
            return
        qid = spoolmod.new_id()
        rcpts: list[str] = []
        orcpts: list[str | None] = []
        seen: set[str] = set()
        for dec in self.recipients:
            for addr, orig in self.ctx.expand(dec.address):
                if addr in seen:
                    continue
                seen.add(addr)
                rcpts.append(addr)
                orcpts.append(orig if orig != addr else None)
        env = spoolmod.Envelope(
            queue_id=qid,
            sender=str(self.sender) if self.sender else "",
            recipients=rcpts,
            orcpts=orcpts,
            arrival=self.ctx.reactor.seconds(),
            client={
                "ip": self.peer_ip,
                "helo": self.helo,
                "proto": self._protocol_name(),
                **({"auth": self.auth_user} if self.auth_user else {}),
                **({"tls": self.tls_info} if self.tls_info else {}),
            },
        )
        try:
            self.incoming = self.ctx.spool.incoming(env)
            self.incoming.write(self._received_header(qid))
        except OSError as e:
            log.error("{queue_id}: cannot create spool file: {error}", queue_id=qid, error=str(e))
            self._abort_incoming()
            self.reply(452, "4.3.1 Insufficient system storage")
            return
        self.reader = DataReader(self.cfg.smtp.max_message_size)
        self._message_start = True
        self.mode = "data"
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        self._flush()
        self._arm()

    def _protocol_name(self) -> str:
        if not self.esmtp:
            return "SMTP"
        p = "ESMTP"
        if self.tls_active:
            p += "S"
        if self.auth_user:
            p += "A"
        return p

    def _received_header(self, qid: str) -> bytes:
        date = _date_header(self.ctx.reactor.seconds())
        tls = ""
        if self.tls_active and self.tls_info:
            ti = self.tls_info
            tls = (f"\r\n\t(using {_sanitize(str(ti.get('version')))} with cipher "
                   f"{_sanitize(str(ti.get('cipher')))} ({int(ti.get('bits') or 0)} bits))")
        elif self.tls_active:
            tls = "\r\n\t(using TLS)"
        rc = ""
        if len(self.recipients) == 1:
            rc = f"\r\n\tfor <{_sanitize(self.recipients[0].address, 300)}>"
        hdr = (
            f"Received: from {self.helo} ([{self.peer_ip}])\r\n"
            f"\tby {self.cfg.hostname} (twisted-relay) with {self._protocol_name()} id {qid}"
            f"{tls}{rc};\r\n\t{date}\r\n"
        )
        return hdr.encode("ascii", "replace")

    def _data_input(self, chunk: bytes | None = None) -> None:
        reader = self.reader
        if chunk is None:
            chunk = bytes(self.buf)
            del self.buf[:]
        text, rest = reader.feed(chunk)
        if text and self.incoming is not None and reader.error is None:
            if self._message_start:
                self._message_start = False
                if text[:1] in (b" ", b"\t"):
                    # a first line starting with blanks would fold into our
                    # Received header: end the header section there, as
                    # Postfix's smtpd does
                    text = b"\r\n" + text
            try:
                self.incoming.write(text)
            except OSError as e:
                log.error("{queue_id}: write to spool failed: {error}",
                          queue_id=self.incoming.queue_id, error=str(e))
                reader.fail("io")
                self._abort_incoming_keep_reader()
        if rest is None:
            return
        self.buf = bytearray(rest)
        self.mode = "command"
        self._end_of_data()

    def _abort_incoming_keep_reader(self) -> None:
        inc, self.incoming = self.incoming, None
        if inc is not None:
            inc.abort()

    def _end_of_data(self) -> None:
        reader = self.reader
        inc = self.incoming
        self.reader = None
        self.incoming = None
        if reader.error is None and reader.received > MAX_HOPS:
            reader.error = "hops"
        if reader.error is not None:
            if inc is not None:
                inc.abort()
            code, text, reason = {
                "bare": (550, "5.6.0 Message rejected: bare CR or LF in message data "
                         "(only CRLF may end a line)", "bare_newline"),
                "long": (550, "5.6.0 Message rejected: line longer than 1000 octets in message data",
                         "line_too_long"),
                "size": (552, "5.3.4 Message size exceeds fixed limit", "size"),
                "io": (452, "4.3.1 Insufficient system storage", "spool_error"),
                "hops": (554, "5.4.6 Too many hops: more than 100 Received headers (mail loop?)",
                         "hops"),
            }[reader.error]
            log.info("{queue_id}: reject: DATA from {helo}[{client_ip}]: {reply}; from=<{sender}>",
                     queue_id=inc.queue_id if inc is not None else "NOQUEUE", helo=self.helo,
                     client_ip=self.peer_ip, code=code, reply=f"{code} {text}",
                     sender=str(self.sender or ""), reason=reason)
            self.ctx.counters.reject(reason)
            self._reset_transaction()
            self.error(code, text)
            return
        env = inc.envelope
        size = inc.size
        reader_8bit = reader.eight_bit
        d = self.ctx.spool.commit(inc)

        def queued(qid):
            log.info(
                "{queue_id}: client={helo}[{client_ip}], from=<{sender}>, size={size}, nrcpt={nrcpt}"
                "{_tls}{_auth}",
                queue_id=qid, helo=self.helo, client_ip=self.peer_ip, sender=env.sender,
                size=size, nrcpt=len(env.recipients), proto=self._protocol_name(),
                tls=self.tls_info.get("version") if self.tls_info else None,
                sasl_username=self.auth_user,
                _tls=f", tls={self.tls_info.get('version')}" if self.tls_info else "",
                _auth=f", sasl_username={self.auth_user}" if self.auth_user else "",
                recipients=env.recipients,
            )
            self.ctx.counters.received += 1
            self.junk = 0  # a message moved forward: junk counts afresh (as Postfix does)
            self.reply(250, f"2.0.0 Ok: queued as {qid}")
            if self.ctx.on_queued is not None:
                entry = spoolmod.QueueEntry(env, spoolmod.State.fresh(env), size, len(inc.header),
                                            eight_bit=reader_8bit, data=inc.data, state_file=False)
                try:
                    self.ctx.on_queued(entry)
                except Exception:  # noqa: BLE001 - never lose the 250 over a hook
                    log.failure("{queue_id}: on_queued hook failed", queue_id=qid)

        def failed(f):
            log.error("{queue_id}: could not queue: {error}", queue_id=env.queue_id,
                      error=f.getErrorMessage())
            self.ctx.counters.reject("spool_error")
            self.reply(452, "4.3.1 Insufficient system storage")

        d.addCallbacks(queued, failed)
        self._reset_transaction()
        self._wait(d)

    # -- STARTTLS ----------------------------------------------------------------
    def do_STARTTLS(self, arg: str) -> None:
        if self.ctx.tls is None:
            self.error(502, "5.5.1 Error: command not implemented")
            return
        if self.tls_active:
            self.error(503, "5.5.1 Error: TLS already active")
            return
        if arg.strip():
            self.error(501, "5.5.4 Syntax: STARTTLS")
            return
        self.reply(220, "2.0.0 Ready to start TLS")
        self._flush()
        # Anything pipelined after STARTTLS was sent in plaintext before the
        # handshake: it must never be executed (CVE-2011-0411 class).
        if self.buf:
            log.info("discarded {n} bytes sent after STARTTLS by [{client_ip}]",
                     n=len(self.buf), client_ip=self.peer_ip)
        del self.buf[:]
        self._reset_session()
        self.tls_active = True
        self._direct = False
        self.transport.startTLS(self.ctx.tls.options)
        # startTLS moved this producer onto the TLS layer, which starts unpaused
        self._out_paused = False
        self._sync_reading()

    # -- AUTH ----------------------------------------------------------------------
    def do_AUTH(self, arg: str) -> None:
        if self.ctx.checker is None:
            self.error(502, "5.5.1 Error: authentication not enabled")
            return
        if not self.esmtp:
            self.error(503, "5.5.1 Error: send EHLO first")
            return
        if self.auth_user is not None:
            self.error(503, "5.5.1 Error: already authenticated")
            return
        if self.has_sender:
            self.error(503, "5.5.1 Error: MAIL transaction in progress")
            return
        if not self._auth_allowed():
            self.error(538, "5.7.11 Encryption required for requested authentication mechanism")
            return
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        initial = initial.strip()
        if mech == "PLAIN":
            self.auth_state = ("PLAIN", [])
            if initial:
                self._auth_step(initial)
            else:
                self.mode = "auth"
                self.reply(334, "")
        elif mech == "LOGIN":
            self.auth_state = ("LOGIN", [])
            if initial:
                self._auth_step(initial)
            else:
                self.mode = "auth"
                self.reply(334, "VXNlcm5hbWU6")
        else:
            self.error(504, "5.5.4 Unrecognized authentication type")

    def _auth_continue(self, text: str) -> None:
        self._auth_step(text.strip())

    def _auth_step(self, b64: str) -> None:
        mech, parts = self.auth_state
        if b64 == "*":
            self.mode = "command"
            self.error(501, "5.0.0 Authentication aborted")
            return
        try:
            value = sasl.decode_base64(b64)
        except sasl.Base64Error:
            self.mode = "command"
            self.error(501, "5.5.2 Cannot decode response")
            return
        if mech == "PLAIN":
            self.mode = "command"
            try:
                plain = sasl.split_plain(value)
            except sasl.PlainFormatError:
                self.error(501, "5.5.2 Invalid PLAIN response")
                return
            if not plain.authzid_allowed:
                self._auth_fail()
                return
            self._auth_check(plain.authcid, plain.password)
            return
        parts.append(value)
        if len(parts) == 1:
            self.mode = "auth"
            self.reply(334, "UGFzc3dvcmQ6")
            return
        self.mode = "command"
        self._auth_check(parts[0], parts[1])

    def _auth_check(self, user: bytes, pw: bytes) -> None:
        from twisted.cred.credentials import UsernamePassword

        name = user.decode("utf-8", "replace").strip()
        d = defer.maybeDeferred(self.ctx.checker.requestAvatarId, UsernamePassword(name, pw))

        def ok(avatar):
            self.auth_user = avatar if isinstance(avatar, str) else avatar.decode()
            self.auth_failures = 0
            log.info("[{client_ip}]: authenticated as {user}", client_ip=self.peer_ip, user=self.auth_user)
            self.reply(235, "2.7.0 Authentication successful")

        def bad(f):
            log.info("reject: AUTH from {helo}[{client_ip}]: authentication failed for {user}",
                     helo=self.helo, client_ip=self.peer_ip, user=_sanitize(name, 100), reason="auth_failed")
            self.ctx.counters.reject("auth_failed")
            return self._auth_fail_later()

        d.addCallbacks(ok, bad)
        self._wait(d)

    def _auth_fail(self) -> None:
        self._wait(self._auth_fail_later())

    def _auth_fail_later(self) -> defer.Deferred:
        from twisted.internet import task

        def after():
            self.auth_failures += 1
            self.error(535, "5.7.8 Error: authentication failed")
            if self.auth_failures >= MAX_AUTH_FAILURES and not self.closing:
                self.reply(421, "4.7.0 Too many authentication failures, closing connection")
                self._close()

        return task.deferLater(self.ctx.reactor, self.ctx.auth_failure_delay, after)


def _dt(ts: float):
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)


_last_date: tuple[int, str] = (-1, "")


def _date_header(ts: float) -> str:
    """RFC 5322 date in local time, computed once per second."""
    global _last_date
    sec = int(ts)
    if _last_date[0] != sec:
        _last_date = (sec, email.utils.format_datetime(email.utils.localtime(_dt(sec))))
    return _last_date[1]


class SMTPFactory(ServerFactory):
    """Builds SMTP sessions for one listener (MX or submission)."""

    def __init__(self, ctx: ServerContext, *, submission: bool = False, implicit_tls: bool = False):
        self.ctx = ctx
        self.submission = submission
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr):
        p = SMTPServer(self.ctx, self.submission, self.implicit_tls)
        p.factory = self
        return p

