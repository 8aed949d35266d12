"""relay.delivery.mx against a real DNS server (tests/support/dns.py) over UDP/TCP."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.trial import unittest

from relay.config import HostPort
from relay.delivery.mx import (
    DNSFailure,
    Hop,
    Resolver,
    is_local_address,
    listeners_from_endpoints,
    make_is_self,
)
from tests.support.dns import DNSServer, Zone


class DNSTestCase(unittest.TestCase):
    def setUp(self):
        self.zone = Zone()
        self.server = DNSServer(self.zone).start()
        self.addCleanup(self.server.stop)
        self.resolver = Resolver(self.server.nameservers, lifetime=1.0)

    async def failure(self, d) -> DNSFailure:
        try:
            result = await d
        except DNSFailure as e:
            return e
        self.fail(f"expected DNSFailure, got {result!r}")


class MXOrderTests(DNSTestCase):
    async def test_preference_order_and_addresses(self):
        z = self.zone
        z.mx("example.test", 30, "mx3.example.test").mx("example.test", 10, "mx1.example.test")
        z.mx("example.test", 20, "mx2.example.test")
        z.a("mx1.example.test", "127.0.0.2").aaaa("mx1.example.test", "::1")
        z.a("mx2.example.test", "127.0.0.3", "127.0.0.4")
        z.aaaa("mx3.example.test", "::1")
        hops = await self.resolver.mx_hops("example.test", 2525)
        self.assertEqual(
            hops,
            [
                Hop("mx1.example.test", "127.0.0.2", 2525, 10),
                Hop("mx1.example.test", "::1", 2525, 10),
                Hop("mx2.example.test", "127.0.0.3", 2525, 20),
                Hop("mx2.example.test", "127.0.0.4", 2525, 20),
                Hop("mx3.example.test", "::1", 2525, 30),
            ],
        )

    async def test_random_among_equal_preferences(self):
        z = self.zone
        z.mx("example.test", 10, "a.example.test").mx("example.test", 10, "b.example.test")
        z.mx("example.test", 5, "first.example.test")
        z.a("a.example.test", "127.0.0.2").a("b.example.test", "127.0.0.3").a("first.example.test", "127.0.0.4")
        orders = set()
        for seed in range(16):
            r = Resolver(self.server.nameservers, lifetime=1.0, rng=random.Random(seed))
            hops = await r.mx_hops("example.test", 25)
            self.assertEqual(hops[0].host, "first.example.test")  # better preference always first
            orders.add(tuple(h.host for h in hops[1:]))
        self.assertEqual(orders, {("a.example.test", "b.example.test"), ("b.example.test", "a.example.test")})

    async def test_name_is_case_and_dot_insensitive(self):
        self.zone.mx("example.test", 10, "MX1.Example.Test.").a("mx1.example.test", "127.0.0.2")
        hops = await self.resolver.mx_hops("EXAMPLE.test.", 25)
        self.assertEqual([h.address for h in hops], ["127.0.0.2"])
        self.assertEqual(hops[0].host, "mx1.example.test")

    async def test_implicit_mx(self):
        self.zone.a("implicit.test", "127.0.0.9").aaaa("implicit.test", "::1")
        hops = await self.resolver.mx_hops("implicit.test", 25)
        self.assertEqual(hops, [Hop("implicit.test", "127.0.0.9", 25, 0), Hop("implicit.test", "::1", 25, 0)])

    async def test_implicit_mx_without_address_is_permanent(self):
        self.zone.txt("noaddr.test", "v=spf1 -all")
        f = await self.failure(self.resolver.mx_hops("noaddr.test", 25))
        self.assertFalse(f.temporary)
        self.assertEqual(f.status, "5.4.4")

    async def test_cname_to_mx_host(self):
        self.zone.mx("example.test", 10, "alias.example.test").cname("alias.example.test", "real.example.test")
        self.zone.a("real.example.test", "127.0.0.6")
        hops = await self.resolver.mx_hops("example.test", 25)
        self.assertEqual([h.address for h in hops], ["127.0.0.6"])

    async def test_domain_literal(self):
        hops = await self.resolver.mx_hops("[127.0.0.5]", 25)
        self.assertEqual(hops, [Hop("127.0.0.5", "127.0.0.5", 25, 0)])
        self.assertEqual(self.zone.queries, [])

    async def test_nameserver_as_string(self):
        self.zone.a("implicit.test", "127.0.0.9")
        r = Resolver([self.server.address], lifetime=1.0)
        hops = await r.mx_hops("implicit.test", 25)
        self.assertEqual(hops[0].address, "127.0.0.9")
        r = Resolver([HostPort("127.0.0.1", self.server.port)], lifetime=1.0)
        self.assertEqual((await r.mx_hops("implicit.test", 25))[0].address, "127.0.0.9")


class MXFailureTests(DNSTestCase):
    async def test_null_mx_is_permanent_5_1_10(self):
        self.zone.null_mx("null.test").a("null.test", "127.0.0.2")
        f = await self.failure(self.resolver.mx_hops("null.test", 25))
        self.assertFalse(f.temporary)
        self.assertEqual(f.status, "5.1.10")
        self.assertIn("null.test", f.reason)

    async def test_nxdomain_is_permanent_5_1_2(self):
        f = await self.failure(self.resolver.mx_hops("nowhere.test", 25))
        self.assertFalse(f.temporary)
        self.assertEqual(f.status, "5.1.2")
        self.assertIn("nowhere.test", f.reason)

    async def test_servfail_is_temporary_then_recovers(self):
        self.zone.mx("example.test", 10, "mx1.example.test").a("mx1.example.test", "127.0.0.2")
        self.zone.behave("example.test", "servfail")
        f = await self.failure(self.resolver.mx_hops("example.test", 25))
        self.assertTrue(f.temporary)
        self.assertEqual(f.status, "4.4.3")
        self.zone.behave("example.test", None)
        hops = await self.resolver.mx_hops("example.test", 25)
        self.assertEqual(hops[0].address, "127.0.0.2")

    async def test_refused_is_temporary(self):
        self.zone.behave("example.test", "refused")
        f = await self.failure(self.resolver.mx_hops("example.test", 25))
        self.assertTrue(f.temporary)

    async def test_timeout_is_temporary(self):
        self.zone.mx("example.test", 10, "mx1.example.test")
        self.zone.behave("example.test", "drop")
        r = Resolver(self.server.nameservers, lifetime=0.5)
        f = await self.failure(r.mx_hops("example.test", 25))
        self.assertTrue(f.temporary)
        self.assertIn("timed out", f.reason)

    async def test_slow_answer_within_lifetime(self):
        self.zone.a("slow.test", "127.0.0.2").delay("slow.test", 0.2)
        r = Resolver(self.server.nameservers, lifetime=10.0)  # far from 0.2 s, even on busy CI
        hops = await r.mx_hops("slow.test", 25)
        self.assertEqual(hops[0].address, "127.0.0.2")

    async def test_lookup_does_not_block_the_reactor(self):
        self.zone.behave("example.test", "drop")
        r = Resolver(self.server.nameservers, lifetime=5.0)  # far beyond the 0.05 s below, even on busy CI
        d = r.mx_hops("example.test", 25)
        await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(d.called)  # still waiting, in a thread, while the reactor runs
        f = await self.failure(d)
        self.assertTrue(f.temporary)

    async def test_concurrent_lookups_of_one_domain_share_one_query(self):
        self.zone.mx("example.test", 10, "mx1.example.test").a("mx1.example.test", "127.0.0.2")
        self.zone.delay("example.test", 0.2)
        listeners = make_is_self([("127.0.0.1", 25)])
        ds = [self.resolver.mx_hops("example.test", 25, hostname="me.test", is_self=listeners) for _ in range(5)]
        other = self.resolver.mx_hops("example.test", 2525, hostname="me.test", is_self=listeners)
        results = [await d for d in ds]
        self.assertEqual(results[0], [Hop("mx1.example.test", "127.0.0.2", 25, 10)])
        self.assertTrue(all(r == results[0] for r in results))
        self.assertEqual((await other)[0].port, 2525)
        self.assertEqual(self.zone.count("example.test", "MX"), 2)  # one per distinct question
        await self.resolver.mx_hops("example.test", 25, hostname="me.test", is_self=listeners)
        self.assertEqual(self.zone.count("example.test", "MX"), 3)  # nothing cached afterwards

    async def test_concurrent_failures_shared(self):
        self.zone.behave("example.test", "servfail")
        ds = [self.resolver.mx_hops("example.test", 25) for _ in range(3)]
        for d in ds:
            f = await self.failure(d)
            self.assertTrue(f.temporary)
        self.assertEqual(self.zone.count("example.test", "MX"), 1)

    async def test_unresolvable_mx_host_is_skipped(self):
        z = self.zone
        z.mx("example.test", 10, "gone.example.test").mx("example.test", 20, "flaky.example.test")
        z.mx("example.test", 30, "ok.example.test")
        z.a("flaky.example.test", "127.0.0.7").behave("flaky.example.test", "servfail")
        z.a("ok.example.test", "127.0.0.3")
        hops = await self.resolver.mx_hops("example.test", 25)
        self.assertEqual(hops, [Hop("ok.example.test", "127.0.0.3", 25, 30)])

    async def test_no_mx_host_resolves_permanent(self):
        self.zone.mx("example.test", 10, "gone.example.test").mx("example.test", 20, "gone2.example.test")
        f = await self.failure(self.resolver.mx_hops("example.test", 25))
        self.assertFalse(f.temporary)
        self.assertEqual(f.status, "5.4.4")
        self.assertIn("no MX host for example.test", f.reason)

    async def test_no_mx_host_resolves_one_temporary(self):
        self.zone.mx("example.test", 10, "gone.example.test").mx("example.test", 20, "flaky.example.test")
        self.zone.a("flaky.example.test", "127.0.0.7").behave("flaky.example.test", "drop")
        r = Resolver(self.server.nameservers, lifetime=0.3)
        f = await self.failure(r.mx_hops("example.test", 25))
        self.assertTrue(f.temporary)
        self.assertEqual(f.status, "4.4.3")


class LoopTests(DNSTestCase):
    def setUp(self):
        super().setUp()
        z = self.zone
        z.a("me.example.test", "127.0.0.7").a("backup.example.test", "127.0.0.8")
        z.a("primary.example.test", "127.0.0.9")

    async def test_self_by_hostname_only_better_hosts(self):
        z = self.zone
        z.mx("example.test", 5, "primary.example.test").mx("example.test", 10, "me.example.test")
        z.mx("example.test", 20, "backup.example.test")
        hops = await self.resolver.mx_hops("example.test", 25, hostname="ME.example.test")
        self.assertEqual([h.host for h in hops], ["primary.example.test"])

    async def test_self_by_hostname_lowest_is_loop(self):
        z = self.zone
        z.mx("example.test", 10, "me.example.test").mx("example.test", 20, "backup.example.test")
        f = await self.failure(self.resolver.mx_hops("example.test", 25, hostname="me.example.test"))
        self.assertFalse(f.temporary)
        self.assertEqual(f.status, "5.4.6")
        self.assertEqual(f.reason, "mail for example.test loops back to myself")

    async def test_self_by_address_and_port(self):
        z = self.zone
        z.mx("example.test", 10, "other-name.example.test").mx("example.test", 20, "backup.example.test")
        z.a("other-name.example.test", "127.0.0.7")
        is_self = make_is_self([("127.0.0.7", 2525)])
        f = await self.failure(self.resolver.mx_hops("example.test", 2525, hostname="x.test", is_self=is_self))
        self.assertEqual(f.status, "5.4.6")
        # Another relay on the same machine, another port: not us.
        hops = await self.resolver.mx_hops("example.test", 2526, hostname="x.test", is_self=is_self)
        self.assertEqual([h.host for h in hops], ["other-name.example.test", "backup.example.test"])

    async def test_self_equal_preference_also_excluded(self):
        z = self.zone
        z.mx("example.test", 10, "me.example.test").mx("example.test", 10, "backup.example.test")
        f = await self.failure(self.resolver.mx_hops("example.test", 25, hostname="me.example.test"))
        self.assertEqual(f.status, "5.4.6")

    async def test_implicit_mx_pointing_at_us(self):
        is_self = make_is_self([("", 2525)])
        self.zone.a("implicit.test", "127.0.0.7")
        f = await self.failure(self.resolver.mx_hops("implicit.test", 2525, is_self=is_self))
        self.assertEqual(f.status, "5.4.6")

    async def test_domain_literal_pointing_at_us(self):
        is_self = make_is_self([("127.0.0.1", 25)])
        f = await self.failure(self.resolver.mx_hops("[127.0.0.1]", 25, is_self=is_self))
        self.assertEqual(f.status, "5.4.6")


class IsSelfTests(unittest.TestCase):
    def test_exact_listener(self):
        s = make_is_self([("127.0.0.7", 2525)])
        self.assertTrue(s("127.0.0.7", 2525))
        self.assertFalse(s("127.0.0.7", 25))
        self.assertFalse(s("127.0.0.8", 2525))

    def test_wildcard_ipv4(self):
        s = make_is_self([("", 25), ("0.0.0.0", 26)])
        self.assertTrue(s("127.0.0.200", 25))  # every 127/8 address is local on Linux
        self.assertTrue(s("127.0.0.200", 26))
        self.assertFalse(s("192.0.2.1", 25))  # TEST-NET-1: not ours
        self.assertFalse(s("127.0.0.200", 27))

    def test_wildcard_ipv6_covers_both(self):
        s = make_is_self([("::", 25)])
        self.assertTrue(s("127.0.0.3", 25))
        self.assertFalse(s("2001:db8::1", 25))

    def test_ipv4_mapped(self):
        s = make_is_self([("127.0.0.7", 25)])
        self.assertTrue(s("::ffff:127.0.0.7", 25))

    def test_is_local_address(self):
        self.assertTrue(is_local_address("127.0.0.1"))
        self.assertTrue(is_local_address("127.0.0.42"))
        self.assertFalse(is_local_address("192.0.2.1"))
        self.assertFalse(is_local_address("0.0.0.0"))
        self.assertFalse(is_local_address("not an ip"))

    def test_listeners_from_endpoints(self):
        got = listeners_from_endpoints(
            [
                "tcp:2525:interface=127.0.0.1",
                "tcp:25",
                "tcp6:587",
                "ssl:465:privateKey=k.pem",
                "systemd:domain=INET:index=0",
                "unix:/tmp/x",
            ]
        )
        self.assertEqual(got, [("127.0.0.1", 2525), ("", 25), ("::", 587), ("", 465)])


class HostHopsTests(DNSTestCase):
    async def test_ip_literal_passes_through(self):
        self.assertEqual(await self.resolver.host_hops("127.0.0.5", 587), [Hop("127.0.0.5", "127.0.0.5", 587, 0)])
        self.assertEqual(await self.resolver.host_hops("[::1]", 587), [Hop("::1", "::1", 587, 0)])
        self.assertEqual(self.zone.queries, [])

    async def test_addresses_without_mx(self):
        self.zone.mx("smart.test", 10, "elsewhere.test").a("smart.test", "127.0.0.5").aaaa("smart.test", "::1")
        hops = await self.resolver.host_hops("smart.test", 587)
        self.assertEqual(hops, [Hop("smart.test", "127.0.0.5", 587, 0), Hop("smart.test", "::1", 587, 0)])
        self.assertEqual(self.zone.count("smart.test", "MX"), 0)

    async def test_nxdomain_defers_by_default(self):
        f = await self.failure(self.resolver.host_hops("typo.test", 587))
        self.assertTrue(f.temporary)
        self.assertIn("typo.test", f.reason)
        f = await self.failure(self.resolver.host_hops("typo.test", 587, permanent_nxdomain=True))
        self.assertFalse(f.temporary)
        self.assertTrue(f.status.startswith("5."))

    async def test_servfail_temporary(self):
        self.zone.a("smart.test", "127.0.0.5").behave("smart.test", "servfail")
        f = await self.failure(self.resolver.host_hops("smart.test", 587, permanent_nxdomain=True))
        self.assertTrue(f.temporary)

    async def test_partial_answer_is_enough(self):
        self.zone.a("smart.test", "127.0.0.5").behave("smart.test", "servfail", "AAAA")
        hops = await self.resolver.host_hops("smart.test", 587)
        self.assertEqual([h.address for h in hops], ["127.0.0.5"])


class SubprocessServerTests(unittest.TestCase):
    """The DNS server as a separate process, and the blocking resolver core."""

    def test_subprocess_server_and_zone_reload(self):
        d = tempfile.mkdtemp(prefix="relay-dns-test-")
        self.addCleanup(shutil.rmtree, d, True)
        zone_path = os.path.join(d, "zone.json")
        zone = Zone().mx("example.test", 10, "mx1.example.test").a("mx1.example.test", "127.0.0.2")
        with open(zone_path, "w") as f:
            f.write(zone.to_json())
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.dns", "--zone", zone_path],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        line = proc.stdout.readline()
        self.assertTrue(line.startswith("READY "), line)
        port = int(line.split()[1])
        r = Resolver([f"127.0.0.1:{port}"], lifetime=2.0)
        self.assertEqual(r.resolve_mx("example.test", 25), [Hop("mx1.example.test", "127.0.0.2", 25, 10)])
        zone.behave("example.test", "servfail")
        tmp = zone_path + ".new"
        with open(tmp, "w") as f:
            f.write(zone.to_json())
        st = os.stat(zone_path)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        os.replace(tmp, zone_path)
        with self.assertRaises(DNSFailure) as cm:
            r.resolve_mx("example.test", 25)
        self.assertTrue(cm.exception.temporary)

    def test_no_resolver_configuration_is_temporary(self):
        r = Resolver(lifetime=0.5)
        r._config_error = "no DNS resolver configured: test"
        start = time.monotonic()
        with self.assertRaises(DNSFailure) as cm:
            r.resolve_mx("example.test", 25)
        self.assertTrue(cm.exception.temporary)
        self.assertIn("no DNS resolver configured", cm.exception.reason)
        self.assertLess(time.monotonic() - start, 5)
