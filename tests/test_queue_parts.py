"""The queue runner's parts on their own: delivery slots, outcome records,
backoff, and the parked sessions the runner is given (relay.queue.slots,
relay.queue.outcomes, relay.queue.manager's ``parked`` parameter)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from relay import config as configmod
from relay.delivery import routing
from relay.delivery.attempt import Outcome
from relay.queue import outcomes
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.queue.manager import QueueManager
from relay.queue.message import Job, Message
from relay.queue.ports import cancel
from relay.queue.slots import SlotPool


def _config(tmp: str, **delivery):
    return configmod.load(None, data={
        "hostname": "relay.test", "spool": os.path.join(tmp, "spool"),
        "local": {"domains": ["local.test"], "users": os.path.join(tmp, "users")},
        "delivery": {"retry_min": "5m", "retry_max": "1h", "max_lifetime": "5d", **delivery},
    })


def _message(rcpts, arrival=1000.0) -> Message:
    env = spoolmod.Envelope(spoolmod.new_id(), "s@client.example", list(rcpts), arrival)
    return Message(env.queue_id, env, spoolmod.State.fresh(env), 10, 0)


def _job(msg: Message, key: str) -> Job:
    return Job(msg, routing.Destination("mx", key, key), list(msg.state.recipients), local=False)


class Slots(unittest.TestCase):
    def test_round_robin_within_the_limits(self):
        pool = SlotPool(limit=3, per_dest=2)
        m = _message(["a@x.example"])
        jobs = [_job(m, "a") for _ in range(3)] + [_job(m, "b")]
        for j in jobs:
            pool.add(j)
        started = [pool.next_job() for _ in range(4)]
        self.assertEqual([j.dest.key for j in started if j], ["a", "b", "a"])  # fair, then the limit
        self.assertIsNone(started[3])
        self.assertEqual((pool.running, pool.waiting_count()), (3, 1))
        pool.done(started[0])
        self.assertEqual(pool.next_job().dest.key, "a")  # a freed slot goes to the one waiting

    def test_take_waiting_empties_the_pool(self):
        pool = SlotPool(limit=1, per_dest=1)
        m = _message(["a@x.example"])
        for key in ("a", "b"):
            pool.add(_job(m, key))
        self.assertEqual(len(pool.take_waiting()), 2)
        self.assertIsNone(pool.next_job())


class Outcomes(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-parts-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.delivery = _config(self.tmp).delivery

    def test_backoff_doubles_to_the_maximum_within_the_jitter(self):
        rng = random.Random(1)
        for attempts, base in ((1, 300), (2, 600), (3, 1200), (9, 3600)):
            b = outcomes.backoff(self.delivery, attempts, rng)
            self.assertTrue(base * (1 - outcomes.JITTER) <= b <= base * (1 + outcomes.JITTER), (attempts, b))

    def test_record_delivered_bounced_deferred_and_expired(self):
        msg = _message(["a@x.example", "b@x.example", "c@x.example", "d@x.example"])
        counters = outcomes.Counters()
        outs = [Outcome("a@x.example", "delivered", "2.0.0", "250 ok", "mx[1.2.3.4]:25", "mx", True),
                Outcome("b@x.example", "bounced", "5.1.1", "550 5.1.1 no", "mx[1.2.3.4]:25", "mx", True),
                Outcome("c@x.example", "deferred", "4.0.0", "451 later", "mx[1.2.3.4]:25", "mx", True)]
        outcomes.record(msg, msg.state.recipients, outs, now=2000.0, delivery=self.delivery, counters=counters,
                        backoff=lambda n: 60.0)
        a, b, c, d = msg.state.recipients
        self.assertEqual((a.status, b.status, c.status, d.status), ("delivered", "bounced", "deferred", "pending"))
        self.assertEqual(c.next_attempt, 2060.0)
        self.assertEqual([f.recipient for f in msg.failures], ["b@x.example"])
        self.assertTrue(msg.settled and msg.tried)
        self.assertEqual((counters.delivered, counters.bounced, counters.deferred), (1, 1, 1))
        late = 1000.0 + self.delivery.max_lifetime
        outcomes.record(msg, [c], [Outcome("c@x.example", "deferred", "4.0.0", "451 later")], now=late,
                        delivery=self.delivery, counters=counters, backoff=lambda n: 60.0)
        self.assertEqual((c.status, msg.failures[-1].status, counters.expired), ("bounced", "5.4.7", 1))

    def test_a_suspension_is_not_an_attempt_in_the_history(self):
        msg = _message(["a@x.example"])
        job = _job(msg, "mx:x.example")
        outcomes.record(msg, job.recipients, outcomes.suspended(job, "timed out"), now=2000.0,
                        delivery=self.delivery, counters=outcomes.Counters(), backoff=lambda n: 60.0)
        (r,) = msg.state.recipients
        self.assertEqual((r.status, r.history, msg.tried), ("deferred", [], False))
        self.assertIn("delivery temporarily suspended: timed out", r.reply)

    def test_status_of(self):
        self.assertEqual(outcomes.status_of("451 4.7.1 greylisted", "4.0.0"), "4.7.1")
        self.assertEqual(outcomes.status_of("", "4.0.0"), "4.0.0")


class FakeParked:
    def __init__(self, n: int):
        self.n = n
        self.evicted: list[int | None] = []
        self.closed = 0

    def __len__(self) -> int:
        return self.n

    def evict(self, n: int | None = None) -> int:
        self.evicted.append(n)
        self.n -= n or self.n
        return n or 0

    def close_all(self) -> defer.Deferred:
        self.closed += 1
        return defer.succeed(None)


class Hop:
    def attempt(self, msg, dest, recipients):
        return defer.succeed([Outcome(r, "delivered", "2.0.0", "250 ok", "mx[1.2.3.4]:25", "mx", True)
                              for r in recipients])


class ParkedSessions(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-parts-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.config = _config(self.tmp, max_concurrency=2)
        self.spool = spoolmod.Spool(self.config.spool)
        self.spool.create()
        self.parked = FakeParked(2)
        self.qm = QueueManager(self.clock, AsyncSpool(self.spool, DiskPool(self.clock, inline=True)), Hop(),
                               self.config, parked=self.parked)
        self.successResultOf(self.qm.start())

    def test_parked_sessions_count_within_max_concurrency_and_close_at_stop(self):
        env = spoolmod.Envelope(spoolmod.new_id(), "s@client.example", ["a@remote.example"], self.clock.seconds())
        self.qm.add(self.spool.inject(env, b"Subject: t\r\n\r\nbody\r\n"))
        self.clock.advance(0)
        self.assertEqual(self.parked.evicted, [1])  # one running + two parked > 2
        self.assertEqual(self.spool.queue_ids(), [])
        self.successResultOf(self.qm.stop())
        self.assertEqual(self.parked.closed, 1)

    def test_the_disk_stopped_callable_is_asked_at_the_end_of_an_attempt(self):
        stopped = [True]
        self.qm.disk_stopped = lambda: stopped[0]
        env = spoolmod.Envelope(spoolmod.new_id(), "s@client.example", ["a@remote.example"], self.clock.seconds())
        self.qm.add(self.spool.inject(env, b"Subject: t\r\n\r\nbody\r\n"))
        self.clock.advance(0)
        self.assertEqual(self.spool.queue_ids(), [env.queue_id])  # delivered, but nothing recorded any more


class Cancel(unittest.TestCase):
    def test_cancel_is_quiet_on_a_call_that_ran_or_none(self):
        clock = task.Clock()
        call = clock.callLater(1, lambda: None)
        cancel(call)
        self.assertFalse(call.active())
        cancel(call)
        cancel(None)
