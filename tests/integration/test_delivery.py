"""Delivery through a real relay: SMTP in, then out by MX (a real DNS server
on 127.0.0.1), smarthost or route to real SMTP servers on other 127.0.0.x
addresses, or into a local Maildir.

The relay runs in-process on the test reactor (short retry times in its
config); clients run in threads; the receiving servers are
tests.support.sink and the DNS server tests.support.dns.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


class DeliveryCase(unittest.TestCase):
    overrides: dict = {}
    sinks_behaviour: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-dlv-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.port = free_port(IPS)
        self.sinks = {}
        for ip in IPS:
            s = Sink(ip, port=self.port, **self.behaviour().get(ip, {})).start()
            self.sinks[ip] = s
            self.addCleanup(s.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        over = {
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port,
                         "retry_min": 1, "retry_max": 2, "connect_timeout": 5, "tls": "may"},
        }
        for k, v in self.more_config().items():
            over.setdefault(k, {}).update(v)
        self.relay = InProcessRelay(self.tmp, over)
        await self.relay.start()
        self.addCleanup(self.stop_relay)

    async def stop_relay(self):
        # a cleanup, not tearDown: trial (26.10) runs cleanups before tearDown,
        # and the relay must stop before its directory is removed
        await self.relay.stop()

    def behaviour(self) -> dict:
        return self.sinks_behaviour

    def more_config(self) -> dict:
        return self.overrides

    def send(self, rcpts, body=b"Subject: test\r\n\r\nbody\r\n", sender="sender@client.example"):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                return s.sendmail(sender, rcpts, body)

        return in_thread(run)

    def queue_empty(self):
        return not self.relay.service.queue.messages and not self.relay.service.spool.queue_ids()


class MX(DeliveryCase):
    async def test_mx_order_and_fallback(self):
        self.zone.mx("dest.example", 10, "mx1.dest.example").mx("dest.example", 20, "mx2.dest.example")
        self.zone.a("mx1.dest.example", "127.0.0.2").a("mx2.dest.example", "127.0.0.3")
        await self.send(["a@dest.example"])
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="delivery to the best MX")
        self.assertEqual(self.sinks["127.0.0.3"].transactions, [])
        # the best MX refuses connections: the next one gets the mail
        await self.sinks["127.0.0.2"].stop()
        await self.send(["b@dest.example"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, what="fallback to the second MX")
        self.assertEqual(self.sinks["127.0.0.3"].transactions[0].rcpts, ["b@dest.example"])
        await apoll(self.queue_empty, what="empty queue")

    async def test_421_greeting_tries_next(self):
        self.sinks["127.0.0.2"].b.greeting = "421 4.3.2 busy"
        self.zone.mx("dest.example", 10, "mx1.dest.example").mx("dest.example", 20, "mx2.dest.example")
        self.zone.a("mx1.dest.example", "127.0.0.2").a("mx2.dest.example", "127.0.0.3")
        await self.send(["a@dest.example"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, what="delivery to the second MX")

    async def test_implicit_mx(self):
        self.zone.a("plain.example", "127.0.0.4")
        await self.send(["x@plain.example"])
        await apoll(lambda: self.sinks["127.0.0.4"].transactions, what="delivery to the A record")

    async def test_null_mx_and_nxdomain_bounce_at_once(self):
        self.zone.mx("nullmx.example", 0, ".")
        # the DSNs go back to the sender's domain
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", "127.0.0.5")
        await self.send(["a@nullmx.example", "b@nowhere.example"])
        await apoll(lambda: len(self.sinks["127.0.0.5"].transactions) >= 1, what="the DSN")
        await apoll(self.queue_empty, what="empty queue")
        dsns = [email.message_from_bytes(t.data, policy=email.policy.default)
                for t in self.sinks["127.0.0.5"].transactions]
        text = "".join(m.as_string() for m in dsns)
        self.assertIn("Status: 5.1.10", text)
        self.assertIn("Status: 5.1.2", text)
        self.assertEqual(self.sinks["127.0.0.5"].transactions[0].mail_from, "")

    async def test_servfail_then_recovery(self):
        self.zone.mx("flaky.example", 10, "mx.flaky.example").a("mx.flaky.example", "127.0.0.2")
        self.zone.behave("flaky.example", "servfail")
        await self.send(["a@flaky.example"])
        q = self.relay.service.queue
        await apoll(lambda: any(r.status == "deferred" for m in q.messages.values() for r in m.state.recipients),
                    what="a deferral")
        self.zone.behave("flaky.example", None)
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, timeout=15, what="delivery after recovery")

    async def test_self_mx_loop_bounces(self):
        # the domain's only MX is this relay (by name): loop, 5.4.6
        self.zone.mx("loop.example", 10, "relay.test").a("relay.test", "127.0.0.1")
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", "127.0.0.5")
        await self.send(["a@loop.example"])
        await apoll(lambda: self.sinks["127.0.0.5"].transactions, what="the DSN")
        self.assertIn(b"5.4.6", self.sinks["127.0.0.5"].transactions[0].data)

    async def test_several_recipients_one_transaction_and_partial_5xx(self):
        self.zone.mx("dest.example", 10, "mx1.dest.example").a("mx1.dest.example", "127.0.0.2")
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", "127.0.0.5")
        self.sinks["127.0.0.2"].b.rcpt_replies = {"bad@dest.example": "550 5.1.1 no such user"}
        await self.send(["a@dest.example", "bad@dest.example", "c@dest.example"])
        await apoll(lambda: self.sinks["127.0.0.2"].transactions and self.sinks["127.0.0.5"].transactions,
                    what="delivery and DSN")
        await apoll(self.queue_empty, what="empty queue")
        ts = self.sinks["127.0.0.2"].transactions
        self.assertEqual(len(ts), 1)
        self.assertEqual(ts[0].rcpts, ["a@dest.example", "c@dest.example"])
        dsn = self.sinks["127.0.0.5"].transactions[0].data
        self.assertIn(b"Final-Recipient: rfc822; bad@dest.example", dsn)
        self.assertIn(b"550 5.1.1 no such user", dsn)
        self.assertNotIn(b"Final-Recipient: rfc822; a@dest.example", dsn)

    async def test_4xx_then_success(self):
        self.zone.mx("dest.example", 10, "mx1.dest.example").a("mx1.dest.example", "127.0.0.2")
        self.sinks["127.0.0.2"].b.rcpt_replies = {"a@dest.example": ["451 4.7.1 greylisted", "250 2.1.5 ok"]}
        await self.send(["a@dest.example", "b@dest.example"])
        await apoll(lambda: len(self.sinks["127.0.0.2"].transactions) >= 2, timeout=15, what="second attempt")
        ts = self.sinks["127.0.0.2"].transactions
        self.assertEqual(ts[0].rcpts, ["b@dest.example"])
        self.assertEqual(ts[1].rcpts, ["a@dest.example"])  # b was never resent
        await apoll(self.queue_empty, what="empty queue")

    async def test_dot_stuffing_and_bytes_exact(self):
        self.zone.mx("dest.example", 10, "mx1.dest.example").a("mx1.dest.example", "127.0.0.2")
        body = (b"Subject: dots\r\n\r\n.leading\r\n..two\r\n.\r\nx\r\n"
                + b"".join(b"." * (i % 3 + 1) + b"z" * (i % 97) + b"\r\n" for i in range(700))
                + b".\r\n\xc3\xa9 8-bit\r\n")
        await self.send(["a@dest.example"], body=body)
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="delivery")
        data = self.sinks["127.0.0.2"].transactions[0].data
        self.assertTrue(data.startswith(b"Received: from client.example"))
        self.assertTrue(data.endswith(body), data[-200:])
        self.assertEqual(data.count(b"Received:"), 1)


class Expiry(DeliveryCase):
    overrides = {"delivery": {"max_lifetime": 3, "delay_warning": 1, "retry_min": 1, "retry_max": 1}}

    async def test_delay_notice_then_expiry_bounce(self):
        self.zone.mx("down.example", 10, "mx.down.example").a("mx.down.example", "127.0.0.4")
        await self.sinks["127.0.0.4"].stop()
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", "127.0.0.5")
        await self.send(["a@down.example"])
        await apoll(lambda: len(self.sinks["127.0.0.5"].transactions) >= 2, timeout=20,
                    what="delay notice and bounce")
        kinds = [email.message_from_bytes(t.data, policy=email.policy.default)["Subject"]
                 for t in self.sinks["127.0.0.5"].transactions]
        self.assertEqual(kinds, ["Delayed Mail (still being retried)", "Undelivered Mail Returned to Sender"])
        bounce = self.sinks["127.0.0.5"].transactions[1].data
        self.assertIn(b"Action: failed", bounce)
        self.assertIn(b"Status: 5.4.7", bounce)
        self.assertIn(b"Connection refused", bounce)
        await apoll(self.queue_empty, what="empty queue")


class Smarthost(DeliveryCase):
    def behaviour(self):
        certs = cert_files("smarthost.test", "127.0.0.3")
        return {"127.0.0.3": {"auth": ("PLAIN", "LOGIN"), "credentials": {"relayuser": "s3cret"},
                              "starttls": "ok", "cert": certs}}

    def more_config(self):
        pwfile = os.path.join(self.tmp, "smarthost.pw")
        with open(pwfile, "w") as f:
            f.write("s3cret\n")
        return {"relay": {"smarthost": f"127.0.0.3:{self.port}", "smarthost_username": "relayuser",
                          "smarthost_password_file": pwfile, "smarthost_tls": "encrypt",
                          "routes": {"routed.example": f"127.0.0.4:{self.port}"}}}

    async def test_smarthost_with_auth_over_tls(self):
        await self.send(["a@anywhere.example"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, what="delivery via the smarthost")
        t = self.sinks["127.0.0.3"].transactions[0]
        self.assertEqual(t.session.auth_user, "relayuser")
        self.assertIsNotNone(t.session.tls)

    async def test_route_overrides_smarthost(self):
        await self.send(["a@routed.example"])
        await apoll(lambda: self.sinks["127.0.0.4"].transactions, what="delivery via the route")
        self.assertEqual(self.sinks["127.0.0.3"].transactions, [])


class OpportunisticTLS(DeliveryCase):
    async def test_starttls_may(self):
        certs = cert_files("mx.tls.example")
        self.sinks["127.0.0.2"].b.starttls = "ok"
        self.sinks["127.0.0.2"].b.cert = certs
        self.zone.mx("tls.example", 10, "mx.tls.example").a("mx.tls.example", "127.0.0.2")
        await self.send(["a@tls.example"])
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="delivery")
        self.assertIsNotNone(self.sinks["127.0.0.2"].transactions[0].session.tls)


class Local(DeliveryCase):
    async def test_local_delivery_and_aliases(self):
        aliases = os.path.join(self.tmp, "aliases")
        with open(aliases, "w") as f:
            f.write("team: alice, friend@far.example\nloop1: loop2\nloop2: loop1\n")
        # aliases need the file in the config: restart the relay with it
        await self.relay.stop()
        self.relay = InProcessRelay(self.tmp, {
            "local": {"aliases": aliases},
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port, "retry_min": 1},
        })
        await self.relay.start()
        self.zone.mx("far.example", 10, "mx.far.example").a("mx.far.example", "127.0.0.2")
        await self.send(["team@local.test", "Alice@LOCAL.test", "postmaster@local.test"],
                        body=b"Subject: local\r\n\r\n.hello\r\n")
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="the remote alias target")
        await apoll(self.queue_empty, what="empty queue")
        new = os.path.join(self.tmp, "mail", "local.test", "alice", "new")
        files = os.listdir(new)
        self.assertEqual(len(files), 1)  # alice once, although named twice
        with open(os.path.join(new, files[0]), "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"Return-Path: <sender@client.example>\nDelivered-To: alice@local.test\n"))
        self.assertIn(b"\n.hello\n", data)
        # postmaster without an alias goes to the first user: alice's mailbox already has it once
        self.assertEqual(self.sinks["127.0.0.2"].transactions[0].rcpts, ["friend@far.example"])


class ConcurrencyWithCachedSessions(DeliveryCase):
    """Sessions parked for reuse are connections too: max_concurrency holds."""

    overrides = {"delivery": {"max_concurrency": 1, "max_per_destination": 1, "tls": "none"}}

    async def test_parked_sessions_count_toward_max_concurrency(self):
        for i, ip in enumerate(IPS):
            self.zone.mx(f"d{i}.example", 10, f"mx.d{i}.example").a(f"mx.d{i}.example", ip)
        sessions = lambda: [s for sink in self.sinks.values() for s in sink.sessions]  # noqa: E731
        peak = [0]
        previous: set[int] = set()

        def occupied():
            # open and not told QUIT; counted only when it was so 20 ms ago too,
            # so a session in the middle of being closed is not counted
            nonlocal previous
            now = {id(s) for s in sessions() if not s.closed and "QUIT" not in
                   [c.split()[0].upper() for c in s.commands if c.strip()]}
            peak[0] = max(peak[0], len(now & previous))
            previous = now

        from twisted.internet import task

        sampler = task.LoopingCall(occupied)
        sampler.start(0.02)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        for i in range(len(IPS)):
            await self.send([f"u@d{i}.example"])
        await apoll(lambda: all(sink.transactions for sink in self.sinks.values()), 20,
                    what="a delivery to every host")
        await apoll(self.queue_empty, what="empty queue")
        sampler.stop()
        self.assertEqual(len(sessions()), len(IPS))
        self.assertEqual(peak[0], 1)


class PerHostLimit(DeliveryCase):
    """max_per_destination holds per host too: domains sharing an MX host do
    not add up their connections to it."""

    overrides = {"delivery": {"max_per_destination": 1, "tls": "none"}}
    sinks_behaviour = {"127.0.0.2": {"delays": {"final": 0.4}}}

    async def test_domains_sharing_an_mx_host_share_its_limit(self):
        domains = [f"shared{i}.example" for i in range(4)]
        for d in domains:
            self.zone.mx(d, 10, "mx.shared.example")
        self.zone.a("mx.shared.example", "127.0.0.2")
        sink = self.sinks["127.0.0.2"]
        peak = [0]

        def sample():
            live = [s for s in sink.sessions if not s.closed and "QUIT" not in
                    [c.split()[0].upper() for c in s.commands if c.strip()]]
            peak[0] = max(peak[0], len(live))

        from twisted.internet import task

        sampler = task.LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        await self.send([f"u@{d}" for d in domains])
        await apoll(lambda: len(sink.transactions) == len(domains), 20, what="a delivery per domain")
        await apoll(self.queue_empty, what="empty queue")
        sampler.stop()
        self.assertEqual(peak[0], 1)
        self.assertEqual(sorted(r for t in sink.transactions for r in t.rcpts), sorted(f"u@{d}" for d in domains))
        # every slot comes back once the parked session has gone
        deliverer = self.relay.service.queue.deliverer
        await apoll(lambda: not deliverer.host_limit.open and not deliverer.host_limit.waiting, 10,
                    what="the host's connection slots released")
