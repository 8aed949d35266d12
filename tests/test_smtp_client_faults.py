"""Next-hop faults: refused, 421/5xx greetings, hangs, slow answers, resets,
stalled readers, and DNS that does not answer, over real sockets."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay.delivery.mx import Hop, Resolver
from relay.outbound.request import Timeouts
from tests.support.dns import DNSServer, Zone
from tests.test_smtp_client import MSG, ClientCase, send, write_big


def closed_port(address: str) -> int:
    """A port on address where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind((address, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class HopIterationTests(ClientCase):
    async def test_next_hop_after_refused_421_and_5xx_greeting(self):
        busy = self.sink("127.0.0.3", greeting="421 4.3.2 mx2 busy, try later")
        hostile = self.sink("127.0.0.4", greeting="554 5.7.1 mx3 does not like you")
        good = self.sink("127.0.0.2")
        refused = Hop("mx1.test", "127.0.0.5", closed_port("127.0.0.5"), 10)
        hops = [
            refused,
            self.hop(busy, "mx2.test", 20),
            self.hop(hostile, "mx3.test", 30),
            self.hop(good, "mx4.test", 40),
        ]
        rep = await self.deliver(hops)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(rep.hop.host, "mx4.test")
        reasons = [r for _, r in rep.attempts]
        self.assertEqual(len(reasons), 3)
        self.assertEqual(reasons[0], f"connect to mx1.test[127.0.0.5]:{refused.port}: Connection refused")
        self.assertIn("refused to talk to me: 421 4.3.2 mx2 busy", reasons[1])
        self.assertIn("554 5.7.1", reasons[2])
        self.assertEqual(len(good.transactions), 1)

    async def test_all_hops_fail_deferred_with_last_reason(self):
        h1 = Hop("mx1.test", "127.0.0.5", closed_port("127.0.0.5"), 10)
        h2 = Hop("mx2.test", "127.0.0.6", closed_port("127.0.0.6"), 20)
        rep = await self.deliver([h1, h2], recipients=["a@dest.test", "b@dest.test"])
        for r in ("a@dest.test", "b@dest.test"):
            res = rep.results[r]
            self.assertEqual((res.kind, res.status, res.code), ("deferred", "4.4.1", None))
            self.assertEqual(res.text, f"connect to mx2.test[127.0.0.6]:{h2.port}: Connection refused")
        self.assertIsNone(rep.hop)
        self.assertEqual(len(rep.attempts), 2)

    async def test_5xx_greeting_on_last_hop_is_deferred(self):
        hostile = self.sink("127.0.0.4", greeting="554 5.7.1 no")
        rep = await self.deliver([self.hop(hostile)])
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status), ("deferred", "4.7.1"))
        self.assertIn("554 5.7.1 no", res.text)

    async def test_no_hops(self):
        rep = await self.deliver([])
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "deferred")

    async def test_stop_at_first_hop_that_answers_even_with_5xx(self):
        first = self.sink("127.0.0.2", rcpt_replies={"rcpt@dest.test": "550 5.1.1 unknown"})
        second = self.sink("127.0.0.3")
        rep = await self.deliver([self.hop(first, "mx1.test"), self.hop(second, "mx2.test", 20)])
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "bounced")
        self.assertEqual(second.sessions, [])

    async def test_421_before_recipients_moves_on(self):
        first = self.sink("127.0.0.2", replies={"MAIL": "421 4.3.0 shutting down"})
        second = self.sink("127.0.0.3")
        rep = await self.deliver([self.hop(first, "mx1.test"), self.hop(second, "mx2.test", 20)])
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(rep.hop.host, "mx2.test")
        self.assertIn("421 4.3.0 shutting down", rep.attempts[0][1])

    async def test_421_at_rcpt_without_pipelining_moves_on(self):
        first = self.sink("127.0.0.2", pipelining=False, replies={"RCPT": "421 4.7.0 too many errors"})
        second = self.sink("127.0.0.3")
        rep = await self.deliver([self.hop(first, "mx1.test"), self.hop(second, "mx2.test", 20)])
        self.assertDelivered(rep, "rcpt@dest.test")

    async def test_421_after_first_transaction_defers_rest(self):
        s = self.sink(replies={"MAIL": ["250 2.1.0 Ok", "421 4.3.0 closing now"]})
        other = self.sink("127.0.0.3")
        rcpts = ["a@dest.test", "b@dest.test", "c@dest.test"]
        rep = await self.deliver([self.hop(s), self.hop(other, "mx2.test", 20)], recipients=rcpts, max_rcpts_per_txn=1)
        self.assertDelivered(rep, "a@dest.test")
        for r in ("b@dest.test", "c@dest.test"):
            self.assertEqual(rep.results[r].kind, "deferred")
        self.assertIn("421 4.3.0 closing now", rep.results["b@dest.test"].text)
        self.assertEqual(other.sessions, [])


