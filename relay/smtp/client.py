"""The outbound ESMTP client: one message, one destination, a list of hops.

Why not twisted.mail.smtp.ESMTPClient / ESMTPSender / sendmail: on Twisted
26.10 they miss dot-stuffing for a "." at the very start of the message and at
their 16 KiB chunk boundaries (an outbound smuggling hole), turn CRLF into
CR CR LF, have no default timeout, abort on a 454 to STARTTLS even when TLS is
optional, never pipeline RCPTs, and believe replies buffered before the TLS
handshake.  This module is written on ``twisted.internet.protocol.Protocol``
instead; each of those cases has a test in tests/test_smtp_client*.py.

Shape:

* ``_ClientProtocol`` only parses replies (multi-line, strict "ddd-"/"ddd "),
  matches them in order to waiters (so pipelined commands are answered in the
  order sent), runs one timer per awaited reply, discards everything buffered
  after the reply to STARTTLS (response injection), and streams a message
  from the spool with a push producer (``_MessageProducer``) that dot-stuffs
  across read-chunk boundaries.
* ``_Delivery`` is the conversation, written top-down with ``async``/``await``:
  hops in order, greeting, EHLO/HELO, STARTTLS per mode, AUTH (never over
  plaintext), transactions of at most ``max_rcpts_per_txn`` recipients, QUIT.
* ``deliver()`` is the entry point; use it with ``defer.ensureDeferred``.  It
  never raises for a delivery problem: every recipient gets a ``RcptResult``
  (delivered / deferred / bounced) in the returned ``DeliveryReport``.

Failure classification (Postfix is the reference): connection refused or
timed out, a 4xx/5xx greeting, a failed EHLO and HELO, a 421 or a lost
connection before any recipient was accepted, missing or failed TLS when TLS
is required, failed AUTH: this hop failed, try the next one.  If every hop
fails, all recipients are deferred with the last reason.  Once a hop has
accepted a recipient, its answers are final for this attempt: 2xx delivered,
4xx deferred, 5xx bounced; a lost connection or timeout before the reply to
the final "." defers the recipients of that transaction.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import defer, error, threads
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.common import dotstuff
from relay.common.fastwrite import send_now
from relay.common.idle import IdleTimer
from relay.delivery.mx import Hop
from relay.runtime.tls import session_info

log = Logger(namespace="relay.smtp.client")


TLS_MODES = ("none", "may", "encrypt", "verify")
MAX_REPLY_LINE = 4096  # RFC 5321 says 512; be lenient, but bounded
MAX_REPLY_LINES = 256
MAX_EARLY_REPLIES = 8
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds.  Defaults: RFC 5321 section 4.5.3.2 (EHLO, STARTTLS, AUTH and
    RSET like MAIL); ``session`` caps one whole connection, ``quit`` is short
    because nothing depends on the answer to QUIT."""

    greeting: float = 300.0
    helo: float = 300.0
    starttls: float = 300.0  # the reply to STARTTLS, then the handshake
    auth: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 300.0
    quit: float = 30.0
    session: float = 3600.0

    @classmethod
    def uniform(cls, seconds: float, session: float | None = None) -> Timeouts:
        """Every per-reply timeout the same (tests use short ones)."""
        names = [f for f in cls.__dataclass_fields__ if f != "session"]
        t = cls(**{n: seconds for n in names})
        return replace(t, session=session if session is not None else max(seconds * 20, 10.0))


