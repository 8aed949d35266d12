"""DNS down or slow, through a whole relay (a real DNS server on 127.0.0.1).

Mail for a domain whose look-up never answers, or answers after the
resolver's lifetime, is deferred (a temporary failure, never a bounce) and
delivered once DNS answers again; meanwhile mail to other destinations
(a route to an IP address, a local Maildir, other MX domains) is delivered.
The relay's resolver lifetime is 10 s.  Tests keep a lifetime far from what
they race it against (a slow answer, the other mail's delivery), since on a
busy CI machine a second is no margin; a short one only where it must run
out (and the answer is then much slower still).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial import unittest

from relay.delivery.mx import Resolver
from relay.mailbox import maildir
from relay.mailbox import users as usersmod
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.smtpclient import send_session
from tests.support.wait import apoll

MX_IP = "127.0.0.2"
ROUTE_IP = "127.0.0.3"


def message(tag: str) -> bytes:
    return f"Message-ID: <{tag}@client.test>\r\nSubject: {tag}\r\n\r\n{tag} body\r\n".encode()


class DNSCase(unittest.TestCase):
    lifetime = 10.0

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-dnsf-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.port = free_port((MX_IP, ROUTE_IP))
        self.mx = Sink(MX_IP, port=self.port).start()
        self.addCleanup(self.mx.stop)
        self.routed = Sink(ROUTE_IP, port=self.port).start()
        self.addCleanup(self.routed.stop)
        self.zone = Zone()
        self.zone.mx("good.test", 10, "mx.good.test").a("mx.good.test", MX_IP)
        for name in ("down.test", "slow.test"):
            self.zone.mx(name, 10, f"mx.{name}").a(f"mx.{name}", MX_IP)
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(lambda: self.dns.stop())
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.relay = InProcessRelay(self.tmp, {
            "relay": {"routes": {"routed.test": f"{ROUTE_IP}:{self.port}"}},
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port,
                         "retry_min": 1, "retry_max": 1, "tls": "none"},
        })
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.svc = self.relay.service
        self.use_resolver()
        self.mailbox = os.path.join(self.tmp, "mail", "local.test", "alice")

    def use_resolver(self, port: int | None = None, lifetime: float | None = None):
        self.svc.queue.deliverer.resolver = Resolver(
            [f"127.0.0.1:{port or self.dns.port}"], lifetime=lifetime or self.lifetime, reactor=self.svc.reactor,
            threadpool=self.svc.dns_pool.pool)

    def send(self, items):
        return in_thread(send_session, *self.relay.smtp, items)

    def state(self, qid: str):
        return self.svc.spool.load(qid).state.recipients[0]

    def got(self, sink: Sink, tag: str) -> int:
        return sum(1 for t in sink.transactions if f"<{tag}@".encode() in t.data)

    def local(self, tag: str) -> int:
        if not os.path.isdir(self.mailbox):
            return 0
        n = 0
        for m in maildir.scan(self.mailbox):
            with open(m.path, "rb") as f:
                n += f"<{tag}@".encode() in f.read()
        return n

    async def others_flow(self, tag: str):
        await self.send([("a@good.test", message(tag + "-mx")), ("b@routed.test", message(tag + "-route")),
                         ("alice@local.test", message(tag + "-local"))])
        await apoll(lambda: self.got(self.mx, tag + "-mx") == 1 and self.got(self.routed, tag + "-route") == 1
                    and self.local(tag + "-local") == 1, 60, what="mail to the other destinations")


class DNSDown(DNSCase):
    async def test_silent_domain_deferred_others_delivered_then_recovers(self):
        self.zone.behave("down.test", "drop")
        qids = await self.send([(f"u{i}@down.test", message(f"down{i}")) for i in range(3)])
        await apoll(lambda: self.zone.count("down.test") >= 1, 30, what="the look-up to start")
        await self.others_flow("during")
        # the silent look-up (10 s lifetime) was still going on while the others went out
        self.assertTrue(all(self.state(q).attempts == 0 for q in qids))
        await apoll(lambda: all(self.state(q).status == "deferred" for q in qids), 60,
                    what="the look-ups to time out")
        for q in qids:
            r = self.state(q)
            self.assertIn("name=down.test type=MX: timed out, try again", r.reply)
        self.zone.behave("down.test", None)
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once DNS answers")
        for i in range(3):
            self.assertEqual(self.got(self.mx, f"down{i}"), 1)

    async def test_servfail_deferred_never_bounced(self):
        self.zone.behave("down.test", "servfail")
        [qid] = await self.send([("u@down.test", message("sf"))])
        await apoll(lambda: self.state(qid).attempts >= 2, 60, what="two attempts")
        self.assertEqual(self.state(qid).status, "deferred")
        self.assertEqual(self.svc.queue.counters.bounced, 0)
        await self.others_flow("sf")
        self.zone.behave("down.test", None)
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery after SERVFAIL ends")
        self.assertEqual(self.got(self.mx, "sf"), 1)

    async def test_dns_server_gone_mx_deferred_routes_and_local_unaffected(self):
        dead = free_port()
        # nothing listens there: every query is refused or times out (nothing
        # races the lifetime here: route and local delivery do not wait for DNS)
        self.use_resolver(dead, lifetime=2.0)
        [qid] = await self.send([("u@good.test", message("gone"))])
        await self.send([("b@routed.test", message("gone-route")), ("alice@local.test", message("gone-local"))])
        await apoll(lambda: self.got(self.routed, "gone-route") == 1 and self.local("gone-local") == 1, 60,
                    what="route and local delivery without DNS")
        await apoll(lambda: self.state(qid).attempts >= 1, 60, what="the MX attempt")
        self.assertEqual(self.state(qid).status, "deferred")
        self.assertEqual(self.svc.queue.counters.bounced, 0)
        self.use_resolver()
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once DNS is back")
        self.assertEqual(self.got(self.mx, "gone"), 1)


class DNSSlow(DNSCase):
    async def test_slow_answer_within_lifetime_delivers(self):
        self.zone.delay("slow.test", 0.5)
        await self.send([("u@slow.test", message("slow"))])
        await apoll(lambda: self.zone.count("slow.test") >= 1, 30, what="the look-up to start")
        await self.others_flow("beside-slow")
        await apoll(lambda: self.got(self.mx, "slow") == 1, 60, what="the slow domain's mail")
        # at the first attempt: slow (0.5 s) but within the lifetime (10 s)
        self.assertEqual(self.svc.queue.counters.deferred, 0)

    async def test_answer_slower_than_lifetime_deferred_then_delivered(self):
        self.zone.delay("slow.test", 30.0)
        self.use_resolver(lifetime=1.5)
        [qid] = await self.send([("u@slow.test", message("tooslow"))])
        await apoll(lambda: self.state(qid).attempts >= 1, 60, what="the look-up to time out")
        self.assertEqual(self.state(qid).status, "deferred")
        self.assertIn("timed out", self.state(qid).reply)
        self.use_resolver()
        self.zone.delay("slow.test", None)
        await apoll(lambda: not self.svc.spool.queue_ids(), 60, what="delivery once DNS is quick")
        self.assertEqual(self.got(self.mx, "tooslow"), 1)


class ManySilentDomains(DNSCase):
    """Many domains whose name servers never answer must not hold up the
    look-ups of other domains (the DNS thread pool has 20 threads)."""

    lifetime = 10.0  # the good domain's mail must get through well within it

    async def test_silent_domains_do_not_starve_other_lookups(self):
        names = [f"dead{i}.test" for i in range(25)]
        for n in names:
            self.zone.behave(n, "drop")
        qids = await self.send([(f"u@{n}", message(n)) for n in names])
        await apoll(lambda: sum(1 for n in names if self.zone.count(n)) >= 20, 30,
                    what="the silent look-ups to start")
        await self.send([("a@good.test", message("starved"))])
        await apoll(lambda: self.got(self.mx, "starved") == 1, 60, what="the good domain's mail")
        # delivered while the silent look-ups were still pending
        self.assertTrue(all(self.state(q).attempts == 0 for q in qids),
                        "mail for good.test waited until silent look-ups timed out")
