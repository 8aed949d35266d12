"""Output flow control of the SMTP server over real sockets, plain and TLS.

A client that pipelines commands and never reads the replies: the session
must stop reading (its transport's producer is paused) instead of holding
the replies in memory, on plain TCP, after STARTTLS (TLSMemoryBIOProtocol
wraps the producer) and on an implicit TLS listener; once the client reads
again, every reply comes, in order.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import time

from twisted.internet import reactor, task
from twisted.internet import tcp as tcpmod
from twisted.trial import unittest

from relay.smtp.connection import PAUSED_INPUT_LIMIT
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, in_thread
from tests.support.wait import apoll

N = 200_000  # HELP commands: 1.2 MB sent (the kernel takes it all), 18 MB of replies if all were answered


class FlowControl(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-flow-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.certs = cert_files("localhost", "127.0.0.1")
        over = {
            "tls": {"certificate": self.certs.cert_pem, "key": self.certs.key_pem},
            "smtp": {"listen": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
                     "junk_command_limit": 0},
        }
        self.relay = InProcessRelay(self.tmp, over, deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.plain = self.relay.ports["smtp tcp:0:interface=127.0.0.1"]
        self.implicit = self.relay.ports["smtp ssl:0:interface=127.0.0.1"]

    def _connect(self, addr, tls: str | None):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(addr)
        ctx = ssl.create_default_context(cafile=self.certs.ca_pem)
        if tls == "implicit":
            s = ctx.wrap_socket(s, server_hostname="localhost")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        if tls == "starttls":
            s.sendall(b"EHLO client.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220 ")
            s = ctx.wrap_socket(s, server_hostname="localhost")
            f = s.makefile("rb")
        return s, f

    def flood(self, addr, tls: str | None):
        """Send N HELPs, never reading a reply."""
        s, f = self._connect(addr, tls)
        s.settimeout(30)
        s.sendall(b"HELP\r\n" * N)  # the kernel's buffers take it all: the relay need not read it
        return s, f

    def rest(self, s, f):
        """Read every reply again, then QUIT."""
        s.settimeout(30)
        got = 0
        t0 = time.monotonic()
        while got < N:
            line = f.readline()
            assert line.startswith(b"214 "), (got, line)
            got += 1
            assert time.monotonic() - t0 < 120, got
        s.sendall(b"QUIT\r\n")
        return got, f.readline()

    async def check(self, addr, tls: str | None):
        s, f = await in_thread(self.flood, addr, tls)
        try:
            ctx = self.relay.service.smtp_ctx
            await apoll(lambda: len(ctx.open_sessions) == 1, 10, what="the session")
            p = next(iter(ctx.open_sessions))
            tcp = p.transport
            while not isinstance(tcp, tcpmod.Connection):  # implicit TLS: TLSMemoryBIOProtocol over TCP
                tcp = tcp.transport

            def held() -> int:
                return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen

            # the steady state: the transport said its buffer is full and the
            # session stopped reading (a pause between two slices of a burst
            # also takes the socket out of the readers, for one reactor turn)
            await apoll(lambda: getattr(p, "_out_paused", False) and len(p.buf) >= PAUSED_INPUT_LIMIT
                        and tcp not in reactor.getReaders(), 30,
                        what="the relay to stop reading while its replies are not drained")
            # and it stays so (not the pause between two slices of a long burst),
            # holding a bounded amount: a transport buffer and the lines read before
            for _ in range(20):
                self.assertNotIn(tcp, reactor.getReaders())
                self.assertLess(held(), 1 << 20)
                self.assertLess(len(p.buf), 1 << 20)
                await task.deferLater(reactor, 0.05, lambda: None)
            self.assertTrue(getattr(p, "_out_paused", False))
            got, bye = await in_thread(self.rest, s, f)
            self.assertEqual((got, bye), (N, b"221 2.0.0 Bye\r\n"))
        finally:
            f.close()  # the socket is closed only when its file is too
            s.close()
        await apoll(lambda: not self.relay.service.smtp_ctx.open_sessions, 10, what="the session to end")

    async def test_plain(self):
        await self.check(self.plain, None)

    async def test_after_starttls(self):
        await self.check(self.plain, "starttls")

    async def test_implicit_tls(self):
        await self.check(self.implicit, "implicit")
