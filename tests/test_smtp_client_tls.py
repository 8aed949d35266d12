"""Outbound STARTTLS (none/may/encrypt/verify), AUTH, response injection.

Real TLS over loopback with trustme certificates (tests/support/certs.py);
the sink is a real STARTTLS server.
"""

from __future__ import annotations

from twisted.internet import ssl

from relay.delivery.mx import Hop
from tests.support.certs import cert_files
from tests.test_smtp_client import ClientCase


def load_ca(path: str) -> ssl.Certificate:
    with open(path, "rb") as f:
        return ssl.Certificate.loadPEM(f.read())


def mx_cert():
    return cert_files("mx.test")


class StartTLSMayTests(ClientCase):
    async def test_may_uses_tls_when_offered(self):
        s = self.sink(starttls="ok", cert=mx_cert())
        rep = await self.deliver([self.hop(s)], tls_mode="may")
        self.assertDelivered(rep, "rcpt@dest.test")
        sess = s.sessions[0]
        self.assertEqual(sess.commands[:3], ["EHLO relay.test", "STARTTLS", "EHLO relay.test"])
        self.assertIsNotNone(sess.tls)
        self.assertIn(rep.tls["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(rep.tls["cipher"])
        # Not verified against the system CAs (the test CA is not one), but
        # delivered: "may" does not verify, it only logs the outcome.
        self.assertFalse(rep.tls["trusted"])
        self.assertFalse(rep.tls["verified"])
        self.assertEqual(rep.tls["hostname"], "mx.test")

    async def test_large_message_over_tls(self):
        # The producer streams through the TLS layer with back-pressure, and
        # dot-stuffing is the same inside TLS.
        s = self.sink(starttls="ok", cert=mx_cert())
        body = b"Subject: big\r\n\r\n" + (b".dotted line " + b"x" * 60 + b"\r\n") * 40000  # ~3 MB
        rep = await self.deliver([self.hop(s)], tls_mode="may", message=body)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.transactions[0].data, body)
        self.assertIsNotNone(s.transactions[0].session.tls)

    async def test_may_reports_verified_when_it_would_verify(self):
        s = self.sink(starttls="ok", cert=mx_cert())
        rep = await self.deliver([self.hop(s)], tls_mode="may", trust_root=mx_cert().ca_pem)
        self.assertTrue(rep.tls["trusted"])
        self.assertTrue(rep.tls["verified"])
        rep = await self.deliver([self.hop(s, host="other.test")], tls_mode="may", trust_root=mx_cert().ca_pem)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertTrue(rep.tls["trusted"])
        self.assertFalse(rep.tls["verified"])
        self.assertIn("does not match", rep.tls["problem"])

    async def test_may_without_starttls_offered_is_plaintext(self):
        s = self.sink(starttls=None)
        rep = await self.deliver([self.hop(s)], tls_mode="may")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIsNone(rep.tls)
        self.assertNotIn("STARTTLS", s.sessions[0].commands)

    async def test_may_handshake_failure_falls_back_to_plaintext_on_new_connection(self):
        s = self.sink(starttls="fail")
        rep = await self.deliver([self.hop(s)], tls_mode="may")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(len(s.sessions), 2)
        self.assertIn("STARTTLS", s.sessions[0].commands)
        self.assertNotIn("STARTTLS", s.sessions[1].commands)
        self.assertIsNone(s.sessions[1].tls)
        self.assertIsNone(rep.tls)
        self.assertEqual(len(rep.attempts), 1)
        self.assertIn("handshake failed", rep.attempts[0][1])
        self.assertIn("trying plaintext", rep.attempts[0][1])

    async def test_may_454_continues_in_plaintext(self):
        # Twisted's ESMTPSender aborts here even when TLS is optional.
        s = self.sink(starttls="454")
        rep = await self.deliver([self.hop(s)], tls_mode="may")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(len(s.sessions), 1)
        self.assertEqual(s.sessions[0].commands[:3], ["EHLO relay.test", "STARTTLS", "MAIL FROM:<sender@origin.test>"])
        self.assertIn("refused STARTTLS", rep.attempts[0][1])

    async def test_none_never_starttls(self):
        s = self.sink(starttls="ok", cert=mx_cert())
        rep = await self.deliver([self.hop(s)], tls_mode="none")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertNotIn("STARTTLS", s.sessions[0].commands)


class StartTLSEncryptTests(ClientCase):
    async def test_encrypt_not_offered_defers(self):
        s = self.sink(starttls=None)
        rep = await self.deliver([self.hop(s)], tls_mode="encrypt")
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status), ("deferred", "4.7.4"))
        self.assertIn("TLS is required, but was not offered by host mx.test[127.0.0.2]", res.text)
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))

    async def test_encrypt_handshake_failure_defers_without_plaintext_retry(self):
        s = self.sink(starttls="fail")
        rep = await self.deliver([self.hop(s)], tls_mode="encrypt")
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status), ("deferred", "4.7.5"))
        self.assertEqual(len(s.sessions), 1)

    async def test_encrypt_454_defers(self):
        s = self.sink(starttls="454")
        rep = await self.deliver([self.hop(s)], tls_mode="encrypt")
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "deferred")
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))

    async def test_encrypt_does_not_verify_certificates(self):
        s = self.sink(starttls="ok", cert=cert_files("somewhere-else.test"))
        rep = await self.deliver([self.hop(s)], tls_mode="encrypt")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertFalse(rep.tls["verified"])

    async def test_encrypt_tries_next_mx(self):
        plain = self.sink("127.0.0.2", starttls=None)
        tls = self.sink("127.0.0.3", starttls="ok", cert=mx_cert())
        rep = await self.deliver([self.hop(plain, "mx1.test"), self.hop(tls, "mx2.test", 20)], tls_mode="encrypt")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(rep.hop.host, "mx2.test")
        self.assertEqual(len(rep.attempts), 1)


