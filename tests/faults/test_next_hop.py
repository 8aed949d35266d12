"""Next-hop faults through a whole relay: a hop that hangs (accepts the
connection and never answers), answers slowly, or resets mid-DATA.

The relay (in-process, real sockets) routes bad.test to a misbehaving sink
and good.test to a healthy one, and delivers local.test to a Maildir.  The
relay times out, defers (the state on disk says so), keeps delivering to the
other destinations meanwhile, and delivers the deferred mail once the hop
behaves; each message reaches each sink once, byte for byte.  Outbound
timeouts are RFC values by default (minutes); here the Deliverer gets
generous ones (GENEROUS: no step of a healthy exchange can reach them on a
busy machine) with only the step under test short, and the generous ones
back before the hop recovers: a retry that timed out at the final dot would
deliver twice.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from twisted.trial import unittest

from relay.mailbox import maildir
from relay.mailbox import users as usersmod
from relay.outbound.request import Timeouts
from tests.support.relay import InProcessRelay, in_thread
from tests.support.sink import Sink
from tests.support.smtpclient import send_session
from tests.support.wait import apoll

GENEROUS = Timeouts.uniform(60.0)


def short(**stages: float) -> Timeouts:
    """GENEROUS, with the given stages short."""
    return dataclasses.replace(GENEROUS, **stages)


def message(tag: str, size: int = 2_000) -> bytes:
    head = f"Message-ID: <{tag}@client.test>\r\nSubject: {tag}\r\n\r\n".encode()
    line = f"{tag} text text text text text text text text text text text text\r\n".encode()
    return head + line * max(1, size // len(line))


class HopCase(unittest.TestCase):
    bad_behaviour: dict = {}
    timeouts = GENEROUS
    delivery: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-hop-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.good = Sink("127.0.0.2").start()
        self.addCleanup(self.good.stop)
        self.bad = Sink("127.0.0.3", **self.bad_behaviour).start()
        self.addCleanup(self.bad.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.relay = InProcessRelay(self.tmp, {
            "relay": {"routes": {"good.test": f"127.0.0.2:{self.good.port}",
                                 "bad.test": f"127.0.0.3:{self.bad.port}"}},
            "delivery": {"retry_min": 1, "retry_max": 1, "tls": "none", "connect_timeout": 5,
                         **self.delivery},
        })
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.svc = self.relay.service
        self.svc.queue.deliverer.timeouts = self.timeouts
        self.mailbox = os.path.join(self.tmp, "mail", "local.test", "alice")

    def send(self, items: list[tuple[str, bytes]]):
        """[(recipient, message)] in one session: the queue ids."""
        return in_thread(send_session, *self.relay.smtp, items)

    def local_count(self) -> int:
        return len(maildir.scan(self.mailbox)) if os.path.isdir(self.mailbox) else 0

    def state(self, qid: str):
        """The live state (what relayctl shows): a deferral by a suspended
        (dead) destination is kept in memory only, not written to disk."""
        m = self.svc.queue.messages.get(qid)
        if m is not None:
            return m.state.recipients[0]
        return self.svc.spool.load(qid).state.recipients[0]

    def assertOnceEach(self, sink: Sink, msgs: dict[str, bytes]):
        got = {}
        for t in sink.transactions:
            mid = t.data.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0].decode()
            self.assertNotIn(mid, got, f"{mid} delivered twice")
            got[mid] = t.data
        self.assertEqual(sorted(got), sorted(msgs))
        for tag, m in msgs.items():
            self.assertTrue(got[tag].endswith(m), tag)

    async def others_flow(self, tag: str, n: int = 5):
        """Mail to good.test and to a local user is delivered now."""
        msgs = {f"{tag}{i}": message(f"{tag}{i}") for i in range(n)}
        before_local = self.local_count()
        await self.send([(f"u{i}@good.test", m) for i, m in enumerate(msgs.values())]
                        + [("alice@local.test", message(f"{tag}-local"))])
        await apoll(lambda: sum(1 for t in self.good.transactions if tag.encode() in t.data) == n
                    and self.local_count() == before_local + 1, 60, what="mail to other destinations")
        return msgs


class Hang(HopCase):
    bad_behaviour = {"hang": {"greeting"}}
    # long enough that the other mail is surely delivered while these hang
    timeouts = short(greeting=10.0)
    delivery = {"max_per_destination": 2, "max_concurrency": 4}

    async def test_hung_hop_times_out_defers_and_others_are_served(self):
        bad_msgs = {f"hang{i}": message(f"hang{i}") for i in range(6)}
        qids = await self.send([("x@bad.test", m) for m in bad_msgs.values()])
        # two connections (max_per_destination) sit there, unanswered
        await apoll(lambda: len(self.bad.sessions) == 2, 30, what="connections to the hung hop")
        good = await self.others_flow("during")
        # ... and they were still hanging while the others were served
        self.assertTrue(all(not s.closed for s in self.bad.sessions), "the hung attempts ended too early")
        self.assertEqual(self.bad.transactions, [])
        # the timeout defers them; the destination is not hammered meanwhile
        await apoll(lambda: all(self.state(q).status == "deferred" for q in qids), 60,
                    what="the hung attempts to time out")
        reasons = {self.state(q).reply for q in qids}
        self.assertTrue(any("timed out while receiving the initial server greeting" in r for r in reasons), reasons)
        # the relay has dropped them (the hop sees the close a moment later)
        await apoll(lambda: all(s.closed for s in self.bad.sessions), 30, what="the hung connections to close")
        # the hop recovers: everything is delivered, once
        self.svc.queue.deliverer.timeouts = GENEROUS
        self.bad.b.hang = set()
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="the deferred mail to be delivered")
        self.assertOnceEach(self.bad, bad_msgs)
        self.assertOnceEach(self.good, good)

    async def test_hang_after_the_final_dot(self):
        self.bad.b.hang = {"final"}
        self.svc.queue.deliverer.timeouts = short(data_end=1.0)
        [qid] = await self.send([("x@bad.test", message("final0"))])
        await apoll(lambda: self.state(qid).attempts >= 1, 60, what="the attempt to time out")
        r = self.state(qid)
        self.assertEqual(r.status, "deferred")
        self.assertIn("timed out while sending end of data -- message may be sent more than once", r.reply)
        await self.others_flow("after")
        self.svc.queue.deliverer.timeouts = GENEROUS
        self.bad.b.hang = set()
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once the hop answers")
        self.assertOnceEach(self.bad, {"final0": message("final0")})


class Slow(HopCase):
    # a second per reply: three messages take the slow hop some 15 s, while
    # the other mail needs well under a second (the margin is for busy CI)
    bad_behaviour = {"delay": 1.0, "pipelining": False}

    async def test_slow_hop_within_timeouts_delivers_others_unaffected(self):
        slow = {f"slow{i}": message(f"slow{i}") for i in range(3)}
        await self.send([("x@bad.test", m) for m in slow.values()])
        await apoll(lambda: self.bad.sessions, 30, what="a connection to the slow hop")
        good = await self.others_flow("meanwhile")
        self.assertLess(len(self.bad.transactions), 3)  # the slow one was still at work
        self.bad.b.delay = 0.1  # (the rest need not take that long)
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="the slow hop to take everything")
        self.assertEqual(self.svc.queue.counters.deferred, 0)  # slow, but within the timeouts
        self.assertOnceEach(self.bad, slow)
        self.assertOnceEach(self.good, good)

    async def test_reply_slower_than_the_timeout_defers(self):
        self.bad.b.delay = 0.0
        self.bad.b.delays = {"MAIL": 30.0}
        self.svc.queue.deliverer.timeouts = short(mail=1.0)
        [qid] = await self.send([("x@bad.test", message("tooslow"))])
        await apoll(lambda: self.state(qid).attempts >= 1, 60, what="the attempt to time out")
        self.assertEqual(self.state(qid).status, "deferred")
        self.assertIn("timed out while sending MAIL FROM", self.state(qid).reply)
        await self.others_flow("other")
        self.svc.queue.deliverer.timeouts = GENEROUS
        self.bad.b.delays = {}
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once the hop is quick")
        self.assertOnceEach(self.bad, {"tooslow": message("tooslow")})


class Reset(HopCase):
    bad_behaviour = {"reset_after_data_bytes": 20_000}

    async def test_reset_mid_data_defers_then_delivers_intact(self):
        big = {f"big{i}": message(f"big{i}", 200_000) for i in range(2)}
        qids = await self.send([("x@bad.test", m) for m in big.values()])
        await apoll(lambda: all(self.state(q).attempts >= 1 for q in qids), 60, what="the attempts")
        for q in qids:
            r = self.state(q)
            self.assertEqual(r.status, "deferred")
            self.assertIn("lost connection with 127.0.0.3[127.0.0.3] while sending", r.reply)
        good = await self.others_flow("between")
        self.assertEqual(self.bad.transactions, [])
        self.bad.b.reset_after_data_bytes = None
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once the hop stops resetting")
        self.assertOnceEach(self.bad, big)
        self.assertOnceEach(self.good, good)
