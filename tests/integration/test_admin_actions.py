"""Administrator's actions against real relay processes, in every state of a message.

The relay is a ``twistd relay`` process (tests.support.gate.GatedRelayProcess:
its state-file writes can be held at a gate the test controls); the next
hops are scripted sinks on the test's reactor; ``relayctl`` is a subprocess
talking over the control socket.  Each action (hold, release, retry,
bounce, delete) is tried on a message in each state it can be in:

* waiting (deferred, nothing under way);
* waiting for a delivery slot (delivery.max_concurrency = 1, the slot held
  by a session the next hop never finishes);
* being delivered (the next hop sits on the final dot);
* its outcome being written (the state-file write held at the gate);

and the relay is restarted afterwards (or killed while the delivery is
under way, for a restart in between): every action must be applied, and
stay applied, or be refused.  Also: ``retry`` of a destination that was
down makes a real attempt at once, and relayctl calls leave one line per
action in the relay's log, none about the transport.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.gate import GatedRelayProcess
from tests.support.relay import free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll
from tests.test_control import json_lines, run_ctl

SENDER = "alice@sink.test"  # the DSNs go to sink B


class AdminCase(unittest.TestCase):
    delivery: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-admin-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        # B: the sender's domain and most recipients; C: a next hop that sits
        # on the final dot; A: another such one, holding the only slot
        self.b = Sink("127.0.0.2").start()
        self.c = Sink("127.0.0.3", hang={"final"}).start()
        self.a = Sink("127.0.0.4", hang={"final"}).start()
        for s in (self.a, self.b, self.c):
            self.addCleanup(s.stop)
        self.port = free_port()
        data = {
            "hostname": "relay.test",
            "spool": os.path.join(self.tmp, "spool"),
            "workers": 1,
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]},
            "pop3": {"listen": []},
            "local": {"domains": ["local.test"], "mailboxes": os.path.join(self.tmp, "mail"),
                      "users": os.path.join(self.tmp, "users")},
            "relay": {"routes": {"sink.test": f"127.0.0.2:{self.b.port}",
                                 "stall.test": f"127.0.0.3:{self.c.port}",
                                 "slow.test": f"127.0.0.4:{self.a.port}"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5, **self.delivery},
        }
        self.proc = GatedRelayProcess(self.tmp, data)
        self.addCleanup(self.proc.stop)
        self.addCleanup(self.proc.gate.open)
        await self.start()

    def start(self):
        return in_thread(self.proc.start, ("127.0.0.1", self.port))

    async def restart(self, kill: bool = False):
        if kill:
            await in_thread(self.proc.kill)
        else:
            await in_thread(self.proc.stop)
        await self.start()

    def ctl(self, *args):
        return in_thread(run_ctl, self.proc.config_path, *args)

    def send(self, rcpt: str, sender: str = SENDER):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.ehlo("client.test")
                s.mail(sender)
                s.rcpt(rcpt)
                code, resp = s.data(f"Subject: admin test\r\nMessage-ID: <{rcpt}>\r\n\r\nbody\r\n".encode())
                assert code == 250
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    async def listing(self) -> dict:
        r = await self.ctl("queue", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return {d["queue_id"]: d for d in json_lines(r.stdout)}

    def delivered(self) -> list[str]:
        """Recipients a next hop acknowledged (250 to the final dot sent)."""
        return [r for s in (self.a, self.b, self.c) for r in s.delivered_to()]

    def dsns_for(self, rcpt: str) -> list:
        return [t for t in self.b.transactions
                if t.mail_from == "" and f"Final-Recipient: rfc822; {rcpt}".encode() in t.data]

    async def act(self, action: str, qid: str, expect: str):
        r = await self.ctl("queue", action, qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: {expect}\n"), self.proc.log()[-3000:])

    async def check(self, expect: dict[str, tuple[str, str]]):
        """expect: qid -> (recipient, held | deleted | bounced | delivered | queued)."""
        async def settled():
            listing = await self.listing()
            for qid, (rcpt, what) in expect.items():
                present = qid in listing
                if what == "held" and not (present and listing[qid]["queue_name"] == "hold"):
                    return False
                if what == "queued" and not (present and listing[qid]["queue_name"] != "hold"):
                    return False
                if what in ("deleted", "bounced", "delivered") and present:
                    return False
                if what == "bounced" and not self.dsns_for(rcpt):
                    return False
                if what == "delivered" and rcpt not in self.delivered():
                    return False
            return True

        await apoll(lambda: defer.ensureDeferred(settled()), timeout=30, what=f"the outcomes {expect}")
        spool_queue = os.path.join(self.tmp, "spool", "queue")
        for qid, (rcpt, what) in expect.items():
            n = self.delivered().count(rcpt)
            self.assertEqual(n, 1 if what == "delivered" else 0, f"{qid} {rcpt} ({what}) delivered {n} times")
            self.assertEqual(len(self.dsns_for(rcpt)), 1 if what == "bounced" else 0, f"{qid} {rcpt} ({what})")
            if what in ("deleted", "bounced", "delivered"):
                self.assertFalse(os.path.exists(os.path.join(spool_queue, qid)), f"{qid} ({what}) still in queue/")


class Waiting(AdminCase):
    async def test_each_action_on_a_deferred_message(self):
        self.b.b.rcpt_replies = {f"m{i}@sink.test": "451 4.2.0 busy" for i in range(1, 6)}
        q = [await self.send(f"m{i}@sink.test") for i in range(1, 6)]
        await apoll(lambda: defer.ensureDeferred(self._all_deferred(q)), timeout=20, what="the deferrals")
        self.b.b.rcpt_replies = {}
        await self.act("hold", q[0], "on hold")
        await self.act("bounce", q[1], "returned to the sender")
        await self.act("delete", q[2], "deleted")
        await self.act("retry", q[3], "will be attempted now")
        await self.act("hold", q[4], "on hold")
        await self.act("release", q[4], "released")
        expect = {q[0]: ("m1@sink.test", "held"), q[1]: ("m2@sink.test", "bounced"),
                  q[2]: ("m3@sink.test", "deleted"), q[3]: ("m4@sink.test", "delivered"),
                  q[4]: ("m5@sink.test", "queued")}
        await self.check(expect)
        await self.restart()
        await self.check(expect)

    async def _all_deferred(self, qids) -> bool:
        listing = await self.listing()
        return all(q in listing and listing[q]["queue_name"] == "deferred" for q in qids)


class WaitingForASlot(AdminCase):
    delivery = {"max_concurrency": 1, "max_per_destination": 1}

    async def test_each_action_on_a_message_waiting_for_a_slot(self):
        blocker = await self.send("blk@slow.test")
        await apoll(lambda: any(s.transactions for s in self.a.sessions), timeout=20,
                    what="the only slot taken by a session that never ends")
        q = [await self.send(f"m{i}@sink.test") for i in range(1, 6)]

        async def waiting():
            listing = await self.listing()
            return all(x in listing and listing[x]["queue_name"] == "active" for x in q)

        await apoll(lambda: defer.ensureDeferred(waiting()), what="the messages waiting for the slot")
        self.assertEqual(self.b.sessions, [])
        await self.act("hold", q[0], "on hold")
        await self.act("bounce", q[1], "will be returned to the sender when the delivery in progress ends")
        await self.act("delete", q[2], "will be deleted when the delivery in progress ends")
        await self.act("retry", q[3], "waiting for a delivery slot: attempted as soon as one is free")
        await self.act("hold", q[4], "on hold")
        await self.act("release", q[4], "released")
        # the hold, the delete and the bounce took effect without the slot
        expect_now = {q[0]: ("m1@sink.test", "held"), q[2]: ("m3@sink.test", "deleted")}
        await self.check(expect_now)
        self.assertEqual(self.b.sessions, [])
        # the slot frees: the waiting ones go; nothing of the others is delivered
        self.a.b.hang = set()
        for p in list(self.a.protocols):
            p.transport.abortConnection()
        expect = {q[0]: ("m1@sink.test", "held"), q[1]: ("m2@sink.test", "bounced"),
                  q[2]: ("m3@sink.test", "deleted"), q[3]: ("m4@sink.test", "delivered"),
                  q[4]: ("m5@sink.test", "delivered")}
        await self.check(expect)
        await self.restart()
        await self.check(expect)
        self.assertIn(blocker, await self.listing())


class BeingDelivered(AdminCase):
    async def _actions(self):
        q = [await self.send(f"m{i}@stall.test") for i in range(1, 6)]
        want = {f"m{i}@stall.test" for i in range(1, 6)}
        await apoll(lambda: want <= {r for s in self.c.sessions for t in s.transactions for r in t.rcpts},
                    timeout=20, what="every message at the final dot")
        await self.act("hold", q[0], "on hold (the delivery in progress finishes)")
        await self.act("bounce", q[1], "will be returned to the sender when the delivery in progress ends")
        await self.act("delete", q[2], "will be deleted when the delivery in progress ends")
        await self.act("retry", q[3], "will be attempted again when the delivery in progress ends")
        await self.act("hold", q[4], "on hold (the delivery in progress finishes)")
        await self.act("release", q[4], "released")
        listing = await self.listing()
        self.assertNotIn(q[2], listing)
        self.assertEqual(listing[q[1]].get("pending_action"), "bounce")
        self.assertEqual(listing[q[3]].get("pending_action"), "retry")
        self.c.b.hang = set()
        return q

    async def test_each_action_then_the_attempt_ends(self):
        q = await self._actions()
        for p in list(self.c.protocols):  # the next hop drops the sessions
            p.transport.abortConnection()
        expect = {q[0]: ("m1@stall.test", "held"), q[1]: ("m2@stall.test", "bounced"),
                  q[2]: ("m3@stall.test", "deleted"), q[3]: ("m4@stall.test", "delivered"),
                  q[4]: ("m5@stall.test", "queued")}
        await self.check(expect)
        await self.restart()
        await self.check(expect)

    async def test_each_action_then_a_crash_before_the_attempt_ends(self):
        q = await self._actions()
        await self.restart(kill=True)
        # what was recorded is applied at the start: nothing was delivered
        # (the next hop never answered the final dot), the released one is
        # attempted again
        expect = {q[0]: ("m1@stall.test", "held"), q[1]: ("m2@stall.test", "bounced"),
                  q[2]: ("m3@stall.test", "deleted"), q[3]: ("m4@stall.test", "delivered"),
                  q[4]: ("m5@stall.test", "delivered")}
        await self.check(expect)
        self.assertIn("applying the administrator's delete recorded before the restart", self.proc.log())


class OutcomeBeingWritten(AdminCase):
    async def test_each_action_while_the_outcome_is_written(self):
        # release needs a held message, and a held one is never attempted:
        # it has no outcome to write (a hold during an attempt: BeingDelivered)
        self.b.b.rcpt_replies = {f"m{i}@sink.test": "451 4.2.0 busy" for i in range(1, 5)}
        self.proc.gate.close()
        q = [await self.send(f"m{i}@sink.test") for i in range(1, 5)]
        await apoll(lambda: set(q) <= self.proc.gate.waiting(), timeout=20,
                    what="every deferral's state write at the gate")
        self.b.b.rcpt_replies = {}
        calls = [self.ctl("queue", "hold", q[0]), self.ctl("queue", "bounce", q[1]),
                 self.ctl("queue", "delete", q[2]), self.ctl("queue", "retry", q[3])]

        async def accepted():
            listing = await self.listing()
            return (listing.get(q[0], {}).get("queue_name") == "hold" and q[2] not in listing
                    and listing.get(q[1], {}).get("pending_action") == "bounce"
                    and listing.get(q[3], {}).get("pending_action") == "retry")

        await apoll(lambda: defer.ensureDeferred(accepted()), timeout=20, what="the actions accepted")
        self.proc.gate.open()
        results = await defer.gatherResults(calls)
        texts = [r.stderr for r in results]
        self.assertEqual(texts, [f"{q[0]}: on hold (the delivery in progress finishes)\n",
                                 f"{q[1]}: will be returned to the sender when the delivery in progress ends\n",
                                 f"{q[2]}: will be deleted when the delivery in progress ends\n",
                                 f"{q[3]}: will be attempted again when the delivery in progress ends\n"])
        expect = {q[0]: ("m1@sink.test", "held"), q[1]: ("m2@sink.test", "bounced"),
                  q[2]: ("m3@sink.test", "deleted"), q[3]: ("m4@sink.test", "delivered")}
        await self.check(expect)
        await self.restart()
        await self.check(expect)


class RetryOfADeadDestination(AdminCase):
    def logged(self, *parts: str) -> bool:
        return any(all(p in ln for p in parts) for ln in self.proc.log().splitlines())

    async def test_retry_one_and_all_after_the_next_hop_is_back(self):
        port = free_port(("127.0.0.5",))
        data = self.proc.data
        data["relay"]["routes"]["down.test"] = f"127.0.0.5:{port}"
        from tests.support.relay import toml_dumps

        with open(self.proc.config_path, "w") as f:
            f.write(toml_dumps(data))
        await self.restart()
        await self._round(port, "one")
        await self._round(port, "all")

    async def _round(self, port: int, how: str):
        first_rcpt, second_rcpt = f"first-{how}@down.test", f"second-{how}@down.test"
        first = await self.send(first_rcpt)
        await apoll(lambda: self.logged(f"to=<{first_rcpt}>", "status=deferred"), timeout=20,
                    what="the refused connection")
        second = await self.send(second_rcpt)
        await apoll(lambda: self.logged(f"to=<{second_rcpt}>", "delivery temporarily suspended"),
                    timeout=20, what="the suspension of the next message")
        sink = Sink("127.0.0.5", port=port).start()
        try:
            if how == "one":
                await self.act("retry", second, "will be attempted now")
                await apoll(lambda: sink.delivered_to() == [second_rcpt], timeout=10,
                            what="the retried message delivered")
                await self.act("retry", first, "will be attempted now")
            else:
                r = await self.ctl("queue", "retry", "--all")
                self.assertEqual((r.returncode, r.stderr), (0, "retried 2 messages\n"))
            await apoll(lambda: sorted(sink.delivered_to()) == sorted([first_rcpt, second_rcpt]), timeout=10,
                        what="both delivered")
            listing = await self.listing()
            self.assertNotIn(first, listing)
            self.assertNotIn(second, listing)
        finally:
            await sink.stop()


class ActionLog(AdminCase):
    async def test_one_line_per_action_none_about_the_transport(self):
        self.b.b.rcpt_replies = {"m1@sink.test": "451 4.2.0 busy"}
        qid = await self.send("m1@sink.test")

        async def deferred():
            return (await self.listing()).get(qid, {}).get("queue_name") == "deferred"

        await apoll(lambda: defer.ensureDeferred(deferred()), timeout=20, what="the deferral")
        before = len(self.proc.log().splitlines())
        for args in (("status",), ("queue",), ("queue", "show", qid), ("queue", "hold", qid),
                     ("queue", "hold", qid), ("queue", "release", qid), ("queue", "retry", "--all")):
            r = await self.ctl(*args)
            self.assertEqual(r.returncode, 0, r.stderr)
        await apoll(lambda: "relayctl queue retry --all" in self.proc.log(), what="the last action's line")
        new = self.proc.log().splitlines()[before:]
        self.assertEqual([ln for ln in new if "connection established" in ln or "connection lost" in ln], [])
        lines = [ln.split("] ", 1)[-1] for ln in new if "relayctl queue" in ln]
        self.assertEqual(lines, [
            f"relayctl queue hold {qid}: 1 done, 0 skipped, 0 failed: on hold",
            f"relayctl queue hold {qid}: 0 done, 1 skipped, 0 failed: already on hold",
            f"relayctl queue release {qid}: 1 done, 0 skipped, 0 failed: released",
            "relayctl queue retry --all (1 message): 1 done, 0 skipped, 0 failed",
        ])


def test_metrics_scrapes_and_relayctl_leave_no_transport_lines_with_workers(tmp_path):
    """The master asks each worker for its metrics over AMP at every scrape,
    and relayctl talks to each worker: neither is logged as connections."""
    from tests.integration.test_workers import make, relayctl, scrape
    from tests.support.wait import poll

    mport = free_port()
    relay, port = make(tmp_path, metrics={"listen": [f"tcp:{mport}:interface=127.0.0.1"]})
    relay.start(wait_for=("127.0.0.1", port))
    try:
        def answering() -> bool:
            try:
                return scrape(mport).get(("relay_workers", (("state", "answering"),))) == 2
            except OSError:  # the metrics listener is not up yet
                return False

        poll(answering, 30, what="both workers answering the master's scrape")
        for _ in range(3):
            scrape(mport)
        r = relayctl(relay.config_path, "status")
        assert r.returncode == 0, r.stderr
        log = relay.log()
        noise = [ln for ln in log.splitlines() if "connection established" in ln or "connection lost" in ln]
        assert noise == [], noise[:4]
    finally:
        relay.stop()