class StartTLSVerifyTests(ClientCase):
    async def test_verify_trusted_certificate(self):
        certs = cert_files("smart.test")
        s = self.sink(starttls="ok", cert=certs)
        rep = await self.deliver([Hop("smart.test", s.interface, s.port)], tls_mode="verify", trust_root=certs.ca_pem)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertTrue(rep.tls["verified"])

    async def test_verify_with_twisted_certificate_trust_root(self):
        certs = cert_files("smart.test")
        root = load_ca(certs.ca_pem)
        s = self.sink(starttls="ok", cert=certs)
        rep = await self.deliver(
            [Hop("127.0.0.2", s.interface, s.port)], tls_mode="verify", tls_hostname="smart.test", trust_root=root
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(rep.tls["hostname"], "smart.test")

    async def test_verify_wrong_host_name_defers(self):
        certs = cert_files("not-the-smarthost.test")
        s = self.sink(starttls="ok", cert=certs)
        rep = await self.deliver([Hop("smart.test", s.interface, s.port)], tls_mode="verify", trust_root=certs.ca_pem)
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status), ("deferred", "4.7.5"))
        self.assertIn("does not match host name smart.test", res.text)
        self.assertEqual(len(s.sessions), 1)
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))

    async def test_verify_untrusted_chain_defers(self):
        s = self.sink(starttls="ok", cert=cert_files("smart.test"))
        rep = await self.deliver([Hop("smart.test", s.interface, s.port)], tls_mode="verify")  # system CAs
        res = rep.results["rcpt@dest.test"]
        self.assertEqual(res.kind, "deferred")
        self.assertIn("not verified", res.text)
        self.assertIn("issuer", res.text)

    async def test_verify_ip_address_name(self):
        certs = cert_files("127.0.0.2")
        s = self.sink(starttls="ok", cert=certs)
        rep = await self.deliver([Hop("127.0.0.2", s.interface, s.port)], tls_mode="verify", trust_root=certs.ca_pem)
        self.assertDelivered(rep, "rcpt@dest.test")

    async def test_verify_not_offered_defers(self):
        s = self.sink(starttls=None)
        rep = await self.deliver([Hop("smart.test", s.interface, s.port)], tls_mode="verify")
        self.assertEqual(rep.results["rcpt@dest.test"].status, "4.7.4")


class ResponseInjectionTests(ClientCase):
    async def test_reply_injected_after_starttls_is_discarded(self):
        # If believed, the injected 554 would answer our EHLO after TLS and we
        # would fall back to HELO; the rest would be out of step.
        s = self.sink(starttls="ok", cert=mx_cert(), inject_after_starttls=b"554 5.7.1 injected\r\n250 2.1.0 Ok\r\n")
        rep = await self.deliver([self.hop(s)], tls_mode="may")
        self.assertDelivered(rep, "rcpt@dest.test")
        for sess in s.sessions:
            self.assertNotIn("HELO relay.test", sess.commands)
        self.assertIsNotNone(rep.tls)
        self.assertGreater(rep.tls["discarded"], 0)
        self.assertEqual(s.sessions[0].commands[2], "EHLO relay.test")
        self.assertTrue(s.sessions[0].esmtp)


