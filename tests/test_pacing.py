"""delivery.pacing: at most N deliveries per window to a destination, the rest waiting (task.Clock)."""

from __future__ import annotations

from relay import config as configmod
from relay.queue import view as queueview
from tests.test_queue import QueueCase


class Pacing(QueueCase):
    delivery = {"pacing": {"one.example": "3/1m", "*": "100/1m"}}

    def test_at_most_n_per_window_the_rest_waits(self):
        self.start()
        ids = [self.queue([f"x{i}@one.example"]) for i in range(10)]
        self.queue(["y@two.example"])
        self.clock.advance(0)
        calls = [c for c in self.hop.calls if c[2] == "mx:one.example"]
        self.assertEqual(len(calls), 3)
        self.assertEqual([c[2] for c in self.hop.calls].count("mx:two.example"), 1)  # "*": room to spare
        # the others wait in the queue: not an attempt, not deferred, and they say why
        waiting = [self.qm.messages[q] for q in ids if q in self.qm.messages]
        self.assertEqual(len(waiting), 7)
        m = waiting[0]
        self.assertEqual(self.qm.pacer.waiting_for(m.jobs), "pacing limit 3/1m for mx:one.example")
        rec = queueview.record(m.env, m.state, m.size, m.queue_name, bool(m.active),
                               self.qm.pacer.waiting_for(m.jobs))
        self.assertEqual(rec["waiting"], "pacing limit 3/1m for mx:one.example")
        self.assertEqual([(r["status"], r["attempts"]) for r in rec["recipients"]], [("pending", 0)])
        self.assertIn("Queue:     active (waiting: pacing limit 3/1m for mx:one.example)",
                      queueview.format_details({**queueview.details(m.env, m.state, m.size, m.queue_name, b"",
                                                                    delivering=True, waiting=rec["waiting"])},
                                               now=self.clock.seconds()))
        for _ in range(600):
            self.clock.advance(1)
        times = [c[0] for c in self.hop.calls if c[2] == "mx:one.example"]
        self.assertEqual(len(times), 10)
        for t in times:  # never more than 3 in any 60 s
            self.assertLessEqual(sum(1 for u in times if t <= u < t + 60), 3, times)
        self.assertLess(times[-1] - times[0], 300)  # and they went as the window moved
        self.assertEqual(self.spool.queue_ids(), [])
        self.assertEqual(self.qm.counters.deferred, 0)

    def test_smarthost_not_paced_by_the_mx_default(self):
        self.config = configmod.load(None, data={
            "spool": self.tmp + "/spool", "relay": {"smarthost": "127.0.0.2:2525"},
            "delivery": {"pacing": {"*": "1/1h"}}})
        self.start()
        for i in range(3):
            self.queue([f"x{i}@one.example"])
        self.clock.advance(0)
        self.assertEqual(len(self.hop.calls), 3)


def test_queue_list_text_says_why_a_message_waits():
    import io

    from relay.queue import spool as spoolmod
    env = spoolmod.Envelope("A" * 16, "a@client.test", ["x@one.example"], 1_800_000_000.0)
    state = spoolmod.State.fresh(env)
    rec = queueview.record(env, state, 100, "active", True, "pacing limit 3/1m for mx:one.example")
    out = io.StringIO()
    queueview.Table(out, now=1_800_000_000.0).add(rec)
    assert "(waiting: pacing limit 3/1m for mx:one.example)\n" in out.getvalue()
    assert "x@one.example  (pending)" in out.getvalue()
