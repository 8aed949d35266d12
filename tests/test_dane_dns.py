"""relay.delivery.mx.Resolver.tlsa against the real test DNS server (AD bit)."""

from __future__ import annotations

from twisted.trial import unittest

from relay.delivery.mx import DNSFailure, Resolver
from relay.outbound.dane import Tlsa
from tests.support.dns import DNSServer, Zone

HEX = "0123456789abcdef" * 4
OWNER = "_25._tcp.mx1.dane.test"


class TlsaLookup(unittest.TestCase):
    def setUp(self):
        self.zone = Zone()
        self.server = DNSServer(self.zone).start()
        self.addCleanup(self.server.stop)
        self.resolver = Resolver(self.server.nameservers, lifetime=1.0)

    async def test_secure_records(self):
        self.zone.tlsa(OWNER, f"3 1 1 {HEX}").tlsa(OWNER, f"2 0 1 {HEX}").tlsa(OWNER, f"1 1 1 {HEX}").sign(OWNER)
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertTrue(ans.secure)
        self.assertEqual(ans.owner, OWNER)
        self.assertEqual(len(ans.records), 3)
        self.assertEqual(ans.usable, (Tlsa.parse(f"3 1 1 {HEX}"), Tlsa.parse(f"2 0 1 {HEX}")))
        self.assertIn("secure: 3 1 1 0123456789abcdef...", ans.describe())
        self.assertIn(("_25._tcp.mx1.dane.test", "TLSA"), self.zone.queries)

    async def test_other_port(self):
        self.zone.tlsa("_2525._tcp.mx1.dane.test", f"3 1 1 {HEX}").sign("_2525._tcp.mx1.dane.test")
        ans = await self.resolver.tlsa("mx1.dane.test", 2525)
        self.assertTrue(ans.secure)
        self.assertEqual(len(ans.usable), 1)

    async def test_insecure_records_ignored(self):
        self.zone.tlsa(OWNER, f"3 1 1 {HEX}")
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertFalse(ans.secure)
        self.assertEqual(len(ans.records), 1)
        self.assertEqual(ans.usable, ())
        self.assertIn("insecure", ans.describe())

    async def test_secure_and_insecure_denial(self):
        # NXDOMAIN, signed: a secure denial
        self.zone.sign(OWNER)
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertEqual((ans.secure, ans.records), (True, ()))
        # NODATA, signed
        self.zone.a(OWNER, "127.0.0.9")
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertEqual((ans.secure, ans.records), (True, ()))
        # unsigned
        self.zone.unsign(OWNER)
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertEqual((ans.secure, ans.records), (False, ()))

    async def test_cname_chain_secure_only_when_all_signed(self):
        self.zone.cname(OWNER, "tlsa.other.test").tlsa("tlsa.other.test", f"3 1 1 {HEX}").sign(OWNER)
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertFalse(ans.secure)
        self.assertEqual(ans.usable, ())
        self.zone.sign("tlsa.other.test")
        ans = await self.resolver.tlsa("mx1.dane.test")
        self.assertTrue(ans.secure)
        self.assertEqual(len(ans.usable), 1)

    async def test_servfail_is_temporary(self):
        self.zone.tlsa(OWNER, f"3 1 1 {HEX}").sign(OWNER).behave(OWNER, "servfail")
        try:
            await self.resolver.tlsa("mx1.dane.test")
        except DNSFailure as e:
            self.assertTrue(e.temporary)
            self.assertEqual(e.status, "4.7.5")
            self.assertIn("DANE: TLSA lookup for _25._tcp.mx1.dane.test failed", e.reason)
        else:
            self.fail("no DNSFailure")

    async def test_timeout_is_temporary(self):
        self.zone.behave(OWNER, "drop")
        resolver = Resolver(self.server.nameservers, lifetime=0.3)
        with self.assertRaises(DNSFailure) as cm:
            await resolver.tlsa("mx1.dane.test")
        self.assertTrue(cm.exception.temporary)
        self.assertIn("timed out", cm.exception.reason)

    async def test_mx_lookups_still_work(self):
        # the AD flag on TLSA queries changes nothing for the MX path
        self.zone.mx("dane.test", 10, "mx1.dane.test").a("mx1.dane.test", "127.0.0.2")
        hops = await self.resolver.mx_hops("dane.test", 25)
        self.assertEqual([h.address for h in hops], ["127.0.0.2"])

    def test_json_round_trip(self):
        self.zone.tlsa(OWNER, f"3 1 1 {HEX}").sign(OWNER)
        z = Zone().load_json(self.zone.to_json())
        self.assertEqual(z.records, self.zone.records)
        self.assertEqual(z.signed, {OWNER})


class MxSecurity(unittest.TestCase):
    """Hop.secure: the MX RRset and the host's address records had the AD bit."""

    def setUp(self):
        self.zone = Zone()
        self.server = DNSServer(self.zone).start()
        self.addCleanup(self.server.stop)
        self.resolver = Resolver(self.server.nameservers, lifetime=1.0)
        self.zone.mx("s.test", 10, "mx1.s.test").mx("s.test", 20, "mx2.s.test")
        self.zone.a("mx1.s.test", "127.0.0.2").a("mx2.s.test", "127.0.0.3")

    async def secure(self, domain="s.test"):
        return {h.host: h.secure for h in await self.resolver.mx_hops(domain, 25)}

    async def test_all_signed(self):
        self.zone.sign("s.test", "mx1.s.test", "mx2.s.test")
        self.assertEqual(await self.secure(), {"mx1.s.test": True, "mx2.s.test": True})

    async def test_unsigned_mx_makes_every_host_insecure(self):
        self.zone.sign("mx1.s.test", "mx2.s.test")
        self.assertEqual(await self.secure(), {"mx1.s.test": False, "mx2.s.test": False})

    async def test_unsigned_host(self):
        self.zone.sign("s.test", "mx1.s.test")
        self.assertEqual(await self.secure(), {"mx1.s.test": True, "mx2.s.test": False})

    async def test_implicit_mx(self):
        self.zone.a("implicit.test", "127.0.0.4").sign("implicit.test")
        self.assertEqual(await self.secure("implicit.test"), {"implicit.test": True})

    async def test_secure_is_not_part_of_equality(self):
        from relay.outbound.request import Hop

        self.assertEqual(Hop("a", "127.0.0.1", 25, 0, secure=True), Hop("a", "127.0.0.1", 25, 0))

    async def test_route_host(self):
        self.zone.a("route.s.test", "127.0.0.6").sign("route.s.test")
        hops = await self.resolver.host_hops("route.s.test", 25)
        self.assertEqual([h.secure for h in hops], [True])
        self.zone.unsign("route.s.test")
        hops = await self.resolver.host_hops("route.s.test", 25)
        self.assertEqual([h.secure for h in hops], [False])
        hops = await self.resolver.host_hops("127.0.0.6", 25)
        self.assertEqual([h.secure for h in hops], [False])
