"""relay.delivery.tlspolicy: the delivery.tls_policy table as the config
refuses or reads it, the TLS decision's precedence (table, MTA-STS, the
defaults), the names "verify" accepts, and what ``relayctl route`` shows.

Delivery under each level against real next hops is in
tests/integration/test_tls_policy.py.  The MTA-STS policies here are fixed
StsPolicy values (the real fetcher is relay.delivery.mtasts, tested on its own).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from twisted.trial import unittest

from relay import config as configmod
from relay.config.tlsvalues import TLSPolicyEntry
from relay.control import route as routecheck
from relay.delivery import routing, tlspolicy
from relay.delivery.stspolicy import StsPolicy
from relay.mailbox import users as usersmod
from relay.outbound.handshake import hop_tls, name_matches
from relay.outbound.request import TLSPolicy
from relay.runtime import parts
from tests.support.dns import DNSServer, Zone
from tests.support.relay import base_config, deep_merge, in_thread


def load(tmp_path, text: str) -> configmod.Config:
    path = tmp_path / "relay.toml"
    path.write_text(f'hostname = "relay.test"\nspool = "{tmp_path}/spool"\n{text}')
    return configmod.load(str(path))


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(configmod.ConfigError) as e:
        load(tmp_path, text)
    return e.value.problems


# --------------------------------------------------------------------------- config


def test_table_forms_are_read(tmp_path):
    cfg = load(tmp_path, '[delivery]\ntls = "dane"\n[delivery.tls_policy]\n"Example.COM" = "encrypt"\n'
                         '".bank.example" = { level = "verify", match = ["*.bank.example", "MX.Bank.example"], '
                         'ca_file = "ca.pem" }\n"[smtp.example.net]" = "dane-only"\n"[192.0.2.7]" = "none"\n')
    assert cfg.delivery.tls == "dane"
    assert dict(cfg.delivery.tls_policy) == {
        "example.com": TLSPolicyEntry("encrypt"),
        ".bank.example": TLSPolicyEntry("verify", ("*.bank.example", "mx.bank.example"), str(tmp_path / "ca.pem")),
        "[smtp.example.net]": TLSPolicyEntry("dane-only"),
        "[192.0.2.7]": TLSPolicyEntry("none"),
    }


@pytest.mark.parametrize("text, key, expected", [
    ('"example.com" = "always"', 'delivery.tls_policy."example.com".level',
     "one of none | may | encrypt | verify | dane | dane-only"),
    ('"example.com" = { level = "sometimes" }', 'delivery.tls_policy."example.com".level', "one of none"),
    ('"example.com" = { match = ["mx.example.com"] }', 'delivery.tls_policy."example.com".level', "one of"),
    ('"example.com" = { level = "encrypt", match = ["mx.example.com"] }',
     'delivery.tls_policy."example.com".match', 'only for level = "verify"'),
    ('"example.com" = { level = "may", ca_file = "ca.pem" }', 'delivery.tls_policy."example.com".ca_file',
     'only for level = "verify"'),
    ('"example.com" = { level = "verify", match = "mx.example.com" }',
     'delivery.tls_policy."example.com".match', "a list of host names"),
    ('"example.com" = { level = "verify", match = ["mx example com"] }',
     'delivery.tls_policy."example.com".match', "a list of host names"),
    ('"example.com" = { level = "verify", match = ["a.*.example.com"] }',
     'delivery.tls_policy."example.com".match', "a list of host names"),
    ('"example.com" = { level = "verify", cafile = "x" }', 'delivery.tls_policy."example.com".cafile',
     "no such key (known: level, match, ca_file)"),
    ('"example.com" = { level = "verify", ca_file = 3 }', 'delivery.tls_policy."example.com".ca_file', "a path"),
    ('"example.com" = 1', 'delivery.tls_policy."example.com"', "a level"),
    ('"exa mple.com" = "may"', 'delivery.tls_policy."exa mple.com"', '"domain", ".domain" or "[host]" key'),
    ('"[]" = "may"', 'delivery.tls_policy."[]"', '"domain", ".domain" or "[host]" key'),
    ('"example.com" = "may"\n"EXAMPLE.com" = "none"', 'delivery.tls_policy."EXAMPLE.com"',
     "one entry per destination"),
])
def test_bad_entries_are_refused_naming_the_key(tmp_path, text, key, expected):
    (p,) = problems(tmp_path, f"[delivery.tls_policy]\n{text}\n")
    assert p.startswith(f"{tmp_path / 'relay.toml'}: {key}: expected "), p
    assert expected in p


def test_not_a_table_and_the_global_levels(tmp_path):
    (p,) = problems(tmp_path, '[delivery]\ntls_policy = "verify"\n')
    assert ": delivery.tls_policy: expected a table of" in p
    # verify for every MX in the world is not a global default: per destination only
    (p,) = problems(tmp_path, '[delivery]\ntls = "verify"\n')
    assert ": delivery.tls: expected one of none | may | encrypt | dane | dane-only" in p
    assert load(tmp_path, '[delivery]\ntls = "dane-only"\n').delivery.tls == "dane-only"


# --------------------------------------------------------------------------- the decision


def cfg_with(tmp_path, table: dict, **delivery) -> configmod.Config:
    return configmod.load(None, data={"hostname": "relay.test", "spool": str(tmp_path / "spool"),
                                      "delivery": {"tls_policy": table, **delivery}})


def mx(domain: str) -> routing.Destination:
    return routing.Destination(routing.MX, "mx:" + domain, domain, "", 25)


def sts(mode: str, *patterns: str) -> StsPolicy:
    return StsPolicy("example.com", mode, patterns, 86400, "20261202", 1e12)


def test_exact_then_the_nearest_parent(tmp_path):
    cfg = cfg_with(tmp_path, {"example.com": "encrypt", ".example.com": "may", ".mail.example.com": "none",
                              ".com": "verify"})
    assert tlspolicy.decide(cfg, mx("example.com")).level == "encrypt"
    assert tlspolicy.decide(cfg, mx("a.example.com")).source == 'table entry ".example.com"'
    assert tlspolicy.decide(cfg, mx("x.mail.example.com")).level == "none"
    assert tlspolicy.decide(cfg, mx("mail.example.com")).level == "may"  # ".mail..." is its subdomains only
    assert tlspolicy.decide(cfg, mx("other.com")).level == "verify"
    d = tlspolicy.decide(cfg, mx("example.org"))
    assert (d.level, d.source, d.required_by()) == ("may", "the global default delivery.tls", None)


def test_table_wins_over_mta_sts_which_wins_over_the_default(tmp_path):
    cfg = cfg_with(tmp_path, {"example.com": "may"}, tls="encrypt")
    enforce = sts("enforce", "*.example.com")
    assert not tlspolicy.wants_sts(cfg, mx("example.com"))
    assert tlspolicy.decide(cfg, mx("example.com"), sts=enforce).level == "may"
    cfg = cfg_with(tmp_path, {})
    d = tlspolicy.decide(cfg, mx("example.com"), sts=enforce)
    assert (d.level, d.source, d.sts_enforce, d.match) == ("verify", "mta-sts enforce (policy id 20261202)", True, ())
    assert d.required_by() == "TLS is required by the policy for example.com (mta-sts enforce)"
    # the MX host name is checked: no fixed name in the client's policy
    assert d.policy() == TLSPolicy("verify", None, None, required_by=d.required_by())
    t = tlspolicy.decide(cfg, mx("example.com"), sts=sts("testing", "mx.example.com"))
    assert (t.level, t.sts_testing, t.policy().would_verify, t.required_by()) == ("may", True, True, None)
    assert "failures reported only" in t.describe()
    n = tlspolicy.decide(cfg, mx("example.com"), sts=sts("none"))
    assert (n.level, n.sts) == ("may", None)


def test_routes_and_the_smarthost(tmp_path):
    data = {"hostname": "relay.test", "spool": str(tmp_path / "spool"),
            "relay": {"routes": {"routed.example": "[10.0.0.5]:25", "other.example": "gw.example:2525"},
                      "smarthost": "smart.example:587", "smarthost_tls": "encrypt"},
            "delivery": {"tls_policy": {"[10.0.0.5]": "verify", "other.example": "encrypt",
                                        "[smart.example]": {"level": "verify", "match": ["*.example"]}}}}
    cfg = configmod.load(None, data=data)
    r = tlspolicy.decide(cfg, routing.route(cfg, "a@routed.example"))
    assert (r.level, r.source, r.hostname) == ("verify", 'table entry "[10.0.0.5]"', "10.0.0.5")
    assert tlspolicy.decide(cfg, routing.route(cfg, "a@other.example")).level == "encrypt"
    s = tlspolicy.decide(cfg, routing.route(cfg, "a@far.example"))
    assert (s.level, s.match, s.source) == ("verify", ("*.example",), 'table entry "[smart.example]"')
    del data["delivery"]
    cfg = configmod.load(None, data=data)
    s = tlspolicy.decide(cfg, routing.route(cfg, "a@far.example"), trust_root="/test/ca.pem")
    assert (s.level, s.source, s.hostname, s.trust_root) == ("encrypt", "relay.smarthost_tls", "smart.example",
                                                             "/test/ca.pem")
    assert s.policy() == TLSPolicy("encrypt", "smart.example", "/test/ca.pem")  # the old messages


def test_trust_roots(tmp_path):
    cfg = cfg_with(tmp_path, {"example.com": {"level": "verify", "ca_file": "/etc/ca.pem"}})
    assert tlspolicy.decide(cfg, mx("example.com")).trust_root == "/etc/ca.pem"
    assert tlspolicy.decide(cfg, mx("example.com"), trust_root="/tests/ca.pem").trust_root == "/tests/ca.pem"
    assert tlspolicy.decide(cfg, mx("example.org")).trust_root is None  # the system CAs


@pytest.mark.parametrize("pattern, name, ok", [
    ("mx.example.com", "mx.example.com", True),
    ("MX.example.com.", "mx.EXAMPLE.com", True),
    ("mx.example.com", "*.example.com", True),
    ("a.mx.example.com", "*.example.com", False),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*.example.com", "*.example.com", True),
    ("example.com", "*.com", True),
    ("mx.example.com", "mx.example.org", False),
])
def test_name_matches(pattern, name, ok):
    assert name_matches(pattern, name) is ok


def test_dane_levels_of_a_hop_without_tlsa_records():
    """Without usable TLSA records "dane" is "may" and "dane-only" defers the
    hop; a hop with records gets "dane", also under an MTA-STS "verify"."""
    from relay.outbound.conversation import HopFailed
    from relay.outbound.dane import Tlsa
    from relay.outbound.request import Hop, MessageFile, Outbound

    hop = Hop("mx.example.com", "127.0.0.2", 25)

    def out(tls):
        return Outbound("a@b.example", ("c@example.com",), MessageFile("/nonexistent", 0), "me.example", tls=tls)

    assert hop_tls(out(TLSPolicy("dane")), hop) == ("may", ())
    with pytest.raises(HopFailed) as e:
        hop_tls(out(TLSPolicy("dane-only")), hop)
    assert "dane-only" in str(e.value.reason if hasattr(e.value, "reason") else e.value)
    assert hop_tls(out(TLSPolicy("verify")), hop) == ("verify", ())
    rec = Tlsa(3, 1, 1, bytes(32))
    assert hop_tls(out(TLSPolicy("verify", tlsa={"mx.example.com": (rec,)})), hop) == ("dane", (rec,))
    assert tlspolicy.REQUIRED == {"encrypt", "verify", "dane-only"}


# --------------------------------------------------------------------------- relayctl route


class Route(unittest.TestCase):
    """``relayctl route``'s explanation (the offline context, a real DNS server)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-tlsroute-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.zone = Zone()
        self.zone.mx("table.example", 10, "mx.table.example").a("mx.table.example", "192.0.2.1")
        self.zone.mx("sts.example", 10, "mx1.sts.example").mx("sts.example", 20, "mx2.sts.example")
        self.zone.a("mx1.sts.example", "192.0.2.2").a("mx2.sts.example", "192.0.2.3")
        self.zone.mx("stsbad.example", 10, "mx.stsbad.example").a("mx.stsbad.example", "192.0.2.4")
        self.zone.mx("plain.example", 10, "mx.plain.example").a("mx.plain.example", "192.0.2.5")
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        data = deep_merge(base_config(self.tmp), {"delivery": {
            "nameservers": [f"127.0.0.1:{self.dns.port}"],
            "tls_policy": {"table.example": {"level": "verify", "match": ["*.table.example"]}}}})
        self.ctx = parts.offline_route_context(configmod.load(None, data=data))
        policies = {"sts.example": StsPolicy("sts.example", "enforce", ("mx1.sts.example",), 604800, "abc", 1e12),
                    "stsbad.example": StsPolicy("stsbad.example", "enforce", ("*.elsewhere.example",), 604800,
                                                "xyz", 1e12)}
        self.ctx.sts = policies.get

    async def explain(self, address: str):
        r = await in_thread(routecheck.explain, self.ctx, address)
        return r, routecheck.format_text(r)

    async def test_table_entry(self):
        r, text = await self.explain("a@table.example")
        tls = r["deliveries"][0]["tls"]
        assert tls == {"level": "verify", "source": 'table entry "table.example"', "required": True,
                       "match": ["*.table.example"], "mta_sts": None,
                       "describe": 'verify (table entry "table.example", certificate names *.table.example)'}
        assert '  TLS: verify (table entry "table.example", certificate names *.table.example)' in text
        assert "1. mx.table.example[192.0.2.1]:25 (preference 10)" in text  # the old lines stay

    async def test_mta_sts_and_the_default(self):
        r, text = await self.explain("a@sts.example")
        d = r["deliveries"][0]
        assert d["tls"]["mta_sts"] == {"mode": "enforce", "id": "abc", "mx": ["mx1.sts.example"], "max_age": 604800}
        assert "TLS: verify (mta-sts enforce (policy id abc))" in text
        assert [h["mta_sts_allowed"] for h in d["hops"]] == [True, False]
        assert "mx2.sts.example[192.0.2.3]:25 (preference 20) (not allowed by the MTA-STS policy)" in text
        r, text = await self.explain("a@plain.example")
        assert r["ok"] and "TLS: may (the global default delivery.tls)" in text

    async def test_no_allowed_mx_would_defer(self):
        r, text = await self.explain("a@stsbad.example")
        d = r["deliveries"][0]
        assert (r["ok"], d["outcome"], d["status"]) == (False, "defer", "4.7.0")
        assert ("TLS is required by the policy for stsbad.example (mta-sts enforce): no MX host matches the "
                "policy's mx patterns (*.elsewhere.example; MX hosts: mx.stsbad.example)") in text
        assert "mail would be deferred (4.7.0)" in text
