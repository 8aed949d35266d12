"""DANE end to end: an in-process relay, the test DNS server as the validating
resolver (AD bit for signed names), sinks with trustme certificates as MX
hosts on 127.0.0.x (RFC 7672)."""

from __future__ import annotations

import os

import trustme
from cryptography import x509

from relay.outbound import dane
from tests.integration.test_delivery import DeliveryCase
from tests.support import certs
from tests.support.certs import CertFiles, cert_files
from tests.support.wait import apoll

DOMAIN = "dane.example"
MX = "mx.dane.example"
IP = "127.0.0.2"


def _leaf(files: CertFiles) -> x509.Certificate:
    with open(files.cert_pem, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())[0]


def _ca_cert() -> x509.Certificate:
    return x509.load_pem_x509_certificate(certs.ca().cert_pem.bytes())


class DaneCase(DeliveryCase):
    overrides = {"delivery": {"tls": "dane"}}

    def owner(self, host: str = MX) -> str:
        return f"_{self.port}._tcp.{host}"

    def mx(self, *, files: CertFiles | None = None, starttls: str | None = "ok", signed: bool = True) -> CertFiles:
        """The MX host on IP; its MX and A records signed unless told not."""
        files = files or cert_files(MX)
        sink = self.sinks[IP]
        sink.b.starttls = starttls
        sink.b.cert = files
        self.zone.mx(DOMAIN, 10, MX).a(MX, IP)
        if signed:
            self.zone.sign(DOMAIN, MX)
        return files

    def tlsa(self, *records: dane.Tlsa, signed: bool = True) -> None:
        for r in records:
            self.zone.tlsa(self.owner(), str(r))
        if signed:
            self.zone.sign(self.owner())

    def with_ca_in_chain(self) -> CertFiles:
        """The leaf followed by the CA certificate (a DANE-TA server must
        send its trust anchor, RFC 7671 section 5.2.2)."""
        files = cert_files(MX)
        path = os.path.join(self.tmp, "chain-with-ca.pem")
        with open(files.cert_pem, "rb") as src, open(path, "wb") as out:
            out.write(src.read())
            out.write(certs.ca().cert_pem.bytes())
        return CertFiles(files.ca_pem, path, files.key_pem, files.names)

    async def delivered(self) -> None:
        await self.send([f"a@{DOMAIN}"])
        await apoll(lambda: self.sinks[IP].transactions, what="delivery")
        await apoll(self.queue_empty, what="empty queue")

    async def deferred(self) -> str:
        """Send one message, wait for its deferral: the reason."""
        await self.send([f"a@{DOMAIN}"])
        q = self.relay.service.queue

        def reason():
            for m in q.messages.values():
                for r in m.state.recipients:
                    if r.status == "deferred":
                        return r.reply
            return None

        text = await apoll(reason, what="a deferral")
        # never sent in clear, never sent at all
        self.assertEqual(self.sinks[IP].transactions, [])
        for s in self.sinks[IP].sessions:
            self.assertFalse(any(c.upper().startswith("MAIL") for c in s.commands), s.commands)
        return text


class Dane(DaneCase):
    async def test_311_matching_delivers_over_tls(self):
        from twisted.logger import formatEvent, globalLogPublisher

        lines: list[str] = []

        def observer(event):
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        files = self.mx()
        rec = dane.record_for(_leaf(files), 3, 1, 1)
        self.tlsa(rec)
        await self.delivered()
        self.assertIsNotNone(self.sinks[IP].transactions[0].session.tls)
        self.assertTrue(any("Verified TLS connection established to mx.dane.example" in x for x in lines), lines)
        want = f"DANE authenticated by the TLSA record {rec.short()} of {self.owner()}"
        self.assertTrue(any(want in x for x in lines), lines)

    async def test_311_not_matching_defers(self):
        self.mx()
        other = trustme.CA().issue_cert(MX)
        self.tlsa(dane.record_for(x509.load_pem_x509_certificate(other.cert_chain_pems[0].bytes()), 3, 1, 1))
        reason = await self.deferred()
        self.assertIn("DANE", reason)
        self.assertIn(f"no TLSA record of {self.owner()} matches the certificate (3 1 1 ", reason)
        self.assertIn(MX, reason)

    async def test_301_and_312_match(self):
        files = self.mx()
        leaf = _leaf(files)
        self.tlsa(dane.record_for(leaf, 3, 0, 1), dane.record_for(leaf, 3, 1, 2))
        await self.delivered()

    async def test_201_ca_as_trust_anchor(self):
        self.mx(files=self.with_ca_in_chain())
        self.tlsa(dane.record_for(_ca_cert(), 2, 0, 1))
        await self.delivered()

    async def test_201_other_ca_defers(self):
        self.mx(files=self.with_ca_in_chain())
        other = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
        self.tlsa(dane.record_for(other, 2, 0, 1))
        reason = await self.deferred()
        self.assertIn("no TLSA record of", reason)

    async def test_201_name_mismatch_defers(self):
        # a certificate from the right CA, for another name: DANE-TA checks names
        wrong = cert_files("other.example")
        path = os.path.join(self.tmp, "wrong-with-ca.pem")
        with open(wrong.cert_pem, "rb") as src, open(path, "wb") as out:
            out.write(src.read() + certs.ca().cert_pem.bytes())
        self.mx(files=CertFiles(wrong.ca_pem, path, wrong.key_pem, wrong.names))
        self.tlsa(dane.record_for(_ca_cert(), 2, 0, 1))
        reason = await self.deferred()
        self.assertIn("does not name mx.dane.example", reason)

    async def test_unsigned_tlsa_ignored_dane_is_may(self):
        self.mx(starttls=None)  # no STARTTLS at all: "may" delivers in plaintext
        other = trustme.CA().issue_cert(MX)
        self.tlsa(dane.record_for(x509.load_pem_x509_certificate(other.cert_chain_pems[0].bytes()), 3, 1, 1),
                  signed=False)
        await self.delivered()
        self.assertIsNone(self.sinks[IP].transactions[0].session.tls)

    async def test_servfail_on_tlsa_defers(self):
        files = self.mx()
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        self.zone.behave(self.owner(), "servfail")
        reason = await self.deferred()
        self.assertIn(f"DANE: TLSA lookup for {self.owner()} failed", reason)
        self.assertEqual(self.sinks[IP].sessions, [])  # not even connected

    async def test_records_but_no_starttls_defers(self):
        files = self.mx(starttls=None)
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        reason = await self.deferred()
        self.assertIn("DANE", reason)
        self.assertIn("TLS is required, but was not offered", reason)

    async def test_handshake_failure_never_retries_in_clear(self):
        files = self.mx(starttls="fail")
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        reason = await self.deferred()
        self.assertIn("DANE", reason)
        self.assertIn("Cannot start TLS", reason)

    async def test_unsigned_mx_no_tlsa_lookup(self):
        # RFC 7672 2.2: an insecure MX RRset: DANE does not apply, "may"
        files = self.mx(starttls=None, signed=False)
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        await self.delivered()
        self.assertEqual(self.zone.count(self.owner(), "TLSA"), 0)

    async def test_unsigned_address_records_no_tlsa_lookup(self):
        files = self.mx(starttls=None)
        self.zone.unsign(MX)
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        await self.delivered()
        self.assertEqual(self.zone.count(self.owner(), "TLSA"), 0)

    async def test_secure_denial_is_may(self):
        self.mx(starttls=None)
        self.zone.sign(self.owner())  # NXDOMAIN, signed
        await self.delivered()


