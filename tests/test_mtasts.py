"""relay.delivery.mtasts and stsparse: real HTTPS on 127.15.x.1:443, the test DNS server."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relay.config import load
from relay.delivery import stsparse
from relay.delivery.mtasts import FAILED_FOR, MtaSts, load_trust
from relay.delivery.mx import Resolver
from relay.queue.diskio import DiskPool
from relay.runtime import parts
from tests.support.dns import DNSServer, Zone
from tests.support.stsserver import PolicyServer, policy_ip, policy_text
from tests.support.wait import apoll

IP = policy_ip(15)
DOMAIN = "a.test"
HOST = "mta-sts." + DOMAIN


class RecordTests(unittest.SynchronousTestCase):
    def test_valid(self):
        self.assertEqual(stsparse.parse_record(["v=STSv1; id=20260101T0;"]), stsparse.Record("20260101T0"))
        self.assertEqual(stsparse.parse_record(["spf", "v=STSv1;id=abc"]), stsparse.Record("abc"))

    def test_no_policy(self):
        for texts in ([], ["v=spf1 -all"], ["v=STSv1; id=1;", "v=STSv1; id=2;"], ["v=STSv1;"],
                      ["v=STSv1; id=bad-id;"], ["v=STSv1; id=" + "a" * 33], ["v=STSv1x; id=1"],
                      ["v=STSv1; junk"]):
            self.assertIsInstance(stsparse.parse_record(texts), str, texts)


class PolicyTextTests(unittest.SynchronousTestCase):
    def test_valid_crlf_and_lf(self):
        for eol in ("\r\n", "\n"):
            p = stsparse.parse_policy(policy_text("testing", ("mx1.a.test", "*.b.test"), 600, eol))
            self.assertEqual(p, stsparse.Parsed("testing", ("mx1.a.test", "*.b.test"), 600))

    def test_mode_none_needs_no_mx_and_unknown_keys_ignored(self):
        p = stsparse.parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\nfoo: bar\n")
        self.assertEqual(p, stsparse.Parsed("none", (), 0))

    def test_malformed(self):
        bad = [
            b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
            b"version: STSv1\nmode: enforce\nmax_age: 10\n",
            b"version: STSv1\nmode: enforce\nmx: *a.test\nmax_age: 10\n",
            b"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 10\n",
            b"version: STSv1\nmode: enforce\nmx a.test\nmax_age: 10\n",
            b"version: STSv1\rmode: enforce\nmx: a.test\nmax_age: 10\n",
            b"version: STSv1\nmode: enforce\nmx: a.test\x1b[2J\nmax_age: 10\n",
            b"\xff\xfe",
            b"<html>hello</html>",
        ]
        for body in bad:
            with self.assertRaises(stsparse.PolicyError, msg=body):
                stsparse.parse_policy(body)


class FetchTestCase(unittest.TestCase):
    def setUp(self):
        self.zone = Zone()
        self.zone.txt("_mta-sts." + DOMAIN, "v=STSv1; id=1;").a(HOST, IP)
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.server = PolicyServer(IP, HOST).start()
        self.addCleanup(lambda: self.server.stop())
        self.server.body = policy_text("enforce", ("mx1.a.test", "*.mx.a.test"), 86400)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.sts = self.make()

    def make(self, **kw) -> MtaSts:
        kw.setdefault("fetch_timeout", 10.0)
        return MtaSts(reactor, Resolver(self.dns.nameservers, lifetime=1.0), DiskPool(reactor, inline=True),
                      os.path.join(self.dir, "mta-sts"), trust=load_trust(self.server.files.ca_pem),
                      clock=self.clock, **kw)


class FetchTests(FetchTestCase):
    async def test_valid_policy_fetched_cached_and_stored(self):
        p = await self.sts.policy("A.test.")
        self.assertEqual((p.domain, p.mode, p.mx, p.max_age, p.id), (DOMAIN, "enforce",
                                                                     ("mx1.a.test", "*.mx.a.test"), 86400, "1"))
        self.assertEqual(p.expires, self.clock.seconds() + 86400)
        self.assertTrue(p.matches("x.mx.a.test") and not p.matches("mx2.a.test"))
        self.assertEqual(self.server.requests, [b"/.well-known/mta-sts.txt"])
        self.assertEqual(await self.sts.policy(DOMAIN), p)  # same id: no second fetch
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(self.sts.fetches["ok"], 1)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "mta-sts", "a.test.json")))

    async def failed(self, result: str, **kw) -> None:
        sts = self.make(**kw) if kw else self.sts
        self.assertIsNone(await sts.policy(DOMAIN))
        self.assertEqual(dict(sts.fetches), {result: 1})

    async def test_malformed_policy(self):
        self.server.body = b"version: STSv1\nmode: enforce\nmax_age: 86400\n"
        await self.failed("malformed")

    async def test_redirect_is_a_failure(self):
        self.server.code = 301
        self.server.headers = {b"location": b"https://mta-sts.a.test/other"}
        await self.failed("redirect")
        self.assertEqual(len(self.server.requests), 1)  # not followed

    async def test_404(self):
        self.server.code = 404
        await self.failed("http_error")

    async def test_wrong_media_type(self):
        self.server.content_type = b"text/html"
        await self.failed("bad_media_type")

    async def test_over_the_size_limit(self):
        self.server.body = policy_text() + b"x: " + b"y" * (64 * 1024) + b"\n"
        await self.failed("too_large")

    async def test_over_the_size_limit_streamed(self):
        self.server.body = policy_text() + b"x: " + b"y" * 5000 + b"\n"
        await self.failed("too_large", max_body=4096)

    async def test_slow_server_times_out(self):
        self.server.hang = True
        await self.failed("timeout", fetch_timeout=0.5)

    async def test_certificate_for_another_name(self):
        await self.server.stop()
        self.server = PolicyServer(IP, "other.a.test").start()
        await self.failed("tls_error")

    async def test_untrusted_ca(self):
        sts = MtaSts(reactor, Resolver(self.dns.nameservers, lifetime=1.0), DiskPool(reactor, inline=True),
                     None, clock=self.clock)  # the system CAs do not know the test CA
        self.assertIsNone(await sts.policy(DOMAIN))
        self.assertEqual(dict(sts.fetches), {"tls_error": 1})

    async def test_txt_missing_or_two(self):
        self.zone.remove("_mta-sts." + DOMAIN)
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.zone.txt("_mta-sts." + DOMAIN, "v=STSv1; id=1;").txt("_mta-sts." + DOMAIN, "v=STSv1; id=2;")
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertEqual(self.server.requests, [])

    async def test_policy_host_without_address(self):
        self.zone.remove(HOST)
        await self.failed("dns_error")

    async def test_reload_reconfigures(self):
        from relay.config import load
        from relay.runtime import parts

        parts.reconfigure_mta_sts(self.sts, load(data={"delivery": {"mta_sts": False}}), None)
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertEqual(self.server.requests, [])

    async def test_disabled(self):
        self.sts.enabled = False
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertIsNone(await self.make().policy("bad_name/../x"))
        self.assertEqual(self.server.requests, [])

    async def test_concurrent_requests_share_one_fetch(self):
        results = await defer.gatherResults([defer.Deferred.fromCoroutine(self.sts.policy(DOMAIN))
                                             for _ in range(5)])
        self.assertEqual(len(set(results)), 1)
        self.assertIsNotNone(results[0])
        self.assertEqual(len(self.server.requests), 1)


class CacheTests(FetchTestCase):
    async def test_id_change_picked_up(self):
        first = await self.sts.policy(DOMAIN)
        self.server.body = policy_text("testing", ("mx9.a.test",), 600)
        self.zone.remove("_mta-sts." + DOMAIN).txt("_mta-sts." + DOMAIN, "v=STSv1; id=2;")
        second = await self.sts.policy(DOMAIN)
        self.assertEqual((first.id, second.id, second.mode, second.mx), ("1", "2", "testing", ("mx9.a.test",)))

    async def test_cache_used_when_fetch_fails_then_expires(self):
        first = await self.sts.policy(DOMAIN)
        self.zone.remove("_mta-sts." + DOMAIN).txt("_mta-sts." + DOMAIN, "v=STSv1; id=2;")
        self.server.code = 500  # an attacker blocking the fetch
        self.assertEqual(await self.sts.policy(DOMAIN), first)
        self.zone.remove("_mta-sts." + DOMAIN)  # or the TXT record
        self.assertEqual(await self.sts.policy(DOMAIN), first)
        self.zone.behave("_mta-sts." + DOMAIN, "servfail")  # or DNS
        self.assertEqual(await self.sts.policy(DOMAIN), first)
        self.clock.advance(86401)
        self.assertIsNone(await self.sts.policy(DOMAIN))

    async def test_failed_fetch_without_a_cached_policy_is_remembered(self):
        """The negative cache: a failed fetch with nothing cached means no
        policy (RFC 8461 section 3.3) for FAILED_FOR, without a new fetch (a
        delivery does not wait up to the fetch timeout each time)."""
        self.server.code = 500
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertEqual((len(self.server.requests), dict(self.sts.fetches)), (1, {"http_error": 1}))
        self.server.code = 200  # repaired, but within FAILED_FOR it is not asked again
        for _ in range(3):
            self.assertIsNone(await self.sts.policy(DOMAIN))
        self.clock.advance(FAILED_FOR - 1)
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertEqual(len(self.server.requests), 1)
        self.clock.advance(1)  # FAILED_FOR is over: fetched again
        p = await self.sts.policy(DOMAIN)
        self.assertEqual((p.mode, p.id, len(self.server.requests)), ("enforce", "1", 2))
        self.assertEqual(self.sts.failed, {})

    async def test_a_new_txt_id_fetches_again(self):
        self.server.code = 500
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.zone.remove("_mta-sts." + DOMAIN).txt("_mta-sts." + DOMAIN, "v=STSv1; id=2;")
        self.assertIsNone(await self.sts.policy(DOMAIN))  # fetched (and failed) again
        self.assertEqual(len(self.server.requests), 2)
        self.server.code = 200
        self.assertIsNone(await self.sts.policy(DOMAIN))  # id 2 failed just now
        self.assertEqual(len(self.server.requests), 2)
        self.zone.remove("_mta-sts." + DOMAIN).txt("_mta-sts." + DOMAIN, "v=STSv1; id=3;")
        p = await self.sts.policy(DOMAIN)
        self.assertEqual((p.id, len(self.server.requests)), ("3", 3))

    async def test_no_txt_record_is_not_remembered_and_a_reload_forgets(self):
        self.zone.remove("_mta-sts." + DOMAIN)
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertEqual(self.sts.failed, {})  # no TXT record: not a failed fetch
        self.zone.txt("_mta-sts." + DOMAIN, "v=STSv1; id=1;")
        self.server.code = 500
        self.assertIsNone(await self.sts.policy(DOMAIN))
        self.assertIn(DOMAIN, self.sts.failed)
        self.server.code = 200
        parts.reconfigure_mta_sts(self.sts, load(data={}), load_trust(self.server.files.ca_pem))  # a new CA file
        self.assertIsNotNone(await self.sts.policy(DOMAIN))
        self.assertEqual(len(self.server.requests), 2)

    async def test_failure_with_a_cached_policy_uses_the_cache_not_the_negative_one(self):
        first = await self.sts.policy(DOMAIN)
        self.zone.remove("_mta-sts." + DOMAIN).txt("_mta-sts." + DOMAIN, "v=STSv1; id=2;")
        self.server.code = 500
        self.assertEqual(await self.sts.policy(DOMAIN), first)
        self.assertEqual(self.sts.failed, {})
        self.server.code = 200
        self.assertEqual((await self.sts.policy(DOMAIN)).id, "2")  # the next delivery tries again

    async def test_cache_survives_a_restart(self):
        first = await self.sts.policy(DOMAIN)
        self.server.code = 500
        again = self.make()
        self.assertEqual(await again.load(), 1)
        self.assertEqual(await again.policy(DOMAIN), first)
        self.assertEqual(len(self.server.requests), 2 - 1)  # the same id: no fetch at all

    async def test_corrupt_or_linked_cache_files_are_ignored(self):
        d = os.path.join(self.dir, "mta-sts")
        os.makedirs(d)
        with open(os.path.join(d, "a.test.json"), "w") as f:
            f.write("{not json")
        os.symlink("/etc/passwd", os.path.join(d, "b.test.json"))
        self.assertEqual(await self.make().load(), 0)
        await self.sts.policy(DOMAIN)  # replaces the bad file
        self.assertEqual(await self.make().load(), 1)
        self.assertTrue(os.path.islink(os.path.join(d, "b.test.json")))

    async def test_cache_directory_linked_elsewhere_is_not_written(self):
        other = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, other, True)
        os.symlink(other, os.path.join(self.dir, "mta-sts"))
        self.assertIsNotNone(await self.sts.policy(DOMAIN))  # used, but not stored through the link
        self.assertEqual(os.listdir(other), [])

    async def test_background_refresh_before_expiry(self):
        self.server.body = policy_text("enforce", ("mx1.a.test",), 7200)
        first = await self.sts.policy(DOMAIN)
        self.server.body = policy_text("enforce", ("mx2.a.test",), 7200)
        self.clock.advance(3600)
        await self.sts.refresh()
        await apoll(lambda: len(self.server.requests) == 2, what="a background refresh")
        p = self.sts.cache[DOMAIN]
        self.assertEqual((p.mx, p.expires), (("mx2.a.test",), first.expires + 3600))

    async def test_report_counts_and_logs_safely(self):
        from twisted.logger import formatEvent, globalLogPublisher

        from relay.common import logsafe

        p = await self.sts.policy(DOMAIN)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.sts.report(p, "evil\r\nhost", "certificate not valid\x1b[2J\nfake line")
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertEqual(self.sts.failures_by_mode(), {"enforce": 1})
        (event,) = [e for e in events if e.get("log_namespace") == "relay.delivery.mtasts"]
        line = formatEvent(logsafe.neutralise(event, event["log_format"]))
        self.assertTrue(line.startswith("mta-sts enforce policy of a.test (id 1): MX evil"), line)
        self.assertFalse(any(c in line for c in "\r\n\x1b"), line)


del FetchTestCase


class ExportTests(unittest.TestCase):
    def test_metrics_and_bad_ca_file(self):
        from prometheus_client import CollectorRegistry, generate_latest

        from relay.config import load
        from relay.delivery.stspolicy import StsPolicy
        from relay.runtime import parts
        from relay.runtime.metrics import RelayCollector

        sts = MtaSts(reactor, None, None, None)
        sts.fetches["tls_error"] += 2
        sts.report(StsPolicy("a.test", "testing", ("mx.a.test",), 60, "1", 0.0), "mx.b.test", "MX not in the policy")
        c = RelayCollector(reactor, smtp=None, queue=None, pickup=None, pop3_factories=[], started_at=0.0, sts=sts)

        class One:
            def collect(self):
                return c._mta_sts()

        reg = CollectorRegistry(auto_describe=False)
        reg.register(One())
        text = generate_latest(reg).decode()
        self.assertIn('relay_mta_sts_fetches_total{result="tls_error"} 2.0', text)
        self.assertIn('relay_mta_sts_fetches_total{result="ok"} 0.0', text)
        self.assertIn('relay_mta_sts_failures_total{mode="testing"} 1.0', text)

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        bad = os.path.join(d, "ca.pem")
        with open(bad, "w") as f:
            f.write("not a certificate\n")
        for path in (bad, os.path.join(d, "missing.pem")):
            cfg = load(data={"delivery": {"mta_sts_ca_file": path}})
            with self.assertRaises(parts.PartError) as e:
                parts.load_sts_trust(cfg)
            self.assertIn("delivery.mta_sts_ca_file", str(e.exception))
