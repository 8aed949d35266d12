"""``relayctl queue drain``: a node's queue handed to another relay over real sockets.

Node A is an in-process relay on 127.0.0.1 whose next hop for dead.test does
not answer (a closed port), ok.test goes to a sink; the peer is a second
in-process relay on 127.0.0.3 (without its queue runner, so what arrived stays
in its spool to be looked at) or a scripted sink there.  relayctl runs as a
subprocess (in a thread, the reactor serving both relays meanwhile).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import smtplib
import tempfile
import time

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay.queue import spool as spoolmod
from relay.queue.drain import peer_queue_id, trace_header
from tests.support.relay import InProcessRelay, free_port, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll
from tests.test_control import json_lines, run_ctl

BODY = b"Subject: drain me\r\nMessage-ID: <1@client.test>\r\n\r\nbody line\r\n.dot line\r\n"


def spool_messages(root: str) -> dict[str, spoolmod.QueueEntry]:
    sp = spoolmod.Spool(root)
    return {qid: sp.load(qid) for qid in sp.queue_ids()}


def message_bytes(root: str, entry: spoolmod.QueueEntry) -> bytes:
    with open(spoolmod.Spool(root).message_path(entry.envelope.queue_id), "rb") as f:
        f.seek(entry.offset)
        return f.read(entry.size)


class Logs:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, event):
        text = formatEvent(event)
        if text:
            self.lines.append(text)

    def having(self, *words: str) -> list[str]:
        return [ln for ln in self.lines if all(w in ln for w in words)]


class DrainCase(unittest.TestCase):
    peer_is_relay = True
    sink_behaviour: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-drain-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.logs = Logs()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        self.ok = Sink("127.0.0.2", **self.sink_behaviour).start()
        self.addCleanup(lambda: self.ok.stop())
        dead = free_port(("127.0.0.2",))
        os.makedirs(os.path.join(self.tmp, "a"))
        self.a = InProcessRelay(os.path.join(self.tmp, "a"), {
            "hostname": "node-a.test",
            "relay": {"routes": {"ok.test": f"127.0.0.2:{self.ok.port}", "dead.test": f"127.0.0.2:{dead}"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5},
        })
        self.cfg = os.path.join(self.tmp, "a", "relay.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.a.data))
        await self.a.start()
        self.addCleanup(self.a.stop)
        if self.peer_is_relay:
            os.makedirs(os.path.join(self.tmp, "b"))
            self.b = InProcessRelay(os.path.join(self.tmp, "b"), {"hostname": "node-b.test"}, ip="127.0.0.3",
                                    deliver=False)
            await self.b.start()
            self.addCleanup(self.b.stop)
            self.peer = "%s:%d" % self.b.smtp

    @property
    def queue(self):
        return self.a.service.queue

    def ctl(self, *args, env=None):
        return in_thread(run_ctl, self.cfg, *args, env=env)

    def send(self, rcpts, sender="sender@client.test"):
        def run() -> str:
            with smtplib.SMTP(*self.a.smtp) as s:
                s.ehlo("client.test")
                s.mail(sender)
                for r in rcpts:
                    s.rcpt(r)
                code, resp = s.data(BODY)
                assert code == 250, resp
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    async def deferred(self, qid: str, n: int):
        """Wait until the message's first attempt is recorded (n recipients deferred)."""
        def done():
            m = self.queue.messages.get(qid)
            return m is not None and not m.in_progress and sum(
                r.status == "deferred" for r in m.state.recipients) == n
        await apoll(done, what=f"{qid} deferred")

    def peer_spool(self) -> dict[str, spoolmod.QueueEntry]:
        return spool_messages(self.b.config.spool)


