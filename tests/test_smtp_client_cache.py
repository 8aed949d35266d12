"""Outbound connection reuse (relay.outbound.conncache.ConnectionCache) against a real sink."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay.delivery.mx import Hop
from relay.outbound.client import deliver
from relay.outbound.conncache import ConnectionCache
from relay.outbound.request import MessageFile, Outbound, Timeouts, TLSPolicy
from tests.support.sink import Sink
from tests.support.wait import apoll


class Cache(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-cache-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.sink = Sink("127.0.0.2").start()
        self.addCleanup(self.sink.stop)
        self.cache = ConnectionCache(reactor, idle=0.5)
        self.addCleanup(self.cache.close_all)
        self.msg = os.path.join(self.tmp, "m")
        with open(self.msg, "wb") as f:
            f.write(b"Subject: x\r\n\r\nbody\r\n")

    def send(self, rcpt, cache=True):
        hop = Hop("sink.test", "127.0.0.2", self.sink.port, 0)
        out = Outbound(sender="a@b.example", recipients=(rcpt,),
                       message=MessageFile(self.msg, os.path.getsize(self.msg)), helo="relay.test",
                       tls=TLSPolicy("none"), timeouts=Timeouts.uniform(5))
        return defer.ensureDeferred(deliver(reactor, [hop], out, cache=self.cache if cache else None))

    async def test_second_message_reuses_the_session(self):
        r1 = await self.send("one@x.example")
        r2 = await self.send("two@x.example")
        self.assertEqual([r1.results["one@x.example"].kind, r2.results["two@x.example"].kind],
                         ["delivered", "delivered"])
        self.assertEqual(len(self.sink.sessions), 1)
        self.assertEqual(len(self.sink.transactions), 2)
        self.assertEqual(self.cache.reused, 1)
        # idle too long: closed with QUIT
        await apoll(lambda: len(self.cache) == 0, timeout=30, what="the idle session to expire")
        await apoll(lambda: "QUIT" in [c.split()[0] for c in self.sink.sessions[0].commands],
                    timeout=30, what="QUIT")

    async def test_dead_cached_session_reconnects(self):
        await self.send("one@x.example")
        self.assertEqual(len(self.cache), 1)
        # the server drops idle connections: the next delivery reconnects
        for p in self.sink.protocols if hasattr(self.sink, "protocols") else []:
            p.transport.loseConnection()
        for lst in list(self.cache._idle.values()):
            for p in lst:
                p.proto.transport.loseConnection()
        await apoll(lambda: all(p.proto.lost is not None for lst in self.cache._idle.values() for p in lst),
                    timeout=30, what="the close")
        r = await self.send("two@x.example")
        self.assertEqual(r.results["two@x.example"].kind, "delivered")
        self.assertEqual(len(self.sink.sessions), 2)

    async def test_unsolicited_reply_while_parked_drops_it(self):
        await self.send("one@x.example")
        (p,) = [p for lst in self.cache._idle.values() for p in lst]
        p.proto.dataReceived(b"421 4.4.2 idle timeout\r\n")  # as if the server said so
        r = await self.send("two@x.example")
        self.assertEqual(r.results["two@x.example"].kind, "delivered")
        self.assertEqual(len(self.sink.sessions), 2)

    async def test_unclean_end_is_not_parked(self):
        self.sink.b.rcpt_replies = {"bad@x.example": "550 5.1.1 no"}
        r = await self.send("bad@x.example")
        self.assertEqual(r.results["bad@x.example"].kind, "bounced")
        self.assertEqual(len(self.cache), 0)  # a MAIL transaction was left open: QUIT, not parked


def test_host_limit_hands_slots_over_in_order_and_cancels():
    from relay.outbound.hostlimit import HostLimit

    limit = [2]
    hl = HostLimit(lambda: limit[0])
    key = ("127.0.0.2", 25)
    a, b = hl.acquire(key), hl.acquire(key)
    assert a.called and b.called and hl.count(key) == 2
    c, d, e = hl.acquire(key), hl.acquire(key), hl.acquire(key)
    assert not c.called and not d.called
    d.cancel()  # a waiter that gives up leaves the line
    d.addErrback(lambda f: None)
    assert list(hl.waiting[key]) == [c, e]
    assert hl.acquire(("127.0.0.3", 25)).called  # another host: its own slots
    hl.release(key)
    assert c.called and not e.called and hl.count(key) == 2
    limit[0] = 3  # a reload raises the limit: the next release lets two go
    hl.release(key)
    assert e.called and hl.count(key) == 2
    hl.release(key)
    hl.release(key)
    assert hl.count(key) == 0 and key not in hl.open and not hl.waiting