class AuthTests(ClientCase):
    def smarthost(self, address="127.0.0.2", **kw):
        kw.setdefault("starttls", "ok")
        kw.setdefault("cert", cert_files("smart.test"))
        kw.setdefault("auth", ("PLAIN", "LOGIN"))
        kw.setdefault("credentials", {"relay": "s3cret p\u00e4ss"})
        return self.sink(address, **kw)

    def smart_hop(self, s, host="smart.test"):
        return Hop(host, s.interface, s.port)

    async def test_auth_plain_over_tls(self):
        s = self.smarthost()
        rep = await self.deliver(
            [self.smart_hop(s)],
            tls_mode="verify",
            trust_root=cert_files("smart.test").ca_pem,
            auth=("relay", "s3cret p\u00e4ss"),
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.sessions[0].auth_user, "relay")
        self.assertEqual(s.sessions[0].auth_attempts, [("PLAIN", True)])

    async def test_auth_login_over_tls(self):
        s = self.smarthost(auth=("LOGIN",))
        rep = await self.deliver([self.smart_hop(s)], tls_mode="encrypt", auth=("relay", "s3cret p\u00e4ss"))
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.sessions[0].auth_attempts, [("LOGIN", True)])
        self.assertEqual(s.sessions[0].auth_user, "relay")

    async def test_auth_failure_defers_with_reply(self):
        s = self.smarthost()
        rep = await self.deliver([self.smart_hop(s)], tls_mode="encrypt", auth=("relay", "wrong"))
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.status, res.code), ("deferred", "4.7.8", 535))
        self.assertIn("535 5.7.8", res.text)
        self.assertIn("SASL authentication failed", res.text)
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))

    async def test_auth_failure_tries_next_address(self):
        bad = self.smarthost("127.0.0.2", credentials={})
        good = self.smarthost("127.0.0.3")
        rep = await self.deliver(
            [self.smart_hop(bad), self.smart_hop(good)], tls_mode="encrypt", auth=("relay", "s3cret p\u00e4ss")
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(rep.hop.address, "127.0.0.3")

    async def test_auth_never_over_plaintext(self):
        # The server offers AUTH without TLS; we must not send credentials.
        s = self.smarthost(starttls=None, auth_requires_tls=False)
        for mode in ("none", "may"):
            rep = await self.deliver([self.smart_hop(s)], tls_mode=mode, auth=("relay", "s3cret p\u00e4ss"))
            res = rep.results["rcpt@dest.test"]
            self.assertEqual((res.kind, res.status), ("deferred", "4.7.0"))
            self.assertIn("plaintext", res.text)
        for sess in s.sessions:
            self.assertEqual(sess.auth_attempts, [])
            self.assertFalse(any(c.startswith(("AUTH", "MAIL")) for c in sess.commands))
        self.assertNotIn(b"s3cret", b"".join(bytes(x.wire) for x in s.sessions))

    async def test_auth_not_sent_after_tls_fallback(self):
        # "may" + failed handshake: the plaintext retry must not carry AUTH.
        s = self.smarthost(starttls="fail", auth_requires_tls=False)
        rep = await self.deliver([self.smart_hop(s)], tls_mode="may", auth=("relay", "s3cret p\u00e4ss"))
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "deferred")
        self.assertEqual(len(s.sessions), 2)
        for sess in s.sessions:
            self.assertEqual(sess.auth_attempts, [])

    async def test_no_auth_offered_sends_without(self):
        s = self.smarthost(auth=())
        rep = await self.deliver([self.smart_hop(s)], tls_mode="encrypt", auth=("relay", "x"))
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIsNone(s.sessions[0].auth_user)

    async def test_unsupported_mechanism(self):
        s = self.smarthost(auth=("CRAM-MD5",))
        rep = await self.deliver([self.smart_hop(s)], tls_mode="encrypt", auth=("relay", "x"))
        self.assertIn("no supported mechanism", rep.results["rcpt@dest.test"].text)
