"""Per-destination TLS policy (delivery.tls_policy) and MTA-STS through a real relay.

The relay runs in-process on the test reactor; its MX look-ups go to the
test DNS server, and the next hops are tests.support.sink servers on four
127.0.0.x addresses: one offers no STARTTLS, one has a certificate for
another name, one a chain from a CA the relay does not trust, one a valid
chain for its MX name (trustme certificates).  Each level is tried against
each of them: delivered or deferred as the table says, and where TLS was
required and not met the sink never saw the recipient (nothing in clear,
no plaintext retry).

The MTA-STS cases use a small in-test StsSource that returns fixed
StsPolicy values: the real fetcher and cache (relay.delivery.mtasts) are
tested on their own; here, what delivery does with a policy.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile

import trustme
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from relay.delivery.stspolicy import StsPolicy
from relay.queue import view
from tests.support.certs import CertFiles, cert_files
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll

PLAIN, OTHER, UNTRUSTED, VALID = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
KINDS = {"plain": PLAIN, "other": OTHER, "untrusted": UNTRUSTED, "valid": VALID}
LEVELS = ("none", "may", "encrypt", "verify")


def untrusted_cert(directory: str, name: str) -> CertFiles:
    """A chain from a CA of its own, which nothing here trusts."""
    ca = trustme.CA()
    leaf = ca.issue_cert(name)
    cert, key = os.path.join(directory, "untrusted.crt"), os.path.join(directory, "untrusted.key")
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key)
    ca_path = os.path.join(directory, "untrusted-ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    return CertFiles(ca_path, cert, key, (name,))


class FixedSts:
    """An StsSource with fixed policies per domain; records the reports."""

    def __init__(self, policies: dict[str, StsPolicy]):
        self.policies = policies
        self.reports: list[tuple[str, str, str]] = []

    async def policy(self, domain: str) -> StsPolicy | None:
        return self.policies.get(domain)

    def report(self, policy: StsPolicy, host: str, failure: str) -> None:
        self.reports.append((policy.domain, host, failure))


def sts(domain: str, mode: str, *mx: str) -> StsPolicy:
    return StsPolicy(domain, mode, tuple(mx), 86400, f"id-{domain}", 1e12)


class TLSPolicyCase(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-tlspol-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.port = free_port(tuple(KINDS.values()))
        self.ca = cert_files("mx.valid.test").ca_pem
        behaviour = {
            PLAIN: {},
            OTHER: {"starttls": "ok", "cert": cert_files("other.example")},
            UNTRUSTED: {"starttls": "ok", "cert": untrusted_cert(self.tmp, "mx.untrusted.test")},
            VALID: {"starttls": "ok", "cert": cert_files("mx.valid.test")},
        }
        self.sinks = {}
        for kind, ip in KINDS.items():
            self.zone.a(f"mx.{kind}.test", ip)
            s = Sink(ip, port=self.port, **behaviour[ip]).start()
            self.sinks[kind] = s
            self.addCleanup(s.stop)
        over = {
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port,
                         "retry_min": "1h", "retry_max": "1h", "connect_timeout": 5, "tls": "may",
                         "tls_policy": self.table()},
        }
        self.relay = InProcessRelay(self.tmp, over)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def table(self) -> dict:
        return {".none.test": "none", ".may.test": "may", ".encrypt.test": "encrypt",
                ".verify.test": {"level": "verify", "ca_file": self.ca}}

    def send(self, rcpts):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                return s.sendmail("sender@client.example", rcpts, b"Subject: test\r\n\r\nbody\r\n")

        return in_thread(run)

    def outcome(self, rcpt: str):
        """The recipient's state: delivered (in a sink), or its queue record."""
        for m in self.relay.service.queue.messages.values():
            for r in m.state.recipients:
                if r.address == rcpt and r.status != "pending":
                    return r
        return None

    def received(self, rcpt: str) -> list:
        """Every sink session that saw this address at all (any command, any byte)."""
        return [s for sink in self.sinks.values() for s in sink.sessions if rcpt.encode() in bytes(s.wire)]

    def delivered(self, rcpt: str):
        for kind, sink in self.sinks.items():
            for t in sink.transactions:
                if rcpt in t.rcpts:
                    return kind, t
        return None


