"""Issue 16: named upstreams, sender routes and their precedence, from the
config to relay.delivery.routing, the connection cache's identity and
``relayctl route``'s explanation (the delivery itself: tests/integration/test_upstreams.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from twisted.internet import task

from relay import config as configmod
from relay.config import ConfigError, HostPort
from relay.control import route as routecheck
from relay.delivery import routing
from relay.delivery.attempt import Deliverer
from relay.outbound import client
from relay.outbound.dane import Tlsa
from relay.outbound.request import Hop, MessageFile, Outbound, TLSPolicy
from relay.runtime import parts
from tests.test_delivery_attempt import Disk, Env, Listeners, Msg, Spool, Users

UPSTREAMS = {
    "office": {"hosts": ["smtp1.example.net:587", "[192.0.2.9]:2525"], "username": "office@example.org",
               "password_file": "/etc/relay/office.pw"},
    "shop": {"hosts": "192.0.2.20:25", "tls": "may"},
    "bulk": {"hosts": ["192.0.2.30:587"], "tls": "encrypt", "username": "bulk", "password_file": "bulk.pw"},
}


def load(relay: dict, **more) -> configmod.Config:
    return configmod.load(data={"relay": relay, **more})


class Config(unittest.TestCase):
    def problems(self, relay: dict) -> str:
        with self.assertRaises(ConfigError) as cm:
            load(relay)
        return str(cm.exception)

    def test_upstreams_parse(self):
        c = load({"upstreams": UPSTREAMS}).relay
        office = c.upstream("office")
        self.assertEqual(office.hosts, (HostPort("smtp1.example.net", 587), HostPort("192.0.2.9", 2525)))
        self.assertEqual(office.tls, "verify")  # the default: a password goes there
        self.assertEqual(c.upstream("shop").hosts, (HostPort("192.0.2.20", 25),))
        self.assertTrue(os.path.isabs(c.upstream("bulk").password_file))  # resolved like every path
        self.assertIsNone(c.upstream("nope"))

    def test_old_forms_unchanged(self):
        c = load({"smarthost": "smtp.provider.example:587", "routes": {"a.example": "10.0.0.5:2525",
                                                                       "b.example": "mailhub"}}).relay
        self.assertEqual(c.smarthost, HostPort("smtp.provider.example", 587))
        self.assertEqual(c.smarthost_hosts, (HostPort("smtp.provider.example", 587),))
        self.assertEqual(c.route_for("a.example"), HostPort("10.0.0.5", 2525))
        self.assertEqual(c.route_for("b.example"), HostPort("mailhub", 25))  # no upstreams: a host, as before
        self.assertIsNone(load({}).relay.smarthost)
        self.assertEqual(load({}).relay.smarthost_hosts, ())

    def test_smarthost_list_and_upstream_name(self):
        c = load({"smarthost": ["a.example:587", "b.example:587"]}).relay
        self.assertEqual(c.smarthost, HostPort("a.example", 587))
        self.assertEqual(len(c.smarthost_hosts), 2)
        c = load({"smarthost": "office", "upstreams": UPSTREAMS}).relay
        self.assertEqual((c.smarthost_upstream, c.smarthost), ("office", HostPort("smtp1.example.net", 587)))

    def test_routes_may_name_an_upstream(self):
        c = load({"upstreams": UPSTREAMS, "routes": {"a.example": "shop", "b.example": "10.0.0.5:25"}}).relay
        self.assertEqual(c.upstream_route_for("a.example"), "shop")
        self.assertIsNone(c.route_for("a.example"))
        self.assertEqual(c.route_for("b.example"), HostPort("10.0.0.5", 25))

    def test_unknown_upstream_names_are_refused_naming_the_key(self):
        msg = self.problems({"upstreams": UPSTREAMS, "sender_routes": {"a@example.org": "offfice"}})
        self.assertIn("relay.sender_routes: a@example.org: 'offfice' is not a defined upstream", msg)
        msg = self.problems({"sender_routes": {"a@example.org": "office"}})
        self.assertIn("relay.sender_routes", msg)
        msg = self.problems({"upstreams": UPSTREAMS, "routes": {"a.example": "shopp"}})
        self.assertIn("relay.routes: a.example: 'shopp' is not a defined upstream", msg)
        self.assertIn('write "shopp:25"', msg)
        msg = self.problems({"upstreams": UPSTREAMS, "smarthost": "ofice"})
        self.assertIn("relay.smarthost: 'ofice' is not a defined upstream", msg)

    def test_bad_host_lists_are_refused(self):
        for hosts in ([], "", "host:-1", "host:0", "host:65536", ["ok.example:25", 7], 25,
                      ["a.example:25", "a.example:25"], "bad host:25"):
            msg = self.problems({"upstreams": {"x": {"hosts": hosts}}})
            self.assertIn("relay.upstreams", msg, hosts)
            self.assertIn("x.hosts", msg, hosts)
        for sh in (["a.example:25", "a.example:-5"], [], ["a.example:25", "a.example:25"], ["a", 5]):
            self.assertIn("relay.smarthost", self.problems({"smarthost": sh}), sh)

    def test_bad_upstream_tables_are_refused(self):
        cases = [
            ({"x": {"hosts": "h.example:587", "username": "u"}}, "x.password_file: required with x.username"),
            ({"x": {"hosts": "h.example:587", "username": "u", "password_file": "p", "tls": "none"}},
             '"none" with x.username'),
            ({"x": {"hosts": "h.example:587", "tls": "sometimes"}}, "x.tls: one of"),
            ({"x": {"hosts": "h.example:587", "port": 25}}, "x: unknown port"),
            ({"x": {}}, "x: missing hosts"),
            ({"x.y": {"hosts": "h.example:25"}}, "name 'x.y'"),
            ({"Office": {"hosts": "h.example:25"}}, "name 'Office'"),
            ({"x": "h.example:25"}, "x: not a table"),
        ]
        for table, text in cases:
            msg = self.problems({"upstreams": table})
            self.assertIn("relay.upstreams", msg)
            self.assertIn(text, msg)
        self.assertIn("relay.upstreams", self.problems({"upstreams": ["x"]}))

    def test_smarthost_credentials_with_an_upstream_smarthost_are_refused(self):
        msg = self.problems({"upstreams": UPSTREAMS, "smarthost": "office", "smarthost_username": "u",
                             "smarthost_password_file": "p"})
        self.assertIn("relay.smarthost_username: not used when relay.smarthost names the upstream 'office'", msg)

    def test_bad_sender_routes_are_refused(self):
        for table in ({"not an address@": "office"}, {"a@example.org": 5}, {"a@example.org": "no.dots"},
                      {"..example": "office"}):
            self.assertIn("relay.sender_routes", self.problems({"upstreams": UPSTREAMS, "sender_routes": table}))


class Precedence(unittest.TestCase):
    def setUp(self):
        self.cfg = configmod.load(data={
            "local": {"domains": ["local.test"]},
            "relay": {"upstreams": UPSTREAMS, "smarthost": "smart.example:25",
                      "sender_routes": {"Alice@Example.ORG": "office", "shop.example": "shop",
                                        ".corp.example": "bulk"},
                      "routes": {"routed.example": "10.0.0.5:25", "viashop.example": "shop"}}})

    def route(self, rcpt: str, sender: str | None) -> routing.Destination:
        return routing.route(self.cfg, rcpt, sender)

    def test_local_is_never_overridden(self):
        d = self.route("bob@local.test", "alice@example.org")
        self.assertEqual((d.kind, d.key, d.via), ("local", "local:local.test", routing.VIA_LOCAL))

    def test_sender_route_first(self):
        d = self.route("x@routed.example", "ALICE@example.org")
        self.assertEqual((d.kind, d.key, d.upstream, d.via, d.rule),
                         ("upstream", "upstream:office", "office", routing.VIA_SENDER, "alice@example.org"))
        self.assertEqual((d.host, d.port), ("smtp1.example.net", 587))
        self.assertEqual(self.route("x@far.example", "anyone@shop.example").key, "upstream:shop")
        self.assertEqual(self.route("x@far.example", "anyone@Sales.Corp.example").key, "upstream:bulk")
        self.assertEqual(self.route("x@far.example", "a@b.sales.corp.example").key, "upstream:bulk")

    def test_subdomain_entries_do_not_match_the_domain_itself_nor_other_senders(self):
        self.assertEqual(self.route("x@far.example", "a@corp.example").kind, "smarthost")
        self.assertEqual(self.route("x@far.example", "bob@example.org").kind, "smarthost")
        self.assertEqual(self.route("x@far.example", "a@sub.shop.example").kind, "smarthost")

    def test_then_recipient_route_then_smarthost(self):
        d = self.route("x@viashop.example", "bob@example.org")
        self.assertEqual((d.key, d.via, d.rule), ("upstream:shop", routing.VIA_RECIPIENT, "viashop.example"))
        d = self.route("x@routed.example", "bob@example.org")
        self.assertEqual((d.kind, d.key, d.via), ("route", "route:10.0.0.5:25", routing.VIA_RECIPIENT))
        d = self.route("x@far.example", "bob@example.org")
        self.assertEqual((d.kind, d.key, d.via), ("smarthost", "smarthost:smart.example:25", routing.VIA_SMARTHOST))

    def test_null_sender_has_no_sender_route(self):
        self.assertEqual(self.route("x@far.example", "").kind, "smarthost")
        self.assertEqual(self.route("x@far.example", None).kind, "smarthost")

    def test_mx_last_and_the_old_signature(self):
        cfg = configmod.load(data={"relay": {"upstreams": UPSTREAMS, "sender_routes": {"shop.example": "shop"}}})
        d = routing.route(cfg, "x@far.example")
        self.assertEqual((d.kind, d.key, d.via), ("mx", "mx:far.example", routing.VIA_MX))

    def test_smarthost_naming_an_upstream(self):
        cfg = configmod.load(data={"relay": {"upstreams": UPSTREAMS, "smarthost": "office"}})
        d = routing.route(cfg, "x@far.example", "bob@example.org")
        self.assertEqual((d.kind, d.key, d.via), ("upstream", "upstream:office", routing.VIA_SMARTHOST))


class CacheIdentity(unittest.TestCase):
    """The connection cache's key names who a session is logged in as."""

    def out(self, auth, scope: str) -> Outbound:
        return Outbound("s@example.org", ("r@example.net",), MessageFile("/dev/null", 0), "relay.test",
                        auth=auth, auth_scope=scope)

    def test_identity(self):
        ident = client._auth_identity
        self.assertIsNone(ident(self.out(None, "")))
        a = ident(self.out(("u", "pw"), "upstream:a"))
        self.assertNotEqual(a, ident(self.out(("u", "pw"), "upstream:b")))  # same user, another route
        self.assertNotEqual(a, ident(self.out(("u", "pw2"), "upstream:a")))  # a changed password
        self.assertNotIn("pw", a.split("\0")[2])  # a digest, not the password
        self.assertEqual(a, ident(self.out(("u", "pw"), "upstream:a")))