class LiveDrain(DrainCase):
    async def test_live_drain_hands_over_only_the_open_recipients(self):
        q1 = await self.send(["x@ok.test", "b@dead.test", "c@dead.test"])
        q2 = await self.send(["d@dead.test"], sender="")
        await self.deferred(q1, 2)
        await self.deferred(q2, 1)
        r = await self.ctl("queue", "drain", "--to", self.peer, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = {d["queue_id"]: d for d in json_lines(r.stdout)}
        self.assertEqual(set(lines), {q1, q2})
        self.assertEqual(lines[q1]["handed_over"], ["b@dead.test", "c@dead.test"])
        self.assertEqual(lines[q1]["node"], "node-a.test")
        self.assertTrue(lines[q1]["removed"] and lines[q1]["complete"])
        self.assertIn("drained 2 messages", r.stderr)
        # node A: nothing left, in memory or on disk
        self.assertEqual(self.queue.messages, {})
        self.assertEqual(spool_messages(self.a.config.spool), {})
        # node B: the open recipients only, the sender as it was (also <>), the trace header on top
        got = {tuple(e.envelope.recipients): e for e in self.peer_spool().values()}
        self.assertEqual(set(got), {("b@dead.test", "c@dead.test"), ("d@dead.test",)})
        e1, e2 = got[("b@dead.test", "c@dead.test")], got[("d@dead.test",)]
        self.assertEqual(e1.envelope.sender, "sender@client.test")
        self.assertEqual(e2.envelope.sender, "")
        self.assertEqual(lines[q1]["peer_queue_id"], e1.envelope.queue_id)
        data = message_bytes(self.b.config.spool, e1)
        # under the peer's own Received, above ours
        trace = [i for i, ln in enumerate(data.split(b"\r\n")) if ln.startswith(b"X-Relay-Drained:")]
        ours = data.split(b"\r\n").index(b"Received: from client.test ([127.0.0.1])")
        self.assertEqual(len(trace), 1, data)
        self.assertLess(trace[0], ours)
        line = data.split(b"\r\n")[trace[0]]
        self.assertTrue(line.startswith(b"X-Relay-Drained: node=node-a.test; queue-id=" + q1.encode()), data)
        self.assertIn(b"arrived=", line)
        self.assertTrue(data.endswith(BODY), data)
        self.assertEqual(self.ok.delivered_to(), ["x@ok.test"])  # never sent again
        # the log: node A names the peer and its id; node B's arrival names node A (its EHLO)
        self.assertTrue(self.logs.having(q1, "drained from node node-a.test", e1.envelope.queue_id), self.logs.lines)
        self.assertTrue(self.logs.having(q1, "removed (drained to"), self.logs.lines)
        self.assertTrue(self.logs.having(e1.envelope.queue_id, "client=node-a.test"), self.logs.lines)

    async def test_text_output_and_ids(self):
        q1 = await self.send(["b@dead.test"])
        q2 = await self.send(["c@dead.test"])
        await self.deferred(q1, 1)
        await self.deferred(q2, 1)
        r = await self.ctl("queue", "drain", "--to", self.peer, q2)
        self.assertEqual(r.returncode, 0, r.stderr)
        (line,) = r.stdout.splitlines()
        pid = next(iter(self.peer_spool()))
        self.assertEqual(line, f"{q2}: handed over to {self.peer} as {pid}: <c@dead.test>")
        self.assertEqual(set(self.queue.messages), {q1})
        r = await self.ctl("queue", "drain", "--to", self.peer, "0" * 16)
        self.assertEqual(r.returncode, 1)
        self.assertIn("0000000000000000: no such message in the queue", r.stderr)

    async def test_held_messages_stay_unless_asked(self):
        q1 = await self.send(["b@dead.test"])
        await self.deferred(q1, 1)
        r = await self.ctl("queue", "hold", q1)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = await self.ctl("queue", "drain", "--to", self.peer)
        self.assertEqual(r.returncode, 0, r.stderr)  # nothing to drain: held ones are not listed
        self.assertEqual(set(self.queue.messages), {q1})
        r = await self.ctl("queue", "drain", "--to", self.peer, "--held")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.queue.messages, {})

    async def test_peer_down_keeps_everything(self):
        q1 = await self.send(["b@dead.test"])
        q2 = await self.send(["c@dead.test"])
        await self.deferred(q1, 1)
        await self.deferred(q2, 1)
        closed = free_port(("127.0.0.3",))
        r = await self.ctl("queue", "drain", "--to", f"127.0.0.3:{closed}", "--json")
        self.assertEqual(r.returncode, 1)
        lines = json_lines(r.stdout)
        self.assertEqual({d["queue_id"] for d in lines}, {q1, q2})
        self.assertTrue(lines[0]["peer_down"])
        self.assertIn("not tried: the peer did not answer", lines[1]["error"])
        self.assertIn("2 messages not (completely) handed over", r.stderr)
        self.assertEqual(set(self.queue.messages), {q1, q2})
        for qid in (q1, q2):
            m = self.queue.messages[qid]
            self.assertEqual([x.status for x in m.state.recipients], ["deferred"])
            self.assertFalse(m.busy)
        self.assertEqual(set(spool_messages(self.a.config.spool)), {q1, q2})

    async def test_bad_usage(self):
        self.queued_before = len(self.queue.messages)
        r = await self.ctl("queue", "drain")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--to HOST:PORT is required", r.stderr)
        r = await self.ctl("queue", "drain", "--to", "host:notaport")
        self.assertEqual(r.returncode, 2)
        r = await self.ctl("queue", "drain", "--to", self.peer, "--tls", "none", "--auth", "u",
                           "--password-file", "/dev/null")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--auth needs TLS", r.stderr)
        # to itself (the config names the port it listens on: the test's relay was started on port 0)
        host, port = self.a.smtp
        with open(self.cfg, "w") as f:
            f.write(toml_dumps({**self.a.data, "smtp": {**self.a.data["smtp"],
                                                         "listen": [f"tcp:{port}:interface={host}"]}}))
        r = await self.ctl("queue", "drain", "--to", f"{host}:{port}")
        self.assertEqual(r.returncode, 2)
        self.assertIn("this relay's own SMTP listener", r.stderr)
        self.assertEqual(len(self.queue.messages), self.queued_before)


