"""SMTPUTF8 to a real third-party next hop: a private Postfix instance (as
tests/integration/test_dsn_postfix.py runs one) between our relay and a sink.

With ``smtputf8_enable = yes`` Postfix offers SMTPUTF8, takes our message
with it and relays it on to a sink that offers it too: the sink's transcript
shows the parameter, the UTF-8 addresses and the message as we sent them, so
Postfix queued them intact.  With ``smtputf8_enable = no`` it does not offer
it: a message that needs it bounces 5.6.7 here (an RFC 6533 report), one
that does not goes through Postfix as any mail.  Skipped (with the reason)
without Postfix or without root."""

from __future__ import annotations

import os
import time

from relay.queue.envelope import Envelope
from relay.queue.layout import new_id
from tests.integration.test_dsn import DsnCase
from tests.integration.test_dsn_postfix import PF_IP, PostfixNextHop, _skip_reason
from tests.support.relay import in_thread
from tests.support.wait import apoll
from tests.test_dsn_global import read_global_report

SENDER = "s\u00e9n@client.example"
JOERG = "j\u00f6rg@pf.example"
UTF8_MSG = ("Subject: Gr\u00fc\u00dfe\r\nFrom: <s\u00e9n@client.example>\r\nTo: <j\u00f6rg@pf.example>\r\n"
            "Message-ID: <u1@client.example>\r\nDate: Wed, 2 Dec 2026 10:00:00 +0000\r\n\r\nK\u00f6rper\r\n").encode()
ASCII_MSG = (b"Subject: plain\r\nFrom: <s@client.example>\r\nMessage-ID: <a1@client.example>\r\n"
             b"Date: Wed, 2 Dec 2026 10:00:00 +0000\r\n\r\nbody\r\n")


class PostfixUtf8(DsnCase):
    skip = _skip_reason()
    start_private_postfix = PostfixNextHop.start_postfix
    route_to_postfix = PostfixNextHop.route_to_postfix
    timeout = 120

    async def test_postfix_as_our_client_with_smtputf8(self):
        """Postfix (smtputf8_enable = yes) relays a client's SMTPUTF8 message
        to us: we take it with SMTPUTF8 and deliver it to a UTF-8 local user.
        (Postfix adds ORCPT=rfc822;j+C3+B6rg@...: its form of a UTF-8
        recipient, which we take: relay.common.dsn._utf8_address.)"""
        from relay.mailbox import users as usersmod

        usersmod.add_user(os.path.join(self.tmp, "users"), "j\u00f6rg@local.test", "pw")
        pf = await self.start_private_postfix(next_hop=self.relay.smtp, main_cf="smtputf8_enable = yes")
        rcpt = "j\u00f6rg@local.test"
        msg = UTF8_MSG.replace(b"j\xc3\xb6rg@pf.example", rcpt.encode())

        def send() -> None:
            import smtplib

            with smtplib.SMTP(PF_IP, pf.port) as c:
                c.ehlo("client.example")
                assert c.has_extn("smtputf8")
                c.sendmail(SENDER, [rcpt], msg, mail_options=["SMTPUTF8"])

        await in_thread(send)
        new = os.path.join(self.tmp, "mail", "local.test", "j\u00f6rg", "new")
        await apoll(lambda: os.path.isdir(new) and os.listdir(new), timeout=60,
                    what="the message in j\u00f6rg's Maildir, through Postfix")
        (name,) = os.listdir(new)
        with open(os.path.join(new, name), "rb") as f:
            data = f.read()
        head, _, body = data.partition(b"\n\n")
        self.assertIn(f"Return-Path: <{SENDER}>".encode(), head)
        self.assertIn(f"Delivered-To: {rcpt}".encode(), head)
        # our Received: line says UTF8SMTP (RFC 6531 3.7.3): Postfix sent it with SMTPUTF8
        ours = head.split(b"\nReceived: ")[1]
        self.assertIn(b"with UTF8SMTP", ours)
        self.assertIn(b"by relay.test", ours)
        self.assertIn("Subject: Gr\u00fc\u00dfe".encode(), head)
        self.assertEqual(body, "K\u00f6rper\n".encode())

    async def start_postfix(self, smtputf8: bool):
        """Postfix between our relay (pf.example routed to it) and the sink on 127.0.0.3."""
        pf = await self.start_private_postfix(main_cf=f"smtputf8_enable = {'yes' if smtputf8 else 'no'}")
        await self.route_to_postfix(pf)
        self.sinks["127.0.0.3"].b.smtputf8 = True  # Postfix's own next hop
        self.sinks["127.0.0.5"].b.smtputf8 = True  # client.example's MX: where our notices go
        return pf

    def queue(self, sender: str, rcpts: list[str], data: bytes) -> None:
        """As the intake stores a message that came with SMTPUTF8."""
        svc = self.relay.service
        env = Envelope(new_id(), sender, rcpts, time.time(), client={"proto": "test"}, extra={"smtputf8": True})
        svc.queue.add(svc.spool.inject(env, data))

    async def test_postfix_with_smtputf8_takes_it_intact(self):
        await self.start_postfix(smtputf8=True)
        self.queue(SENDER, [JOERG], UTF8_MSG)
        sink = self.sinks["127.0.0.3"]
        await apoll(lambda: sink.transactions, timeout=60, what="Postfix relaying to the sink")
        await apoll(self.queue_empty, timeout=20, what="our queue empty")
        t = sink.transactions[0]
        self.assertIn("SMTPUTF8", t.mail_params.upper().split())  # Postfix kept the request
        self.assertEqual((t.mail_from, t.rcpts), (SENDER, [JOERG]))
        # Postfix adds its Received: line on top ("with UTF8SMTP": it received
        # it with SMTPUTF8); the rest is ours, byte for byte
        received, _, rest = t.data.partition(b"\r\nSubject: ")
        self.assertIn(b"with UTF8SMTP", received)
        self.assertEqual(b"Subject: " + rest, UTF8_MSG)
        self.assertEqual(self.notices(), [])

    async def test_postfix_without_smtputf8_makes_us_bounce_5_6_7(self):
        await self.start_postfix(smtputf8=False)
        self.queue(SENDER, [JOERG], UTF8_MSG)
        data = await self.one_notice("the 5.6.7 bounce")
        r = read_global_report(data)
        (b,) = r["per_rcpt"]
        self.assertEqual((b["final-recipient"], b["status"]), (f"utf-8; {JOERG}", "5.6.7"))
        self.assertIn(f"SMTPUTF8 is required, but was not offered by host {PF_IP}[{PF_IP}]", b["diagnostic-code"])
        self.assertEqual(self.sinks["127.0.0.3"].transactions, [])

    async def test_postfix_without_smtputf8_gets_what_does_not_need_it(self):
        await self.start_postfix(smtputf8=False)
        self.queue("s@client.example", ["info@pf.example"], ASCII_MSG)
        sink = self.sinks["127.0.0.3"]
        await apoll(lambda: sink.transactions, timeout=60, what="Postfix relaying to the sink")
        await apoll(self.queue_empty, timeout=20, what="our queue empty")
        t = sink.transactions[0]
        self.assertNotIn("SMTPUTF8", t.mail_params.upper().split())
        received, _, rest = t.data.partition(b"\r\nSubject: ")
        self.assertNotIn(b"UTF8SMTP", received)
        self.assertEqual(b"Subject: " + rest, ASCII_MSG)
        self.assertEqual(self.notices(), [])