class Levels(TLSPolicyCase):
    async def test_each_level_against_each_next_hop(self):
        expected_deferred = {("encrypt", "plain"), ("verify", "plain"), ("verify", "other"),
                             ("verify", "untrusted")}
        rcpts = {}
        for level in LEVELS:
            for kind in KINDS:
                domain = f"{kind}.{level}.test"
                self.zone.mx(domain, 10, f"mx.{kind}.test")
                rcpts[(level, kind)] = f"u@{domain}"
        await self.send(list(rcpts.values()))

        def settled():
            return all(self.delivered(r) if k not in expected_deferred else self.outcome(r)
                       for k, r in rcpts.items())

        await apoll(settled, timeout=30, what="every recipient delivered or deferred")
        for (level, kind), r in rcpts.items():
            if (level, kind) in expected_deferred:
                rec = self.outcome(r)
                self.assertEqual(rec.status, "deferred", (level, kind))
                self.assertIsNone(self.delivered(r), (level, kind))
                self.assertEqual(self.received(r), [], f"{level}/{kind}: the next hop saw the recipient")
                self.assertIn(f'TLS is required by the policy for {kind}.{level}.test (table entry ".{level}.test": '
                              f"{level})", rec.reply)
                continue
            where, t = self.delivered(r)
            self.assertEqual(where, kind)
            if level == "none" or kind == "plain":
                self.assertIsNone(t.session.tls, (level, kind))
            else:
                self.assertIsNotNone(t.session.tls, (level, kind))
        reply = {k: self.outcome(r).reply for k, r in rcpts.items() if k in expected_deferred}
        self.assertIn("host mx.plain.test[127.0.0.2] did not offer STARTTLS", reply[("encrypt", "plain")])
        self.assertIn("host mx.plain.test[127.0.0.2] did not offer STARTTLS", reply[("verify", "plain")])
        self.assertIn("the certificate of mx.other.test is not valid for that name (it names: other.example)",
                      reply[("verify", "other")])
        self.assertIn("the certificate of mx.untrusted.test is not trusted (", reply[("verify", "untrusted")])
        # the metric, as a scrape shows it
        m = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for fam in text_string_to_metric_families(self.relay.service.metrics.render().decode())
             for s in fam.samples if s.name == "relay_tls_policy_failures_total"}
        count = {dict(k[1])["reason"]: v for k, v in m.items()}
        self.assertEqual(count, {"starttls_not_offered": 2, "certificate_name": 1, "certificate_untrusted": 1,
                                 "starttls_refused": 0, "handshake": 0, "mx_not_allowed": 0})
        # what `relayctl queue show` prints: the deferral's reason
        m = next(iter(self.relay.service.queue.messages.values()))
        shown = view.format_details(view.details(m.env, m.state, m.size, "deferred", b""))
        self.assertIn("the certificate of mx.other.test is not valid for that name (it names: other.example)", shown)


class Refused(TLSPolicyCase):
    async def test_starttls_refused_or_failing_under_a_required_policy(self):
        """No plaintext retry under a required policy ("may" still retries)."""
        self.zone.mx("plain.encrypt.test", 10, "mx.plain.test").mx("plain.may.test", 10, "mx.plain.test")
        self.sinks["plain"].b.starttls = "454"
        await self.send(["a@plain.encrypt.test"])
        await apoll(lambda: self.outcome("a@plain.encrypt.test"), timeout=30, what="a deferral")
        self.assertIn("(table entry \".encrypt.test\": encrypt): host mx.plain.test[127.0.0.2] refused to start "
                      "TLS: 454", self.outcome("a@plain.encrypt.test").reply)
        self.sinks["plain"].b.starttls = "fail"
        self.zone.mx("plain.verify.test", 10, "mx.plain.test")
        await self.send(["b@plain.verify.test", "c@plain.may.test"])
        await apoll(lambda: self.outcome("b@plain.verify.test") and self.delivered("c@plain.may.test"),
                    timeout=30, what="a deferral and a delivery in plaintext after the handshake failed")
        self.assertIn("(table entry \".verify.test\": verify): the TLS handshake with mx.plain.test[127.0.0.2] "
                      "failed", self.outcome("b@plain.verify.test").reply)
        self.assertIsNone(self.delivered("c@plain.may.test")[1].session.tls)
        for r in ("a@plain.encrypt.test", "b@plain.verify.test"):
            self.assertEqual(self.received(r), [], r)
        failures = self.relay.service.deliverer.tls_policy_failures
        self.assertEqual((failures["starttls_refused"], failures["handshake"]), (1, 1))


class Match(TLSPolicyCase):
    def table(self) -> dict:
        return {"named.test": {"level": "verify", "match": ["other.example"], "ca_file": self.ca},
                "wild.test": {"level": "verify", "match": ["*.valid.test"], "ca_file": self.ca},
                "wrong.test": {"level": "verify", "match": ["*.elsewhere.test"], "ca_file": self.ca}}

    async def test_match_names_instead_of_the_mx_name(self):
        self.zone.mx("named.test", 10, "mx.other.test").mx("wild.test", 10, "mx.valid.test")
        self.zone.mx("wrong.test", 10, "mx.valid.test")
        await self.send(["a@named.test", "b@wild.test", "c@wrong.test"])
        await apoll(lambda: self.delivered("a@named.test") and self.delivered("b@wild.test")
                    and self.outcome("c@wrong.test"), timeout=30, what="two delivered, one deferred")
        self.assertIsNotNone(self.delivered("a@named.test")[1].session.tls)
        rec = self.outcome("c@wrong.test")
        self.assertEqual(rec.status, "deferred")
        self.assertIn("is not valid for the names the policy allows (*.elsewhere.test; it names: mx.valid.test)",
                      rec.reply)
        # the handshake completed before the names were checked: nothing was sent after it
        self.assertEqual(self.received("c@wrong.test"), [])