class PeerRefuses(DrainCase):
    """The peer is a sink on 127.0.0.3 refusing one recipient for good, another for now."""

    peer_is_relay = False

    async def test_refused_recipients_are_kept_and_marked(self):
        peer = Sink("127.0.0.3", rcpt_replies={"c@dead.test": "550 5.1.1 no such user",
                                                "e@dead.test": "451 4.3.0 try later"}).start()
        self.addCleanup(lambda: peer.stop())
        q1 = await self.send(["b@dead.test", "c@dead.test"])
        q2 = await self.send(["e@dead.test"])
        q3 = await self.send(["f@dead.test"])
        for q in (q1, q2, q3):
            await self.deferred(q, 1 if q != q1 else 2)
        r = await self.ctl("queue", "drain", "--to", f"127.0.0.3:{peer.port}", "--json")
        self.assertEqual(r.returncode, 1, r.stderr)
        lines = {d["queue_id"]: d for d in json_lines(r.stdout)}
        self.assertEqual(lines[q1]["handed_over"], ["b@dead.test"])
        self.assertEqual(lines[q1]["refused"][0]["recipient"], "c@dead.test")
        self.assertIn("550 5.1.1 no such user", lines[q1]["refused"][0]["reply"])
        self.assertEqual(lines[q2]["kept"][0]["recipient"], "e@dead.test")
        self.assertTrue(lines[q3]["complete"])  # a 4xx does not stop the drain
        self.assertEqual(sorted(peer.delivered_to()), ["b@dead.test", "f@dead.test"])
        self.assertIn(f"2 messages not (completely) handed over, kept here: {q1} {q2}", r.stderr)
        # kept here: c open, its history saying the peer refused it; b final (handed over)
        self.assertEqual(set(self.queue.messages), {q1, q2})
        r = await self.ctl("queue", "show", q1, "--json")
        d = json.loads(r.stdout)
        by = {x["address"]: x for x in d["recipients"]}
        self.assertEqual(by["b@dead.test"]["status"], "delivered")
        self.assertEqual(by["c@dead.test"]["status"], "deferred")
        self.assertEqual(by["c@dead.test"]["history"][-1]["status"], "drain refused")
        self.assertTrue(self.logs.having(q1, "c@dead.test", "refused, kept here"), self.logs.lines)
        # a second drain sends only c again (b is final here)
        peer.b.rcpt_replies.clear()
        r = await self.ctl("queue", "drain", "--to", f"127.0.0.3:{peer.port}")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(sorted(peer.delivered_to()), ["b@dead.test", "c@dead.test", "e@dead.test", "f@dead.test"])
        self.assertEqual(self.queue.messages, {})


    async def test_peer_goes_down_mid_drain(self):
        """The peer stops listening right after its first 250: the next
        message meets a refused connection; the rest is kept, nothing lost."""
        peer = Sink("127.0.0.3").start()
        self.addCleanup(lambda: peer.stop())

        class StopAfterFirst(list):
            def append(self, t):
                super().append(t)
                if len(self) == 1:
                    peer._listening.stopListening()

        peer.transactions = StopAfterFirst()
        qids = [await self.send([f"{c}@dead.test"]) for c in "bcd"]
        for q in qids:
            await self.deferred(q, 1)
        r = await self.ctl("queue", "drain", "--to", f"127.0.0.3:{peer.port}", "--json")
        self.assertEqual(r.returncode, 1, r.stderr)
        lines = json_lines(r.stdout)
        self.assertEqual(len(lines), 3, r.stdout)
        self.assertTrue(lines[0]["complete"])
        self.assertTrue(lines[1]["peer_down"])
        self.assertIn("refused", lines[1]["kept"][0]["reply"].lower())
        self.assertEqual(lines[2]["error"], "not tried: the peer did not answer")
        kept = {lines[1]["queue_id"], lines[2]["queue_id"]}
        self.assertEqual(set(self.queue.messages), kept)
        self.assertEqual(set(spool_messages(self.a.config.spool)), kept)
        self.assertEqual(len(peer.delivered_to()), 1)
        for qid in kept:
            self.assertEqual([x.status for x in self.queue.messages[qid].state.recipients], ["deferred"])