class TimeoutTests(ClientCase):
    async def test_hang_at_greeting_times_out_and_moves_on(self):
        hung = self.sink("127.0.0.3", hang={"greeting"})
        good = self.sink("127.0.0.2")
        rep = await self.deliver(
            [self.hop(hung, "mx1.test"), self.hop(good, "mx2.test", 20)], timeouts=Timeouts.uniform(0.5)
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIn("timed out while receiving the initial server greeting", rep.attempts[0][1])

    async def test_hang_at_greeting_only_hop_deferred(self):
        hung = self.sink("127.0.0.3", hang={"greeting"})
        rep = await self.deliver([self.hop(hung)], timeouts=Timeouts.uniform(0.3))
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status), ("deferred", "4.4.2"))
        self.assertEqual(
            res.text, "conversation with mx.test[127.0.0.3] timed out while receiving the initial server greeting"
        )

    async def test_hang_after_data_is_deferred_not_resent_elsewhere(self):
        hung = self.sink("127.0.0.3", hang={"final"})
        other = self.sink("127.0.0.2")
        rep = await self.deliver(
            [self.hop(hung, "mx1.test"), self.hop(other, "mx2.test", 20)],
            recipients=["a@dest.test", "b@dest.test"],
            timeouts=Timeouts.uniform(0.5),
        )
        for r in ("a@dest.test", "b@dest.test"):
            res = rep.results[r]
            self.assertEqual((res.kind, res.status, res.stage), ("deferred", "4.4.2", "end of DATA"))
            self.assertIn("timed out while sending end of data -- message may be sent more than once", res.text)
        self.assertEqual(other.sessions, [])
        self.assertEqual(len(hung.sessions[0].transactions), 1)  # the server did get it all

    async def test_hang_at_rcpt_moves_on(self):
        hung = self.sink("127.0.0.3", hang={"RCPT"})
        good = self.sink("127.0.0.2")
        rep = await self.deliver(
            [self.hop(hung, "mx1.test"), self.hop(good, "mx2.test", 20)], timeouts=Timeouts.uniform(0.4)
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIn("timed out while sending RCPT TO", rep.attempts[0][1])

    async def test_hang_at_data_initiation(self):
        hung = self.sink("127.0.0.3", hang={"DATA"}, pipelining=False)
        rep = await self.deliver([self.hop(hung)], timeouts=Timeouts.uniform(0.4))
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "deferred")

    async def test_slow_replies_within_timeouts(self):
        slow = self.sink(delay=0.1, pipelining=False)
        rep = await self.deliver(
            [self.hop(slow)], recipients=["a@dest.test", "b@dest.test"], timeouts=Timeouts.uniform(1.0)
        )
        self.assertDelivered(rep, "a@dest.test", "b@dest.test")

    async def test_each_reply_has_its_own_timeout(self):
        # Seven replies of 0.2 s each (1.4 s in all) with a 1 s per-reply
        # timeout: slow but steady progress is not a timeout.
        slow = self.sink(delay=0.2, pipelining=False)
        rep = await self.deliver([self.hop(slow)], timeouts=Timeouts.uniform(1.0, session=30))
        self.assertDelivered(rep, "rcpt@dest.test")

    async def test_session_cap(self):
        slow = self.sink(delay=0.2, pipelining=False)
        t = Timeouts.uniform(5.0, session=0.5)
        rep = await self.deliver([self.hop(slow)], recipients=[f"u{i}@dest.test" for i in range(10)], timeouts=t)
        self.assertEqual(rep.recipients("deferred"), [f"u{i}@dest.test" for i in range(10)])
        self.assertEqual(slow.transactions, [])

    async def test_connect_timeout(self):
        # A listener whose accept queue is full: the kernel drops our SYN.
        srv = socket.socket()
        srv.bind(("127.0.0.7", 0))
        srv.listen(0)
        self.addCleanup(srv.close)
        port = srv.getsockname()[1]
        fillers = []
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.7", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        self.addCleanup(lambda: [c.close() for c in fillers])
        rep = await self.deliver([Hop("mx.test", "127.0.0.7", port, 10)], connect_timeout=0.5)
        res = rep.results["rcpt@dest.test"]
        self.assertEqual(res.kind, "deferred")
        self.assertEqual(res.text, f"connect to mx.test[127.0.0.7]:{port}: Connection timed out")