@dataclass(frozen=True)
class Reply:
    """A complete server reply: ``lines`` are the texts after "ddd-"/"ddd "."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as sent (all lines, joined by newlines)."""
        n = len(self.lines)
        return "\n".join(f"{self.code}{'-' if i < n - 1 else ' '}{ln}" for i, ln in enumerate(self.lines))

    @property
    def one_line(self) -> str:
        """For logs and Diagnostic-Code: all lines on one line."""
        return f"{self.code} " + " ".join(ln.strip() for ln in self.lines if ln.strip())

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) the server gave, else derived."""
        first = self.lines[0].split(" ", 1)[0] if self.lines and self.lines[0] else ""
        parts = first.split(".")
        if (
            len(parts) == 3
            and all(p.isdigit() for p in parts)
            and parts[0] == str(self.code // 100)
            and parts[0] in "245"
            and len(parts[1]) <= 3
            and len(parts[2]) <= 3
        ):
            return first
        return f"{self.code // 100}.0.0" if self.code // 100 in (2, 4, 5) else "4.0.0"

    @property
    def kind(self) -> str:
        c = self.code // 100
        return "delivered" if c == 2 else "bounced" if c == 5 else "deferred"


@dataclass(frozen=True)
class RcptResult:
    """What happened to one recipient in this attempt.

    ``code`` is the remote reply code, None when the result is ours (no hop
    answered, a local problem); ``text`` the full remote reply or our reason;
    ``stage`` the command it answered ("RCPT TO", "MAIL FROM", "DATA", "end of
    DATA", ...) or the step that failed ("connect", "greeting", "TLS", ...).
    """

    kind: str  # delivered | deferred | bounced
    status: str
    text: str
    code: int | None = None
    hop: Hop | None = None
    stage: str = ""

    @property
    def remote(self) -> bool:
        return self.code is not None

    @property
    def diagnostic(self) -> str | None:
        """An RFC 3464 Diagnostic-Code value, for remote replies."""
        if self.code is None:
            return None
        return "smtp; " + " ".join(ln.strip() for ln in self.text.splitlines())

    def describe(self) -> str:
        """Postfix-like one line for the log: who said what to which command."""
        if self.code is not None and self.hop is not None and self.text.startswith(str(self.code)):
            one = " ".join(ln.strip() for ln in self.text.splitlines())
            return f"host {self.hop.host}[{self.hop.address}] said: {one} (in reply to {self.stage} command)"
        return self.text


@dataclass
class DeliveryReport:
    """Per-recipient results plus what the log wants to know."""

    results: dict[str, RcptResult]
    hop: Hop | None = None  # the hop that answered (None: every hop failed)
    tls: dict | None = None  # version, cipher, bits, trusted, verified, hostname
    attempts: list[tuple[Hop, str]] = field(default_factory=list)  # hops that failed, why

    def recipients(self, kind: str) -> list[str]:
        return [r for r, res in self.results.items() if res.kind == kind]


class ConversationError(Exception):
    """The connection ended or stalled while we waited: kind is "timeout",
    "lost", "protocol" or "local"."""

    def __init__(self, kind: str, stage: str, detail: str = ""):
        super().__init__(f"{kind} {stage} {detail}".strip())
        self.kind = kind
        self.stage = stage
        self.detail = detail


@dataclass
class _Waiter:
    d: defer.Deferred | _Slot
    stage: str
    timeout: float
    tls_boundary: bool = False


class _Group:
    """The replies to a pipelined group of commands, as one Deferred that
    fires with [(ok, Reply or Failure)] once every one has an outcome (what
    a DeferredList of one Deferred per command gives, for less)."""

    __slots__ = ("d", "results", "left")

    def __init__(self, n: int):
        self.d: defer.Deferred = defer.Deferred()
        self.results: list = [None] * n
        self.left = n

    def _set(self, i: int, ok: bool, value) -> None:
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

    def callback(self, reply) -> None:
        self.group._set(self.index, True, reply)

    def errback(self, exc) -> None:
        self.group._set(self.index, False, exc if isinstance(exc, Failure) else Failure(exc))


@implementer(IHandshakeListener)
class _ClientProtocol(Protocol):
    """Reply parsing and waiting; the conversation lives in _Delivery."""

    def __init__(self, clock):
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
        self.closed = defer.Deferred()
        self._handshake: defer.Deferred | None = None
        self._handshake_timer = None
        self.producer: _MessageProducer | None = None
        self.stage = "greeting"

    # --------------------------------------------------------------- input
    def connectionMade(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
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
    def expect(self, stage: str, timeout: float, *, tls_boundary: bool = False) -> defer.Deferred:
        """Deferred[Reply] for the next reply; fails with ConversationError."""
        if self.lost is not None:
            return defer.fail(self.lost)
        if self._early and not self._waiters:
            reply = self._early.popleft()
            if tls_boundary:
                self._start_discarding()
            return defer.succeed(reply)
        w = _Waiter(defer.Deferred(), stage, timeout, tls_boundary)
        self._waiters.append(w)
        if len(self._waiters) == 1:
            self._start_timer(w)
        return w.d

    def expect_group(self, specs: list[tuple[str, float]]) -> defer.Deferred:
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

    def command(self, line: bytes, stage: str, timeout: float) -> defer.Deferred:
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
                self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
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
    def start_tls(self, creator, timeout: float) -> defer.Deferred:
        """Start the handshake; Deferred fires when it completed."""
        self._discarding = False
        self._buf = b""
        self._handshake = defer.Deferred()
        self._handshake_timer = self.clock.callLater(timeout, self._handshake_timed_out)
        self.transport.startTLS(creator)
        return self._handshake

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
        sent with its final "." in one write, as _MessageProducer would."""
        if self.lost is not None:
            raise self.lost
        send_now(self.transport, dotstuff.stuff_message(data))

    def send_message(self, path: str, offset: int, size: int, block_timeout: float) -> defer.Deferred:
        """Stream the message, dot-stuffed, then ".": fires when all is written."""
        if self.lost is not None:
            return defer.fail(self.lost)
        self.producer = _MessageProducer(self, path, offset, size, block_timeout)
        return self.producer.start()


def _describe_failure(reason) -> str:
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


@implementer(IPushProducer)
class _MessageProducer:
    """Reads the spool file in chunks and writes it dot-stuffed.

    Memory stays flat: one chunk at a time, and the transport pauses us when
    its buffer is full.  A "." is doubled at the very start of the message
    and after every LF (so after every CRLF, whatever chunk boundary falls
    between the CRLF and the dot; doubling after a bare LF too keeps a
    lenient next hop from seeing an end of data we did not mean).  The bytes
    are otherwise sent exactly as stored; CRLF is added before ".\\r\\n" only
    when the message does not already end with one.
    """

    def __init__(self, proto: _ClientProtocol, path: str, offset: int, size: int, block_timeout: float):
        self.proto = proto
        self.path = path
        self.offset = offset
        self.remaining = size
        self.size = size
        self.block_timeout = block_timeout
        self.stuffer = dotstuff.Stuffer()
        self.paused = False
        self.finished = False
        self.sent = 0  # message bytes read and written so far (for tests/logs)
        self.d = defer.Deferred()
        self.file = None
        self.timer = None

    def start(self) -> defer.Deferred:
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 - closed by _close()
            self.file.seek(self.offset)
        except OSError as e:
            self._local_error(f"cannot read the queued message {self.path}: {e.strerror}")
            return self.d
        self.proto.transport.registerProducer(self, True)
        self._arm()
        self.resumeProducing()
        return self.d

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.block_timeout)
        else:
            self.timer = self.proto.clock.callLater(self.block_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self.proto.fail(ConversationError("timeout", "message body"))

    def pauseProducing(self) -> None:
        self.paused = True  # the timer runs on: a stalled peer times out

    def resumeProducing(self) -> None:
        self.paused = False
        if self.finished:
            return
        self._arm()
        t = self.proto.transport
        while not self.paused and not self.finished and self.proto.lost is None:
            if self.remaining == 0:
                self._finish()
                t.write(self.stuffer.end())
                self.d.callback(None)
                return
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
            t.write(self.stuffer.feed(chunk))

    def stopProducing(self) -> None:
        self._close()

    def _finish(self) -> None:
        self.finished = True
        self._disarm()
        self._close()
        self.proto.transport.unregisterProducer()
        self.proto.producer = None

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
        self.proto.fail(exc)

    def connection_lost(self, exc: ConversationError) -> None:
        self.finished = True
        self._disarm()
        self._close()
        if not self.d.called:
            self.d.errback(ConversationError(exc.kind, "message body", exc.detail))


# ---------------------------------------------------------------------- TLS

_X509_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}

_CONTEXTS: dict = {}


def _cert_names(cert) -> list[str]:
    """DNS names and IP addresses in the subjectAltName, for messages."""
    from cryptography import x509

    try:
        san = cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # noqa: BLE001 - no SAN or unparsable: only for a message
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))][:10]


