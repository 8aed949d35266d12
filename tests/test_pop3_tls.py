"""POP3 and TLS over real sockets: STLS (RFC 2595), its command-injection
rule, implicit TLS (ssl:995-style), and tls.auth_requires_tls."""

from __future__ import annotations

import base64
import poplib
import socket
import ssl

from twisted.trial import unittest

from relay.common.tls import load_server_tls
from tests.support.certs import cert_files
from tests.support.pop3server import (
    ALICE,
    PASSWORDS,
    POP3ServerMixin,
    recv_lines,
    recv_until,
)
from tests.support.wait import apoll

MSG = b"Subject: secret\r\n\r\n.hidden line\r\nbody\r\n"


def tls_options():
    files = cert_files("localhost", "127.0.0.1")
    return load_server_tls(files.cert_pem, files.key_pem).options


def client_ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert_files("localhost", "127.0.0.1").ca_pem)


def err(e: Exception) -> bytes:
    return e.args[0]


class STLSBase(POP3ServerMixin, unittest.TestCase):
    def setUp(self):
        self.factory_kwargs = {"tls_options": tls_options(), "login_failure_delay": 0.01}
        super().setUp()


class STLSTests(STLSBase):
    async def test_plaintext_logins_refused_naming_stls(self):
        def client():
            c = self.pop()
            capa = c.capa()
            out = [capa]
            for cmd in (f"USER {ALICE}", f"PASS {PASSWORDS[ALICE]}",
                        "AUTH PLAIN " + base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode(),
                        "AUTH PLAIN", "AUTH"):
                try:
                    c._shortcmd(cmd)
                    out.append(b"accepted")
                except poplib.error_proto as e:
                    out.append(err(e))
            c.quit()
            return out

        out = await self.run_client(client)
        self.assertIn("STLS", out[0])
        self.assertNotIn("USER", out[0])
        self.assertNotIn("SASL", out[0])
        for reply in out[1:]:
            self.assertEqual(reply, b"-ERR [AUTH] Plaintext authentication disallowed on "
                                    b"non-secure connections; use STLS first")
        self.assertEqual(self.factory.logged_in, 0)

    async def test_stls_then_login(self):
        self.deliver(MSG)

        def client():
            c = self.pop()
            r = c.stls(client_ctx())
            capa = c.capa()
            c.user(ALICE)
            c.pass_(PASSWORDS[ALICE])
            lines = c.retr(1)[1]
            try:
                c._shortcmd("STLS")
                again = b"accepted"
            except poplib.error_proto as e:
                again = err(e)
            cipher = c.sock.version()
            c.quit()
            return r, capa, lines, again, cipher

        r, capa, lines, again, version = await self.run_client(client)
        self.assertEqual(r, b"+OK Begin TLS negotiation")
        self.assertNotIn("STLS", capa)
        self.assertEqual(capa["SASL"], ["PLAIN"])
        self.assertIn("USER", capa)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MSG)
        self.assertTrue(again.startswith(b"-ERR STLS is not valid in the TRANSACTION state"))
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    async def test_large_message_and_pipelining_inside_tls(self):
        big = b"Subject: big\r\n\r\n" + b"".join(b".%06d " % i + b"z" * 70 + b"\r\n" for i in range(40_000))
        self.deliver(big)
        self.deliver(MSG)

        def client():
            c = self.pop()
            c.stls(client_ctx())
            c.user(ALICE)
            c.pass_(PASSWORDS[ALICE])
            got = b"\r\n".join(c.retr(1)[1]) + b"\r\n"
            c.sock.sendall(b"RETR 2\r\nNOOP\r\n")  # pipelined inside TLS
            first = c._getlongresp()
            second = c._getresp()
            c.quit()
            return got, first, second

        got, first, second = await self.run_client(client)
        self.assertEqual(got, big)
        self.assertEqual(b"\r\n".join(first[1]) + b"\r\n", MSG)
        self.assertEqual(second, b"+OK")

    async def test_stls_twice_refused(self):
        def client():
            c = self.pop()
            c.stls(client_ctx())
            try:
                c._shortcmd("STLS")
                r = b"accepted"
            except poplib.error_proto as e:
                r = err(e)
            c.quit()
            return r

        self.assertEqual(await self.run_client(client), b"-ERR TLS is already active")

    async def test_stls_command_injection_is_discarded(self):
        """STLS and a following command in one write: the command is thrown
        away, not executed inside TLS (CVE-2011-0411 class)."""
        s = self.raw()

        def client():
            s.recv(200)
            s.sendall(b"STLS\r\nUSER " + ALICE.encode() + b"\r\nCAPA\r\n")
            first = recv_lines(s, 1)
            tls = client_ctx().wrap_socket(s, server_hostname="127.0.0.1")
            tls.sendall(b"PASS " + PASSWORDS[ALICE].encode() + b"\r\nNOOP\r\n")
            replies = recv_lines(tls, 2)
            tls.sendall(b"QUIT\r\n")
            rest = recv_until(tls, b"Bye\r\n")
            tls.close()
            return first, replies, rest

        first, replies, rest = await self.run_client(client)
        self.assertEqual(first, [b"+OK Begin TLS negotiation"])
        # USER was not run: PASS finds no user; no CAPA listing appeared
        self.assertEqual(replies, [b"-ERR Send USER first", b"+OK"])
        self.assertEqual(rest, b"+OK Bye\r\n")
        self.assertEqual(self.factory.logged_in, 0)

    async def test_garbage_instead_of_handshake(self):
        s = self.raw()

        def client():
            s.recv(200)
            s.sendall(b"STLS\r\n")
            first = recv_lines(s, 1)
            s.sendall(b"USER alice@example.org\r\n" * 10)
            return first, recv_until(s, b"NEVER")

        first, after = await self.run_client(client)
        self.assertEqual(first, [b"+OK Begin TLS negotiation"])
        # plaintext where the handshake should be: no command of it is run or
        # answered in the clear (at most a TLS alert), and the connection closes
        self.assertNotIn(b"+OK", after)
        self.assertNotIn(b"-ERR", after)
        self.assertFalse(after[:1].isalpha(), after[:60])
        await apoll(lambda: self.factory.open_sessions == 0)
        self.assertEqual(self.factory.logged_in, 0)

    async def test_certificate_removed_at_runtime(self):
        """Settings are read per use: without tls_options, no STLS and
        plaintext logins (what a reload to a config without TLS does)."""
        self.factory.tls_options = None

        def client():
            c = self.pop()
            capa = c.capa()
            c.user(ALICE)
            r = c.pass_(PASSWORDS[ALICE])
            c.quit()
            return capa, r

        capa, r = await self.run_client(client)
        self.assertNotIn("STLS", capa)
        self.assertTrue(r.startswith(b"+OK Logged in"))


