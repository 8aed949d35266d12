"""Issue 16 over real sockets: named upstreams chosen by sender, each with its
own credentials, and fail-over between an upstream's hosts.

The relay runs in-process on the test reactor; the upstreams are
tests.support.sink servers on other 127.0.0.x addresses (real STARTTLS with
trustme certificates checked against the upstream's ca_file, real AUTH),
their names in the real test DNS server.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay.control import route as routecheck
from relay.outbound.request import Timeouts
from tests.support.certs import cert_files
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
SENDER = "sender@client.example"


class UpstreamCase(unittest.TestCase):
    """Sinks on IPS (one port), a DNS zone, and a relay whose config is
    ``relay_config()``; the sender's domain has its MX on 127.0.0.6 (DSNs)."""

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-up-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.zone = Zone()
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", "127.0.0.6")
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.port = free_port(IPS)
        self.sinks = {}
        for ip in IPS:
            s = Sink(ip, port=self.port, **self.behaviour().get(ip, {})).start()
            self.sinks[ip] = s
            self.addCleanup(s.stop)
        over = {"delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port,
                             "retry_min": 1, "retry_max": 2, "connect_timeout": 5, "tls": "may"},
                "relay": self.relay_config()}
        self.relay = InProcessRelay(self.tmp, over)
        await self.relay.start()
        self.relay.service.queue.deliverer.timeouts = Timeouts.uniform(2.0)
        self.addCleanup(self.relay.stop)

    def behaviour(self) -> dict:
        return {}

    def relay_config(self) -> dict:
        return {}

    def password_file(self, name: str, password: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(password + "\n")
        os.chmod(path, 0o600)
        return path

    def hp(self, ip_or_name: str) -> str:
        return f"{ip_or_name}:{self.port}"

    def send(self, rcpts, sender=SENDER, body=b"Subject: test\r\n\r\nbody\r\n"):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                return s.sendmail(sender, rcpts, body)

        return in_thread(run)

    def queue_empty(self):
        return not self.relay.service.queue.messages and not self.relay.service.spool.queue_ids()

    def dsns(self) -> list[email.message.Message]:
        return [email.message_from_bytes(t.data, policy=email.policy.default)
                for t in self.sinks["127.0.0.6"].transactions]


class SenderRoutes(UpstreamCase):
    """Two upstreams on one host (127.0.0.2, "mail.up.test") that require
    different credentials, a third on another host; routes by sender."""

    def behaviour(self):
        certs, self.other = cert_files("mail.up.test"), cert_files("other.up.test")
        self.ca = certs.ca_pem
        up = {"auth": ("PLAIN", "LOGIN"), "starttls": "ok", "cert": certs}
        return {"127.0.0.2": {**up, "credentials": {"alpha": "alpha-pw", "beta": "beta-pw"}},
                "127.0.0.3": {**up, "cert": self.other, "credentials": {"gamma": "gamma-pw"}}}

    def relay_config(self):
        self.zone.a("mail.up.test", "127.0.0.2").a("other.up.test", "127.0.0.3")
        self.zone.mx("dest.example", 10, "mx.dest.example").a("mx.dest.example", "127.0.0.4")
        return {
            "upstreams": {
                "alpha": {"hosts": self.hp("mail.up.test"), "ca_file": self.ca, "username": "alpha",
                          "password_file": self.password_file("alpha.pw", "alpha-pw")},
                "beta": {"hosts": [self.hp("mail.up.test")], "ca_file": self.ca, "username": "beta",
                         "password_file": self.password_file("beta.pw", "beta-pw")},
                "gamma": {"hosts": [self.hp("other.up.test")], "tls": "encrypt", "ca_file": self.other.ca_pem,
                          "username": "gamma", "password_file": self.password_file("gamma.pw", "gamma-pw")},
            },
            "sender_routes": {"alice@client.example": "alpha", "beta.example": "beta", ".sub.example": "gamma"},
            # an unauthenticated route to the same host as alpha and beta
            "routes": {"plain.example": self.hp("127.0.0.2"), "viagamma.example": "gamma"},
        }

    async def test_each_sender_goes_to_its_upstream_with_its_own_credentials(self):
        sink = self.sinks["127.0.0.2"]
        await self.send(["x@dest.example"], sender="Alice@CLIENT.example")
        await self.send(["y@dest.example"], sender="bob@beta.example")
        await self.send(["z@dest.example"], sender="carol@a.sub.example")
        await self.send(["w@plain.example"], sender="dave@client.example")
        await self.send(["v@dest.example"], sender="erin@client.example")
        await apoll(lambda: len(sink.transactions) >= 3 and self.sinks["127.0.0.3"].transactions
                    and self.sinks["127.0.0.4"].transactions, what="all five delivered")
        by_rcpt = {t.rcpts[0]: t for t in sink.transactions}
        self.assertEqual(by_rcpt["x@dest.example"].session.auth_user, "alpha")
        self.assertEqual(by_rcpt["y@dest.example"].session.auth_user, "beta")
        # the route without credentials never gets a logged-in session
        self.assertIsNone(by_rcpt["w@plain.example"].session.auth_user)
        self.assertEqual(len({id(t.session) for t in sink.transactions}), 3)
        for t in (by_rcpt["x@dest.example"], by_rcpt["y@dest.example"]):
            self.assertIsNotNone(t.session.tls)  # tls = "verify" (the default) against the upstream's CA
        g = self.sinks["127.0.0.3"].transactions[0]
        self.assertEqual((g.rcpts, g.session.auth_user), (["z@dest.example"], "gamma"))
        # no sender route: MX, without AUTH
        self.assertEqual(self.sinks["127.0.0.4"].delivered_to(), ["v@dest.example"])
        self.assertIsNone(self.sinks["127.0.0.4"].transactions[0].session.auth_user)
        await apoll(self.queue_empty, what="empty queue")

    async def test_a_session_cached_for_one_upstream_is_never_reused_for_another(self):
        sink = self.sinks["127.0.0.2"]
        for i in range(3):  # alternating, each within the cache's idle time of the one before
            await self.send([f"a{i}@dest.example"], sender="alice@client.example")
            await apoll(lambda n=2 * i + 1: len(sink.transactions) >= n, what="alpha delivery")
            await self.send([f"b{i}@dest.example"], sender="bob@beta.example")
            await apoll(lambda n=2 * i + 2: len(sink.transactions) >= n, what="beta delivery")
        for t in sink.transactions:
            want = "alpha" if t.rcpts[0].startswith("a") else "beta"
            self.assertEqual(t.session.auth_user, want, t.rcpts)
        await apoll(self.queue_empty, what="empty queue")

    async def test_sender_route_wins_over_recipient_route_and_one_message_splits(self):
        sink = self.sinks["127.0.0.2"]
        # one message, two recipients: the sender route takes both (it wins over relay.routes)
        await self.send(["p@plain.example", "q@viagamma.example"], sender="alice@client.example")
        await apoll(lambda: sink.transactions, what="delivery via alpha")
        self.assertEqual(sorted(sink.transactions[0].rcpts), ["p@plain.example", "q@viagamma.example"])
        self.assertEqual(sink.transactions[0].session.auth_user, "alpha")
        # without a sender route the recipients of one message go each to its route
        await self.send(["p2@plain.example", "q2@viagamma.example"], sender="dave@client.example")
        await apoll(lambda: len(sink.transactions) >= 2 and self.sinks["127.0.0.3"].transactions,
                    what="delivery split by recipient route")
        self.assertEqual(sink.transactions[1].rcpts, ["p2@plain.example"])
        self.assertIsNone(sink.transactions[1].session.auth_user)
        self.assertEqual(self.sinks["127.0.0.3"].transactions[0].rcpts, ["q2@viagamma.example"])
        self.assertEqual(self.sinks["127.0.0.3"].transactions[0].session.auth_user, "gamma")
        await apoll(self.queue_empty, what="empty queue")


    async def test_route_explains_the_live_choice(self):
        """What ``relayctl route ADDRESS --sender S`` gets from the running
        relay (the control socket's responder: its parts, the real DNS)."""
        svc = self.relay.service
        r = await svc.dns_pool.run(routecheck.explain, svc.route_context(), "x@dest.example", None,
                                   "alice@client.example")
        d = r["deliveries"][0]
        self.assertEqual((d["via"], d["upstream"], d["username"], d["tls"]["level"]),
                         ("sender route", "alpha", "alpha", "verify"))
        self.assertEqual([(h["host"], h["address"]) for h in d["hops"]], [("mail.up.test", "127.0.0.2")])
        text = routecheck.format_text(r)
        self.assertIn("upstream alpha (sender route: relay.sender_routes 'alice@client.example')", text)
        self.assertNotIn("alpha-pw", text)
        r = await svc.dns_pool.run(routecheck.explain, svc.route_context(), "x@dest.example", None,
                                   "erin@client.example")
        self.assertEqual((r["deliveries"][0]["kind"], r["deliveries"][0]["via"]), ("mx", "MX"))


class FailOver(UpstreamCase):
    """An upstream of four hosts: refused, 421 greeting, silent, working."""

    def behaviour(self):
        return {"127.0.0.3": {"greeting": "421 4.3.2 busy, try later"},
                "127.0.0.4": {"hang": {"greeting"}},
                "127.0.0.5": {"greeting": "554 5.7.1 you are not welcome"}}

    def relay_config(self):
        return {"upstreams": {
                    "pool": {"hosts": [self.hp("127.0.0.2"), self.hp("127.0.0.3"), self.hp("127.0.0.4"),
                                       self.hp("127.0.0.6")], "tls": "none"},
                    "hard": {"hosts": [self.hp("127.0.0.5"), self.hp("127.0.0.6")], "tls": "none"}},
                "sender_routes": {"hard.example": "hard"},
                "smarthost": "pool"}

    async def test_refused_421_and_silent_hosts_fail_over_to_the_next(self):
        await self.sinks["127.0.0.2"].stop()  # connection refused
        await self.send(["a@far.example"])
        sink = self.sinks["127.0.0.6"]
        await apoll(lambda: sink.transactions, timeout=30, what="delivery to the fourth host")
        self.assertEqual(sink.delivered_to(), ["a@far.example"])
        self.assertTrue(self.sinks["127.0.0.3"].sessions, "the 421 host was tried")
        self.assertTrue(self.sinks["127.0.0.4"].sessions, "the silent host was tried")
        await apoll(self.queue_empty, what="empty queue")

    async def test_a_5xx_greeting_bounces_without_trying_the_next_host(self):
        await self.send(["b@far.example"], sender="someone@hard.example")
        # the DSN (null sender: no sender route) goes by the smarthost, pool's first host
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, timeout=20, what="the DSN")
        t = self.sinks["127.0.0.2"].transactions[0]
        self.assertEqual(t.mail_from, "")  # a DSN, not the message
        self.assertEqual(t.rcpts, ["someone@hard.example"])
        self.assertIn(b"5.7.1", t.data)
        self.assertEqual(len(self.sinks["127.0.0.5"].sessions), 1)
        self.assertEqual(self.sinks["127.0.0.6"].sessions, [], "the second host of hard was not tried")
        await apoll(self.queue_empty, what="empty queue")