def _subject(cert) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string() or "?"
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def _client_context(trust_root) -> SSL.Context:
    """One context per trust root (loading the system CAs is not free)."""
    key = trust_root if isinstance(trust_root, str) else id(trust_root)
    cached = _CONTEXTS.get(key)
    if cached is not None and cached[0] is trust_root:
        return cached[1]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    if trust_root is None:
        ctx.set_default_verify_paths()
    elif isinstance(trust_root, str):
        ctx.load_verify_locations(trust_root)
    else:
        try:
            root = IOpenSSLTrustRoot(trust_root)  # ssl.Certificate adapts to it
        except TypeError:
            raise TypeError(f"trust_root must be None, a PEM file path or an IOpenSSLTrustRoot, not {trust_root!r}")
        root._addCACertsToContext(ctx)
    _CONTEXTS[key] = (trust_root, ctx)  # the reference keeps id() unique
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class _OutboundTLS:
    """A client TLS connection that always checks the certificate (chain and
    name) and records the outcome; with ``enforce`` a failure fails the
    handshake ("verify"), without it the connection goes on ("may",
    "encrypt": MX certificates are not verified, as in Postfix, but the
    log says whether they would have been)."""

    def __init__(self, hostname: str, *, enforce: bool, trust_root=None):
        self.hostname = hostname.rstrip(".")
        self.enforce = enforce
        self.trust_root = trust_root
        self.chain_error: str | None = None
        self.name_error: str | None = None
        self.saw_leaf = False
        try:
            import ipaddress

            ipaddress.ip_address(self.hostname)
            self._is_ip = True
        except ValueError:
            self._is_ip = False

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(_client_context(self.trust_root), None)
        conn.set_app_data(tlsProtocol)
        if not self._is_ip and self.hostname:
            try:
                conn.set_tlsext_host_name(self.hostname.encode("idna"))
            except UnicodeError:
                pass
        conn.set_verify(SSL.VERIFY_PEER, self._verify)
        return conn

    def _verify(self, conn, cert, errno: int, depth: int, ok: int) -> bool:
        try:
            if not ok and self.chain_error is None:
                subject = _subject(cert)
                self.chain_error = f"{_X509_ERRORS.get(errno, f'X509 verify error {errno}')} (depth {depth}, {subject})"
            if depth == 0:
                self.saw_leaf = True
                if self.name_error is None:
                    ident = IPAddress_ID(self.hostname) if self._is_ip else DNS_ID(self.hostname)
                    try:
                        verify_service_identity(extract_patterns(cert), [ident], [])
                    except (VerificationError, CertificateError):
                        names = ", ".join(_cert_names(cert)) or "none"
                        self.name_error = f"certificate does not match host name {self.hostname} (it names: {names})"
        except Exception as e:  # noqa: BLE001 - never raise inside an OpenSSL callback
            self.name_error = self.name_error or f"certificate check failed: {e}"
        if not self.enforce:
            return True
        return bool(ok) and not (depth == 0 and self.name_error)

    @property
    def trusted(self) -> bool:
        return self.saw_leaf and self.chain_error is None

    @property
    def verified(self) -> bool:
        return self.trusted and self.name_error is None

    def problem(self) -> str | None:
        return self.chain_error or self.name_error


# ---------------------------------------------------------------- delivery


class _HopFailed(Exception):
    """This hop cannot take the mail now: try the next one."""

    def __init__(
        self, status: str, reason: str, *, reply: Reply | None = None, stage: str = "", plaintext_retry: bool = False
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.reply = reply
        self.stage = stage
        self.plaintext_retry = plaintext_retry


class _Down(Exception):
    """The connection died after recipients were accepted: defer the rest."""

    def __init__(
        self, status: str, reason: str, *, reply: Reply | None = None, stage: str = "", data_started: bool = False
    ):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.reply = reply
        self.stage = stage
        self.data_started = data_started


_STAGE_WORDS = {
    "greeting": "receiving the initial server greeting",
    "EHLO": "performing the EHLO handshake",
    "HELO": "performing the HELO handshake",
    "STARTTLS": "sending STARTTLS",
    "TLS handshake": "performing the TLS handshake",
    "AUTH": "authenticating",
    "MAIL FROM": "sending MAIL FROM",
    "RCPT TO": "sending RCPT TO",
    "DATA": "sending DATA command",
    "message body": "sending message body",
    "end of DATA": "sending end of data -- message may be sent more than once",
    "RSET": "sending RSET",
    "QUIT": "sending QUIT",
    "session": "delivering (session time limit reached)",
}


def _has_8bit(path: str, offset: int, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                return False
            if not chunk.isascii():
                return True
            left -= len(chunk)
    return False


def _bad_path(addr: str) -> bool:
    return any(c in addr for c in "\r\n\0<>") or any(ord(c) < 32 for c in addr)


@dataclass(eq=False)
class _Parked:
    proto: "_ClientProtocol"
    hop: Hop
    ext: dict
    tls: dict | None
    since: float
    uses: int
    timer: float = 0.0  # (reactor time) when it has idled long enough to be closed


class ConnectionCache:
    """Idle SMTP sessions kept for a moment after a delivery, so the next
    message to the same host skips the connect, greeting, EHLO, STARTTLS
    and AUTH (Postfix's smtp connection cache: smtp_connection_cache_time_limit
    = 2s, smtp_connection_reuse_time_limit = 300s).

    A session is parked only after a clean end (no transaction open, no
    unanswered command); a parked session that says anything, or dies, is
    dropped; one that idles longer than ``idle`` is closed with QUIT.
    """

    def __init__(self, reactor, idle: float = 2.0, max_age: float = 300.0, max_parked: int = 200):
        self.reactor = reactor
        self.idle = idle
        self.max_age = max_age
        self.max_parked = max_parked
        self._idle: dict[tuple, list[_Parked]] = {}
        self.reused = 0
        self.closing = False
        # one timer for all parked sessions (not a callLater and a cancel
        # per message): it fires at the earliest end of idleness
        self._sweeper = None

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: tuple) -> _Parked | None:
        lst = self._idle.get(key)
        while lst:
            p = lst.pop()
            if not lst:
                del self._idle[key]
            if p.proto.lost is None and not p.proto._early and not p.proto._buf:
                self.reused += 1
                return p
            self._drop(p)
        return None

    def park(self, key: tuple, p: _Parked) -> bool:
        if self.closing or len(self) >= self.max_parked or self.reactor.seconds() - p.since > self.max_age:
            return False
        p.timer = self.reactor.seconds() + self.idle  # when it has idled enough
        self._idle.setdefault(key, []).append(p)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle, self._sweep)
        return True

    def _sweep(self) -> None:
        """QUIT the sessions parked for ``idle`` seconds; sleep until the next."""
        self._sweeper = None
        now = self.reactor.seconds()
        first = None
        for key in list(self._idle):
            lst = self._idle[key]
            for p in [p for p in lst if p.timer <= now]:
                lst.remove(p)
                self._quit(p)
            if not lst:
                del self._idle[key]
            else:
                t = min(p.timer for p in lst)
                first = t if first is None else min(first, t)
        if first is not None and not self.closing:
            self._sweeper = self.reactor.callLater(max(0.0, first - now), self._sweep)

    def _quit(self, p: _Parked) -> None:
        proto = p.proto
        if proto.lost is not None:
            return
        d = proto.command(b"QUIT", "QUIT", 10)
        d.addBoth(lambda _: proto.transport.loseConnection() if proto.lost is None else None)

    def evict(self, n: int | None = None, to: tuple[str, int] | None = None) -> int:
        """Close parked sessions at once (QUIT, then close without waiting
        for the reply): the n parked longest (parked sessions count toward
        ``delivery.max_concurrency``), or every one to the host ``to`` =
        (address, port), whose connection slots an attempt needs (HostLimit)."""
        parked = [(key, p) for key, lst in self._idle.items() for p in lst
                  if to is None or (p.hop.address, p.hop.port) == to]
        if n is not None:
            parked = sorted(parked, key=lambda kp: kp[1].timer)[:n]
        for key, p in parked:
            lst = self._idle[key]
            lst.remove(p)
            if not lst:
                del self._idle[key]
            if p.proto.lost is None:
                p.proto.transport.write(b"QUIT\r\n")
                p.proto.transport.loseConnection()
        return len(parked)

    def _drop(self, p: _Parked) -> None:
        if p.proto.lost is None:
            p.proto.fail(ConversationError("local", "close", "cached connection dropped"))

    def close_all(self) -> defer.Deferred:
        """At shutdown: QUIT every parked session; fires when all are closed."""
        self.closing = True
        parked = [p for lst in self._idle.values() for p in lst]
        self._idle.clear()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for p in parked:
            self._quit(p)
        if not parked:
            return defer.succeed(None)
        # a peer that does not answer QUIT at once is simply cut off
        abort = self.reactor.callLater(2.0, lambda: [self._drop(p) for p in parked])
        d = defer.DeferredList([p.proto.closed for p in parked], consumeErrors=True)
        d.addBoth(lambda r: (abort.active() and abort.cancel(), r)[1])
        return d


