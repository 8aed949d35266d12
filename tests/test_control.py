"""relayctl against a real relay service on a real UNIX control socket.

The relay runs in-process on the test reactor (RelayService with its
ControlService listening on <spool>/control.sock); ``relayctl`` runs as a
subprocess (``python -m relay.admin.cli --config FILE``) in a thread, so the
reactor keeps serving it.  The next hop is tests.support.sink on 127.0.0.2,
reached by a relay.routes entry, so every delivery outcome is scripted; MX
look-ups for ``route`` go to tests.support.dns.  The offline verbs (no
relay running) are tested on spools written with relay.queue.spool.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from twisted.trial import unittest

from relay import config as configmod
from relay.admin.client import _BoxReader, encode_box
from relay.control.proto import big
from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.ctlprobe import probe_imports
from tests.support.dns import DNSServer, Zone
from tests.support.relay import ROOT, InProcessRelay, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll


def run_ctl(config_path: str, *args: str, env: dict | None = None, user: int | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT
    e.pop("RELAY_CONFIG", None)
    e.update(env or {})
    kw = {}
    if user is not None:
        kw["user"] = user
        kw["group"] = user
        kw["extra_groups"] = []
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", config_path, *args],
                          capture_output=True, text=True, env=e, timeout=timeout, cwd="/", **kw)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class LiveCase(unittest.TestCase):
    """A running relay routing sink.test to a scripted sink, and its config file."""

    delivery: dict = {"retry_min": "1h", "retry_max": "2h"}
    sink_behaviour: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-ctl-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.sink = Sink("127.0.0.2", **copy.deepcopy(self.sink_behaviour)).start()
        self.addCleanup(lambda: self.sink.stop())
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        with open(os.path.join(self.tmp, "aliases"), "w") as f:
            f.write("team: alice, bob@sink.test\n")
        over = {
            "relay": {"routes": {"sink.test": f"127.0.0.2:{self.sink.port}"}},
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "connect_timeout": 5,
                         **self.delivery},
            "local": {"aliases": os.path.join(self.tmp, "aliases")},
        }
        self.relay = InProcessRelay(self.tmp, over)
        self.cfg = os.path.join(self.tmp, "relay.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.relay.data))
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    @property
    def queue(self):
        return self.relay.service.queue

    def ctl(self, *args, **kw):
        return in_thread(run_ctl, self.cfg, *args, **kw)

    def send(self, rcpts, sender="sender@client.test", subject="test"):
        """Deferred[queue id]: one message through SMTP."""
        body = f"Subject: {subject}\r\nMessage-ID: <{time.time_ns()}@client.test>\r\n\r\nbody\r\n".encode()
        return in_thread(self._send, rcpts, sender, body)

    def _send(self, rcpts, sender, body) -> str:
        with smtplib.SMTP(*self.relay.smtp) as s:
            s.ehlo("client.test")
            s.mail(sender)
            for r in rcpts:
                s.rcpt(r)
            code, resp = s.data(body)
            assert code == 250, resp
            return resp.decode().rsplit(" ", 1)[1]

    def deferred(self, qid):
        m = self.queue.messages.get(qid)
        return m is not None and not m.active and not m.busy and any(
            r.status == "deferred" for r in m.state.recipients)

    async def listing(self) -> dict[str, dict]:
        r = await self.ctl("queue", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return {d["queue_id"]: d for d in json_lines(r.stdout)}


class Listing(LiveCase):
    sink_behaviour = {"rcpt_replies": {"b@sink.test": "451 4.2.0 mailbox busy"}}

    async def test_empty_queue(self):
        r = await self.ctl("queue")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "Mail queue is empty\n", ""))
        r = await self.ctl("queue", "--json")
        self.assertEqual((r.returncode, r.stdout), (0, ""))

    async def test_table_json_fields_and_show(self):
        qid = await self.send(["a@sink.test", "b@sink.test"])
        await apoll(lambda: self.deferred(qid), what="b deferred")
        before = time.time()
        listing = await self.listing()
        self.assertEqual(list(listing), [qid])
        d = listing[qid]
        m = self.queue.messages[qid]
        self.assertEqual(d["queue_name"], "deferred")
        self.assertEqual(d["queue_id"], qid)
        self.assertEqual(d["arrival_time"], int(m.env.arrival))
        self.assertIsInstance(d["arrival_time"], int)
        self.assertEqual(d["message_size"], m.size)
        self.assertEqual(os.path.getsize(self.relay.service.spool.message_path(qid)), m.size + m.offset)
        self.assertIs(d["forced_expire"], False)
        self.assertEqual(d["sender"], "sender@client.test")
        a, b = d["recipients"]
        self.assertEqual(a, {"address": "a@sink.test", "status": "delivered", "attempts": 1,
                             "delay_reason": "", "next_attempt": None})
        self.assertEqual((b["address"], b["status"], b["attempts"]), ("b@sink.test", "deferred", 1))
        self.assertIn("451 4.2.0 mailbox busy", b["delay_reason"])
        self.assertGreater(b["next_attempt"], before + 1800)  # retry_min 1h, jitter 10%

        r = await self.ctl("queue")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].startswith("-Queue ID-"))
        row = next(ln for ln in lines if ln.startswith(qid))
        self.assertIn(str(m.size), row)
        self.assertIn("sender@client.test", row)
        self.assertNotIn("a@sink.test", r.stdout)  # delivered: final, not listed
        self.assertRegex(r.stdout, r"b@sink\.test  \(deferred, 1 attempt, next \d\d:\d\d:\d\d|b@sink\.test  "
                                   r"\(deferred, 1 attempt, next \d{4}-")
        self.assertIn("451 4.2.0 mailbox busy", r.stdout)
        self.assertEqual(lines[-1], "-- 1 Kbytes in 1 message (0 active, 1 deferred, 0 on hold).")

        r = await self.ctl("queue", "show", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout
        self.assertIn(f"Queue ID:  {qid}", out)
        self.assertIn("Sender:    <sender@client.test>", out)
        self.assertIn("Client:    127.0.0.1, HELO client.test, ESMTP", out)
        # the attempt history lives in the state file (memory keeps what is not written yet)
        on_disk = self.relay.service.spool.read_state(qid, m.env)
        hop = next(h for h in on_disk.recipients[1].history + m.state.recipients[1].history)
        self.assertIn(f"to=<b@sink.test>, relay={hop['relay']}, delay=", out)
        self.assertIn(f"status=deferred (host {hop['relay'].rsplit(':', 1)[0]} said: 451 4.2.0 mailbox busy", out)
        self.assertIn(f"to=<a@sink.test>, relay={hop['relay']}", out)
        self.assertIn("status=sent (host 127.0.0.2[127.0.0.2] said: 250 2.0.0", out)
        self.assertIn("Headers:", out)
        self.assertIn("  Subject: test", out)
        self.assertIn(f"with ESMTP id {qid}", out)
        self.assertEqual(hop["relay"], f"127.0.0.2[127.0.0.2]:{self.sink.port}")

        r = await self.ctl("queue", "show", qid.lower(), "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        d = json.loads(r.stdout)
        self.assertEqual(d["queue_id"], qid)
        hist = d["recipients"][1]["history"]
        self.assertEqual(len(hist), 1)
        self.assertEqual(set(hist[0]), {"time", "relay", "status", "reply"})
        self.assertEqual(hist[0]["status"], "deferred")
        self.assertIn("451 4.2.0", hist[0]["reply"])
        self.assertIn("Subject: test", d["headers"])
        self.assertEqual(d["client"]["helo"], "client.test")

    async def test_unknown_ids(self):
        qid = await self.send(["b@sink.test"])
        await apoll(lambda: self.deferred(qid), what="deferral")
        missing = "0" * 16
        r = await self.ctl("queue", "show", missing)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{missing}: no such message in the queue", r.stderr)
        self.assertEqual(r.stdout, "")
        for verb in ("hold", "release", "delete", "retry", "bounce"):
            r = await self.ctl("queue", verb, missing, "nonsense/../x")
            self.assertEqual(r.returncode, 1, verb)
            self.assertIn(f"relayctl: {missing}: no such message in the queue", r.stderr)
            self.assertIn("NONSENSE/../X: no such message in the queue (not a queue id)", r.stderr)
        # a known id with an unknown one: the known one is acted on, status 1
        r = await self.ctl("queue", "hold", qid, missing)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{qid}: on hold", r.stderr)
        self.assertTrue(self.queue.messages[qid].hold)

    async def test_while_the_spool_is_still_being_read(self):
        self.queue.loaded = False  # as during the start-up scan of a big spool
        self.addCleanup(setattr, self.queue, "loaded", True)
        r = await self.ctl("queue")
        self.assertEqual(r.returncode, 0)
        self.assertIn("still reading its spool at start-up: this listing is incomplete", r.stderr)
        r = await self.ctl("queue", "hold", "0" * 16)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no such message in the queue (the relay is still reading its spool", r.stderr)
        r = await self.ctl("status")
        self.assertIn("still reading the spool at start-up", r.stdout)

    async def test_usage_errors(self):
        for args in (["queue", "delete"], ["queue", "retry", "--all", "0" * 16], ["queue", "hold"],
                     ["queue", "frobnicate"], ["route"]):
            r = await self.ctl(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertIn("relayctl", r.stderr)


class LiveImports(LiveCase):
    """Against a running relay too, relayctl's queue and status verbs import
    no Twisted (relay.admin.cli): the protocol comes from relay.control.proto."""

    sink_behaviour = {"rcpt_replies": {"b@sink.test": "451 4.2.0 mailbox busy"}}

    async def test_no_twisted_on_the_live_path(self):
        qid = await self.send(["b@sink.test"])
        await apoll(lambda: self.deferred(qid), what="b deferred")
        for args in (("queue",), ("queue", "--json"), ("queue", "show", qid), ("queue", "hold", qid),
                     ("queue", "release", qid), ("status",)):
            seen, r = await in_thread(probe_imports, "--config", self.cfg, *args, cwd=self.tmp)
            self.assertEqual(seen["rc"], 0, f"relayctl {' '.join(args)}: {r.stderr}")
            self.assertEqual(seen["twisted"], [], f"relayctl {' '.join(args)} imported Twisted")
        self.assertIs(self.queue.messages[qid].hold, False)  # the hold and release went through


class Actions(LiveCase):
    sink_behaviour = {"rcpt_replies": {"b@sink.test": ["451 4.2.0 busy", "250 2.1.5 Ok"],
                                       "c@sink.test": ["451 4.2.0 busy", "250 2.1.5 Ok"]}}

    async def test_retry_delivers_a_deferred_message_at_once(self):
        qid = await self.send(["b@sink.test"])
        await apoll(lambda: self.deferred(qid), what="deferral")
        self.assertEqual(self.sink.transactions, [])
        r = await self.ctl("queue", "retry", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"{qid}: will be attempted now", r.stderr)
        # retry_min is an hour: only the retry can deliver it now
        await apoll(lambda: self.sink.delivered_to() == ["b@sink.test"], timeout=30, what="delivery")
        await apoll(lambda: qid not in self.queue.messages, what="removal")
        r = await self.ctl("queue")
        self.assertEqual(r.stdout, "Mail queue is empty\n")

    async def test_retry_all_skips_held(self):
        q1 = await self.send(["b@sink.test"])
        q2 = await self.send(["c@sink.test"])
        await apoll(lambda: self.deferred(q1) and self.deferred(q2), what="deferrals")
        r = await self.ctl("queue", "hold", q2)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = await self.ctl("queue", "retry", "--all")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("retried 1 message (1 skipped: on hold or being delivered)", r.stderr)
        await apoll(lambda: "b@sink.test" in self.sink.delivered_to(), timeout=30, what="delivery of b")
        self.assertNotIn("c@sink.test", self.sink.delivered_to())
        r = await self.ctl("queue", "retry", q2)
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"{q2}: is on hold: release it first", r.stderr)

    async def test_hold_and_release(self):
        qid = await self.send(["b@sink.test"])
        await apoll(lambda: self.deferred(qid), what="deferral")
        r = await self.ctl("queue", "hold", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: on hold\n"))
        state = self.relay.service.spool.read_state(qid, self.queue.messages[qid].env)
        self.assertTrue(state.hold)  # durable
        self.assertEqual((await self.listing())[qid]["queue_name"], "hold")
        r = await self.ctl("queue")
        self.assertIn(f"{qid}!", r.stdout)
        self.assertIn("(0 active, 0 deferred, 1 on hold)", r.stdout)
        r = await self.ctl("queue", "hold", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: already on hold\n"))
        r = await self.ctl("queue", "release", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: released\n"))
        self.assertEqual((await self.listing())[qid]["queue_name"], "deferred")
        self.assertFalse(self.relay.service.spool.read_state(qid, self.queue.messages[qid].env).hold)
        r = await self.ctl("queue", "release", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: was not on hold\n"))

    async def test_delete(self):
        q1 = await self.send(["b@sink.test"])
        q2 = await self.send(["c@sink.test"])
        await apoll(lambda: self.deferred(q1) and self.deferred(q2), what="deferrals")
        r = await self.ctl("queue", "delete", q1)
        self.assertEqual((r.returncode, r.stderr), (0, f"{q1}: deleted\n"))
        self.assertNotIn(q1, self.queue.messages)
        self.assertFalse(os.path.exists(self.relay.service.spool.message_path(q1)))
        self.assertFalse(os.path.exists(self.relay.service.spool.state_path(q1)))
        r = await self.ctl("queue", "delete", "--all")
        self.assertEqual((r.returncode, r.stderr), (0, "deleted 1 message\n"))
        self.assertEqual(self.relay.service.spool.queue_ids(), [])
        self.assertEqual(self.sink.transactions, [])

    async def test_bounce_returns_to_sender_with_a_dsn(self):
        qid = await self.send(["b@sink.test"], sender="alice@sink.test")
        await apoll(lambda: self.deferred(qid), what="deferral")
        r = await self.ctl("queue", "bounce", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: returned to the sender\n"))
        await apoll(lambda: self.sink.transactions, what="the DSN")
        t = self.sink.transactions[0]
        self.assertEqual((t.mail_from, t.rcpts), ("", ["alice@sink.test"]))
        self.assertIn(b"Final-Recipient: rfc822; b@sink.test", t.data)
        self.assertIn(b"returned to sender by the mail administrator", t.data)
        self.assertIn(b"451 4.2.0 busy", t.data)
        self.assertNotIn(qid, self.queue.messages)


class DeleteDuringDelivery(LiveCase):
    sink_behaviour = {"hang": {"final"}}

    async def test_delete_while_the_next_hop_sits_on_the_final_dot(self):
        qid = await self.send(["b@sink.test"])
        await apoll(lambda: any(s.transactions for s in self.sink.sessions), what="the data at the sink")
        listing = await self.listing()
        self.assertEqual(listing[qid]["queue_name"], "active")
        self.assertIs(listing[qid]["delivering"], True)
        r = await self.ctl("queue")
        self.assertIn(f"{qid}*", r.stdout)
        r = await self.ctl("queue", "delete", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"{qid}: will be deleted when the delivery in progress ends", r.stderr)
        # gone for the administrator at once, on disk until the attempt ends
        self.assertEqual(await self.listing(), {})
        r = await self.ctl("queue", "show", qid)
        self.assertEqual(r.returncode, 1)
        self.assertTrue(os.path.exists(self.relay.service.spool.message_path(qid)))
        # the next hop goes away mid-transaction: the attempt ends, the message is removed
        await self.sink.stop()
        await apoll(lambda: qid not in self.queue.messages, what="removal")
        self.assertEqual(self.relay.service.spool.queue_ids(), [])
        self.assertFalse(os.path.exists(self.relay.service.spool.state_path(qid)))
        r = await self.ctl("status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        self.assertEqual(s["queue"]["total"], 0)
        self.assertEqual(s["counters"]["dsn_sent"], 0)


class HoldSurvivesExpiry(LiveCase):
    delivery = {"retry_min": 1, "retry_max": 1, "max_lifetime": 4, "delay_warning": 0}
    sink_behaviour = {"rcpt_replies": {"held@sink.test": "451 4.2.0 busy", "other@sink.test": "451 4.2.0 busy"}}

    async def test_held_message_outlives_max_lifetime(self):
        held = await self.send(["held@sink.test"], sender="")
        other = await self.send(["other@sink.test"], sender="")
        await apoll(lambda: self.deferred(held), what="first deferral")
        r = await self.ctl("queue", "hold", held)
        self.assertEqual(r.returncode, 0, r.stderr)
        # the other message, queued at the same moment, expires (bounced, null sender: dropped)
        await apoll(lambda: other not in self.queue.messages, timeout=20, what="the other message to expire")
        arrival = self.queue.messages[held].env.arrival
        await apoll(lambda: time.time() > arrival + 5, timeout=10, what="past max_lifetime")
        listing = await self.listing()
        self.assertEqual(list(listing), [held])
        self.assertEqual(listing[held]["queue_name"], "hold")
        attempts = listing[held]["recipients"][0]["attempts"]
        # released after its lifetime, with the next hop back: delivered, not bounced
        self.sink.b.rcpt_replies = {}
        r = await self.ctl("queue", "release", held)
        self.assertEqual(r.returncode, 0, r.stderr)
        await apoll(lambda: "held@sink.test" in self.sink.delivered_to(), timeout=30, what="delivery")
        self.assertGreaterEqual(attempts, 1)


class Status(LiveCase):
    async def test_status(self):
        await self.send(["alice@local.test"])
        await apoll(lambda: not self.queue.messages, what="local delivery")
        def connect():
            c = socket.create_connection(self.relay.smtp, timeout=10)
            c.recv(100)  # the banner
            return c

        s = await in_thread(connect)
        self.addCleanup(s.close)
        await apoll(lambda: len(self.relay.service.smtp_ctx.open_sessions) == 1, what="an open session")
        r = await self.ctl("status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        st = json.loads(r.stdout)
        self.assertIs(st["running"], True)
        self.assertEqual(st["pid"], os.getpid())
        self.assertGreater(st["uptime"], 0)  # the relay started before this test's traffic
        self.assertEqual(st["queue"], {"active": 0, "deferred": 0, "hold": 0, "total": 0})
        self.assertEqual(st["counters"]["received"], 1)
        self.assertEqual(st["counters"]["delivered"], 1)
        self.assertEqual((st["counters"]["deferred"], st["counters"]["bounced"]), (0, 0))
        self.assertEqual(st["sessions"], {"smtp": 1, "pop3": 0})
        host, port = self.relay.smtp
        self.assertIn({"name": f"smtp tcp:0:interface={host}", "host": host, "port": port}, st["listeners"])
        self.assertEqual(st["control_socket"], os.path.join(self.tmp, "spool", "control.sock"))
        r = await self.ctl("status")
        self.assertIn(f"Relay:      running, pid {os.getpid()}, up ", r.stdout)
        self.assertIn("Queue:      0 messages (0 active, 0 deferred, 0 on hold)", r.stdout)
        self.assertIn("1 messages received", r.stdout)
        self.assertIn("Sessions:   1 SMTP, 0 POP3", r.stdout)
        self.assertIn(f"({host}:{port})", r.stdout)


class Route(LiveCase):
    async def test_route_answers(self):
        r = await self.ctl("route", "alice@local.test")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"local delivery to the Maildir {self.tmp}/mail/local.test/alice", r.stdout)

        r = await self.ctl("route", "team@local.test", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        d = json.loads(r.stdout)
        self.assertIs(d["alias"], True)
        self.assertEqual([(x["recipient"], x["kind"]) for x in d["deliveries"]],
                         [("alice@local.test", "local"), ("bob@sink.test", "route")])
        self.assertEqual(d["deliveries"][1]["hops"], [{"host": "127.0.0.2", "address": "127.0.0.2",
                                                       "port": self.sink.port, "preference": 0}])

        r = await self.ctl("route", "nobody@local.test")
        self.assertEqual(r.returncode, 1)
        self.assertIn("550 5.1.1 <nobody@local.test>: Recipient address rejected", r.stdout)

        r = await self.ctl("route", "bad address@example.org")
        self.assertEqual(r.returncode, 1)
        self.assertIn("501 5.1.3 Bad recipient address syntax", r.stdout)

        r = await self.ctl("route", "x@elsewhere.test", "--client", "192.0.2.7")
        self.assertEqual(r.returncode, 1)
        self.assertIn("refused for client 192.0.2.7: 554 5.7.1 <x@elsewhere.test>: Relay access denied", r.stdout)
        r = await self.ctl("route", "x@elsewhere.test", "--client", "not-an-ip")
        self.assertEqual(r.returncode, 2)

    async def test_route_mx_uses_dns(self):
        self.zone.mx("mx.test", 20, "backup.mx.test").mx("mx.test", 10, "primary.mx.test")
        self.zone.a("primary.mx.test", "127.0.0.3").aaaa("primary.mx.test", "::1").a("backup.mx.test", "127.0.0.4")
        r = await self.ctl("route", "x@MX.test.")
        self.assertEqual(r.returncode, 0, r.stderr + r.stdout)
        out = r.stdout
        self.assertIn("<x@mx.test>: accepted from trusted clients (250 2.1.5 Ok)", out)
        self.assertIn("from other clients: 554 5.7.1", out)
        self.assertIn("MX delivery for mx.test on port 25, hosts in the order they would be tried:", out)
        i1 = out.index("1. primary.mx.test[127.0.0.3]:25 (preference 10)")
        i2 = out.index("2. primary.mx.test[::1]:25 (preference 10)")
        i3 = out.index("3. backup.mx.test[127.0.0.4]:25 (preference 20)")
        self.assertLess(i1, i2)
        self.assertLess(i2, i3)
        self.assertGreater(self.zone.count("mx.test", "MX"), 0)  # a real look-up

        self.zone.null_mx("nomail.test")
        r = await self.ctl("route", "x@nomail.test", "--json")
        self.assertEqual(r.returncode, 1)
        d = json.loads(r.stdout)["deliveries"][0]
        self.assertEqual((d["outcome"], d["status"]), ("bounce", "5.1.10"))
        self.zone.behave("flaky.test", "servfail")
        r = await self.ctl("route", "x@flaky.test")
        self.assertEqual(r.returncode, 1)
        self.assertIn("DNS look-up failed temporarily (4.4.3), mail would be deferred", r.stdout)


class Reload(LiveCase):
    async def test_reload_without_support(self):
        self.relay.service.reload = None  # a relay without reload support
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no reload support", r.stderr)

    async def test_reload_reports(self):
        calls = []

        def refused():
            calls.append(1)
            return {"ok": False, "messages": ["relay.toml: smtp.timeout: expected a duration"],
                    "restart_needed": []}

        self.relay.service.reload = refused
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr, "relay.toml: smtp.timeout: expected a duration\n")
        self.relay.service.reload = lambda: {"ok": True, "messages": ["config reloaded from relay.toml"],
                                             "restart_needed": ["smtp.listen"]}
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "config reloaded from relay.toml\nsmtp.listen changed: takes effect after a "
                                   "restart\n")
        self.assertEqual(calls, [1])


class Socket(LiveCase):
    sink_behaviour = {"rcpt_replies": {"b@sink.test": "451 4.2.0 busy"}}

    async def test_mode_pages_and_cleanup(self):
        path = self.relay.config.control_socket
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.relay.config.spool).st_mode), 0o700)
        # a listing bigger than one page and than one AMP value, over the real socket
        q = self.queue
        base = await self.send(["b@sink.test"])
        await apoll(lambda: self.deferred(base), what="deferral")
        m = q.messages[base]
        for i in range(4500):
            env = spoolmod.Envelope(spoolmod.new_id(), f"s{i}@x.test", ["r@sink.test"], m.env.arrival)
            q.messages[env.queue_id] = type(m)(env.queue_id, env, spoolmod.State.fresh(env), 10, 0)
        lines = (await self.ctl("queue", "--json")).stdout.splitlines()
        self.assertEqual(len(lines), 4501)
        self.assertEqual(sorted(json.loads(x)["queue_id"] for x in lines), sorted(q.messages))
        for qid in list(q.messages):
            if qid != base:
                del q.messages[qid]
        await self.relay.stop()
        self.assertFalse(os.path.exists(path))
        r = await self.ctl("status")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Relay:      not running", r.stdout)

    async def test_not_answering(self):
        # something holds the spool lock (a hung relay) and nothing answers on the socket
        await self.relay.stop()
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(self.relay.config.control_socket)
        srv.listen(1)
        self.addCleanup(srv.close)
        lock = os.open(os.path.join(self.relay.config.spool, "lock"), os.O_RDWR)
        self.addCleanup(os.close, lock)
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = await self.ctl("queue", env={"RELAYCTL_TIMEOUT": "0.5"})
        self.assertEqual(r.returncode, 1)
        self.assertIn("the relay does not answer on its control socket", r.stderr)
        srv.close()
        os.unlink(self.relay.config.control_socket)
        r = await self.ctl("queue", "hold", "0" * 16, env={"RELAYCTL_TIMEOUT": "0.5"})
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, r"a relay \(pid \d+\) holds the spool .* but does not answer on its control "
                                   r"socket \(.*control.sock: No such file or directory\)")

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
    async def test_other_users_cannot_open_the_socket_or_read_the_spool(self):
        path = self.relay.config.control_socket
        queue_dir = os.path.join(self.relay.config.spool, "queue")

        def as_nobody(fn) -> int:
            pid = os.fork()
            if pid == 0:  # the child only tries and reports by exit status
                code = 2
                try:
                    os.setgroups([])
                    os.setgid(65534)
                    os.setuid(65534)
                    fn()
                    code = 0
                except PermissionError:
                    code = 13
                finally:
                    os._exit(code)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        def connect():
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)

        os.chmod(self.tmp, 0o755)  # only the relay's own permissions stand in the way
        self.assertEqual(await in_thread(as_nobody, lambda: os.listdir(self.tmp)), 0)
        self.assertEqual(await in_thread(as_nobody, connect), 13)
        self.assertEqual(await in_thread(as_nobody, lambda: os.listdir(queue_dir)), 13)
        os.chmod(self.relay.config.spool, 0o755)  # even with the spool open, the socket is 0600
        self.assertEqual(await in_thread(as_nobody, connect), 13)
        self.assertEqual(await in_thread(as_nobody, lambda: os.stat(path)), 0)


class SocketStartup(unittest.TestCase):
    """A stale socket from a crash never prevents a start; a live one or a file does."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-ctl-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.path = os.path.join(self.tmp, "spool", "control.sock")
        os.makedirs(os.path.dirname(self.path), mode=0o700)

    def make(self) -> InProcessRelay:
        relay = InProcessRelay(self.tmp)
        self.addCleanup(relay.stop)  # also after a failed start: it took the spool lock
        return relay

    async def test_stale_socket_is_replaced(self):
        s = socket.socket(socket.AF_UNIX)
        s.bind(self.path)
        s.close()  # what SIGKILL leaves behind: a socket file nobody listens on
        relay = await self.make().start()
        r = await in_thread(run_ctl_for, relay, "status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIs(json.loads(r.stdout)["running"], True)

    async def test_live_socket_or_other_file_stops_the_start(self):
        from relay.runtime.service import StartupError

        s = socket.socket(socket.AF_UNIX)
        s.bind(self.path)
        s.listen(1)
        self.addCleanup(s.close)
        relay = self.make()
        with self.assertRaises(StartupError) as cm:
            await relay.start()
        await relay.stop()
        self.assertIn("control.socket", str(cm.exception))
        self.assertIn("in use by another running process", str(cm.exception))
        s.close()
        os.unlink(self.path)
        with open(self.path, "w") as f:
            f.write("not a socket")
        relay = self.make()
        with self.assertRaises(StartupError) as cm:
            await relay.start()
        await relay.stop()
        self.assertIn("exists and is not a socket", str(cm.exception))
        with open(self.path) as f:
            self.assertEqual(f.read(), "not a socket")  # never deleted


def run_ctl_for(relay: InProcessRelay, *args: str) -> subprocess.CompletedProcess:
    path = os.path.join(relay.tmpdir, "relay.toml")
    with open(path, "w") as f:
        f.write(toml_dumps(relay.data))
    return run_ctl(path, *args)


# -- offline: no relay running, relayctl works on the spool -------------------------------------


def make_spool(tmp: str, specs: list[dict]) -> tuple[str, list[str]]:
    """A config file and a spool with the messages described (as a stopped relay left them)."""
    data = {
        "hostname": "relay.test", "spool": os.path.join(tmp, "spool"), "workers": 1,
        "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]}, "pop3": {"listen": []},
        "local": {"domains": ["local.test"], "mailboxes": os.path.join(tmp, "mail"),
                  "users": os.path.join(tmp, "users")},
    }
    cfg = os.path.join(tmp, "relay.toml")
    with open(cfg, "w") as f:
        f.write(toml_dumps(data))
    sp = spoolmod.Spool(data["spool"])
    sp.create()
    ids = []
    now = time.time()
    for spec in specs:
        env = spoolmod.Envelope(spoolmod.new_id(), spec.get("sender", "sender@client.test"), spec["rcpts"],
                                now - 60, client={"ip": "127.0.0.1", "helo": "client.test", "proto": "ESMTP"})
        entry = sp.inject(env, b"Subject: offline\r\n\r\nbody\r\n")
        st = entry.state
        for r in st.recipients:
            r.status = spec.get("status", "deferred")
            if r.status == "deferred":
                r.attempts = 2
                r.reply = "451 4.3.0 try later"
                r.next_attempt = now + 3000
                r.history = [{"t": now - 30, "relay": "mx.test[127.0.0.3]:25", "status": "deferred",
                              "reply": r.reply}]
        st.hold = spec.get("hold", False)
        sp.write_state(env.queue_id, st)
        ids.append(env.queue_id)
    return cfg, ids


@pytest.fixture
def tmp(tmp_path_factory):
    d = tempfile.mkdtemp(prefix="relay-off-")
    yield d
    shutil.rmtree(d, True)


def test_offline_no_spool_at_all(tmp):
    cfg, _ = make_spool(tmp, [])
    shutil.rmtree(os.path.join(tmp, "spool"))
    r = run_ctl(cfg, "queue")
    assert (r.returncode, r.stdout) == (0, "Mail queue is empty\n")
    assert not os.path.exists(os.path.join(tmp, "spool"))  # relayctl does not create it
    r = run_ctl(cfg, "status")
    assert r.returncode == 1
    assert "Relay:      not running" in r.stdout
    r = run_ctl(cfg, "queue", "delete", "0" * 16)
    assert r.returncode == 1 and "no such message" in r.stderr


def test_offline_listing_show_and_status(tmp):
    cfg, (a, b, c) = make_spool(tmp, [{"rcpts": ["x@dest.test", "y@dest.test"]},
                                      {"rcpts": ["z@dest.test"], "hold": True},
                                      {"rcpts": ["p@dest.test"], "status": "pending", "sender": ""}])
    r = run_ctl(cfg, "queue", "--json")
    assert r.returncode == 0, r.stderr
    recs = {d["queue_id"]: d for d in json_lines(r.stdout)}
    assert list(recs) == [a, b, c]
    assert [recs[q]["queue_name"] for q in (a, b, c)] == ["deferred", "hold", "active"]
    x = recs[a]["recipients"][0]
    assert (x["address"], x["status"], x["attempts"], x["delay_reason"]) == ("x@dest.test", "deferred", 2,
                                                                            "451 4.3.0 try later")
    assert recs[c]["sender"] == "" and recs[c]["recipients"][0]["status"] == "pending"
    assert set(recs[a]) >= {"queue_name", "queue_id", "arrival_time", "message_size", "forced_expire",
                            "sender", "recipients"}
    r = run_ctl(cfg, "queue")
    assert r.returncode == 0
    assert f"{b}!" in r.stdout and "MAILER-DAEMON" in r.stdout
    assert r.stdout.splitlines()[-1] == "-- 1 Kbytes in 3 messages (1 active, 1 deferred, 1 on hold)."
    r = run_ctl(cfg, "queue", "show", a)
    assert r.returncode == 0
    assert "to=<x@dest.test>, relay=mx.test[127.0.0.3]:25, delay=30.0, status=deferred (451 4.3.0 try later)" \
        in r.stdout
    assert "  Subject: offline" in r.stdout
    r = run_ctl(cfg, "status", "--json")
    assert r.returncode == 1
    s = json.loads(r.stdout)
    assert s["running"] is False
    assert s["queue"] == {"active": 1, "deferred": 1, "hold": 1, "total": 3}
    r = run_ctl(cfg, "reload")
    assert r.returncode == 1 and "not running" in r.stderr


def test_offline_actions(tmp):
    cfg, (a, b, c, d) = make_spool(tmp, [{"rcpts": ["x@dest.test"]}, {"rcpts": ["y@dest.test"]},
                                         {"rcpts": ["z@dest.test"], "sender": "alice@client.test"},
                                         {"rcpts": ["w@dest.test"]}])
    conf = configmod.load(cfg)
    sp = spoolmod.Spool(conf.spool)
    r = run_ctl(cfg, "queue", "hold", a)
    assert (r.returncode, r.stderr) == (0, f"{a}: on hold\n")
    assert sp.load(a).state.hold
    r = run_ctl(cfg, "queue", "retry", a)
    assert r.returncode == 1 and "release it first" in r.stderr
    r = run_ctl(cfg, "queue", "release", a)
    assert (r.returncode, r.stderr) == (0, f"{a}: released\n")
    r = run_ctl(cfg, "queue", "retry", a)
    assert r.returncode == 0 and "as soon as the relay starts" in r.stderr
    assert sp.load(a).state.recipients[0].next_attempt == 0.0
    r = run_ctl(cfg, "queue", "delete", b, "0" * 16)
    assert r.returncode == 1
    assert f"{b}: deleted" in r.stderr and f"relayctl: {'0' * 16}: no such message in the queue" in r.stderr
    assert b not in sp.queue_ids()
    r = run_ctl(cfg, "queue", "bounce", c)
    assert r.returncode == 0, r.stderr
    assert "returned to the sender" in r.stderr
    ids = sp.queue_ids()
    assert c not in ids
    dsn = [q for q in ids if q not in (a, d)]
    assert len(dsn) == 1
    e = sp.load(dsn[0])
    assert (e.envelope.sender, e.envelope.recipients, e.envelope.extra) == (
        "", ["alice@client.test"], {"dsn": "failed", "for": c})
    with open(sp.message_path(dsn[0]), "rb") as f:
        body = f.read()
    assert b"Final-Recipient: rfc822; z@dest.test" in body and b"451 4.3.0 try later" in body
    r = run_ctl(cfg, "queue", "delete", "--all")
    assert (r.returncode, r.stderr) == (0, "deleted 3 messages\n")
    assert sp.queue_ids() == []


def test_offline_relay_waits_for_relayctl_lock(tmp):
    """relayctl holds the lock while it changes the spool; a relay starting
    meanwhile waits for it instead of failing or racing."""
    cfg, (a,) = make_spool(tmp, [{"rcpts": ["x@dest.test"]}])
    lock = os.open(os.path.join(tmp, "spool", "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as relayctl does during a change
    from relay.runtime.service import RelayService

    svc = RelayService(configmod.load(cfg))
    t0 = time.monotonic()
    import threading

    threading.Timer(0.5, lambda: os.close(lock)).start()
    svc._open_spool()  # what startService does first
    try:
        assert time.monotonic() - t0 >= 0.4
    finally:
        os.close(svc._lock_fd)


def test_box_codec_roundtrip():
    """The Twisted-free client codec reads what Twisted's AMP writes, BigString included."""
    from twisted.protocols import amp

    from relay.control.amp import BigString, QueueList

    value = bytes(range(256)) * 700  # 179,200 bytes: three AMP values
    strings = amp.AmpBox()
    BigString().toBox(b"lines", strings, {"lines": value}, None)
    assert len(strings) == 3
    wire = amp.AmpBox(strings, _answer=b"1").serialize()
    reader = _BoxReader()
    boxes = []
    for i in range(0, len(wire), 1000):
        boxes += reader.feed(wire[i : i + 1000])
    assert len(boxes) == 1 and big(boxes[0], b"lines") == value
    objs: dict = {}
    BigString().fromBox(b"lines", dict(strings), objs, None)
    assert objs["lines"] == value
    # and Twisted parses what the client encodes
    box = encode_box({b"_command": b"QueueList", b"_ask": b"1", b"start": b"True", b"limit": b"10"})
    parsed = QueueList.parseArguments(amp.AmpBox(_parse(box)), None)
    assert parsed == {"start": True, "limit": 10}


def _parse(wire: bytes) -> dict:
    return _BoxReader().feed(wire)[0]
