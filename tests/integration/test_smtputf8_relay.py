"""SMTPUTF8 relaying end to end (issue 17): an in-process relay, the real test
DNS server and sinks on 127.0.0.x.  The messages are put into the spool as
the SMTP intake stores one that came with SMTPUTF8 (Envelope.smtputf8,
UTF-8 local parts, A-label domains) and handed to the queue, as the notices
are; what goes out is read on the sinks, the 5.6.7 notice with the email
package and tests.test_dsn_global.read_global_report."""

from __future__ import annotations

import email
import email.policy
import time

from relay.queue.envelope import Envelope
from relay.queue.layout import new_id
from tests.integration.test_dsn import SENDER_MX, DsnCase
from tests.support.wait import apoll
from tests.test_dsn_global import read_global_report

SENDER = "s\u00e9n@client.example"
UTF8_MSG = "Subject: Gr\u00fc\u00dfe\r\nFrom: <s\u00e9n@client.example>\r\n\r\nK\u00f6rper\r\n".encode()
ASCII_MSG = b"Subject: plain\r\nFrom: <s@client.example>\r\n\r\nK\xc3\xb6rper\r\n"


class Utf8Relay(DsnCase):
    async def setUp(self):
        await super().setUp()
        # two MX hosts for utf8.example: only the second offers SMTPUTF8
        self.zone.mx("utf8.example", 10, "mx1.utf8.example").a("mx1.utf8.example", "127.0.0.2")
        self.zone.mx("utf8.example", 20, "mx2.utf8.example").a("mx2.utf8.example", "127.0.0.4")
        self.sinks["127.0.0.4"].b.smtputf8 = True
        self.sinks[SENDER_MX].b.smtputf8 = True

    def queue(self, sender: str, rcpts: list[str], data: bytes, smtputf8: bool = True) -> str:
        svc = self.relay.service
        env = Envelope(new_id(), sender, rcpts, time.time(), client={"proto": "test"},
                       extra={"smtputf8": True} if smtputf8 else {})
        entry = svc.spool.inject(env, data)
        svc.queue.add(entry)
        return env.queue_id

    async def test_second_mx_offers_it(self):
        self.queue(SENDER, ["j\u00f6rg@utf8.example"], UTF8_MSG)
        await apoll(lambda: self.sinks["127.0.0.4"].transactions, timeout=20, what="delivery to mx2")
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        t = self.sinks["127.0.0.4"].transactions[0]
        self.assertIn("SMTPUTF8", t.mail_params.split())
        self.assertEqual((t.mail_from, t.rcpts, t.data), (SENDER, ["j\u00f6rg@utf8.example"], UTF8_MSG))
        self.assertEqual(self.sinks["127.0.0.2"].transactions, [])
        self.assertEqual(self.notices(), [])

    async def test_not_offered_bounces_5_6_7_with_a_global_report(self):
        qid = self.queue(SENDER, ["j\u00f6rg@dest.example"], UTF8_MSG)
        data = await self.one_notice("the 5.6.7 bounce")
        t = self.sinks[SENDER_MX].transactions[0]
        self.assertIn("SMTPUTF8", t.mail_params.split())  # the notice went with SMTPUTF8
        self.assertEqual(t.rcpts, [SENDER])
        r = read_global_report(data)
        (b,) = r["per_rcpt"]
        self.assertEqual((b["final-recipient"], b["action"], b["status"]),
                         ("utf-8; j\u00f6rg@dest.example", "failed", "5.6.7"))
        self.assertIn("SMTPUTF8 is required, but was not offered by host mx.dest.example[127.0.0.2]",
                      b["diagnostic-code"])
        self.assertEqual(r["per_msg"]["x-relay-queue-id"], qid)
        msg = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
        self.assertEqual(msg.get_param("report-type"), "global-delivery-status")
        self.assertEqual(list(msg.iter_parts())[2].get_content_type(), "message/global-headers")
        self.assertEqual(self.sinks["127.0.0.2"].transactions, [])

    async def test_not_needed_is_delivered_without_it(self):
        self.queue("s@client.example", ["info@dest.example"], ASCII_MSG)
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, timeout=20, what="delivery")
        t = self.sinks["127.0.0.2"].transactions[0]
        self.assertNotIn("SMTPUTF8", t.mail_params.split())
        self.assertEqual(t.data, ASCII_MSG)

    async def test_ascii_mail_bounce_stays_as_today(self):
        self.sinks["127.0.0.2"].b.rcpt_replies = {"bad@dest.example": "550 5.1.1 no such user"}
        self.queue("s@client.example", ["bad@dest.example"], ASCII_MSG, smtputf8=False)
        data = await self.one_notice("the bounce")
        self.assertNotIn(b"global", data)
        self.assertIn(b"Content-Type: message/delivery-status\r\n", data)
        self.assertNotIn("SMTPUTF8", self.sinks[SENDER_MX].transactions[0].mail_params)

    async def test_a_notice_that_cannot_reach_a_utf8_sender_is_dropped(self):
        # the sender's MX has no SMTPUTF8 either: the notice (from <>) bounces in
        # turn, and a bounce of a bounce is logged and dropped, never looped
        self.sinks[SENDER_MX].b.smtputf8 = False
        self.queue(SENDER, ["j\u00f6rg@dest.example"], UTF8_MSG)
        await apoll(lambda: len(self.sinks[SENDER_MX].sessions) >= 1, timeout=20, what="the notice tried")
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        self.assertEqual(self.sinks[SENDER_MX].transactions, [])
        self.assertEqual(self.sinks["127.0.0.2"].transactions, [])