class _Delivery:
    def __init__(
        self,
        reactor,
        hops,
        *,
        sender,
        recipients,
        message_path,
        message_offset,
        message_size,
        helo,
        tls_mode,
        tls_hostname,
        trust_root,
        auth,
        connect_timeout,
        timeouts,
        max_rcpts_per_txn,
        body_8bit,
        threadpool,
        queue_id,
        cache=None,
        host_limit=None,
        message_data=None,
    ):
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {TLS_MODES}, not {tls_mode!r}")
        self.reactor = reactor
        self.hops = list(hops)
        self.sender = sender
        self.recipients = list(dict.fromkeys(recipients))
        self.path = message_path
        self.offset = message_offset
        self.size = message_size
        # the message itself when the caller has it in memory (just received)
        self.data = message_data if message_data is not None and len(message_data) == message_size else None
        self.helo = helo
        self.tls_mode = tls_mode
        self.tls_hostname = tls_hostname
        self.trust_root = trust_root
        self.auth = auth
        self.connect_timeout = connect_timeout
        self.t = timeouts or Timeouts()
        self.max_rcpts = max(1, max_rcpts_per_txn)
        self.body_8bit = body_8bit
        self.threadpool = threadpool
        self.queue_id = queue_id
        self.cache: ConnectionCache | None = cache
        self.host_limit = host_limit  # relay.delivery.hostlimit.HostLimit or None
        self._park: tuple | None = None  # (proto, ext) to park instead of QUIT
        self.report = DeliveryReport(results={})
        if tls_mode != "none":
            _client_context(trust_root)  # a bad trust_root is the caller's error: raise now

    # ------------------------------------------------------------ top level
    async def run(self) -> DeliveryReport:
        results = self.report.results
        pending: list[str] = []
        if _bad_path(self.sender):
            for r in self.recipients:
                results[r] = RcptResult(
                    "bounced", "5.1.7", f"bad sender address syntax: {self.sender!r}", stage="MAIL FROM"
                )
            return self.report
        for r in self.recipients:
            if _bad_path(r) or not r:
                results[r] = RcptResult("bounced", "5.1.3", f"bad recipient address syntax: {r!r}", stage="RCPT TO")
            else:
                pending.append(r)
        if not pending:
            return self.report
        self._pending_rcpts = pending
        last: _HopFailed | None = None
        if not self.hops:
            last = _HopFailed("4.4.4", "no next hop to deliver to", stage="connect")
        for hop in self.hops:
            plaintext_only = self.tls_mode == "none"
            while True:
                try:
                    try:
                        outcome = await self._session(hop, pending, plaintext_only)
                    except (_HopFailed, defer.CancelledError):
                        raise
                    except Exception as e:  # noqa: BLE001 - a bug must not lose the recipients: defer them
                        log.failure("{queue_id}: {hop}: unexpected error", queue_id=self.queue_id or "-", hop=str(hop))
                        raise _HopFailed(
                            "4.3.0", f"local error while delivering to {self._where(hop)}: {e!r}", stage="local"
                        )
                except _HopFailed as f:
                    self.report.attempts.append((hop, f.reason))
                    log.info(
                        "{queue_id}: {hop}: {reason}", queue_id=self.queue_id or "-", hop=str(hop), reason=f.reason
                    )
                    last = f
                    if f.plaintext_retry and not plaintext_only:
                        plaintext_only = True
                        continue
                    break
                else:
                    self.report.hop = hop
                    results.update(outcome)
                    return self.report
        assert last is not None
        failed_hop = self.report.attempts[-1][0] if self.report.attempts else None
        for r in pending:
            results[r] = RcptResult(
                "deferred",
                _temporary(last.status),
                last.reason,
                code=last.reply.code if last.reply else None,
                hop=failed_hop,
                stage=last.stage,
            )
        return self.report

    # ------------------------------------------------------------- session
    def _where(self, hop: Hop) -> str:
        return f"{hop.host}[{hop.address}]"

    async def _connect(self, hop: Hop) -> _ClientProtocol:
        cls = TCP6ClientEndpoint if ":" in hop.address else TCP4ClientEndpoint
        ep = cls(self.reactor, hop.address, hop.port, timeout=self.connect_timeout)
        factory = Factory.forProtocol(lambda: _ClientProtocol(self.reactor))
        factory.noisy = False
        where = f"connect to {self._where(hop)}:{hop.port}"
        try:
            return await ep.connect(factory)
        except error.ConnectionRefusedError:
            raise _HopFailed("4.4.1", f"{where}: Connection refused", stage="connect")
        except error.TimeoutError:
            raise _HopFailed("4.4.1", f"{where}: Connection timed out", stage="connect")
        except (error.ConnectError, OSError) as e:
            msg = getattr(e, "osError", None) or e
            raise _HopFailed("4.4.1", f"{where}: {msg}", stage="connect")

    def _cache_key(self, hop: Hop, plaintext_only: bool) -> tuple:
        return (hop.address, hop.port, hop.host, self.tls_mode, plaintext_only, self.tls_hostname,
                self.auth[0] if self.auth else None, self.helo)

    async def _session(self, hop: Hop, rcpts: list[str], plaintext_only: bool) -> dict[str, RcptResult]:
        self.report.tls = None
        key = self._cache_key(hop, plaintext_only)
        if self.cache is not None:
            parked = self.cache.take(key)
            if parked is not None:
                try:
                    return await self._run_session(parked.proto, hop, key, parked=parked)
                except _HopFailed as f:
                    # the cached session went away before anything was decided:
                    # that says nothing about the host, try a fresh connection
                    log.debug("{queue_id}: cached session to {hop} failed ({reason}); reconnecting",
                              queue_id=self.queue_id or "-", hop=str(hop), reason=f.reason)
                    self.report.tls = None
        proto = await self._connect_within_limit(hop)
        return await self._run_session(proto, hop, key, plaintext_only=plaintext_only)

    async def _connect_within_limit(self, hop: Hop) -> _ClientProtocol:
        """Connect, holding one of the host's connection slots (HostLimit)
        for as long as the socket lives."""
        limit = self.host_limit
        if limit is None:
            return await self._connect(hop)
        where = (hop.address, hop.port)
        d = limit.acquire(where)
        if not d.called and self.cache is not None:
            # idle sessions to that host hold slots: let them go first
            self.cache.evict(to=(hop.address, hop.port))
        await d
        try:
            proto = await self._connect(hop)
        except BaseException:
            limit.release(where)
            raise
        proto.closed.addBoth(lambda r: (limit.release(where), r)[1])
        return proto

    async def _run_session(self, proto, hop: Hop, key: tuple, *, parked: _Parked | None = None,
                           plaintext_only: bool = False) -> dict[str, RcptResult]:
        cap = self.reactor.callLater(
            self.t.session, proto.fail, ConversationError("timeout", "session", f"session exceeded {self.t.session:g}s")
        )
        graceful = False
        self._park = None
        try:
            if parked is None:
                result = await self._converse(proto, hop, rcpts=self._pending_rcpts, plaintext_only=plaintext_only)
            else:
                self.report.tls = parked.tls
                try:
                    result = await self._deliver_on(proto, hop, self._pending_rcpts, parked.ext)
                except _Down as d:
                    raise _HopFailed(d.status, d.reason, reply=d.reply, stage=d.stage)
            graceful = True
            return result
        finally:
            if cap.active():
                cap.cancel()
            park = self._park
            self._park = None
            # another attempt waiting for this host's slot: QUIT, do not park
            wanted = self.host_limit is not None and bool(self.host_limit.waiting.get((hop.address, hop.port)))
            if graceful and park is not None and proto.lost is None and not wanted:
                since = parked.since if parked else self.reactor.seconds()
                uses = (parked.uses if parked else 0) + 1
                if self.cache.park(key, _Parked(proto, hop, park[1], self.report.tls, since, uses)):
                    proto = None
            if proto is not None:
                if graceful and park is not None and proto.lost is None:
                    await self._quit(proto, hop)
                await self._close(proto, graceful)

    async def _close(self, proto: _ClientProtocol, graceful: bool) -> None:
        """Close and wait until the socket is gone (no connection outlives
        deliver()); abort if a graceful close takes too long."""
        if proto.lost is None:
            if graceful:
                proto.transport.loseConnection()
            else:
                proto.fail(ConversationError("local", "close"))
        guard = self.reactor.callLater(10, proto.fail, ConversationError("timeout", "close"))
        give_up = defer.Deferred()
        last = self.reactor.callLater(20, give_up.callback, None)
        await defer.DeferredList([proto.closed, give_up], fireOnOneCallback=True, consumeErrors=True)
        for call in (guard, last):
            if call.active():
                call.cancel()

    def _conv_failure(self, hop: Hop, e: ConversationError) -> tuple[str, str]:
        """(status, reason) for a conversation that died, Postfix wording."""
        words = _STAGE_WORDS.get(e.stage, f"in stage {e.stage}")
        w = self._where(hop)
        if e.kind == "timeout":
            return "4.4.2", f"conversation with {w} timed out while {words}"
        if e.kind == "protocol":
            return "4.5.0", f"protocol error with {w} while {words}: {e.detail}"
        if e.kind == "local":
            return "4.3.0", f"local problem while delivering to {w}: {e.detail}"
        extra = f" ({e.detail})" if e.detail else ""
        return "4.4.2", f"lost connection with {w} while {words}{extra}"

    async def _reply(self, proto: _ClientProtocol, d: defer.Deferred, hop: Hop) -> Reply:
        """Await a reply; turn a dead connection into _Down (callers decide
        whether that is a hop failure)."""
        try:
            return await d
        except ConversationError as e:
            status, reason = self._conv_failure(hop, e)
            raise _Down(status, reason, stage=e.stage)

    async def _cmd(self, proto, hop, line: bytes, stage: str, timeout: float) -> Reply:
        proto.stage = stage
        return await self._reply(proto, proto.command(line, stage, timeout), hop)

    async def _converse(
        self, proto: _ClientProtocol, hop: Hop, rcpts: list[str], plaintext_only: bool
    ) -> dict[str, RcptResult]:
        w = self._where(hop)
        try:
            greeting = await self._reply(proto, proto.expect("greeting", self.t.greeting), hop)
            if greeting.code // 100 != 2:
                raise _HopFailed(
                    greeting.status,
                    f"host {w} refused to talk to me: {greeting.one_line}",
                    reply=greeting,
                    stage="greeting",
                )
            ext = await self._hello(proto, hop)
            tls = await self._starttls(proto, hop, ext, plaintext_only)
            if tls is not None:
                ext = await self._hello(proto, hop)
            await self._authenticate(proto, hop, ext)
        except _Down as d:
            raise _HopFailed(d.status, d.reason, reply=d.reply, stage=d.stage)
        return await self._deliver_on(proto, hop, rcpts, ext)

    async def _deliver_on(self, proto, hop: Hop, rcpts: list[str], ext: dict) -> dict[str, RcptResult]:
        """The transactions on a session that is ready (greeted, EHLO, TLS, AUTH)."""
        w = self._where(hop)
        results: dict[str, RcptResult] = {}
        size_limit = _size_limit(ext)
        if size_limit and self.size > size_limit:
            reply_text = f"message size {self.size} exceeds size limit {size_limit} of server {w}"
            for r in rcpts:
                results[r] = RcptResult("bounced", "5.3.4", reply_text, hop=hop, stage="MAIL FROM")
            await self._quit(proto, hop)
            return results
        utf8 = not (self.sender.isascii() and all(r.isascii() for r in rcpts))
        if utf8 and "SMTPUTF8" not in ext:
            if not self.sender.isascii():
                bad = list(rcpts)
            else:
                bad = [r for r in rcpts if not r.isascii()]
            for r in bad:
                results[r] = RcptResult(
                    "bounced",
                    "5.6.7",
                    f"SMTPUTF8 is required, but was not offered by host {w}",
                    hop=hop,
                    stage="MAIL FROM",
                )
            rcpts = [r for r in rcpts if r not in results]
            utf8 = False
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % self.size
        if "8BITMIME" in ext:
            if self.body_8bit is None:
                self.body_8bit = (not self.data.isascii()) if self.data is not None else await self._scan_8bit()
            if self.body_8bit:
                params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        clean = await self._transactions(proto, hop, rcpts, ext, params, results)
        if proto.lost is None:
            if self.cache is not None and clean:
                self._park = (proto, ext)  # _run_session parks it (or QUITs)
            else:
                await self._quit(proto, hop)
        return results

    async def _scan_8bit(self) -> bool:
        try:
            if self.threadpool is not None:
                return await threads.deferToThreadPool(
                    self.reactor, self.threadpool, _has_8bit, self.path, self.offset, self.size
                )
            return await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), _has_8bit, self.path, self.offset, self.size
            )
        except OSError:
            return False  # the transfer itself will report the unreadable file

    async def _hello(self, proto: _ClientProtocol, hop: Hop) -> dict[str, str]:
        w = self._where(hop)
        helo = self.helo.encode("idna") if not self.helo.isascii() else self.helo.encode()
        r = await self._cmd(proto, hop, b"EHLO " + helo, "EHLO", self.t.helo)
        if r.code // 100 == 2:
            return _extensions(r)
        if r.code // 100 == 5:
            r2 = await self._cmd(proto, hop, b"HELO " + helo, "HELO", self.t.helo)
            if r2.code // 100 == 2:
                return {}
            r = r2
            stage = "HELO"
        else:
            stage = "EHLO"
        raise _HopFailed(
            r.status,
            f"host {w} refused to talk to me: {r.one_line} (in reply to {stage} command)",
            reply=r,
            stage=stage,
        )

    async def _starttls(self, proto: _ClientProtocol, hop: Hop, ext: dict, plaintext_only: bool) -> dict | None:
        mode = self.tls_mode
        if plaintext_only or mode == "none":
            return None
        w = self._where(hop)
        if "STARTTLS" not in ext:
            if mode == "may":
                return None
            raise _HopFailed("4.7.4", f"TLS is required, but was not offered by host {w}", stage="STARTTLS")
        proto.stage = "STARTTLS"
        d = proto.expect("STARTTLS", self.t.starttls, tls_boundary=True)
        proto.send(b"STARTTLS")
        r = await self._reply(proto, d, hop)
        if r.code != 220:
            proto.resume_plaintext()
            if mode == "may":
                log.info(
                    "{queue_id}: {hop}: STARTTLS refused ({reply}); continuing in plaintext",
                    queue_id=self.queue_id or "-",
                    hop=str(hop),
                    reply=r.one_line,
                )
                self.report.attempts.append((hop, f"host {w} refused STARTTLS: {r.one_line}; continued in plaintext"))
                return None
            raise _HopFailed(
                "4.7.4", f"TLS is required, but host {w} refused to start TLS: {r.one_line}", reply=r, stage="STARTTLS"
            )
        if proto.discarded:
            log.warn(
                "{queue_id}: {hop}: discarded {n} bytes the server sent after its reply to STARTTLS"
                " (response injection?)",
                queue_id=self.queue_id or "-",
                hop=str(hop),
                n=proto.discarded,
            )
        name = self.tls_hostname or hop.host
        creator = _OutboundTLS(name, enforce=(mode == "verify"), trust_root=self.trust_root)
        proto.stage = "TLS handshake"
        try:
            await proto.start_tls(creator, self.t.starttls)
        except ConversationError as e:
            problem = creator.problem() if mode == "verify" else None
            detail = problem or e.detail or e.kind
            if e.kind == "timeout":
                detail = "timed out"
            if mode == "may":
                raise _HopFailed(
                    "4.7.5",
                    f"Cannot start TLS with {w}: handshake failed ({detail}); trying plaintext",
                    stage="TLS handshake",
                    plaintext_retry=True,
                )
            if problem:
                raise _HopFailed("4.7.5", f"Server certificate not verified: {w}: {problem}", stage="TLS handshake")
            raise _HopFailed("4.7.5", f"Cannot start TLS with {w}: handshake failed ({detail})", stage="TLS handshake")
        info = dict(session_info(proto.transport) or {})
        info.update(
            hostname=name,
            trusted=creator.trusted,
            verified=creator.verified,
            problem=creator.problem(),
            mode=mode,
            discarded=proto.discarded,
        )
        self.report.tls = info
        kind = "Verified" if creator.verified else "Trusted" if creator.trusted else "Untrusted"
        log.info(
            "{queue_id}: {kind} TLS connection established to {hop}: {version} with cipher {cipher} ({bits} bits)",
            queue_id=self.queue_id or "-",
            kind=kind,
            hop=str(hop),
            version=info.get("version"),
            cipher=info.get("cipher"),
            bits=info.get("bits"),
        )
        return info

    async def _authenticate(self, proto: _ClientProtocol, hop: Hop, ext: dict) -> None:
        if not self.auth:
            return
        w = self._where(hop)
        if self.report.tls is None:
            raise _HopFailed(
                "4.7.0",
                f"not sending AUTH to {w} over a plaintext connection (TLS was not established); "
                "authentication credentials are only sent over TLS",
                stage="AUTH",
            )
        mechs = ext.get("AUTH", "").upper().split()
        if "AUTH" not in ext:
            return  # Postfix: no AUTH offered, send without authenticating
        user, password = self.auth
        if "PLAIN" in mechs:
            token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
            r = await self._cmd(proto, hop, b"AUTH PLAIN " + token, "AUTH", self.t.auth)
            if r.code == 334:  # server ignored the initial response
                r = await self._cmd(proto, hop, token, "AUTH", self.t.auth)
        elif "LOGIN" in mechs:
            r = await self._cmd(proto, hop, b"AUTH LOGIN", "AUTH", self.t.auth)
            if r.code == 334:
                r = await self._cmd(proto, hop, base64.b64encode(user.encode()), "AUTH", self.t.auth)
            if r.code == 334:
                r = await self._cmd(proto, hop, base64.b64encode(password.encode()), "AUTH", self.t.auth)
        else:
            raise _HopFailed(
                "4.7.0",
                f"cannot authenticate to {w}: no supported mechanism (offered: {' '.join(mechs) or 'none'})",
                stage="AUTH",
            )
        if r.code // 100 != 2:
            if r.code == 334:  # a server wanting more than we have: cancel
                proto.send(b"*")
            raise _HopFailed(
                "4.7.8" if r.code // 100 == 5 else r.status,
                f"SASL authentication failed; server {w} said: {r.one_line}",
                reply=r,
                stage="AUTH",
            )

    async def _quit(self, proto: _ClientProtocol, hop: Hop) -> None:
        try:
            await self._cmd(proto, hop, b"QUIT", "QUIT", self.t.quit)
        except _Down:
            pass

    # -------------------------------------------------------- transactions
    async def _transactions(self, proto, hop, rcpts, ext, params, results) -> None:
        """Transactions of at most max_rcpts recipients on this connection.

        A connection that dies (or a 421) before any recipient has an answer
        and before any message data was sent is a failure of this hop (the
        caller tries the next one); later, the undecided recipients are
        deferred - in particular a transaction whose data was being sent.
        """
        queue = deque(rcpts)
        need_rset = False
        data_sent = False
        while queue and proto.lost is None:
            batch = [queue.popleft() for _ in range(min(self.max_rcpts, len(queue)))]
            try:
                if need_rset:
                    r = await self._cmd(proto, hop, b"RSET", "RSET", self.t.rset)
                    if r.code // 100 != 2:
                        raise _Down(
                            r.status if r.code // 100 == 4 else "4.5.0",
                            f"host {self._where(hop)} said: {r.one_line} (in reply to RSET command)",
                            reply=r,
                            stage="RSET",
                        )
                retry, completed = await self._transaction(proto, hop, batch, ext, params, results)
            except _Down as d:
                data_sent = data_sent or d.data_started
                if not data_sent and not any(r in results for r in rcpts):
                    raise _HopFailed(d.status, d.reason, reply=d.reply, stage=d.stage)
                for r in [r for r in batch if r not in results] + list(queue):
                    results[r] = _down_result(d, hop)
                return False
            data_sent = data_sent or completed
            need_rset = not completed
            queue.extendleft(reversed(retry))
        return not need_rset and proto.lost is None

    async def _transaction(self, proto, hop, batch, ext, params, results):
        """One MAIL/RCPT.../DATA; fills results; returns (retry, completed):
        the recipients to try again in the next transaction (452 after some
        were accepted) and whether the message data went through."""
        w = self._where(hop)
        mail = b"MAIL FROM:<" + self.sender.encode() + b">" + params
        rcpt_lines = [b"RCPT TO:<" + r.encode() + b">" for r in batch]
        pipelining = "PIPELINING" in ext
        accepted: list[str] = []
        rejected: list[tuple[str, Reply]] = []
        data_reply: Reply | None = None

        def check421(r: Reply, stage: str) -> None:
            if r.code == 421:
                raise _Down(
                    r.status, f"host {w} said: {r.one_line} (in reply to {stage} command)", reply=r, stage=stage
                )

        if pipelining:
            proto.stage = "MAIL FROM"
            stages = ["MAIL FROM"] + ["RCPT TO"] * len(batch) + ["DATA"]
            timeouts = [self.t.mail] + [self.t.rcpt] * len(batch) + [self.t.data_init]
            group = proto.expect_group(list(zip(stages, timeouts)))
            proto.send(mail, *rcpt_lines, b"DATA")
            # Wait for the whole group: every waiter ends (reply, timeout or
            # lost connection), so no failure is left unhandled.
            outcome = await group
            replies: list[Reply] = []
            for (ok, value), st in zip(outcome, stages):
                if not ok:
                    e = value.value
                    if not isinstance(e, ConversationError):
                        value.raiseException()
                    status, reason = self._conv_failure(hop, e)
                    raise _Down(status, reason, stage=e.stage)
                check421(value, st)
                replies.append(value)
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await self._cmd(proto, hop, mail, "MAIL FROM", self.t.mail)
            check421(mail_reply, "MAIL FROM")
            rcpt_replies = []
            if mail_reply.code // 100 == 2:
                for line in rcpt_lines:
                    rep = await self._cmd(proto, hop, line, "RCPT TO", self.t.rcpt)
                    check421(rep, "RCPT TO")
                    rcpt_replies.append(rep)

        if mail_reply.code // 100 != 2:
            for r in batch:
                results[r] = _reply_result(mail_reply, hop, "MAIL FROM")
            if pipelining and data_reply is not None and data_reply.code == 354:
                await self._abandon_data(proto, hop)
            return [], False

        retry: list[str] = []
        for r, rep in zip(batch, rcpt_replies):
            if rep.code // 100 == 2:
                accepted.append(r)
            else:
                rejected.append((r, rep))
        for r, rep in rejected:
            if rep.code == 452 and accepted:
                retry.append(r)  # "too many recipients": next transaction
            else:
                results[r] = _reply_result(rep, hop, "RCPT TO")

        if not accepted:
            if pipelining and data_reply is not None and data_reply.code == 354:
                await self._abandon_data(proto, hop)
            return retry, False

        if not pipelining:
            data_reply = await self._cmd(proto, hop, b"DATA", "DATA", self.t.data_init)
        check421(data_reply, "DATA")
        if data_reply.code != 354:
            for r in accepted:
                results[r] = _reply_result(data_reply, hop, "DATA")
            return retry, False

        proto.stage = "message body"
        try:
            if self.data is not None and self.size <= CHUNK:
                proto.send_small_message(self.data)
            else:
                await proto.send_message(self.path, self.offset, self.size, self.t.data_block)
        except ConversationError as e:
            status, reason = self._conv_failure(hop, e)
            raise _Down(status, reason, stage=e.stage, data_started=True)
        proto.stage = "end of DATA"
        try:
            final = await self._reply(proto, proto.expect("end of DATA", self.t.data_end), hop)
        except _Down as d:
            d.data_started = True
            raise
        for r in accepted:
            results[r] = _reply_result(final, hop, "end of DATA")
        if final.code == 421:
            raise _Down(
                final.status,
                f"host {w} said: {final.one_line} (in reply to end of DATA command)",
                reply=final,
                stage="end of DATA",
                data_started=True,
            )
        return retry, True

    async def _abandon_data(self, proto, hop) -> None:
        """A pipelined DATA got 354 with no recipient accepted: send an empty
        message body so the server is back in command state (RFC 2920)."""
        proto.stage = "end of DATA"
        d = proto.expect("end of DATA", self.t.data_end)
        proto.send(b".")
        await self._reply(proto, d, hop)


