"""The metrics HTTP server and a client that pipelines requests and never
reads the responses: twisted.web's HTTPChannel answered each one at once
(its pause of the transport is skipped while a request is handled), so the
responses piled up (20,000 GETs: 140 MB).  Now one request per connection:
what a connection holds is one page, and the rest is not read."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading

from twisted.internet import reactor, task
from twisted.internet import tcp as tcpmod
from twisted.trial import unittest
from twisted.web.http import HTTPChannel

from tests.support.relay import InProcessRelay, in_thread
from tests.support.wait import apoll

N = 20_000  # pipelined GETs: 0.6 MB of requests, tens of MB of responses


class MetricsFlow(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-metricsflow-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.relay = InProcessRelay(self.tmp, {"metrics": {"listen": ["tcp:0:interface=127.0.0.1"]}},
                                    deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    async def test_pipelined_requests_whose_responses_are_not_read(self):
        host, port = self.relay.ports["metrics"]
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        sender = threading.Thread(target=s.sendall, args=(req * N,), daemon=True)
        sender.start()
        try:
            def channel():
                for t in list(reactor.getReaders()) + list(reactor.getWriters()):
                    proto = getattr(t, "protocol", None)
                    if isinstance(t, tcpmod.Server) and isinstance(getattr(proto, "_channel", proto), HTTPChannel):
                        return t
                return None

            def quiet() -> bool:
                """No metrics connection is read, and none holds more than a page or so."""
                t = channel()
                if t is None:
                    return True  # answered and closed
                return t not in reactor.getReaders() and len(t.dataBuffer) - t.offset + t._tempDataLen < 1 << 20

            await task.deferLater(reactor, 0.5, lambda: None)  # the flood is under way
            await apoll(quiet, 30, what="the metrics server to stop reading a client that does not read")
            for _ in range(20):
                self.assertTrue(quiet())
                await task.deferLater(reactor, 0.05, lambda: None)

            def read_all() -> bytes:
                s.settimeout(30)
                out = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:  # the unread requests reset the close
                        return out
                    if not chunk:
                        return out
                    out += chunk

            got = await in_thread(read_all)
            self.assertLessEqual(got.count(b"HTTP/1.1 200 OK"), 1)
        finally:
            s.close()

    async def test_a_scrape_still_works(self):
        import urllib.request

        host, port = self.relay.ports["metrics"]

        def get():
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                return r.status, r.headers.get("Connection"), r.read()

        status, conn, body = await in_thread(get)
        self.assertEqual((status, conn), (200, "close"))
        self.assertIn(b"relay_", body)
