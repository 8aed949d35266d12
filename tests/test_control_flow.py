"""The control socket's output flow control (relay.common.flow), over the real UNIX
socket: a client that sends requests and never reads the answers makes the
relay stop reading it, instead of holding every answer in memory; once it
reads, every answer comes."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading

from twisted.internet import reactor, task
from twisted.trial import unittest

from relay.admin.client import _BoxReader, encode_box
from tests.support.relay import InProcessRelay, in_thread
from tests.support.wait import apoll

N = 40_000  # Hello requests: 1.2 MB; about 5 MB of answers


class ControlFlow(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-ctlflow-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.relay = InProcessRelay(self.tmp, deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    async def test_requests_whose_answers_are_not_read(self):
        svc = self.relay.service
        factory = svc.control.factory
        data = b"".join(encode_box({b"_command": b"Hello", b"_ask": b"%x" % i}) for i in range(N))
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(svc.control.path)
        s.settimeout(60)
        sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
        try:
            sender.start()  # blocks once the relay stops reading; goes on when we read
            await apoll(lambda: len(factory.protocols) == 1, 10, what="the control connection")
            p = next(iter(factory.protocols))
            t = p.transport

            def held() -> int:
                return len(t.dataBuffer) - t.offset + t._tempDataLen

            await apoll(lambda: t not in reactor.getReaders(), 30,
                        what="the relay to stop reading a client that does not read its answers")
            for _ in range(20):
                self.assertNotIn(t, reactor.getReaders())
                self.assertLess(held(), 1 << 20)
                await task.deferLater(reactor, 0.05, lambda: None)

            def read_all() -> int:
                r = _BoxReader()
                got = 0
                while got < N:
                    chunk = s.recv(65536)
                    assert chunk, got
                    for box in r.feed(chunk):
                        assert box[b"_answer"] == b"%x" % got, box
                        got += 1
                return got

            self.assertEqual(await in_thread(read_all), N)
            await in_thread(sender.join, 30)
            self.assertFalse(sender.is_alive())
        finally:
            s.close()
        await apoll(lambda: not factory.protocols, 10, what="the connection to end")