class OptionalTLSTests(STLSBase):
    def setUp(self):
        super().setUp()
        self.factory.auth_requires_tls = False

    async def test_plaintext_login_allowed_and_stls_offered(self):
        def client():
            c = self.pop()
            capa = c.capa()
            c.user(ALICE)
            r = c.pass_(PASSWORDS[ALICE])
            c.quit()
            return capa, r

        capa, r = await self.run_client(client)
        self.assertIn("STLS", capa)
        self.assertIn("USER", capa)
        self.assertTrue(r.startswith(b"+OK Logged in"))


class ImplicitTLSTests(POP3ServerMixin, unittest.TestCase):
    def setUp(self):
        opts = tls_options()
        self.listen_tls = opts
        self.factory_kwargs = {"tls_options": opts}
        super().setUp()

    async def test_login_over_implicit_tls(self):
        self.deliver(MSG)
        big = b"Subject: big\r\n\r\n" + b"w" * 78 * 30_000 + b"\r\n"  # one 2 MB line: streamed
        self.deliver(big)

        def client():
            c = poplib.POP3_SSL("127.0.0.1", self.portno, context=client_ctx(), timeout=10)
            poplib._MAXLINE = 1 << 22
            capa = c.capa()
            c.user(ALICE)
            c.pass_(PASSWORDS[ALICE])
            lines = c.retr(1)[1]
            big_lines = c.retr(2)[1]
            c.quit()
            return capa, lines, big_lines

        maxline = poplib._MAXLINE
        self.addCleanup(setattr, poplib, "_MAXLINE", maxline)
        capa, lines, big_lines = await self.run_client(client)
        self.assertNotIn("STLS", capa)
        self.assertIn("USER", capa)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MSG)
        self.assertEqual(b"\r\n".join(big_lines) + b"\r\n", big)

    async def test_plaintext_client_on_tls_port_gets_nothing(self):
        def client():
            s = socket.create_connection(("127.0.0.1", self.portno), timeout=10)
            s.sendall(b"USER alice@example.org\r\n")
            data = recv_until(s, b"NEVER")
            s.close()
            return data

        data = await self.run_client(client)
        self.assertNotIn(b"+OK", data)
        await apoll(lambda: self.factory.open_sessions == 0)