class ResetTests(ClientCase):
    async def test_reset_mid_data_defers(self):
        s = self.sink(reset_after_data_bytes=5000)
        other = self.sink("127.0.0.3")
        body = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 2000
        rep = await self.deliver(
            [self.hop(s), self.hop(other, "mx2.test", 20)], message=body, recipients=["a@dest.test", "b@dest.test"]
        )
        for r in ("a@dest.test", "b@dest.test"):
            res = rep.results[r]
            self.assertEqual((res.kind, res.status), ("deferred", "4.4.2"))
            self.assertIn("lost connection with mx.test[127.0.0.2] while sending", res.text)
        self.assertEqual(s.transactions, [])
        self.assertEqual(other.sessions, [])

    async def test_reset_at_mail_moves_on(self):
        s = self.sink(abort_at={"MAIL"})
        other = self.sink("127.0.0.3")
        rep = await self.deliver([self.hop(s), self.hop(other, "mx2.test", 20)])
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIn("lost connection with mx.test[127.0.0.2]", rep.attempts[0][1])

    async def test_stalled_reader_times_out_in_data(self):
        path = os.path.join(self.dir, "big")
        # 24 MB: more than the loopback socket buffers hold.
        size = write_big(path, b"q" * 998 + b"\r\n", 24 * 1024)
        s = self.sink(stall_data=True, keep_data=False)
        rep = await send(
            reactor,
            [self.hop(s)],
            sender="a@b.test",
            recipients=["r@dest.test"],
            message_path=path,
            message_size=size,
            helo="relay.test",
            tls_mode="none",
            timeouts=Timeouts.uniform(0.5),
            body_8bit=False,
        )
        res = rep.results["r@dest.test"]
        self.assertEqual(res.kind, "deferred")
        self.assertIn("timed out while sending message body", res.text)


class IsolationTests(ClientCase):
    """A hung peer or silent DNS for one destination does not hold up others."""

    async def test_hung_destination_does_not_block_another(self):
        hung = self.sink("127.0.0.3", hang={"greeting"})
        good = self.sink("127.0.0.2")
        slow_d = defer.ensureDeferred(self.deliver([self.hop(hung)], timeouts=Timeouts.uniform(2.0)))
        rep = await self.deliver([self.hop(good)])
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertFalse(slow_d.called)
        slow = await slow_d
        self.assertEqual(slow.results["rcpt@dest.test"].kind, "deferred")

    async def test_dns_down_does_not_block_delivery(self):
        zone = Zone()
        zone.behave("down.test", "drop")
        server = DNSServer(zone).start()
        self.addCleanup(server.stop)
        resolver = Resolver(server.nameservers, lifetime=1.5)
        lookup = resolver.mx_hops("down.test", 25)
        good = self.sink("127.0.0.2")
        rep = await self.deliver([self.hop(good)], message=MSG)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertFalse(lookup.called)
        try:
            await lookup
        except Exception as e:  # noqa: BLE001
            self.assertTrue(e.temporary)
        else:
            self.fail("expected a temporary DNS failure")


class TrialDirtyReactorTests(unittest.TestCase):
    """deliver() leaves no connection behind (trial would report it)."""

    async def test_nothing_left_open_after_failures(self):
        rep = await send(
            reactor,
            [Hop("x.test", "127.0.0.5", closed_port("127.0.0.5"))],
            sender="",
            recipients=["a@b.test"],
            message_path=__file__,
            message_size=10,
            helo="relay.test",
            tls_mode="may",
            timeouts=Timeouts.uniform(1),
        )
        self.assertEqual(rep.results["a@b.test"].kind, "deferred")
