"""The queue runner's schedule, limits and records, on task.Clock.

These drive a 5-day schedule in milliseconds: time comes from a Clock, the
spool is real (a temporary directory) with disk work run inline, and the
next hop is a scripted stand-in for relay.delivery.attempt (the real deliveries
are covered over real sockets in tests/integration).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest

from relay import config as configmod
from relay.delivery import routing
from relay.delivery.attempt import Outcome
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.queue.manager import QueueManager

DAY = 86400


class ScriptedNextHop:
    """Answers attempts from a script; records every call."""

    def __init__(self, script=None, manual=False):
        self.script = script or (lambda dest, rcpt, n: ("delivered", "2.0.0", "250 2.0.0 ok"))
        self.calls: list[tuple[float, str, str, list[str]]] = []
        self.manual = manual
        self.pending: list[tuple[defer.Deferred, list]] = []
        self.clock = None
        self.count: dict[str, int] = {}

    def attempt(self, msg, dest, recipients):
        self.calls.append((self.clock.seconds(), msg.qid, dest.key, list(recipients)))
        outs = []
        for r in recipients:
            n = self.count[r] = self.count.get(r, 0) + 1
            kind, status, reply = self.script(dest, r, n)
            outs.append(Outcome(r, kind, status, reply, "mx.test[127.0.0.9]:25", "mx.test", True))
        if self.manual:
            d = defer.Deferred()
            self.pending.append((d, outs))
            return d
        return defer.succeed(outs)

    def release_all(self):
        pend, self.pending = self.pending, []
        for d, outs in pend:
            d.callback(outs)


class QueueCase(unittest.TestCase):
    delivery: dict = {}

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-queue-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.config = configmod.load(None, data={
            "hostname": "relay.test", "spool": os.path.join(self.tmp, "spool"),
            "local": {"domains": ["local.test"], "users": os.path.join(self.tmp, "users")},
            "delivery": {"retry_min": "5m", "retry_max": "1h", "max_lifetime": "5d",
                         "delay_warning": "4h", **self.delivery},
        })
        self.spool = spoolmod.Spool(self.config.spool)
        self.spool.create()
        self.hop = ScriptedNextHop()
        self.hop.clock = self.clock
        self.qm = None

    def start(self, hop=None):
        if hop is not None:
            self.hop = hop
            hop.clock = self.clock
        disk = DiskPool(self.clock, inline=True)
        self.qm = QueueManager(self.clock, AsyncSpool(self.spool, disk), self.hop, self.config,
                               disk_stopped=lambda: disk.stopped)
        self.qm.random.seed(1)
        self.successResultOf(self.qm.start())
        return self.qm

    def queue(self, rcpts, sender="sender@client.example", body=b"Subject: test\r\n\r\nbody\r\n"):
        env = spoolmod.Envelope(spoolmod.new_id(), sender, list(rcpts), self.clock.seconds())
        entry = self.spool.inject(env, body)
        if self.qm is not None:
            self.qm.add(entry)
        return env.queue_id

    def dsns(self):
        out = []
        for qid in self.spool.queue_ids():
            env, off, _ = self.spool.read_envelope(qid)
            if env.sender == "" and env.extra.get("dsn"):
                with open(self.spool.message_path(qid), "rb") as f:
                    f.seek(off)
                    out.append((env, email.message_from_bytes(f.read(), policy=email.policy.default)))
        return out


class Schedule(QueueCase):
    def test_new_mail_delivered_immediately_and_removed(self):
        self.start()
        qid = self.queue(["a@remote.example", "b@remote.example", "c@other.example"])
        self.clock.advance(0)
        keys = sorted(c[2] for c in self.hop.calls)
        self.assertEqual(keys, ["mx:other.example", "mx:remote.example"])
        # one transaction for both recipients of remote.example
        self.assertIn(["a@remote.example", "b@remote.example"], [c[3] for c in self.hop.calls])
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertNotIn(qid, self.qm.messages)

    def test_found_in_spool_at_start(self):
        qid = self.queue(["a@remote.example"])
        self.start()
        self.clock.advance(0)
        self.assertEqual([c[1] for c in self.hop.calls], [qid])

    def test_retry_backoff_doubles_to_max_with_jitter_then_expires_with_bounce(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.2.0", "451 4.2.0 try later")))
        t0 = self.clock.seconds()
        qid = self.queue(["a@remote.example"])
        # run five days in steps of a minute
        for _ in range(int(5 * DAY / 60) + 120):
            self.clock.advance(60)
        times = [c[0] - t0 for c in self.hop.calls if c[1] == qid]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # 5m, 10m, 20m, 40m, then 1h (within jitter and the 1-minute step)
        self.assertGreaterEqual(len(gaps), 6, times)
        for want, got in zip([300, 600, 1200, 2400, 3600, 3600], gaps):
            self.assertLess(abs(got - want), want * 0.1 + 61, (want, got))
        self.assertTrue(all(g <= 3600 * 1.1 + 61 for g in gaps))
        # expired: bounced after max_lifetime, the message is gone, one DSN queued
        self.assertNotIn(qid, self.qm.messages)
        self.assertLessEqual(times[-1], 5 * DAY + 61)
        self.assertGreaterEqual(times[-1], 5 * DAY - 3600 * 1.1)
        dsns = [m for env, m in self.dsns() if env.extra["for"] == qid]
        failed = [m for m in dsns if "Undelivered" in m["Subject"]]
        self.assertEqual(len(failed), 1)
        report = failed[0]
        self.assertEqual(report.get_content_type(), "multipart/report")
        status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
        text = status.as_string()
        self.assertIn("Action: failed", text)
        self.assertIn("Status: 5.4.7", text)
        self.assertIn("Final-Recipient: rfc822; a@remote.example", text)
        self.assertIn("451 4.2.0 try later", text)

    def test_one_delay_notice(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.4.1", "connect to mx: refused")
                                   if d.key != "mx:client.example" else ("deferred", "4.0.0", "dsn held")))
        qid = self.queue(["a@remote.example"])
        for _ in range(int(DAY / 60)):
            self.clock.advance(60)
        delayed = [m for env, m in self.dsns() if env.extra.get("for") == qid and env.extra["dsn"] == "delayed"]
        self.assertEqual(len(delayed), 1)
        self.assertIn("Action: delayed", delayed[0].as_string())
        self.assertTrue(self.qm.messages[qid].state.warned)

    def test_no_delay_notice_when_disabled(self):
        self.config = configmod.load(None, data={
            "hostname": "relay.test", "spool": self.config.spool,
            "local": {"domains": ["local.test"]}, "delivery": {"delay_warning": "0"}})
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.4.1", "refused")))
        self.queue(["a@remote.example"])
        for _ in range(int(DAY / 600)):
            self.clock.advance(600)
        self.assertEqual(self.dsns(), [])

    def test_5xx_for_one_recipient_others_delivered_never_resent(self):
        def script(d, r, n):
            if d.key == "mx:client.example":
                return "deferred", "4.0.0", "keep the DSN queued"
            if r.startswith("bad"):
                return "bounced", "5.1.1", "550 5.1.1 no such user"
            if r.startswith("slow"):
                return ("deferred", "4.2.0", "452 4.2.0 busy") if n == 1 else ("delivered", "2.0.0", "250 ok")
            return "delivered", "2.0.0", "250 ok"

        self.start(ScriptedNextHop(script))
        qid = self.queue(["good@remote.example", "bad@remote.example", "slow@remote.example"])
        self.clock.advance(0)
        msg = self.qm.messages[qid]
        self.assertEqual([r.status for r in msg.state.recipients], ["delivered", "bounced", "deferred"])
        # durable: the state file says so
        st = self.spool.read_state(qid, msg.env)
        self.assertEqual([r.status for r in st.recipients], ["delivered", "bounced", "deferred"])
        self.clock.advance(400)
        attempts = [c[3] for c in self.hop.calls if c[1] == qid]
        self.assertEqual(self.qm.counters.dsn_sent, 1)
        self.assertEqual(attempts, [["good@remote.example", "bad@remote.example", "slow@remote.example"],
                                    ["slow@remote.example"]])
        self.assertNotIn(qid, self.qm.messages)
        dsn = [m for env, m in self.dsns() if env.extra["for"] == qid]
        self.assertEqual(len(dsn), 1)
        self.assertIn("bad@remote.example", dsn[0].as_string())
        self.assertNotIn("good@remote.example", str(dsn[0].get_payload()[1]))

    def test_restart_keeps_final_recipients_final(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("delivered", "2.0.0", "250 ok") if r.startswith("a")
                                   else ("deferred", "4.0.0", "451 later")))
        self.queue(["a@remote.example", "b@remote.example"])
        self.clock.advance(0)
        # a new queue manager on the same spool: like a restart
        hop2 = ScriptedNextHop()
        self.qm.running = False
        self.start(hop2)
        self.clock.advance(3600)
        self.assertEqual([c[3] for c in hop2.calls], [["b@remote.example"]])

    def test_null_sender_never_bounced(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("bounced", "5.1.1", "550 no")))
        self.queue(["a@remote.example"], sender="")
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [])
        self.assertEqual(self.spool.queue_ids(), [])

    def test_dsn_is_delivered_like_any_message(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("bounced", "5.1.1", "550 no") if d.key == "mx:remote.example"
                                   else ("delivered", "2.0.0", "250 ok")))
        self.queue(["a@remote.example"], sender="me@client.example")
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual([c[3] for c in self.hop.calls], [["a@remote.example"], ["me@client.example"]])
        self.assertEqual(self.spool.queue_ids(), [])


class Limits(QueueCase):
    delivery = {"max_concurrency": 3, "max_per_destination": 2}

    def test_concurrency_limits(self):
        hop = ScriptedNextHop(manual=True)
        self.start(hop)
        for i in range(4):
            self.queue([f"x{i}@one.example"])
        for i in range(4):
            self.queue([f"y{i}@two.example"])
        self.clock.advance(0)
        running = [c[2] for c in hop.calls]
        self.assertEqual(len(running), 3)
        self.assertLessEqual(running.count("mx:one.example"), 2)
        self.assertLessEqual(running.count("mx:two.example"), 2)
        hop.release_all()
        self.clock.advance(0)
        self.assertEqual(len(hop.calls), 6)
        while hop.pending:
            hop.release_all()
            self.clock.advance(0)
        self.assertEqual(len(hop.calls), 8)
        self.assertEqual(self.spool.queue_ids(), [])


class DeadDestinationBacklog(QueueCase):
    delivery = {"max_concurrency": 1, "max_per_destination": 1}

    def test_backlog_of_a_dead_destination_is_suspended_over_several_turns(self):
        from relay.queue.manager import DISPATCH_PER_TURN

        hop = ScriptedNextHop(manual=True)
        self.start(hop)
        n = DISPATCH_PER_TURN * 2 + 50
        for i in range(n):
            self.queue([f"u{i}@dead.example"])
        self.clock.advance(0)
        self.assertEqual(len(hop.calls), 1)
        # no server answered: the destination is dead, its backlog is deferred without attempts
        (d, outs), = hop.pending
        hop.pending = []
        d.callback([Outcome(o.address, "deferred", "4.4.1", "connect to mx.dead.example: timed out", "none", None,
                            False) for o in outs])

        def deferred():
            return sum(1 for m in self.qm.messages.values()
                       if all(r.status == spoolmod.DEFERRED for r in m.state.recipients))

        # one slice in this turn (the reactor serves others before the next one)
        self.assertLessEqual(deferred(), DISPATCH_PER_TURN + 1)
        self.clock.advance(0)
        self.assertEqual(deferred(), n)
        self.assertEqual(len(hop.calls), 1)


class RetryOfADeadDestination(QueueCase):
    """relayctl queue retry: what was found dead before the retry does not
    suspend it (a real attempt at once); what the retry's own attempts find
    does suspend the rest of a retry --all."""

    def test_retry_makes_a_real_attempt_then_a_fresh_failure_suspends_the_rest(self):
        refused = [True]

        class Hop(ScriptedNextHop):
            def attempt(self, msg, dest, recipients):
                self.calls.append((self.clock.seconds(), msg.qid, dest.key, list(recipients)))
                if refused[0]:
                    return defer.succeed([Outcome(r, "deferred", "4.4.1", "connect to mx.dead.example: refused",
                                                  "none", None, False) for r in recipients])
                return defer.succeed([Outcome(r, "delivered", "2.0.0", "250 ok", "mx", "mx", True)
                                      for r in recipients])

        hop = Hop()
        self.start(hop)
        q1 = self.queue(["a@dead.example"])
        self.clock.advance(0)
        q2 = self.queue(["b@dead.example"])
        q3 = self.queue(["c@dead.example"])
        self.clock.advance(0)
        self.assertEqual([c[1] for c in hop.calls], [q1])  # q2, q3 suspended
        self.clock.advance(60)  # past the dead window (30 s at most); q2, q3 wait for their backoff
        self.assertEqual(len(hop.calls), 1)
        q4 = self.queue(["d@dead.example"])
        self.clock.advance(0)
        self.assertEqual([c[1] for c in hop.calls], [q1, q4])  # a new real attempt: dead again
        # the next hop is still down: a retry of one makes a real attempt anyway
        self.assertEqual(self.successResultOf(self.qm.retry(q2)), "will be attempted now")
        self.clock.advance(0)
        self.assertEqual([c[1] for c in hop.calls], [q1, q4, q2])
        # retry of all: the first real attempt finds it dead again, the others are suspended
        for q in (q1, q3, q4):
            self.qm.retry(q)
        self.clock.advance(0)
        self.assertEqual(len(hop.calls), 4)
        # the next hop is back: a retry delivers at once
        refused[0] = False
        for q in (q1, q2, q3, q4):
            self.qm.retry(q)
        self.clock.advance(0)
        self.assertEqual(self.qm.messages, {})


class Admin(QueueCase):
    def test_hold_stops_delivery_and_expiry_release_delivers(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.0.0", "451 later") if n == 1
                                   else ("delivered", "2.0.0", "250 ok")))
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)
        self.successResultOf(defer.ensureDeferred(self.qm.hold(qid)))
        self.assertTrue(self.spool.read_state(qid, self.qm.messages[qid].env).hold)
        for _ in range(6 * 24):
            self.clock.advance(3600)
        self.assertEqual(len(self.hop.calls), 1)  # nothing while held, and no expiry
        self.assertIn(qid, self.qm.messages)
        self.assertEqual(self.qm.messages[qid].queue_name, "hold")
        self.successResultOf(defer.ensureDeferred(self.qm.release(qid)))
        self.qm.retry(qid)
        self.clock.advance(0)
        self.assertEqual(len(self.hop.calls), 2)
        self.assertNotIn(qid, self.qm.messages)

    def test_delete_during_delivery(self):
        hop = ScriptedNextHop(manual=True)
        self.start(hop)
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)
        self.successResultOf(defer.ensureDeferred(self.qm.delete(qid)))
        self.assertIn(qid, self.spool.queue_ids())  # still being delivered
        hop.release_all()
        self.clock.advance(0)
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertNotIn(qid, self.qm.messages)

    def test_bounce_now(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.0.0", "451 later")
                                   if d.key != "mx:client.example" else ("deferred", "4.0.0", "x")))
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)
        self.successResultOf(defer.ensureDeferred(self.qm.bounce(qid)))
        self.assertNotIn(qid, self.qm.messages)
        dsn = [m for env, m in self.dsns() if env.extra["for"] == qid]
        self.assertEqual(len(dsn), 1)
        self.assertIn("returned to sender by the mail administrator", dsn[0].as_string())


class Routing(unittest.TestCase):
    def test_order(self):
        cfg = configmod.load(None, data={
            "local": {"domains": ["local.test"]},
            "relay": {"routes": {"routed.example": "10.1.1.1:2525"}, "smarthost": "smart.example:587"},
        })
        self.assertEqual(routing.route(cfg, "a@LOCAL.test".lower()).kind, "local")
        r = routing.route(cfg, "a@routed.example")
        self.assertEqual((r.kind, r.host, r.port), ("route", "10.1.1.1", 2525))
        s = routing.route(cfg, "a@any.example")
        self.assertEqual((s.kind, s.host, s.port), ("smarthost", "smart.example", 587))
        cfg2 = configmod.load(None, data={"delivery": {"port": 2626}})
        m = routing.route(cfg2, "a@any.example")
        self.assertEqual((m.kind, m.domain, m.port), ("mx", "any.example", 2626))


class HeldData(QueueCase):
    """A message just received comes with its bytes (spool.QueueEntry.data):
    the first attempt uses them, then they are dropped; the total is bounded."""

    def entry(self, rcpts, body=b"Subject: test\r\n\r\nbody\r\n"):
        env = spoolmod.Envelope(spoolmod.new_id(), "s@client.example", list(rcpts), self.clock.seconds())
        entry = self.spool.inject(env, body)
        entry.data = body
        return entry

    def test_first_attempt_sees_the_data_then_it_is_dropped(self):
        seen = []
        hop = ScriptedNextHop(lambda dest, r, n: ("deferred", "4.0.0", "451 later"))
        orig = hop.attempt
        hop.attempt = lambda msg, dest, rcpts: (seen.append(msg.data), orig(msg, dest, rcpts))[1]
        qm = self.start(hop)
        e = self.entry(["a@remote.example"])
        msg = qm.add(e)
        self.assertEqual(qm.held_bytes, len(e.data))
        self.clock.advance(0)
        self.assertEqual(seen, [e.data])
        self.assertIsNone(msg.data)
        self.assertEqual(qm.held_bytes, 0)
        self.clock.advance(3600)  # the retry reads the file
        self.assertEqual(seen[1:], [None])

    def test_budget_and_removal(self):
        import relay.queue.manager as queuemod

        self.patch(queuemod, "MAX_HELD_BYTES", 100)
        qm = self.start(ScriptedNextHop(manual=True))
        body = b"x" * 60
        m1 = qm.add(self.entry(["a@remote.example"], body))
        m2 = qm.add(self.entry(["b@remote.example"], body))
        self.assertEqual((m1.data, m2.data, qm.held_bytes), (body, None, 60))
        self.clock.advance(0)
        self.hop.release_all()
        self.assertEqual(qm.held_bytes, 0)
        self.assertEqual(self.spool.queue_ids(), [])


class PendingActions(QueueCase):
    """Actions on busy messages: recorded in the state file at once, applied
    when the busy step ends or at the next start (the integration tests in
    tests/integration/test_admin_actions.py do the same over real processes)."""

    delivery = {"max_concurrency": 1, "max_per_destination": 1}

    def restart(self):
        self.qm.running = False  # the old one is gone (a crash): nothing more of it runs
        self.qm = None
        return self.start(self.hop)

    def test_delete_during_an_attempt_is_durable_across_a_crash(self):
        hop = ScriptedNextHop(manual=True)
        self.start(hop)
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)
        self.assertEqual(len(hop.calls), 1)
        text = self.successResultOf(defer.ensureDeferred(self.qm.delete(qid)))
        self.assertEqual(text, "will be deleted when the delivery in progress ends")
        env = self.qm.messages[qid].env
        self.assertEqual(self.spool.read_state(qid, env).pending, "delete")
        self.restart()  # the attempt never ended
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertEqual(len(hop.calls), 1)

    def test_hold_and_bounce_of_jobs_waiting_for_a_slot(self):
        hop = ScriptedNextHop(manual=True)
        self.start(hop)
        blocker = self.queue(["x@one.example"])
        held = self.queue(["a@two.example"])
        returned = self.queue(["b@two.example"])
        self.clock.advance(0)
        self.assertEqual([c[1] for c in hop.calls], [blocker])
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.qm.hold(held))), "on hold")
        self.assertEqual(self.successResultOf(defer.ensureDeferred(self.qm.bounce(returned))),
                         "will be returned to the sender when the delivery in progress ends")
        self.clock.advance(0)
        # applied without waiting for the slot: held on disk, returned with a DSN
        self.assertTrue(self.spool.read_state(held, self.qm.messages[held].env).hold)
        self.assertNotIn(returned, self.qm.messages)
        self.assertEqual(len([m for env, m in self.dsns() if env.extra["for"] == returned]), 1)
        hop.release_all()
        self.clock.advance(0)
        while hop.pending:
            hop.release_all()
            self.clock.advance(0)
        self.assertNotIn(held, [c[1] for c in hop.calls])
        self.assertNotIn(returned, [c[1] for c in hop.calls])
        self.restart()
        self.assertEqual(self.qm.messages[held].queue_name, "hold")

    def test_outcome_kept_until_written(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("delivered", "2.0.0", "250 ok") if r.startswith("a")
                                   else ("deferred", "4.0.0", "451 later")))
        real = self.spool.write_state_merged
        fails = [1]

        def full(*a, **kw):
            if fails[0]:
                fails[0] -= 1
                raise OSError(28, "No space left on device")
            return real(*a, **kw)

        self.spool.write_state_merged = full
        qid = self.queue(["a@remote.example", "b@remote.example"])
        self.clock.advance(0)
        env = self.qm.messages[qid].env
        self.assertEqual([r.status for r in self.spool.read_state(qid, env).recipients], ["pending", "pending"])
        self.clock.advance(self.qm.finalize_retry)
        self.assertEqual([r.status for r in self.spool.read_state(qid, env).recipients], ["delivered", "deferred"])

    def test_writes_of_one_message_never_overlap(self):
        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.0.0", "451 later")))
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)
        msg = self.qm.messages[qid]
        gate: defer.Deferred = defer.Deferred()
        order = []
        real = self.qm.aspool.write_state

        def write_state(q, state, **kw):
            order.append(("start", state.hold))
            d = gate if len(order) == 1 else defer.succeed(None)
            return d.addCallback(lambda _: real(q, state, **kw)).addCallback(
                lambda r: (order.append(("end", None)), r)[1])

        self.qm.aspool.write_state = write_state
        d1 = defer.ensureDeferred(self.qm.hold(qid))
        d2 = defer.ensureDeferred(self.qm.release(qid))
        self.assertEqual(order, [("start", True)])  # the release waits for the hold's write
        gate.callback(None)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(order, [("start", True), ("end", None), ("start", False), ("end", None)])
        self.assertFalse(self.spool.read_state(qid, msg.env).hold)

    def test_an_action_that_cannot_be_recorded_is_refused_and_changes_nothing(self):
        from relay.queue.manager import ActionFailed

        self.start(ScriptedNextHop(lambda d, r, n: ("deferred", "4.0.0", "451 later")))
        qid = self.queue(["a@remote.example"])
        self.clock.advance(0)

        def full(*a, **kw):
            raise OSError(28, "No space left on device")

        self.spool.write_state_merged = full
        f = self.failureResultOf(defer.ensureDeferred(self.qm.hold(qid)), ActionFailed)
        self.assertEqual(str(f.value), "not done: cannot record the hold (No space left on device); try again")
        msg = self.qm.messages[qid]
        self.assertFalse(msg.hold)
        self.assertFalse(self.spool.read_state(qid, msg.env).hold)
        # still delivered on schedule
        calls = len(self.hop.calls)
        self.clock.advance(2 * 3600)
        self.assertGreater(len(self.hop.calls), calls)
