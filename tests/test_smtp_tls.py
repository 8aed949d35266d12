"""SMTP server: STARTTLS, implicit TLS, AUTH, submission, sender restriction (issue 5).

Real TLS over real sockets with certificates made by trustme.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import socket
import ssl
import tempfile

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, in_thread
from tests.support.smtpclient import RawSMTP


def plain(user: str, pw: str) -> str:
    return base64.b64encode(f"\0{user}\0{pw}".encode()).decode()


class TLSRelayCase(unittest.TestCase):
    extra: dict = {}
    networks = ["10.99.0.0/16"]  # loopback clients are NOT trusted here

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-tls-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.certs = cert_files("localhost", "127.0.0.1")
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice-pw")
        usersmod.add_user(os.path.join(self.tmp, "users"), "bob@local.test", "bob-pw")
        over = {
            "tls": {"certificate": self.certs.cert_pem, "key": self.certs.key_pem},
            "relay": {"networks": self.networks},
            "smtp": {
                "listen": ["tcp:0:interface=127.0.0.1"],
                "submission": ["tcp:0:interface=127.0.0.1", "ssl:0:interface=127.0.0.1"],
            },
        }
        for k, v in self.extra.items():
            over.setdefault(k, {}).update(v)
        self.relay = InProcessRelay(self.tmp, over, deliver=False)
        await self.relay.start()
        self.addCleanup(self.stop_relay)
        ports = self.relay.ports
        self.mx = ports[f"smtp {over['smtp']['listen'][0]}"]
        self.sub = ports[f"submission {over['smtp']['submission'][0]}"]
        self.smtps = ports[f"submission {over['smtp']['submission'][1]}"]

    async def stop_relay(self):
        # a cleanup, not tearDown: trial (26.10) runs cleanups before tearDown,
        # and the relay must stop before its directory is removed
        await self.relay.stop()

    def ctx(self):
        return ssl.create_default_context(cafile=self.certs.ca_pem)


class STARTTLS(TLSRelayCase):
    async def test_starttls_resets_session_and_hides_starttls(self):
        def run():
            c = RawSMTP(*self.mx)
            c.reply()
            e1 = c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            r = c.cmd("STARTTLS")
            c.starttls(self.certs.ca_pem)
            after_mail = c.cmd("MAIL FROM:<a@b.example>")  # no EHLO yet: must be refused
            e2 = c.cmd("EHLO x")
            rc = c.cmd("RCPT TO:<alice@local.test>")  # sender from before TLS is forgotten
            m = c.cmd("MAIL FROM:<a@b.example>")
            c.close()
            return e1, r, after_mail, e2, rc, m

        e1, r, after_mail, e2, rc, m = await in_thread(run)
        self.assertIn("STARTTLS", e1.lines)
        self.assertNotIn("AUTH PLAIN LOGIN", e1.lines)  # auth_requires_tls: not before TLS
        self.assertEqual(r.code, 220)
        self.assertEqual(after_mail.code, 503)
        self.assertNotIn("STARTTLS", e2.lines)
        self.assertIn("AUTH PLAIN LOGIN", e2.lines)
        self.assertEqual(rc.code, 503)
        self.assertEqual(m.code, 250)

    async def test_starttls_command_injection_discarded(self):
        def run():
            s = socket.create_connection(self.mx)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x\r\n")
            while True:
                line = f.readline()
                if line[3:4] == b" ":
                    break
            # STARTTLS and a command in one write: the MAIL must never run
            s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
            line = f.readline()
            assert line.startswith(b"220"), line
            tls = self.ctx().wrap_socket(s, server_hostname="localhost")
            tls.sendall(b"EHLO x\r\n")
            buf = b""
            while not buf.endswith(b"250 HELP\r\n"):
                buf += tls.recv(4096)
            tls.sendall(b"RCPT TO:<alice@local.test>\r\n")
            r = tls.recv(4096)
            tls.close()
            return buf, r

        ehlo, r = await in_thread(run)
        self.assertTrue(ehlo.startswith(b"250-relay.test"), ehlo)  # no reply to the injected MAIL
        self.assertTrue(r.startswith(b"503"), r)  # no sender carried into TLS

    async def test_received_records_tls_and_esmtps(self):
        def run():
            with smtplib.SMTP(*self.mx) as s:
                s.starttls(context=self.ctx())
                s.ehlo("client.example")
                s.sendmail("a@b.example", ["alice@local.test"], b"Subject: tls\r\n\r\nbody\r\n")

        await in_thread(run)
        qid = self.relay.service.spool.queue_ids()[0]
        with open(self.relay.service.spool.message_path(qid), "rb") as f:
            f.readline()
            data = f.read()
        hdr = data.split(b"\r\n\r\n")[0]
        self.assertIn(b"with ESMTPS id " + qid.encode(), hdr)
        self.assertRegex(hdr, rb"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+ bits\)\)")


class SubmissionAuth(TLSRelayCase):
    async def test_mail_before_auth_530(self):
        def run():
            with smtplib.SMTP(*self.sub) as s:
                s.starttls(context=self.ctx())
                s.ehlo("x")
                return s.mail("alice@local.test")

        code, msg = await in_thread(run)
        self.assertEqual(code, 530)
        self.assertTrue(msg.startswith(b"5.7.0"))

    async def test_auth_plain_then_relay_anywhere(self):
        def run():
            with smtplib.SMTP(*self.sub) as s:
                s.starttls(context=self.ctx())
                s.login("alice@local.test", "alice-pw")
                return s.sendmail("alice@local.test", ["someone@far.example"], b"Subject: x\r\n\r\nhi\r\n")

        self.assertEqual(await in_thread(run), {})
        qid = self.relay.service.spool.queue_ids()[0]
        env, _, _ = self.relay.service.spool.read_envelope(qid)
        self.assertEqual(env.recipients, ["someone@far.example"])
        self.assertEqual(env.client["auth"], "alice@local.test")
        with open(self.relay.service.spool.message_path(qid), "rb") as f:
            f.readline()
            hdr = f.read().split(b"\r\n\r\n")[0]
        self.assertIn(b"with ESMTPSA id", hdr)
        self.assertNotIn(b"alice-pw", hdr)

    async def test_auth_login_implicit_tls(self):
        def run():
            with smtplib.SMTP_SSL(*self.smtps, context=self.ctx()) as s:
                s.ehlo("x")
                assert "STARTTLS" not in s.esmtp_features and "starttls" not in s.esmtp_features
                s.user, s.password = "bob@local.test", "bob-pw"
                code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                return code, s.sendmail("bob@local.test", ["x@far.example"], b"Subject: y\r\n\r\n.\r\n")

        code, res = await in_thread(run)
        self.assertEqual(code, 235)
        self.assertEqual(res, {})

    async def test_implicit_tls_submission_is_private(self):
        # smtp.submission_hide_client_session (on by default): no HELO, no IP in the Received header
        def run():
            with smtplib.SMTP_SSL(*self.smtps, context=self.ctx()) as s:
                s.ehlo("secret-laptop.home")
                s.login("bob@local.test", "bob-pw")
                return s.sendmail("bob@local.test", ["x@far.example"], b"Subject: y\r\n\r\nhi\r\n")

        self.assertEqual(await in_thread(run), {})
        qid = self.relay.service.spool.queue_ids()[0]
        env, _, _ = self.relay.service.spool.read_envelope(qid)
        self.assertEqual((env.client["ip"], env.client["helo"]), ("127.0.0.1", "secret-laptop.home"))
        with open(self.relay.service.spool.message_path(qid), "rb") as f:
            f.readline()
            hdr = f.read().split(b"\r\n\r\n")[0]
        self.assertTrue(hdr.startswith(b"Received: by relay.test (twisted-relay) with ESMTPSA id " + qid.encode()))
        self.assertRegex(hdr, rb"\(using TLSv1\.[23] with cipher")
        self.assertNotIn(b"secret-laptop", hdr)
        self.assertNotIn(b"127.0.0.1", hdr)

    async def test_wrong_password_535_then_closed(self):
        def run():
            c = RawSMTP(*self.sub)
            c.reply()
            c.cmd("EHLO x")
            c.cmd("STARTTLS")
            c.starttls(self.certs.ca_pem)
            c.cmd("EHLO x")
            rs = [c.cmd("AUTH PLAIN " + plain("alice@local.test", "nope")),
                  c.cmd("AUTH PLAIN " + plain("nobody@local.test", "nope"))]
            c.send(("AUTH PLAIN " + plain("alice@local.test", "x") + "\r\n").encode())
            rs.append(c.reply())
            rs.append(c.reply())
            return rs, c.closed()

        rs, closed = await in_thread(run)
        self.assertEqual([r.code for r in rs], [535, 535, 535, 421])
        self.assertTrue(rs[0].lines[0].startswith("5.7.8"))
        self.assertEqual(rs[0].lines, rs[1].lines)  # unknown user looks the same
        self.assertTrue(closed)

    async def test_auth_plain_authorization_identity_rule(self):
        """relay.common.sasl's rule, the same as POP3's (tests/test_pop3.py): an
        authzid is accepted when empty or the authcid's user modulo case."""
        def login(authz: str) -> int:
            c = RawSMTP(*self.sub)
            c.reply()
            c.cmd("EHLO x")
            c.cmd("STARTTLS")
            c.starttls(self.certs.ca_pem)
            c.cmd("EHLO x")
            resp = base64.b64encode(f"{authz}\0alice@local.test\0alice-pw".encode()).decode()
            r = c.cmd("AUTH PLAIN " + resp)
            c.close()
            return r.code

        def run():
            return {authz: login(authz) for authz in
                    ("", "alice@local.test", "ALICE@Local.TEST", " alice@local.test", "bob@local.test")}

        self.assertEqual(await in_thread(run), {"": 235, "alice@local.test": 235, "ALICE@Local.TEST": 235,
                                                " alice@local.test": 235, "bob@local.test": 535})

    async def test_auth_refused_before_tls(self):
        def run():
            c = RawSMTP(*self.sub)
            c.reply()
            c.cmd("EHLO x")
            r = c.cmd("AUTH PLAIN " + plain("alice@local.test", "alice-pw"))
            c.close()
            return r

        r = await in_thread(run)
        self.assertEqual(r.code, 538)

    async def test_sender_restriction(self):
        def run():
            out = []
            with smtplib.SMTP(*self.sub) as s:
                s.starttls(context=self.ctx())
                s.login("alice@local.test", "alice-pw")
                for sender in ("alice@local.test", "ALICE@local.test", "alias-of-alice@local.test",
                               "bob@local.test", "alice@other.example", ""):
                    out.append(s.mail(sender))
                    s.rset()
            return out

        out = await in_thread(run)
        self.assertEqual([c for c, _ in out], [250, 250, 250, 553, 553, 250])
        self.assertTrue(out[3][1].startswith(b"5.7.1"))

    async def test_unauthenticated_outside_networks_cannot_relay_on_mx_port(self):
        def run():
            with smtplib.SMTP(*self.mx) as s:
                s.ehlo("x")
                s.mail("a@b.example")
                return s.rcpt("someone@far.example")

        code, msg = await in_thread(run)
        self.assertEqual(code, 554)


class AuthWithoutTLSRequirement(TLSRelayCase):
    extra = {"tls": {"auth_requires_tls": False}}

    async def test_auth_offered_in_plaintext(self):
        def run():
            with smtplib.SMTP(*self.sub) as s:
                s.ehlo("x")
                feats = s.esmtp_features.get("auth", "")
                s.login("alice@local.test", "alice-pw")
                return feats, s.sendmail("alice@local.test", ["z@far.example"], b"x\r\n")

        feats, res = await in_thread(run)
        self.assertIn("PLAIN", feats)
        self.assertEqual(res, {})