def _reply_result(reply: Reply, hop: Hop, stage: str) -> RcptResult:
    kind = reply.kind
    if reply.code // 100 not in (2, 4, 5):
        kind = "deferred"
    return RcptResult(
        kind,
        reply.status if kind != "deferred" or reply.status[0] == "4" else "4.5.0",
        reply.text,
        code=reply.code,
        hop=hop,
        stage=stage,
    )


def _temporary(status: str) -> str:
    return status if status.startswith("4") else "4" + status[1:] if status[:1] in "25" else "4.0.0"


def _down_result(d: _Down, hop: Hop) -> RcptResult:
    if d.reply is not None:
        return RcptResult(
            "deferred",
            d.reply.status if d.reply.status[0] == "4" else "4.0.0",
            d.reply.text,
            code=d.reply.code,
            hop=hop,
            stage=d.stage,
        )
    return RcptResult("deferred", d.status, d.reason, hop=hop, stage=d.stage)


def _extensions(reply: Reply) -> dict[str, str]:
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        kw, _, params = line.strip().partition(" ")
        if kw:
            ext[kw.upper()] = params.strip()
    # Old servers say "AUTH=LOGIN PLAIN".
    for line in reply.lines[1:]:
        if line.upper().startswith("AUTH=") and "AUTH" not in ext:
            ext["AUTH"] = line[5:].strip()
    return ext