class MtaSts(TLSPolicyCase):
    def table(self) -> dict:
        return {"sts-table.test": "may"}

    async def setUp(self):
        await super().setUp()
        self.sts = FixedSts({
            "sts-ok.test": sts("sts-ok.test", "enforce", "*.valid.test"),
            "sts-bad.test": sts("sts-bad.test", "enforce", "mx.elsewhere.test"),
            "sts-name.test": sts("sts-name.test", "enforce", "mx.other.test"),
            "sts-plain.test": sts("sts-plain.test", "enforce", "mx.plain.test"),
            "sts-testing.test": sts("sts-testing.test", "testing", "mx.elsewhere.test"),
            "sts-testcert.test": sts("sts-testcert.test", "testing", "mx.other.test"),
            "sts-table.test": sts("sts-table.test", "enforce", "mx.elsewhere.test"),
            "sts-none.test": sts("sts-none.test", "none", "mx.elsewhere.test"),
        })
        d = self.relay.service.deliverer
        d.sts = self.sts
        d.trust_root = self.ca  # "verify" against the system CAs, here the test CA
        for domain, kind in (("sts-ok.test", "valid"), ("sts-bad.test", "valid"), ("sts-name.test", "other"),
                             ("sts-plain.test", "plain"), ("sts-testing.test", "plain"), ("sts-testcert.test", "other"),
                             ("sts-table.test", "plain"), ("sts-none.test", "plain")):
            self.zone.mx(domain, 10, f"mx.{kind}.test")

    async def test_enforce_testing_and_precedence(self):
        deliver = ["a@sts-ok.test", "t@sts-testing.test", "x@sts-table.test", "n@sts-none.test",
                   "v@sts-testcert.test"]
        defer = ["b@sts-bad.test", "c@sts-name.test", "p@sts-plain.test"]
        await self.send(deliver + defer)
        await apoll(lambda: all(self.delivered(r) for r in deliver) and all(self.outcome(r) for r in defer),
                    timeout=30, what="delivered and deferred as the policies say")
        self.assertIsNotNone(self.delivered("a@sts-ok.test")[1].session.tls)
        for r in defer:
            self.assertEqual(self.outcome(r).status, "deferred", r)
            self.assertEqual(self.received(r), [], r)
        self.assertIn("TLS is required by the policy for sts-bad.test (mta-sts enforce): no MX host matches the "
                      "policy's mx patterns (mx.elsewhere.test; MX hosts: mx.valid.test)",
                      self.outcome("b@sts-bad.test").reply)
        self.assertIn("TLS is required by the policy for sts-name.test (mta-sts enforce): the certificate of "
                      "mx.other.test is not valid for that name (it names: other.example)",
                      self.outcome("c@sts-name.test").reply)
        self.assertIn("(mta-sts enforce): host mx.plain.test[127.0.0.2] did not offer STARTTLS",
                      self.outcome("p@sts-plain.test").reply)
        # testing: delivered as without the policy (in clear here), the failures reported
        self.assertIsNone(self.delivered("t@sts-testing.test")[1].session.tls)
        testing = [(h, f) for d, h, f in self.sts.reports if d == "sts-testing.test"]
        self.assertIn(("mx.plain.test", "MX host mx.plain.test does not match the policy's mx patterns "
                       "(mx.elsewhere.test)"), testing)
        self.assertIn(("mx.plain.test", "host mx.plain.test[127.0.0.2] did not offer STARTTLS"), testing)
        self.assertIsNotNone(self.delivered("v@sts-testcert.test")[1].session.tls)
        self.assertIn(("sts-testcert.test", "mx.other.test", "the certificate of mx.other.test is not valid for that "
                       "name (it names: other.example)"), self.sts.reports)
        # enforce failures are reported too; a table entry and mode "none": no report
        reported = {d for d, _h, _f in self.sts.reports}
        self.assertTrue({"sts-bad.test", "sts-name.test", "sts-plain.test"} <= reported)
        self.assertFalse({"sts-table.test", "sts-none.test", "sts-ok.test"} & reported)
        failures = self.relay.service.deliverer.tls_policy_failures
        self.assertEqual((failures["mx_not_allowed"], failures["certificate_name"],
                          failures["starttls_not_offered"]), (1, 1, 1))
