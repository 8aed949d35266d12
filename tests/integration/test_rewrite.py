"""Sender rewriting and private submission through a real relay (issue 14).

The relay runs in-process on 127.0.0.1 with an MX port and a submission
port; its relay.networks is 127.0.0.1 only, so a client bound to 127.0.0.9
is "the internet" unless it authenticates.  Mail to dest.example (trusted
clients) and backup.example (relay.domains: anyone) goes by relay.routes to
a sink on 127.0.0.2.  relay-sendmail runs in-process and drops into the
spool; the pickup queues it.  relayctl runs as a real subprocess.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay import config as configmod
from relay.intake import sendmail as sm
from relay.mailbox import users as usersmod
from tests.support.relay import ROOT, InProcessRelay, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll

MESSAGE = (b'From: "NAS, the box" <root@nas.lan> (daily)\r\n'
           b"Sender: cron@printer.lan\r\n"
           b"Reply-To: =?utf-8?q?J=C3=B6rg?= <joerg@nas.lan>, admins: ops@other.example, root@nas.lan;\r\n"
           b"To: someone@dest.example\r\n"
           b"Subject: disk report from root@nas.lan\r\n"
           b"\r\n"
           b"From: root@nas.lan is in the body: never rewritten\r\n")


def ctl(config_path: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", config_path, *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd="/")


class RewriteCase(unittest.TestCase):
    smtp_extra: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-rw-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.sink = Sink("127.0.0.2").start()
        self.addCleanup(lambda: self.sink.stop())
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        hop = f"127.0.0.2:{self.sink.port}"
        over = {
            "smtp": {"submission": ["tcp:0:interface=127.0.0.1"], **self.smtp_extra},
            "relay": {"networks": ["127.0.0.1/32"], "domains": ["backup.example"],
                      "routes": {"dest.example": hop, "backup.example": hop, "held.example": "127.0.0.2:1"}},
            "rewrite": {"senders": {"root@nas.lan": "alerts@example.org"},
                        "masquerade": {"*.lan": "example.org"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5},
        }
        self.relay = InProcessRelay(self.tmp, over)
        self.cfg = os.path.join(self.tmp, "relay.toml")
        self.write()
        self.relay.config = configmod.load(self.cfg)  # a reload re-reads this file
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def write(self) -> None:
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.relay.data))

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def send(self, port: str, rcpt: str, *, sender: str = "root@nas.lan", source: str = "127.0.0.1",
             login: bool = False, helo: str = "nas.lan", body: bytes = MESSAGE):
        def run() -> str:
            with smtplib.SMTP(*self.relay.ports[port], source_address=(source, 0)) as s:
                s.ehlo(helo)
                if login:
                    s.login("alice@local.test", "pw")
                s.mail(sender)
                s.rcpt(rcpt)
                code, resp = s.data(body)
                assert code == 250, resp
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    async def delivered(self, n: int = 1):
        await apoll(lambda: len([t for t in self.sink.transactions if t.completed]) >= n, 20,
                    what=f"{n} deliveries at the sink")
        return [t for t in self.sink.transactions if t.completed][n - 1]


class SenderRewriting(RewriteCase):
    async def test_trusted_lan_client_envelope_and_headers(self):
        qid = await self.send("smtp", "someone@dest.example")
        t = await self.delivered()
        self.assertEqual(t.mail_from, "alerts@example.org")
        head, _, body = t.data.partition(b"\r\n\r\n")
        self.assertIn(b'From: "NAS, the box" <alerts@example.org> (daily)\r\n', head)
        self.assertIn(b"Sender: cron@example.org\r\n", head)
        self.assertIn(b"Reply-To: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>, admins: ops@other.example, "
                      b"alerts@example.org;\r\n", head)
        self.assertTrue(head.endswith(b"\r\nTo: someone@dest.example\r\nSubject: disk report from root@nas.lan"))
        self.assertEqual(body, b"From: root@nas.lan is in the body: never rewritten\r\n")
        msg = email.message_from_bytes(t.data, policy=email.policy.default)
        self.assertEqual(msg["From"].addresses[0].addr_spec, "alerts@example.org")
        log = self.log_text()
        self.assertIn(f"{qid}: sender <root@nas.lan> rewritten to <alerts@example.org>", log)
        self.assertIn(f"{qid}: From header <root@nas.lan> rewritten to <alerts@example.org>", log)
        self.assertIn(f"{qid}: Sender header <cron@printer.lan> rewritten to <cron@example.org>", log)
        # the queued line is as it always was, with the new sender
        self.assertIn(f"{qid}: client=nas.lan[127.0.0.1], from=<alerts@example.org>, size=", log)

    async def test_resent_from_and_resent_sender_of_a_trusted_client(self):
        # a device forwarding mail on names itself in Resent-*: rewritten as Postfix's canonical maps do
        body = (b"Resent-From: Forwarder <root@nas.lan>\r\nResent-Sender: cron@printer.lan\r\n"
                b"Resent-To: someone@dest.example\r\nFrom: outside@other.example\r\nSubject: fwd\r\n\r\nbody\r\n")
        qid = await self.send("smtp", "someone@dest.example", body=body)
        t = await self.delivered()
        self.assertIn(b"Resent-From: Forwarder <alerts@example.org>\r\nResent-Sender: cron@example.org\r\n"
                      b"Resent-To: someone@dest.example\r\nFrom: outside@other.example\r\n", t.data)
        log = self.log_text()
        self.assertIn(f"{qid}: Resent-From header <root@nas.lan> rewritten to <alerts@example.org>", log)
        self.assertIn(f"{qid}: Resent-Sender header <cron@printer.lan> rewritten to <cron@example.org>", log)
        # from the internet: left alone
        await self.send("smtp", "x@backup.example", source="127.0.0.9", body=body)
        t = await self.delivered(2)
        self.assertIn(b"\r\n" + body, t.data)

    async def test_header_block_over_1_mib_passes_unchanged_and_is_logged(self):
        # past the stage's bound (1 MiB) the headers are not rewritten: accepted, logged, nothing lost
        filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 100) for i in range(10_000))
        body = b"From: root@nas.lan\r\n" + filler + b"Subject: big\r\n\r\nbody: root@nas.lan\r\n"
        self.assertGreater(len(body), 1 << 20)
        qid = await self.send("smtp", "someone@dest.example", body=body)
        t = await self.delivered()
        self.assertEqual(t.mail_from, "alerts@example.org")  # the envelope is rewritten as always
        self.assertTrue(t.data.endswith(b"\r\n" + body), "the message changed")
        self.assertIn(f"{qid}: headers not rewritten: the header block is larger than 1048576 octets",
                      self.log_text())

        # just under the bound: rewritten
        small = b"From: root@nas.lan\r\n" + filler[:8_000 * 118] + b"Subject: s\r\n\r\nbody\r\n"
        self.assertLess(small.index(b"\r\n\r\n"), 1 << 20)
        qid = await self.send("smtp", "someone@dest.example", body=small)
        t = await self.delivered(2)
        self.assertTrue(t.data.endswith(b"\r\n" + small.replace(b"From: root@nas.lan", b"From: alerts@example.org", 1)))

    async def test_internet_client_is_never_rewritten(self):
        await self.send("smtp", "x@backup.example", source="127.0.0.9")
        t = await self.delivered()
        self.assertEqual(t.mail_from, "root@nas.lan")
        self.assertIn(b"\r\n" + MESSAGE, t.data)  # byte for byte after our Received header
        self.assertNotIn("rewritten", self.log_text())

    async def test_authenticated_client_from_anywhere_is_rewritten(self):
        # (an authenticated client may only use its own envelope senders: relay.intake.policy)
        await self.send("submission", "someone@dest.example", source="127.0.0.9", login=True,
                        sender="alice@local.test", body=b"From: cron@x.nas.lan\r\nSubject: s\r\n\r\nhi\r\n")
        t = await self.delivered()
        self.assertEqual(t.mail_from, "alice@local.test")
        self.assertIn(b"From: cron@example.org\r\nSubject: s\r\n\r\nhi\r\n", t.data)

    async def test_null_sender_no_from_several_from_and_malformed(self):
        body = (b"From: root@nas.lan\r\nFrom: <cron@nas.lan>\r\nReply-To: broken <root@nas.lan\r\n"
                b"Subject: x\r\n\r\nbody\r\n")
        qid = await self.send("smtp", "a@dest.example", sender="<>", body=body)
        t = await self.delivered()
        self.assertEqual(t.mail_from, "")
        self.assertIn(b"From: alerts@example.org\r\nFrom: <cron@example.org>\r\n"
                      b"Reply-To: broken <root@nas.lan\r\n", t.data)
        self.assertIn(f"{qid}: Reply-To header not rewritten: it does not parse as an address list", self.log_text())
        await self.send("smtp", "b@dest.example", body=b"Subject: no from at all\r\n\r\nbody\r\n")
        t = await self.delivered(2)
        self.assertEqual(t.mail_from, "alerts@example.org")
        self.assertTrue(t.data.endswith(b"Subject: no from at all\r\n\r\nbody\r\n"))

    async def test_relay_sendmail_through_the_pickup(self):
        msg = b"From: Cron Daemon <root@nas.lan>\nSubject: cron\n\nout\n"
        rc = await in_thread(sm.main, ["-C", self.cfg, "-f", "root@nas.lan", "someone@dest.example"],
                             stdin=io.BytesIO(msg))
        self.assertEqual(rc, 0)
        t = await self.delivered()
        self.assertEqual(t.mail_from, "alerts@example.org")
        self.assertIn(b"From: Cron Daemon <alerts@example.org>\r\n", t.data)
        self.assertIn("sender <root@nas.lan> rewritten to <alerts@example.org>", self.log_text())

    async def test_queue_show_and_route(self):
        qid = await self.send("smtp", "someone@held.example")
        await apoll(lambda: (m := self.relay.service.queue.messages.get(qid)) is not None and not m.active
                    and not m.busy and m.state.recipients[0].attempts >= 1, 20, what="a deferral")
        r = await in_thread(ctl, self.cfg, "queue", "show", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Sender:    <alerts@example.org>  (sender rewritten from <root@nas.lan>)", r.stdout)
        r = await in_thread(ctl, self.cfg, "queue", "show", qid, "--json")
        d = json.loads(r.stdout)
        self.assertEqual((d["sender"], d["sender_rewritten_from"]), ("alerts@example.org", "root@nas.lan"))
        # relayctl route, live
        r = await in_thread(ctl, self.cfg, "route", "--sender", "ROOT@nas.lan")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("sender <ROOT@nas.lan>: rewritten to <alerts@example.org> for trusted clients "
                      "(rewrite.senders)", r.stdout)
        r = await in_thread(ctl, self.cfg, "route", "someone@dest.example", "--sender", "x@y.lan", "--json")
        j = json.loads(r.stdout)
        self.assertEqual(j["sender"]["rewritten_to"], "x@example.org")
        self.assertEqual(j["sender"]["rule"], 'rewrite.masquerade "*.lan"')
        self.assertEqual(j["deliveries"][0]["kind"], "route")
        r = await in_thread(ctl, self.cfg, "route", "--sender", "x@nas.lan", "--client", "192.0.2.7")
        self.assertIn("not rewritten for client 192.0.2.7 (only mail from trusted sources is", r.stdout)
        r = await in_thread(ctl, self.cfg, "route", "--sender", "x@other.example")
        self.assertIn("not rewritten (no rewrite.senders or rewrite.masquerade entry matches)", r.stdout)
        await self.relay.stop()
        # offline (no relay running): the same answers, from the config
        r = await in_thread(ctl, self.cfg, "route", "--sender", "root@nas.lan")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("rewritten to <alerts@example.org> for trusted clients (rewrite.senders)", r.stdout)
        r = await in_thread(ctl, self.cfg, "queue", "show", qid)
        self.assertIn("(sender rewritten from <root@nas.lan>)", r.stdout)


class Reload(RewriteCase):
    async def test_a_reload_applies_a_new_map_and_refuses_a_bad_one(self):
        self.relay.data["rewrite"] = {"senders": {}, "masquerade": {"nas.lan": "lan.example.org"}}
        self.write()
        self.assertTrue(self.relay.service.reload()["ok"])
        await self.send("smtp", "a@dest.example", body=b"From: root@nas.lan\r\n\r\nx\r\n")
        t = await self.delivered()
        self.assertEqual(t.mail_from, "root@lan.example.org")
        self.assertIn(b"From: root@lan.example.org\r\n", t.data)
        self.relay.data["rewrite"] = {"masquerade": {"*.lan": "not a domain"}}
        self.write()
        r = self.relay.service.reload()
        self.assertFalse(r["ok"])
        self.assertIn("rewrite.masquerade: expected", "\n".join(r["messages"]))
        self.assertIn("entry '*.lan': 'not a domain' is not a domain", "\n".join(r["messages"]))
        await self.send("smtp", "b@dest.example", body=b"From: root@nas.lan\r\n\r\nx\r\n")
        t = await self.delivered(2)
        self.assertEqual(t.mail_from, "root@lan.example.org")  # the running map is kept


class PrivateSubmission(RewriteCase):
    async def test_submission_hides_the_client_the_log_keeps_it(self):
        qid = await self.send("submission", "someone@dest.example", source="127.0.0.9", login=True,
                              helo="secret-laptop.home", sender="alice@local.test",
                              body=b"Subject: s\r\n\r\nhi\r\n")
        t = await self.delivered()
        received = t.data.split(b"\r\n\t", 1)[0]
        self.assertTrue(t.data.startswith(b"Received: by relay.test (twisted-relay) with ESMTPA id " + qid.encode()),
                        t.data[:200])
        self.assertNotIn(b"127.0.0.9", t.data)
        self.assertNotIn(b"secret-laptop", t.data)
        self.assertNotIn(b"from", received)
        self.assertIn(f"{qid}: client=secret-laptop.home[127.0.0.9], from=<alice@local.test>", self.log_text())

    async def test_mx_port_keeps_the_client_even_after_auth(self):
        qid = await self.send("smtp", "someone@dest.example", source="127.0.0.9", login=True,
                              helo="laptop.home", sender="alice@local.test", body=b"Subject: s\r\n\r\nhi\r\n")
        t = await self.delivered()
        self.assertTrue(t.data.startswith(b"Received: from laptop.home ([127.0.0.9])\r\n\tby relay.test"))
        self.assertIn(f"{qid}: client=laptop.home[127.0.0.9]", self.log_text())

    async def test_unauthenticated_lan_client_is_shown(self):
        await self.send("smtp", "someone@dest.example", helo="nas.lan", body=b"Subject: s\r\n\r\nhi\r\n")
        t = await self.delivered()
        self.assertTrue(t.data.startswith(b"Received: from nas.lan ([127.0.0.1])"))


class PrivateSubmissionSwitched(RewriteCase):
    smtp_extra = {"hide_client_session": True, "submission_hide_client_session": False}

    async def test_both_keys_turned_around(self):
        await self.send("submission", "a@dest.example", source="127.0.0.9", login=True, helo="laptop.home",
                        sender="alice@local.test", body=b"Subject: s\r\n\r\nhi\r\n")
        t = await self.delivered()
        self.assertTrue(t.data.startswith(b"Received: from laptop.home ([127.0.0.9])"))
        await self.send("smtp", "b@dest.example", source="127.0.0.9", login=True, helo="laptop.home",
                        sender="alice@local.test", body=b"Subject: s\r\n\r\nhi\r\n")
        t = await self.delivered(2)
        self.assertTrue(t.data.startswith(b"Received: by relay.test (twisted-relay) with ESMTPA id "))
        self.assertNotIn(b"127.0.0.9", t.data)
