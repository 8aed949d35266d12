"""A real SMTP receiving server for tests: records everything, replies as scripted.

It is a test double of a real MTA, not a mock: it speaks ESMTP over a real
TCP socket (on a 127.0.0.x address, so different addresses stand for
different hosts), does real STARTTLS with a trustme certificate and real
AUTH PLAIN/LOGIN, and checks command order like a server would.  What it adds
is a transcript of every session and a script for misbehaviour.

Use in a trial test (same reactor)::

    from tests.support.sink import Sink
    sink = Sink("127.0.0.2", pipelining=False, size=10_000).start()
    self.addCleanup(sink.stop)
    ... deliver to ("127.0.0.2", sink.port) ...
    await apoll(lambda: sink.transactions)          # completed transactions
    t = sink.transactions[0]
    t.mail_from, t.rcpts, t.data (dot-unstuffed bytes), t.raw (wire bytes of DATA)
    t.session.tls, t.session.auth_user, t.session.helo

Everything in ``sink.b`` (a ``Behaviour``) can be changed while it runs.
The scriptable parts:

* ``greeting``: the banner reply, e.g. "421 4.3.2 busy" or "554 5.7.1 go away"
  (a 421 reply closes the connection, as real servers do).
* ``hang``: a set of stages never answered: "greeting" (hang after connect),
  "EHLO", "HELO", "MAIL", "RCPT", "DATA" (the 354), "final" (the reply after
  "."), "STARTTLS", "AUTH", "QUIT".
* ``delay`` (every reply) and ``delays`` (per stage, seconds): slow replies.
* ``replies``: per stage a reply or a list of replies consumed one per use
  (the last one sticks), e.g. ``{"MAIL": ["451 4.3.0 later", "250 2.1.0 Ok"]}``.
* ``rcpt_replies``: per recipient address (lower-cased) the same.
* ``max_rcpts``: after that many accepted RCPTs in a transaction, "452 4.5.3
  Too many recipients".
* ``reset_after_data_bytes``: abort the connection (TCP RST) after that many
  bytes of DATA.
* ``abort_at``: a set of stages at which the connection is reset instead of
  answered.
* ``stall_data``: after the 354, stop reading from the socket (a peer that
  accepts DATA and then never drains it).
* ``ehlo=False``: EHLO gets "502 5.5.2", HELO works (HELO fallback).
* ``pipelining``, ``size`` (None: not advertised; 0: "SIZE" without limit),
  ``eightbitmime``, ``smtputf8``, ``dsn``, ``enhancedstatuscodes``: EHLO keywords
  (the DSN parameters are recorded as sent: ``mail_params``, ``session.commands``).
  As a real server does, a sink that does not offer SMTPUTF8 refuses the
  MAIL parameter (555) and a non-ASCII address (553 5.6.7); one that does
  refuses a non-ASCII address in a transaction without the parameter.
* ``starttls``: None (not offered), "ok" (needs ``cert``, a
  tests.support.certs.CertFiles), "fail" (answers 220 then fails the
  handshake with a TLS alert), "454" (answers 454).
* ``inject_after_starttls``: bytes sent right after the 220 to STARTTLS, in
  the same write, before the handshake (response injection).
* ``auth``: mechanisms to offer ("PLAIN", "LOGIN"), checked against
  ``credentials`` {user: password}; with ``auth_requires_tls`` (default) AUTH
  is offered only after STARTTLS (and refused before it).
* ``keep_data=False``: keep only the size and SHA-256 of messages (big ones);
  DATA bytes are then not kept in ``wire`` either.

Every session (``sink.sessions``) records the commands, every byte the
client sent (``wire``; decrypted after STARTTLS), the replies, TLS info, the
AUTH user and ``max_outstanding``: how many commands were waiting for their
reply at once (more than 1 means the client pipelined).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections import deque
from dataclasses import dataclass, field

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from relay.common.tls import load_server_tls, session_info

TLS_ALERT_HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"


@dataclass
class Behaviour:
    name: str = "sink.test"
    greeting: str | None = None
    ehlo: bool = True
    pipelining: bool = True
    size: int | None = None
    eightbitmime: bool = True
    smtputf8: bool = False
    dsn: bool = False
    enhancedstatuscodes: bool = True
    starttls: str | None = None
    cert: object | None = None
    inject_after_starttls: bytes | None = None
    auth: tuple[str, ...] = ()
    credentials: dict[str, str] = field(default_factory=dict)
    auth_requires_tls: bool = True
    replies: dict[str, object] = field(default_factory=dict)
    rcpt_replies: dict[str, object] = field(default_factory=dict)
    max_rcpts: int | None = None
    hang: set[str] = field(default_factory=set)
    abort_at: set[str] = field(default_factory=set)
    delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    reset_after_data_bytes: int | None = None
    stall_data: bool = False
    keep_data: bool = True


@dataclass
class Session:
    peer: tuple[str, int]
    helo: str | None = None
    esmtp: bool = False
    tls: dict | None = None
    auth_user: str | None = None
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)  # (mechanism, over TLS)
    commands: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)
    max_outstanding: int = 0
    closed: bool = False
    transactions: list[Transaction] = field(default_factory=list)


@dataclass
class Transaction:
    session: Session
    mail_from: str
    mail_params: str
    rcpts: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    raw: bytes = b""
    size: int = 0
    sha256: str = ""
    final_reply: str = ""
    completed: bool = False


class _Unstuffer:
    """Splits DATA on CRLF only, undoes dot-stuffing, finds the end line."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.partial = b""
        self.out = bytearray()
        self.raw = bytearray()
        self.size = 0
        self.hash = hashlib.sha256()
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Consume data; return the bytes after the end line (if it came)."""
        buf = self.partial + data
        start = 0
        while True:
            i = buf.find(b"\r\n", start)
            if i < 0:
                break
            line = buf[start:i]
            end = i + 2
            if self.keep:
                self.raw += buf[start:end]
            if line == b".":
                self.done = True
                self.partial = b""
                return buf[end:]
            if line.startswith(b"."):
                line = line[1:]
            chunk = line + b"\r\n"
            self.size += len(chunk)
            self.hash.update(chunk)
            if self.keep:
                self.out += chunk
            start = end
        self.partial = buf[start:]
        return b""


def _reply_text(code: int, enh: str, text: str, b: Behaviour) -> str:
    return f"{code} {enh} {text}" if b.enhancedstatuscodes and enh else f"{code} {text}"


@implementer(IHandshakeListener)
class SinkProtocol(protocol.Protocol):
    def __init__(self, sink: Sink):
        self.sink = sink
        self.b = sink.b
        self.buf = b""
        self.queue: deque[bytes] = deque()
        self.busy = False
        self.paused = False  # stop parsing lines until a reply changes mode
        self.mode = "command"  # command | data | tls-fail | closed
        self.txn: Transaction | None = None
        self.unstuffer: _Unstuffer | None = None
        self.data_bytes = 0
        self.auth_state: tuple | None = None
        self.calls: set = set()
        self.session: Session | None = None

    # connection
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.session = Session((peer.host, peer.port))
        self.sink.sessions.append(self.session)
        self.sink.protocols.add(self)
        self.busy = True
        greeting = self._script("greeting", None) or self.b.greeting or f"220 {self.b.name} ESMTP sink"
        self._respond("greeting", greeting)

    def connectionLost(self, reason=None) -> None:
        self.mode = "closed"
        if self.session is not None:
            self.session.closed = True
        for c in list(self.calls):
            if c.active():
                c.cancel()
        self.calls.clear()
        self.sink.protocols.discard(self)

    def handshakeCompleted(self) -> None:
        self.session.tls = session_info(self.transport) or {"version": "?", "cipher": "?"}

    # input
    def dataReceived(self, data: bytes) -> None:
        if self.mode == "closed":
            return
        if self.b.keep_data or self.mode != "data":
            self.session.wire += data
        if self.mode == "tls-fail":
            self.transport.write(TLS_ALERT_HANDSHAKE_FAILURE)
            self.transport.loseConnection()
            self.mode = "closed"
            return
        self.buf += data
        self._process()

    def _process(self) -> None:
        while self.buf and not self.paused and self.mode in ("command", "data"):
            if self.mode == "data":
                self._data(self.buf)
                continue
            i = self.buf.find(b"\r\n")
            if i < 0:
                if len(self.buf) > 4096:
                    self._write("500 5.5.2 Line too long")
                    self.transport.loseConnection()
                    self.mode = "closed"
                break
            line, self.buf = self.buf[:i], self.buf[i + 2 :]
            self.queue.append(line)
            self.session.max_outstanding = max(self.session.max_outstanding, len(self.queue) + int(self.busy))
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"DATA", b"STARTTLS", b"AUTH", b"QUIT") or self.auth_state:
                self.paused = True
        self._kick()

    def _kick(self) -> None:
        if self.busy or not self.queue or self.mode != "command":
            return
        self.busy = True
        line = self.queue.popleft()
        self._command(line)

    # output
    def _write(self, text: str, extra: bytes = b"") -> None:
        self.session.replies.append(text)
        lines = text.split("\n")
        self.transport.write(b"".join(ln.encode() + b"\r\n" for ln in lines) + extra)

    def _respond(self, stage: str, reply: str, after=None, extra: bytes = b"") -> None:
        """Send reply (unless the stage hangs or aborts), then run after()."""
        if stage in self.b.hang:
            return  # stay busy for ever: the client must time out
        if stage in self.b.abort_at:
            self.transport.abortConnection()
            return
        delay = self.b.delays.get(stage, self.b.delay)

        def send() -> None:
            self.calls.discard(call)
            if self.mode == "closed":
                return
            self._write(reply, extra)
            if reply.startswith("421"):
                self.transport.loseConnection()
                self.mode = "closed"
                return
            if after is not None:
                after()
            self.busy = False
            if self.mode in ("command", "data"):
                # A pausing command (DATA, STARTTLS, AUTH, QUIT, an AUTH
                # continuation) is always the last one queued: once the
                # queue is empty its reply has gone and input may be read.
                if not self.queue:
                    self.paused = False
                self._process()

        call = self.sink.reactor.callLater(delay, send)
        self.calls.add(call)

    def _script(self, stage: str, default: str | None) -> str | None:
        return _take(self.b.replies, stage, default)

    # commands
    def _command(self, line: bytes) -> None:
        b = self.b
        text = line.decode("utf-8", "replace")
        self.session.commands.append(text)
        if self.auth_state is not None:
            return self._auth_continue(text)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        if verb == "EHLO":
            if not b.ehlo:
                return self._respond("EHLO", self._script("EHLO", "502 5.5.2 Error: command not recognized"))
            scripted = self._script("EHLO", None)
            if scripted:
                return self._respond("EHLO", scripted)
            self._reset_helo(arg, True)
            return self._respond("EHLO", "\n".join(self._ehlo_lines(arg)))
        if verb == "HELO":
            self._reset_helo(arg, False)
            return self._respond("HELO", self._script("HELO", f"250 {b.name}"))
        if verb == "STARTTLS":
            return self._starttls()
        if verb == "AUTH":
            return self._auth(arg)
        if verb == "MAIL":
            return self._mail(arg)
        if verb == "RCPT":
            return self._rcpt(arg)
        if verb == "DATA":
            return self._data_cmd()
        if verb == "RSET":
            self.txn = None
            return self._respond("RSET", self._script("RSET", _reply_text(250, "2.0.0", "Ok", b)))
        if verb == "NOOP":
            return self._respond("NOOP", _reply_text(250, "2.0.0", "Ok", b))
        if verb == "QUIT":
            return self._respond("QUIT", _reply_text(221, "2.0.0", "Bye", b), after=self._close)
        return self._respond("other", _reply_text(502, "5.5.2", "Error: command not recognized", b))

    def _close(self) -> None:
        self.transport.loseConnection()
        self.mode = "closed"

    def _reset_helo(self, name: str, esmtp: bool) -> None:
        self.session.helo = name
        self.session.esmtp = esmtp
        self.txn = None

    def _ehlo_lines(self, client: str) -> list[str]:
        b = self.b
        kws = []
        if b.pipelining:
            kws.append("PIPELINING")
        if b.size is not None:
            kws.append(f"SIZE {b.size}" if b.size else "SIZE")
        if b.eightbitmime:
            kws.append("8BITMIME")
        if b.enhancedstatuscodes:
            kws.append("ENHANCEDSTATUSCODES")
        if b.smtputf8:
            kws.append("SMTPUTF8")
        if b.dsn:
            kws.append("DSN")
        if b.starttls and self.session.tls is None:
            kws.append("STARTTLS")
        if b.auth and (self.session.tls is not None or not b.auth_requires_tls):
            kws.append("AUTH " + " ".join(b.auth))
        lines = [f"{b.name} greets {client}"] + kws
        return [f"250{'-' if i < len(lines) - 1 else ' '}{ln}" for i, ln in enumerate(lines)]

    def _starttls(self) -> None:
        b = self.b
        if not b.starttls or self.session.tls is not None:
            return self._respond("STARTTLS", _reply_text(502, "5.5.1", "STARTTLS not offered", b))
        if b.starttls == "454":
            return self._respond(
                "STARTTLS",
                self._script("STARTTLS", _reply_text(454, "4.7.0", "TLS not available due to temporary reason", b)),
            )

        def begin() -> None:
            # Anything the client sent before the handshake is thrown away
            # (server-side STARTTLS injection defence, as a real server does).
            self.buf = b""
            self.queue.clear()
            self.txn = None
            self.session.helo = None
            if b.starttls == "fail":
                self.mode = "tls-fail"
                return
            self.transport.startTLS(self.sink.server_tls())

        self._respond("STARTTLS", "220 2.0.0 Ready to start TLS", after=begin, extra=b.inject_after_starttls or b"")

    def _auth(self, arg: str) -> None:
        b = self.b
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        tls = self.session.tls is not None
        self.session.auth_attempts.append((mech, tls))
        if not b.auth or (b.auth_requires_tls and not tls):
            return self._respond("AUTH", _reply_text(503, "5.5.1", "Error: authentication not enabled", b))
        if self.session.auth_user is not None:
            return self._respond("AUTH", _reply_text(503, "5.5.1", "Error: already authenticated", b))
        if mech not in b.auth:
            return self._respond("AUTH", _reply_text(504, "5.5.4", "Unsupported authentication mechanism", b))
        if mech == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            self.auth_state = ("PLAIN",)
            return self._respond("AUTH", "334 ")
        # LOGIN
        if initial:
            self.auth_state = ("LOGIN-PASS", _b64(initial))
            return self._respond("AUTH", "334 UGFzc3dvcmQ6")
        self.auth_state = ("LOGIN-USER",)
        return self._respond("AUTH", "334 VXNlcm5hbWU6")

    def _auth_continue(self, text: str) -> None:
        state, self.auth_state = self.auth_state, None
        if text.strip() == "*":
            return self._respond("AUTH", _reply_text(501, "5.7.0", "Authentication aborted", self.b))
        if state[0] == "PLAIN":
            return self._auth_plain(text.strip())
        if state[0] == "LOGIN-USER":
            self.auth_state = ("LOGIN-PASS", _b64(text.strip()))
            return self._respond("AUTH", "334 UGFzc3dvcmQ6")
        return self._auth_check(state[1], _b64(text.strip()))

    def _auth_plain(self, b64: str) -> None:
        parts = _b64(b64).split("\0")
        if len(parts) != 3:
            return self._respond("AUTH", _reply_text(501, "5.5.2", "Cannot decode response", self.b))
        return self._auth_check(parts[1], parts[2])

    def _auth_check(self, user: str | None, password: str | None) -> None:
        if user is not None and self.b.credentials.get(user) == password and password is not None:
            self.session.auth_user = user
            return self._respond(
                "AUTH", self._script("AUTH", _reply_text(235, "2.7.0", "Authentication successful", self.b))
            )
        return self._respond("AUTH", _reply_text(535, "5.7.8", "Error: authentication failed", self.b))

    def _mail(self, arg: str) -> None:
        b = self.b
        if self.session.helo is None:
            return self._respond("MAIL", _reply_text(503, "5.5.1", "Error: send HELO/EHLO first", b))
        if self.txn is not None:
            return self._respond("MAIL", _reply_text(503, "5.5.1", "Error: nested MAIL command", b))
        if not arg.upper().startswith("FROM:"):
            return self._respond("MAIL", _reply_text(501, "5.5.4", "Syntax: MAIL FROM:<address>", b))
        path, params = _path(arg[5:])
        if path is None:
            return self._respond("MAIL", _reply_text(501, "5.1.7", "Bad sender address syntax", b))
        for p in params.split():
            k, _, v = p.partition("=")
            if k.upper() == "SIZE" and b.size and v.isdigit() and int(v) > b.size:
                return self._respond("MAIL", _reply_text(552, "5.3.4", "Message size exceeds fixed limit", b))
            if k.upper() == "SMTPUTF8" and not b.smtputf8:
                return self._respond("MAIL", _reply_text(555, "5.5.4", "Unsupported option: SMTPUTF8", b))
        if not b.smtputf8 and not path.isascii():
            return self._respond("MAIL", _reply_text(553, "5.6.7", "non-ASCII address without SMTPUTF8", b))
        reply = self._script("MAIL", _reply_text(250, "2.1.0", "Ok", b))
        if reply.startswith("2"):
            self.txn = Transaction(self.session, path, params)
        return self._respond("MAIL", reply)

    def _rcpt(self, arg: str) -> None:
        b = self.b
        if self.txn is None:
            return self._respond("RCPT", _reply_text(503, "5.5.1", "Error: need MAIL command", b))
        if not arg.upper().startswith("TO:"):
            return self._respond("RCPT", _reply_text(501, "5.5.4", "Syntax: RCPT TO:<address>", b))
        path, _params = _path(arg[3:])
        if not path:
            return self._respond("RCPT", _reply_text(501, "5.1.3", "Bad recipient address syntax", b))
        if not path.isascii() and "SMTPUTF8" not in self.txn.mail_params.upper().split():
            return self._respond("RCPT", _reply_text(553, "5.6.7", "non-ASCII address without SMTPUTF8", b))
        if b.max_rcpts is not None and len(self.txn.rcpts) >= b.max_rcpts:
            reply = _reply_text(452, "4.5.3", "Error: too many recipients", b)
        else:
            reply = _take(b.rcpt_replies, path.lower(), None) or self._script(
                "RCPT", _reply_text(250, "2.1.5", "Ok", b)
            )
        if reply.startswith("2"):
            self.txn.rcpts.append(path)
        else:
            self.txn.rejected.append((path, reply))
        return self._respond("RCPT", reply)

    def _data_cmd(self) -> None:
        b = self.b
        if self.txn is None:
            return self._respond("DATA", _reply_text(503, "5.5.1", "Error: need MAIL command", b))
        scripted = self._script("DATA", None)
        if not self.txn.rcpts and scripted is None:
            return self._respond("DATA", _reply_text(554, "5.5.1", "Error: no valid recipients", b))
        reply = scripted or "354 End data with <CR><LF>.<CR><LF>"
        if not reply.startswith("354"):
            self.txn = None
            return self._respond("DATA", reply)

        def enter() -> None:
            self.mode = "data"
            self.unstuffer = _Unstuffer(b.keep_data)
            self.data_bytes = 0
            if b.stall_data:
                self.transport.pauseProducing()  # stop reading: the client's writes back up

        return self._respond("DATA", reply, after=enter)

    def _data(self, chunk: bytes) -> None:
        self.buf = b""
        limit = self.b.reset_after_data_bytes
        if limit is not None and self.data_bytes + len(chunk) >= limit:
            self.transport.abortConnection()
            self.mode = "closed"
            return
        self.data_bytes += len(chunk)
        rest = self.unstuffer.feed(chunk)
        if not self.unstuffer.done:
            return
        u, t = self.unstuffer, self.txn
        self.unstuffer, self.txn = None, None
        self.mode = "command"
        self.buf = rest
        t.data, t.raw, t.size, t.sha256 = bytes(u.out), bytes(u.raw), u.size, u.hash.hexdigest()
        self.session.transactions.append(t)
        self.busy = True
        if not t.rcpts:  # a DATA answered 354 without recipients (RFC 2920 3.1)
            reply = _reply_text(554, "5.5.1", "Error: no valid recipients", self.b)
        else:
            n = next(self.sink.counter)
            reply = self._script("final", _reply_text(250, "2.0.0", f"Ok: queued as SINK{n}", self.b))

        def done() -> None:
            t.final_reply = reply
            if reply.startswith("2"):
                t.completed = True
                self.sink.transactions.append(t)

        self.paused = True
        t.final_reply = reply
        self._respond("final", reply, after=done)


def _take(table: dict, key: str, default):
    """A scripted reply: a string, or a list consumed one per use (last sticks)."""
    v = table.get(key)
    if v is None:
        return default
    if isinstance(v, str):
        return v
    if len(v) > 1:
        return v.pop(0)
    return v[0] if v else default


def _b64(text: str) -> str | None:
    try:
        return base64.b64decode(text.encode(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def _path(text: str) -> tuple[str | None, str]:
    t = text.strip()
    if not t.startswith("<"):
        return None, ""
    end = t.find(">")
    if end < 0:
        return None, ""
    return t[1:end], t[end + 1 :].strip()


class _Factory(protocol.Factory):
    def __init__(self, sink: Sink):
        self.sink = sink

    def buildProtocol(self, addr):
        return SinkProtocol(self.sink)


class Sink:
    """A listening sink on (interface, port); ``port=0`` picks a free one."""

    def __init__(self, interface: str = "127.0.0.2", port: int = 0, reactor=None, **behaviour):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.b = Behaviour(**behaviour)
        self.sessions: list[Session] = []
        self.transactions: list[Transaction] = []
        self.protocols: set[SinkProtocol] = set()
        self.counter = itertools.count(1)
        self._listening = None
        self._tls = None
        self._tls_key = None

    def start(self) -> Sink:
        self._listening = self.reactor.listenTCP(self.port, _Factory(self), interface=self.interface)
        self.port = self._listening.getHost().port
        return self

    def server_tls(self):
        cert = self.b.cert
        if cert is None:
            raise RuntimeError("Sink: starttls='ok' needs cert=CertFiles")
        key = (cert.cert_pem, cert.key_pem)
        if self._tls_key != key:
            self._tls = load_server_tls(cert.cert_pem, cert.key_pem).options
            self._tls_key = key
        return self._tls

    @property
    def messages(self) -> list[bytes]:
        return [t.data for t in self.transactions]

    def delivered_to(self) -> list[str]:
        return [r for t in self.transactions for r in t.rcpts]

    def stop(self) -> defer.Deferred:
        for p in list(self.protocols):
            for c in list(p.calls):
                if c.active():
                    c.cancel()
            if p.transport is not None:
                p.transport.abortConnection()
        d = defer.maybeDeferred(self._listening.stopListening) if self._listening else defer.succeed(None)
        self._listening = None
        return d
