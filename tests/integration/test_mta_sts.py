"""MTA-STS end to end: a relay on defaults (plus the test DNS server, the
sink's port and the test CA) delivering by MX to domains that publish a
policy, served over real HTTPS on 127.16.x.1:443 (tests/support/stsserver.py).

An ``enforce`` policy: delivered only over TLS verified for the MX host,
deferred when the certificate is for another name or the MX host is not
one the policy allows.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from tests.support.certs import cert_files
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.stsserver import PolicyServer, policy_ip, policy_text
from tests.support.wait import apoll

MX_IP = "127.0.0.2"
DOMAIN = "sts.test"


class MtaStsDelivery(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-sts-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        web_ip = policy_ip(16)
        self.zone.txt("_mta-sts." + DOMAIN, "v=STSv1; id=20261202;").a("mta-sts." + DOMAIN, web_ip)
        self.zone.mx(DOMAIN, 10, "mx." + DOMAIN).a("mx." + DOMAIN, MX_IP)
        self.web = PolicyServer(web_ip, "mta-sts." + DOMAIN).start()
        self.addCleanup(lambda: self.web.stop())
        self.web.body = policy_text("enforce", ("mx." + DOMAIN,), 86400)
        self.port = free_port((MX_IP,))
        self.sink = Sink(MX_IP, port=self.port, starttls="ok", cert=cert_files("mx." + DOMAIN)).start()
        self.addCleanup(self.sink.stop)
        self.relay = InProcessRelay(self.tmp, {"delivery": {
            "nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port, "retry_min": 1, "retry_max": 2,
            "mta_sts_ca_file": self.web.files.ca_pem}})
        await self.relay.start()
        self.addCleanup(lambda: self.relay.stop())

    def send(self, rcpt: str):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                return s.sendmail("sender@client.example", [rcpt], b"Subject: sts\r\n\r\nbody\r\n")

        return in_thread(run)

    def deferred_reasons(self) -> list[str]:
        q = self.relay.service.queue
        return [r.reply for m in q.messages.values() for r in m.state.recipients if r.status == "deferred"]

    def cache_path(self) -> str:
        return os.path.join(self.relay.service.spool.root, "mta-sts", DOMAIN + ".json")

    async def test_the_relays_source_fetches_caches_and_reloads_after_a_restart(self):
        sts = self.relay.service.sts
        self.assertIs(self.relay.service.deliverer.sts, sts)
        p = await sts.policy(DOMAIN)
        self.assertEqual((p.mode, p.id, p.mx), ("enforce", "20261202", ("mx." + DOMAIN,)))
        await apoll(lambda: os.path.exists(self.cache_path()), what="the cached policy")
        await self.relay.stop()
        self.web.code = 503  # the fetch blocked: the cached policy must still apply
        self.relay = InProcessRelay(self.tmp, self.relay.data)
        await self.relay.start()
        await apoll(lambda: DOMAIN in self.relay.service.sts.cache, what="the cache loaded at start")
        self.assertEqual(await self.relay.service.sts.policy(DOMAIN), p)
        self.assertEqual(len(self.web.requests), 1)

    async def test_enforce_delivers_over_verified_tls_and_caches_the_policy(self):
        await self.send("a@" + DOMAIN)
        await apoll(lambda: self.sink.transactions, what="delivery to the policy's MX")
        self.assertIsNotNone(self.sink.transactions[0].session.tls)
        self.assertEqual(self.web.requests, [b"/.well-known/mta-sts.txt"])
        path = self.cache_path()
        await apoll(lambda: os.path.exists(path), what="the cached policy")
        with open(path) as f:
            cached = json.load(f)
        self.assertEqual((cached["mode"], cached["id"], cached["mx"]), ("enforce", "20261202", ["mx." + DOMAIN]))

    async def test_enforce_defers_when_the_mx_certificate_does_not_verify(self):
        self.sink.b.cert = cert_files("other.example")
        await self.send("b@" + DOMAIN)
        await apoll(lambda: any("mta-sts enforce" in r for r in self.deferred_reasons()), timeout=15,
                    what="a deferral naming the policy")
        self.assertEqual(self.sink.transactions, [])  # never in clear, never to the wrong certificate

    async def test_enforce_defers_when_the_mx_does_not_match(self):
        self.web.body = policy_text("enforce", ("mx.elsewhere.test",), 86400)
        await self.send("c@" + DOMAIN)
        await apoll(lambda: any("mta-sts enforce" in r for r in self.deferred_reasons()), timeout=15,
                    what="a deferral naming the policy")
        self.assertEqual(self.sink.transactions, [])