class CacheTlsa(unittest.TestCase):
    """The connection cache's key holds the hop's TLSA records: a session
    parked before the host had DANE records is not reused once it has them
    (that delivery must authenticate by DANE on a fresh connection)."""

    HOP = Hop("MX.Far.Example.", "127.0.0.21", 25)
    RECORD = Tlsa(3, 1, 1, bytes(32))

    def key(self, mode: str, tlsa: dict) -> tuple:
        out = Outbound("s@example.org", ("r@far.example",), MessageFile("/dev/null", 0), "relay.test",
                       tls=TLSPolicy(mode=mode, tlsa=tlsa))
        d = client._Delivery(task.Clock(), [self.HOP], out, threadpool=None, cache=None, host_limit=None)
        return d._cache_key(self.HOP, False)

    def test_records_change_the_key(self):
        without = self.key("dane", {})
        with_records = self.key("dane", {"mx.far.example": (self.RECORD,)})
        self.assertNotEqual(without, with_records)
        self.assertEqual(with_records[-1], (self.RECORD,))  # found under the normalised host name
        self.assertEqual(without[-1], ())
        self.assertEqual(with_records, self.key("dane", {"mx.far.example": (self.RECORD,)}))  # stable
        other = Tlsa(3, 1, 1, b"\1" * 32)
        self.assertNotEqual(with_records, self.key("dane", {"mx.far.example": (other,)}))  # a rollover
        # another host's records say nothing about this hop's session
        self.assertEqual(without, self.key("dane", {"mx2.far.example": (self.RECORD,)}))
        hash(with_records)  # a dict key of the cache

    def test_verify_with_records_is_not_the_verify_session(self):
        self.assertNotEqual(self.key("verify", {}), self.key("verify", {"mx.far.example": (self.RECORD,)}))