class SmarthostList(UpstreamCase):
    def relay_config(self):
        return {"smarthost": [self.hp("127.0.0.2"), self.hp("127.0.0.3")]}

    async def test_smarthost_list_fails_over(self):
        await self.sinks["127.0.0.2"].stop()
        await self.send(["a@far.example"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, what="delivery to the second smarthost")
        await apoll(self.queue_empty, what="empty queue")


class RefusedByTheFirstHost(UpstreamCase):
    """A 5xx to MAIL or RCPT from an upstream's first host is its answer: the
    second host is not tried; a 4xx defers."""

    def behaviour(self):
        return {"127.0.0.2": {"rcpt_replies": {"gone@far.example": "550 5.1.1 no such user"},
                              "replies": {"MAIL": ["553 5.7.1 sender not allowed", "250 2.1.0 Ok"]}}}

    def relay_config(self):
        return {"upstreams": {"u": {"hosts": [self.hp("127.0.0.2"), self.hp("127.0.0.3")], "tls": "none"}},
                "sender_routes": {"client.example": "u"}}

    async def test_5xx_to_mail_and_rcpt_bounce_without_the_second_host(self):
        await self.send(["a@far.example"])  # MAIL refused (the first time)
        await apoll(lambda: self.sinks["127.0.0.6"].transactions, what="the first DSN")
        await self.send(["gone@far.example", "ok@far.example"])  # one RCPT refused
        await apoll(lambda: len(self.sinks["127.0.0.6"].transactions) >= 2, what="the second DSN")
        await apoll(self.queue_empty, what="empty queue")
        dsns = self.dsns()
        self.assertIn("5.7.1", dsns[0].as_string())
        self.assertIn("5.1.1", dsns[1].as_string())
        self.assertEqual(self.sinks["127.0.0.2"].delivered_to(), ["ok@far.example"])
        self.assertEqual(self.sinks["127.0.0.3"].sessions, [], "the second host was never tried")