class DrainDuringAttempt(DrainCase):
    """An attempt is under way (the next hop is slow to answer the data): the
    drain waits for its outcome, then hands over what is still open; the
    message is never sent by both at once."""

    sink_behaviour = {"delays": {"final": 2.0}, "replies": {"final": "451 4.3.0 come back later"}}

    async def test_drain_waits_for_the_attempt(self):
        qid = await self.send(["x@ok.test"])
        await apoll(lambda: self.queue.messages[qid].attempting, what="attempt under way")
        r = await self.ctl("queue", "drain", "--to", self.peer, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        (line,) = json_lines(r.stdout)
        self.assertEqual(line["handed_over"], ["x@ok.test"])
        self.assertEqual(len(self.ok.transactions), 0)  # the sink never accepted it
        self.assertEqual(len(self.ok.sessions[0].transactions), 1)  # but was sent it once, before
        self.assertEqual(len(self.peer_spool()), 1)
        self.assertEqual(self.queue.messages, {})


class Offline(unittest.TestCase):
    """A stopped relay's spool (workers = 2: two queues), drained by relayctl itself."""

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-drainoff-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        os.makedirs(os.path.join(self.tmp, "b"))
        self.b = InProcessRelay(os.path.join(self.tmp, "b"), {"hostname": "node-b.test"}, ip="127.0.0.3",
                                deliver=False)
        await self.b.start()
        self.addCleanup(self.b.stop)
        self.spool = os.path.join(self.tmp, "spool")
        self.cfg = os.path.join(self.tmp, "relay.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps({"hostname": "dead-node.test", "spool": self.spool, "workers": 2,
                                "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]}, "pop3": {"listen": []}}))

    def make(self, worker: int | None, rcpts: list[str], delivered: tuple[str, ...] = ()) -> str:
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        sp = spoolmod.Spool(os.path.join(self.spool, f"w{worker}") if worker is not None else self.spool)
        sp.create()
        env = spoolmod.Envelope(spoolmod.new_id(), "old@client.test", rcpts, time.time() - 3600,
                                client={"ip": "127.0.0.1", "helo": "client.test", "proto": "ESMTP"})
        entry = sp.inject(env, BODY)
        for r in entry.state.recipients:
            r.status = "delivered" if r.address in delivered else "deferred"
        sp.write_state(env.queue_id, entry.state)
        return env.queue_id

    def ctl(self, *args, env=None):
        return in_thread(run_ctl, self.cfg, *args, env=env)

    async def test_offline_drain_of_every_worker_queue(self):
        q0 = self.make(0, ["a@far.test", "b@far.test"], delivered=("a@far.test",))
        q1 = self.make(1, ["c@far.test"])
        q2 = self.make(None, ["d@far.test"])  # an orphan: the top spool's own queue (workers was 1 before)
        q5 = self.make(5, ["e@far.test"])  # an orphan: a worker that no longer exists (workers was 6)
        r = await self.ctl("queue", "drain", "--to", "%s:%d" % self.b.smtp, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = {d["queue_id"]: d for d in json_lines(r.stdout)}
        self.assertEqual(lines[q0]["handed_over"], ["b@far.test"])
        self.assertEqual(lines[q1]["handed_over"], ["c@far.test"])
        self.assertEqual(lines[q2]["handed_over"], ["d@far.test"])
        self.assertEqual(lines[q5]["handed_over"], ["e@far.test"])
        self.assertEqual(spool_messages(self.spool), {})
        for w in (0, 1, 5):
            self.assertEqual(spool_messages(os.path.join(self.spool, f"w{w}")), {})
            self.assertEqual(os.listdir(os.path.join(self.spool, f"w{w}", "incoming")), [])
        got = {tuple(e.envelope.recipients): e for e in spool_messages(self.b.config.spool).values()}
        self.assertEqual(set(got), {("b@far.test",), ("c@far.test",), ("d@far.test",), ("e@far.test",)})
        e = got[("b@far.test",)]
        self.assertEqual(e.envelope.sender, "old@client.test")
        self.assertIn(b"\r\nX-Relay-Drained: node=dead-node.test; queue-id=" + q0.encode(),
                      message_bytes(self.b.config.spool, e))

    async def test_refuses_while_a_relay_holds_the_spool(self):
        q0 = self.make(0, ["a@far.test"])
        fd = os.open(os.path.join(self.spool, "w0", "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = await self.ctl("queue", "drain", "--to", "%s:%d" % self.b.smtp, env={"RELAYCTL_TIMEOUT": "1"})
        self.assertEqual(r.returncode, 1)
        self.assertIn("holds the spool", r.stderr)
        self.assertEqual(set(spool_messages(os.path.join(self.spool, "w0"))), {q0})
        self.assertEqual(spool_messages(self.b.config.spool), {})


class Pure(unittest.TestCase):
    def test_peer_queue_id(self):
        self.assertEqual(peer_queue_id("250 2.0.0 Ok: queued as 4F3A9C21B0D1"), "4F3A9C21B0D1")
        self.assertEqual(peer_queue_id("250 2.0.0 OK id=1kXyZ-0001aB-Cd"), "1kXyZ-0001aB-Cd")
        self.assertEqual(peer_queue_id("250 ok"), "")
        self.assertEqual(peer_queue_id("250 2.0.0 Message accepted for delivery"), "")
        self.assertEqual(peer_queue_id("250 2.0.0"), "")
        self.assertEqual(peer_queue_id("250 2.6.0 <abc@example.org> [InternalId=123456789] Queued mail for delivery"),
                         "")
        self.assertEqual(peer_queue_id("250 Ok 1732112233-01234"), "1732112233-01234")

    def test_trace_header(self):
        h = trace_header("node.test", "ABCDEF0123456789", 0.0)
        self.assertEqual(h, b"X-Relay-Drained: node=node.test; queue-id=ABCDEF0123456789; "
                            b"arrived=Thu, 01 Jan 1970 00:00:00 +0000\r\n")
