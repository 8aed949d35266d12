"""A POP3 server on 127.0.0.1 for tests, with users and Maildirs in a temp dir.

Tests talk to it with Python's poplib (blocking) from a thread, through
``run_client``, while the reactor serves; ``tearDown`` waits (with a
deadline) until every session is gone and no thread job is pending, so
trial's dirty-reactor check stays quiet.
"""

from __future__ import annotations

import os
import poplib
import socket
import ssl
import tempfile
from typing import ClassVar

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.threadpool import ThreadPool

from relay.mailbox import maildir, pop3
from relay.mailbox.users import UserDB, hash_password
from tests.support.wait import apoll

DOMAIN = "example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORDS = {ALICE: "alice-secret", BOB: "bob secret with spaces"}


def write_users(path: str, users: dict[str, str]) -> None:
    # ln=4: a cheap hash, so tests are fast; the format is the real one.
    with open(path, "w") as f:
        f.writelines(f"{addr}:{hash_password(pw, ln=4)}\n" for addr, pw in users.items())


class POP3ServerMixin:
    """setUp/tearDown for a trial TestCase with a listening POP3 factory."""

    factory_kwargs: ClassVar[dict] = {}
    listen_tls = None  # CertificateOptions for an implicit TLS listener

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="pop3-test-")
        self.root = os.path.join(self.tmp, "mail")
        self.users_path = os.path.join(self.tmp, "users")
        write_users(self.users_path, PASSWORDS)
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="pop3-test")
        self.pool.start()
        self.pending = 0
        kwargs = {"login_failure_delay": 0.05}
        kwargs.update(self.factory_kwargs)
        self.factory = pop3.POP3Factory(
            hostname="pop.example.org", mailbox_root=self.root, local_domains=[DOMAIN],
            userdb=UserDB(self.users_path), threadpool=self.pool, **kwargs,
        )
        real = self.factory.run_blocking

        def tracked(f, *a, **kw):
            self.pending += 1
            d = real(f, *a, **kw)

            def done(r):
                self.pending -= 1
                return r

            return d.addBoth(done)

        self.factory.run_blocking = tracked
        wrapped = self.factory
        if self.listen_tls is not None:
            wrapped = pop3.wrap_implicit_tls(self.factory, self.listen_tls)
        self.port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.portno = self.port.getHost().port
        self.addCleanup(self._cleanup)

    async def _cleanup(self):
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0,
                    timeout=15, what="POP3 sessions to end")
        await self.port.stopListening()
        self.pool.stop()

    # -- helpers ------------------------------------------------------------
    def deliver(self, data: bytes, user: str = ALICE, prefix: bytes = b"") -> str:
        """Deliver data (CRLF text) through maildir.deliver, as local delivery will."""
        src = os.path.join(self.tmp, "spool-file")
        with open(src, "wb") as f:
            f.write(b"X-Envelope: junk before the message\r\n")
            off = f.tell()
            f.write(data)
        local, _, domain = user.partition("@")
        return maildir.deliver(self.root, domain, local, src, off, prefix)

    def maildir_of(self, user: str = ALICE) -> str:
        local, _, domain = user.partition("@")
        return os.path.join(self.root, domain, local)

    def files(self, user: str = ALICE, sub: str = "new") -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.maildir_of(user), sub)))
        except FileNotFoundError:
            return []

    def pop(self, timeout: float = 10) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.portno, timeout=timeout)

    def login(self, user: str = ALICE) -> poplib.POP3:
        c = self.pop()
        c.user(user)
        c.pass_(PASSWORDS[user])
        return c

    def raw(self, timeout: float = 10) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.portno), timeout=timeout)
        self.addCleanup(s.close)
        return s

    def run_client(self, fn, *args, **kwargs) -> defer.Deferred:
        """Run blocking client code in a thread while the reactor serves."""
        return threads.deferToThread(fn, *args, **kwargs)


def recv_until(sock: socket.socket, end: bytes, limit: int = 1 << 24) -> bytes:
    """Read from sock until the received bytes end with end (or EOF)."""
    buf = b""
    while not buf.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise AssertionError("too much data")
    return buf


def recv_lines(sock, n: int) -> list[bytes]:
    """Read exactly n CRLF lines."""
    buf = b""
    while buf.count(b"\r\n") < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\r\n")[:n]


def client_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_pem)
    return ctx


class FakeTransport(StringTransport):
    """A StringTransport that can start TLS and push back like a socket."""

    def __init__(self, pause_at: int | None = None):
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.tls = None
        self.pause_at = pause_at
        self.out_paused = False
        self.aborted = False
        self.max_buffered = 0

    def startTLS(self, ctx, normal=True):
        self.tls = ctx

    def write(self, data):
        super().write(data)
        self.max_buffered = max(self.max_buffered, len(self.value()))
        if (self.pause_at is not None and len(self.value()) > self.pause_at
                and self.producer is not None and not self.out_paused):
            self.out_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.out_paused and self.producer is not None:
            self.out_paused = False
            self.producer.resumeProducing()
        return data

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()