class Explain(unittest.TestCase):
    """``relayctl route ADDRESS --sender S`` with the relay stopped (IP
    literal hosts: no DNS)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-route-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.cfg = configmod.load(data={
            "spool": os.path.join(self.tmp, "spool"), "local": {"domains": ["local.test"],
                                                                "users": os.path.join(self.tmp, "users")},
            "relay": {"upstreams": {"office": {"hosts": ["192.0.2.8:587", "192.0.2.9:587"], "username": "me",
                                               "password_file": os.path.join(self.tmp, "pw")},
                                    "shop": {"hosts": "192.0.2.20:25", "tls": "may"}},
                      "sender_routes": {"example.org": "office"}, "routes": {"viashop.example": "shop"},
                      "smarthost": ["192.0.2.30:25", "192.0.2.31:25"]}})
        self.ctx = parts.offline_route_context(self.cfg)

    def explain(self, rcpt: str, sender: str | None) -> tuple[dict, str]:
        r = routecheck.explain(self.ctx, rcpt, None, sender)
        return r, routecheck.format_text(r)

    def test_sender_route(self):
        r, text = self.explain("x@far.example", "alice@example.org")
        d = r["deliveries"][0]
        self.assertEqual((d["kind"], d["via"], d["upstream"], d["rule"], d["auth"], d["username"]),
                         ("upstream", "sender route", "office", "example.org", True, "me"))
        self.assertEqual(d["hosts"], ["192.0.2.8:587", "192.0.2.9:587"])
        self.assertEqual([h["address"] for h in d["hops"]], ["192.0.2.8", "192.0.2.9"])
        self.assertIn("upstream office (sender route: relay.sender_routes 'example.org'), hosts in the order they "
                      "would be tried:", text)
        self.assertIn("configured hosts 192.0.2.8:587, 192.0.2.9:587 (fail-over in this order); TLS verify; "
                      "AUTH as me", text)
        self.assertIn("1. 192.0.2.8:587", text)
        self.assertIn("2. 192.0.2.9:587", text)
        self.assertNotIn("pw", text.replace("password", ""))

    def test_recipient_route_smarthost_and_local(self):
        r, text = self.explain("x@viashop.example", "bob@other.example")
        self.assertEqual(r["deliveries"][0]["via"], "recipient route")
        self.assertIn("upstream shop (recipient route: relay.routes 'viashop.example')", text)
        self.assertIn("no AUTH", text)
        r, text = self.explain("x@far.example", "bob@other.example")
        d = r["deliveries"][0]
        self.assertEqual((d["kind"], d["via"], d["auth"]), ("smarthost", "smarthost", False))
        self.assertEqual([h["address"] for h in d["hops"]], ["192.0.2.30", "192.0.2.31"])
        self.assertIn("smarthost 192.0.2.30:25 (relay.smarthost), hosts in the order they would be tried:", text)
        self.assertIn("configured hosts 192.0.2.30:25, 192.0.2.31:25 (fail-over in this order); TLS may; no AUTH",
                      text)
        r, _ = self.explain("postmaster@local.test", "alice@example.org")
        self.assertEqual(r["deliveries"][0]["kind"], "local")  # a sender route never overrides local delivery
        r, _ = self.explain("x@far.example", None)
        self.assertEqual(r["deliveries"][0]["kind"], "smarthost")  # no --sender: no sender route
        r, _ = self.explain("x@far.example", "<>")
        self.assertEqual(r["deliveries"][0]["kind"], "smarthost")


class Attempt(unittest.TestCase):
    """What relay.delivery.attempt.Deliverer gives the client for each kind
    of destination: whose credentials, which TLS, whether a 5xx stops."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-att-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.cfg = configmod.load(data={
            "hostname": "relay.test", "spool": os.path.join(self.tmp, "spool"),
            "local": {"domains": ["local.test"], "users": os.path.join(self.tmp, "users")},
            "relay": {"upstreams": {**UPSTREAMS, "one": {"hosts": "one.example:587", "ca_file": "/ca.pem"}},
                      "sender_routes": {"example.org": "office", "one.example": "one"},
                      "routes": {"routed.example": "10.0.0.5:25", "viabulk.example": "bulk"},
                      "smarthost": "smart.example:25", "smarthost_username": "smartuser",
                      "smarthost_password_file": "/smart.pw", "smarthost_tls": "encrypt"}})
        self.d = Deliverer(task.Clock(), resolver=None, spool=Spool(), disk=Disk(), users=Users([]),
                           listeners=Listeners(), config=self.cfg)

    def dest(self, rcpt: str, sender: str) -> routing.Destination:
        return routing.route(self.cfg, rcpt, sender)

    def test_each_destination_logs_in_only_with_its_own_credentials(self):
        login = self.d._login
        office = login(self.dest("x@far.example", "a@example.org"))
        self.assertEqual(office[1:], ("office@example.org", "/etc/relay/office.pw"))
        self.assertEqual(login(self.dest("x@viabulk.example", "a@other.example"))[1], "bulk")
        self.assertEqual(login(self.dest("x@far.example", "a@other.example"))[1], "smartuser")
        self.assertIsNone(login(self.dest("x@far.example", "a@one.example")))  # an upstream without a username
        self.assertIsNone(login(self.dest("x@routed.example", "a@other.example")))  # a host:port route

    def test_outbound_of_an_upstream(self):
        msg = Msg("Q1", Env("a@example.org"), 10, 0)
        dest = self.dest("x@far.example", "a@example.org")
        out = self.d._outbound(msg, dest, ["x@far.example"], ("office@example.org", "pw"))
        # two hosts: each checked against its own name
        self.assertEqual((out.tls.mode, out.tls.hostname), ("verify", None))
        self.assertEqual((out.auth_scope, out.stop_on_5xx), ("upstream:office", True))
        self.assertEqual(self.d._hosts(dest), [("smtp1.example.net", 587), ("192.0.2.9", 2525)])
        dest = self.dest("x@far.example", "b@one.example")
        out = self.d._outbound(msg, dest, ["x@far.example"], None)
        self.assertEqual(out.tls, TLSPolicy("verify", "one.example", "/ca.pem"))
        self.assertEqual((out.auth_scope, out.stop_on_5xx), ("", True))
        # the single smarthost and MX keep their old behaviour
        dest = self.dest("x@far.example", "b@other.example")
        out = self.d._outbound(msg, dest, ["x@far.example"], ("smartuser", "pw"))
        self.assertEqual((out.tls.mode, out.tls.hostname, out.stop_on_5xx), ("encrypt", "smart.example", False))
        self.assertEqual(out.auth_scope, "smarthost:smart.example:25")

    def test_an_upstream_removed_by_a_reload_defers(self):
        dest = self.dest("x@far.example", "a@example.org")
        self.d.reconfigure(configmod.load(data={"spool": os.path.join(self.tmp, "spool")}), self.d.users)
        outcomes = self.d.attempt(Msg("Q1", Env("a@example.org"), 10, 0), dest, ["x@far.example"]).result
        self.assertEqual([(o.kind, o.status) for o in outcomes], [("deferred", "4.3.5")])
        self.assertIn("upstream office is no longer configured", outcomes[0].reply)