def _size_limit(ext: dict[str, str]) -> int:
    v = ext.get("SIZE", "").strip()
    return int(v) if v.isdigit() else 0


async def deliver(
    reactor,
    hops: Iterable[Hop],
    *,
    sender: str,
    recipients: Iterable[str],
    message_path: str,
    message_offset: int = 0,
    message_size: int,
    helo: str,
    tls_mode: str = "may",
    tls_hostname: str | None = None,
    trust_root=None,
    auth: tuple[str, str] | None = None,
    connect_timeout: float = 30.0,
    timeouts: Timeouts | None = None,
    max_rcpts_per_txn: int = 50,
    body_8bit: bool | None = None,
    threadpool=None,
    queue_id: str | None = None,
    cache: ConnectionCache | None = None,
    host_limit=None,
    message_data: bytes | None = None,
) -> DeliveryReport:
    """Deliver one queued message to one destination; never raises for a
    delivery problem (see the module docstring).

    ``hops``: from relay.delivery.mx, in order.  ``sender``: "" for the null sender.
    ``message_path``/``message_offset``/``message_size``: where the message
    (CRLF line endings, not dot-stuffed) lies in the spool file.
    ``tls_mode``: none | may | encrypt | verify ("verify" checks the chain
    against ``trust_root`` - None for the system CAs, a PEM file path, or an
    IOpenSSLTrustRoot such as ``ssl.Certificate`` - and the name
    ``tls_hostname`` or the hop's host name with service-identity).
    ``auth``: (username, password) for AUTH PLAIN/LOGIN, only ever sent over
    TLS.  ``body_8bit``: whether the message has 8-bit bytes (None: scan the
    file in a thread when the server offers 8BITMIME).  ``queue_id`` goes in
    the log lines.  ``cache``: a ConnectionCache for reuse; ``host_limit``: a
    relay.delivery.hostlimit.HostLimit (connections per host).  ``message_data``:
    the message bytes (what the file holds from ``message_offset``), when the
    caller has them in memory; a small one is then sent without reading the file.
    """
    d = _Delivery(
        reactor,
        hops,
        sender=sender,
        recipients=recipients,
        message_path=message_path,
        message_offset=message_offset,
        message_size=message_size,
        helo=helo,
        tls_mode=tls_mode,
        tls_hostname=tls_hostname,
        trust_root=trust_root,
        auth=auth,
        connect_timeout=connect_timeout,
        timeouts=timeouts,
        max_rcpts_per_txn=max_rcpts_per_txn,
        body_8bit=body_8bit,
        threadpool=threadpool,
        queue_id=queue_id,
        cache=cache,
        host_limit=host_limit,
        message_data=message_data,
    )
    return await d.run()


__all__ = [
    "TLS_MODES",
    "ConversationError",
    "DeliveryReport",
    "RcptResult",
    "Reply",
    "Timeouts",
    "deliver",
]