class DaneOnly(DaneCase):
    overrides = {"delivery": {"tls": "dane-only"}}

    async def test_no_records_defers(self):
        self.mx()
        self.zone.sign(self.owner())
        reason = await self.deferred()
        self.assertIn("dane-only", reason)
        self.assertIn(f"{MX} has no usable DNSSEC-validated TLSA records", reason)
        self.assertEqual(self.sinks[IP].sessions, [])

    async def test_unsigned_mx_defers(self):
        files = self.mx(signed=False)
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        reason = await self.deferred()
        self.assertIn("its MX or address records are not DNSSEC-validated", reason)

    async def test_unsigned_records_defer(self):
        files = self.mx()
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1), signed=False)
        reason = await self.deferred()
        self.assertIn("no usable DNSSEC-validated TLSA records", reason)

    async def test_matching_delivers(self):
        files = self.mx()
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        await self.delivered()
        self.assertIsNotNone(self.sinks[IP].transactions[0].session.tls)


class Route(DaneCase):
    async def test_route_shows_tlsa_and_security(self):
        from relay.control import route
        from tests.support.relay import in_thread

        files = self.mx()
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        self.zone.mx("plain.example", 10, "mx.plain.example").a("mx.plain.example", "127.0.0.3")
        self.zone.sign("plain.example", "mx.plain.example", "fail.example", "mx.fail.example")
        self.zone.mx("unsigned.example", 10, "mx.unsigned.example").a("mx.unsigned.example", "127.0.0.5")
        self.zone.tlsa(f"_{self.port}._tcp.mx.plain.example", str(dane.record_for(_leaf(files), 3, 1, 1)))
        self.zone.behave(f"_{self.port}._tcp.mx.fail.example", "servfail")
        self.zone.mx("fail.example", 10, "mx.fail.example").a("mx.fail.example", "127.0.0.4")
        ctx = self.relay.service.route_context()
        for addr, want in ((f"a@{DOMAIN}", f"TLSA {self.owner()}: secure: 3 1 1 "),
                           ("a@plain.example", "insecure (not DNSSEC-validated: ignored): 3 1 1 "),
                           ("a@fail.example", "DANE: TLSA lookup for"),
                           ("a@unsigned.example", "not looked up (the MX or address records are not DNSSEC")):
            r = await in_thread(route.explain, ctx, addr)
            text = route.format_text(r)
            self.assertIn(want, text)


class DaneRoute(DaneCase):
    """relay.routes follow delivery.tls too: the route host's TLSA records
    apply when its address records are DNSSEC-validated."""

    def more_config(self) -> dict:
        return {"delivery": {"tls": "dane-only"},
                "relay": {"routes": {"routed.example": f"{MX}:{self.port}",
                                     "literal.example": f"{IP}:{self.port}"}}}

    async def test_route_host_with_tlsa(self):
        files = self.mx()
        self.tlsa(dane.record_for(_leaf(files), 3, 1, 1))
        await self.send(["a@routed.example"])
        await apoll(lambda: self.sinks[IP].transactions, what="delivery")
        self.assertIsNotNone(self.sinks[IP].transactions[0].session.tls)

    async def test_route_to_an_address_has_no_dane(self):
        self.mx()
        await self.send(["a@literal.example"])
        q = self.relay.service.queue
        await apoll(lambda: any(r.status == "deferred" for m in q.messages.values() for r in m.state.recipients),
                    what="a deferral")
        self.assertEqual(self.sinks[IP].transactions, [])
