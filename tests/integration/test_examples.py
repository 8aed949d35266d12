"""The configurations in etc/examples, tried for real (README's copy-paste setups).

Each example file is loaded as a user would copy it, then adapted only where
a test must: paths under a temporary directory, ports and interfaces moved
to free loopback ones, test certificates (trustme) instead of the real ones,
a test DNS server, and the next hops replaced by test SMTP servers.  Then
the example's purpose is exercised: relaying from the LAN, submission with
AUTH, backup MX hand-over, a verified TLS smarthost with AUTH, POP3 reading.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import smtplib
import ssl
import tempfile
import tomllib

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.dns import DNSServer, Zone
from tests.support.relay import ROOT, InProcessRelay, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll

EXAMPLES = os.path.join(ROOT, "etc", "examples")


def load_example(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name), "rb") as f:
        return tomllib.load(f)


class ExampleCase(unittest.TestCase):
    example = ""

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-example-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.certs = cert_files("localhost", "127.0.0.1", "mail.example.org", "smtp.isp.example")
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        self.ports: dict[int, int] = {}
        self.data = self.adapt(load_example(self.example))

    def port(self, n: int) -> int:
        if n not in self.ports:
            self.ports[n] = free_port(("127.0.0.1",))
        return self.ports[n]

    def path(self, p: str) -> str:
        if p.startswith(("/var/", "/etc/")):
            out = os.path.join(self.tmp, p.strip("/").replace("/", "_"))
            if p.endswith(".pem"):
                return self.certs.cert_pem if "fullchain" in p else self.certs.key_pem
            return out
        return p

    def endpoint(self, desc: str) -> str:
        kind, _, rest = desc.partition(":")
        parts = rest.split(":")
        port = self.port(int(parts[0]))
        return f"{kind}:{port}:interface=127.0.0.1"

    def adapt(self, d: dict) -> dict:
        d["spool"] = self.path(d.get("spool", "spool"))
        for sect, keys in (("smtp", ("listen", "submission")), ("pop3", ("listen",))):
            for k in keys:
                if k in d.get(sect, {}):
                    # two LAN interfaces on one port become one loopback listener
                    d[sect][k] = list(dict.fromkeys(self.endpoint(e) for e in d[sect][k]))
        for k in ("certificate", "key"):
            if k in d.get("tls", {}):
                d["tls"][k] = self.path(d["tls"][k])
        for k in ("mailboxes", "users", "aliases"):
            if k in d.get("local", {}):
                d["local"][k] = self.path(d["local"][k])
        for k in ("smarthost_password_file",):
            if k in d.get("relay", {}):
                d["relay"][k] = self.path(d["relay"][k])
        d.setdefault("local", {}).setdefault("mailboxes", os.path.join(self.tmp, "mail"))
        d["local"].setdefault("users", os.path.join(self.tmp, "users"))
        d.setdefault("delivery", {}).update({"nameservers": [f"127.0.0.1:{self.dns.port}"],
                                             "retry_min": 1, "retry_max": 1})
        return d

    async def start(self):
        self.relay = InProcessRelay(self.tmp, {}, reactor=None)
        self.relay.data = self.data
        from relay import config as configmod
        self.relay.config = configmod.load(None, data=self.data)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def smtp_port(self, key: str, i: int = 0) -> int:
        return int(self.data["smtp"][key][i].split(":")[1])

    def ctx(self):
        return ssl.create_default_context(cafile=self.certs.ca_pem)


class LanSmarthost(ExampleCase):
    example = "lan-smarthost.toml"

    async def test_lan_relay_submission_and_pop3(self):
        usersmod.add_user(self.data["local"]["users"], "alice@example.org", "alice-pw")
        with open(self.data["local"]["aliases"], "w") as f:
            f.write("postmaster: alice\n")
        mx_port = free_port(("127.0.0.5",))
        self.data["delivery"]["port"] = mx_port
        sink = Sink("127.0.0.5", port=mx_port).start()
        self.addCleanup(sink.stop)
        self.zone.mx("far.example", 10, "mx.far.example").a("mx.far.example", "127.0.0.5")
        await self.start()
        mx, sub = self.smtp_port("listen"), self.smtp_port("submission")

        def run():
            # a LAN machine (loopback is in relay.networks) relays without AUTH
            with smtplib.SMTP("127.0.0.1", mx) as s:
                s.sendmail("printer@example.org", ["boss@far.example"], b"Subject: scan\r\n\r\nx\r\n")
            # a roaming user: submission, STARTTLS, AUTH, any destination
            with smtplib.SMTP("127.0.0.1", sub) as s:
                s.starttls(context=self.ctx())
                s.login("alice@example.org", "alice-pw")
                s.sendmail("alice@example.org", ["friend@far.example", "postmaster@example.org"],
                           b"Subject: from the road\r\n\r\nhello\r\n")

        await in_thread(run)
        await apoll(lambda: len(sink.transactions) >= 2, what="two messages at the MX")
        self.assertEqual(sorted(r for t in sink.transactions for r in t.rcpts),
                         ["boss@far.example", "friend@far.example"])
        pop_port = int(self.data["pop3"]["listen"][0].split(":")[1])
        box = os.path.join(self.data["local"]["mailboxes"], "example.org", "alice", "new")
        await apoll(lambda: os.path.isdir(box) and os.listdir(box), what="local delivery")

        def pop():
            p = poplib.POP3("127.0.0.1", pop_port)
            p.stls(self.ctx())
            p.user("alice@example.org")
            p.pass_("alice-pw")
            n, _ = p.stat()
            msg = b"\n".join(p.retr(1)[1])
            p.quit()
            return n, msg

        n, msg = await in_thread(pop)
        self.assertEqual(n, 1)
        self.assertIn(b"Subject: from the road", msg)
        self.assertIn(b"with ESMTPSA", msg)


class BackupMX(ExampleCase):
    example = "backup-mx.toml"

    async def test_backup_mx_passes_mail_to_the_primary(self):
        primary = free_port(("127.0.0.6",))
        self.data["delivery"]["port"] = primary
        sink = Sink("127.0.0.6", port=primary).start()
        self.addCleanup(sink.stop)
        self.zone.mx("example.com", 10, "mx1.example.com").a("mx1.example.com", "127.0.0.6")
        self.zone.mx("example.com", 20, "backup.example.net").a("backup.example.net", "127.0.0.1")
        await self.start()
        port = self.smtp_port("listen")

        def run():
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail("someone@internet.example", ["info@example.com"], b"Subject: hi\r\n\r\nx\r\n")

        await in_thread(run)
        await apoll(lambda: sink.transactions, what="the hand-over to the primary")
        self.assertEqual(sink.transactions[0].rcpts, ["info@example.com"])


class SendOnlyISP(ExampleCase):
    example = "send-only-isp.toml"

    async def test_verified_tls_smarthost_with_auth(self):
        isp = free_port(("127.0.0.7",))
        sink = Sink("127.0.0.7", port=isp, starttls="ok", cert=self.certs, auth=("PLAIN", "LOGIN"),
                    credentials={"me@isp.example": "isp-pw"}).start()
        self.addCleanup(sink.stop)
        # smtp.isp.example resolves to the test server; its certificate is the test CA's
        self.zone.a("smtp.isp.example", "127.0.0.7")
        host, _, _ = self.data["relay"]["smarthost"].partition(":")
        self.data["relay"]["smarthost"] = f"{host}:{isp}"
        self.data["relay"]["smarthost_ca_file"] = self.certs.ca_pem
        with open(self.data["relay"]["smarthost_password_file"], "w") as f:
            f.write("isp-pw\n")
        await self.start()
        port = self.smtp_port("listen")

        def run():
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail("me@home.example", ["anyone@far.example"], b"Subject: out\r\n\r\nx\r\n")

        await in_thread(run)
        await apoll(lambda: sink.transactions, what="delivery through the ISP")
        t = sink.transactions[0]
        self.assertEqual(t.session.auth_user, "me@isp.example")
        self.assertIsNotNone(t.session.tls)


class ReceivePOP3(ExampleCase):
    example = "receive-pop3.toml"

    async def test_receive_for_the_domain_and_read_over_pop3s(self):
        usersmod.add_user(self.data["local"]["users"], "bob@example.org", "bob-pw")
        await self.start()
        port = self.smtp_port("listen")
        pop3s = [d for d in self.data["pop3"]["listen"] if d.startswith("ssl:")][0]
        pop3s_port = int(pop3s.split(":")[1])

        def run():
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.sendmail("a@internet.example", ["bob@example.org"], b"Subject: for bob\r\n\r\n.dot\r\n")
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.ehlo("x")
                s.mail("a@internet.example")
                return s.rcpt("nobody@example.org")

        code, _ = await in_thread(run)
        self.assertEqual(code, 550)
        box = os.path.join(self.data["local"]["mailboxes"], "example.org", "bob", "new")
        await apoll(lambda: os.path.isdir(box) and os.listdir(box), what="delivery to bob")

        def pop():
            p = poplib.POP3_SSL("127.0.0.1", pop3s_port, context=self.ctx())
            p.user("bob@example.org")
            p.pass_("bob-pw")
            lines = p.retr(1)[1]
            p.quit()
            return lines

        lines = await in_thread(pop)
        self.assertIn(b"Subject: for bob", lines)
        self.assertIn(b".dot", lines)


def test_examples_are_all_tried():
    tried = {c.example for c in ExampleCase.__subclasses__()}
    assert tried == {n for n in os.listdir(EXAMPLES) if n.endswith(".toml")}
    for n in tried:
        text = open(os.path.join(EXAMPLES, n)).read()
        assert re.search(r"^hostname = ", text, re.M)
