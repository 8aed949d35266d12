"""A real third-party POP3 client, mpop (Debian package "mpop"), fetches mail
from our server end to end: STLS with a trustme certificate, AUTH PLAIN and
USER/PASS, pipelining, "leave mail on server" by UIDL, then deletion.

Skipped, saying why, when mpop is not installed (.ci/run installs it with
`apt-get install -y mpop`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import ClassVar

from twisted.trial import unittest

from relay.common.tls import load_server_tls
from tests.support.certs import cert_files
from tests.support.pop3server import ALICE, PASSWORDS, POP3ServerMixin
from tests.support.wait import apoll

MPOP = shutil.which("mpop")

MESSAGES = [
    b"From: carol@example.net\r\nTo: alice@example.org\r\nSubject: one\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n",
    b"Subject: two\r\n\r\n8-bit \xc3\xa9\r\n",
    b"Subject: three\r\n\r\n" + b"long line " * 500 + b"\r\n" + b"x\r\n" * 5000,
]
PREFIX = b"Return-Path: <carol@example.net>\r\nDelivered-To: alice@example.org\r\n"


class MpopTests(POP3ServerMixin, unittest.TestCase):
    factory_kwargs: ClassVar[dict] = {}

    def setUp(self):
        if MPOP is None:
            raise unittest.SkipTest(
                "mpop is not installed: this end-to-end test needs the Debian package 'mpop' "
                "(apt-get install -y mpop)")
        certs = cert_files("localhost", "127.0.0.1")
        self.ca = certs.ca_pem
        self.factory_kwargs = {"tls_options": load_server_tls(certs.cert_pem, certs.key_pem).options}
        super().setUp()
        self.out = os.path.join(self.tmp, "fetched")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.out, sub))

    def mpop(self, *, auth: str, keep: bool) -> subprocess.CompletedProcess:
        conf = os.path.join(self.tmp, "mpoprc")
        with open(conf, "w") as f:
            f.write(
                f"account default\n"
                f"host 127.0.0.1\n"
                f"port {self.portno}\n"
                f"timeout 20\n"
                f"user {ALICE}\n"
                f"password {PASSWORDS[ALICE]}\n"
                f"auth {auth}\n"
                f"tls on\n"
                f"tls_starttls on\n"
                f"tls_trust_file {self.ca}\n"
                f"delivery maildir {self.out}\n"
                f"uidls_file {self.tmp}/uidls\n"
                f"received_header off\n"
                f"keep {'on' if keep else 'off'}\n"
            )
        os.chmod(conf, 0o600)
        return subprocess.run([MPOP, "-C", conf, "--quiet"], capture_output=True, timeout=60, check=False)

    def fetched(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(os.path.join(self.out, "new"))):
            with open(os.path.join(self.out, "new", name), "rb") as f:
                out.append(f.read())
        return out

    async def settle(self):
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0)

    async def test_mpop_fetches_leaves_and_deletes(self):
        for m in MESSAGES:
            self.deliver(m, prefix=PREFIX)

        r = await self.run_client(self.mpop, auth="plain", keep=True)
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        await self.settle()
        got = self.fetched()
        want = sorted((PREFIX + m).replace(b"\r\n", b"\n") for m in MESSAGES)
        self.assertEqual(sorted(got), want)  # byte for byte (Maildir stores LF)
        self.assertEqual(len(self.files(sub="cur")), 3)  # RETR moved them to cur/

        # Again: mpop knows them by UIDL (stable across the new/ -> cur/ move)
        r = await self.run_client(self.mpop, auth="user", keep=True)
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        await self.settle()
        self.assertEqual(len(self.fetched()), 3)

        # One more message; now fetch without keeping: the mailbox empties
        self.deliver(b"Subject: four\r\n\r\nfour\r\n", prefix=PREFIX)
        r = await self.run_client(self.mpop, auth="plain", keep=False)
        self.assertEqual(r.returncode, 0, r.stderr.decode(errors="replace"))
        await self.settle()
        self.assertEqual(len(self.fetched()), 4)
        self.assertEqual(self.files(sub="new") + self.files(sub="cur"), [])

    async def test_mpop_refuses_wrong_password(self):
        self.factory.login_failure_delay = 0.01
        conf_pw = PASSWORDS[ALICE]
        PASSWORDS[ALICE] = "wrong"
        try:
            r = await self.run_client(self.mpop, auth="plain", keep=True)
        finally:
            PASSWORDS[ALICE] = conf_pw
        await self.settle()
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"authentication failed", r.stderr.lower())
