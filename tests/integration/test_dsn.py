"""DSN end to end (RFC 3461, 3464): an in-process relay between real SMTP
clients and real receiving servers (tests.support.sink) on 127.0.0.x, with
the real test DNS server; the notices it sends are read back with the email
package and their fields checked (tests.test_dsn.check_report)."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import tempfile

from relay.mailbox import users as usersmod
from relay.queue import view
from relay.queue.envelope import Envelope, State
from tests.integration.test_delivery import DeliveryCase
from tests.support.relay import InProcessRelay, in_thread
from tests.support.wait import apoll
from tests.test_dsn import check_report

SENDER_MX = "127.0.0.5"  # client.example's MX: where the notices go
BODY = b"Subject: dsn test\r\nMessage-ID: <m1@client.example>\r\n\r\nthe body line\r\n"


class DsnCase(DeliveryCase):
    async def setUp(self):
        await super().setUp()
        self.zone.mx("client.example", 10, "mx.client.example").a("mx.client.example", SENDER_MX)
        self.zone.mx("dest.example", 10, "mx.dest.example").a("mx.dest.example", "127.0.0.2")
        self.zone.mx("dsn.example", 10, "mx.dsn.example").a("mx.dsn.example", "127.0.0.3")
        self.sinks["127.0.0.3"].b.dsn = True

    def transaction(self, rcpts, mail_opts=(), body=BODY, relay=None):
        """One transaction; rcpts: [(address, [RCPT parameters])]."""
        host, port = (relay or self.relay).smtp

        def run():
            with smtplib.SMTP(host, port) as s:
                s.ehlo("client.example")
                assert s.has_extn("dsn")
                code, text = s.mail("sender@client.example", list(mail_opts))
                assert code == 250, text
                for r, opts in rcpts:
                    code, text = s.rcpt(r, list(opts))
                    assert code == 250, text
                code, text = s.data(body)
                assert code == 250, text

        return in_thread(run)

    def notices(self):
        return [t.data for t in self.sinks[SENDER_MX].transactions]

    async def one_notice(self, what):
        await apoll(lambda: self.notices(), timeout=20, what=what)
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        self.assertEqual(len(self.notices()), 1)
        return self.notices()[0]


class Failures(DsnCase):
    overrides = {"delivery": {"dsn_full_limit": 2000}}

    async def test_bounce_with_envid_orcpt_and_full_message(self):
        self.sinks["127.0.0.2"].b.rcpt_replies = {"bad@dest.example": "550 5.1.1 no such user"}
        await self.transaction([("bad@dest.example", ["NOTIFY=FAILURE", "ORCPT=rfc822;Orig+2Bx@dest.example"]),
                                ("good@dest.example", ["NOTIFY=FAILURE"])],
                               ["RET=FULL", "ENVID=QQ+2B314"])
        data = await self.one_notice("the bounce")
        per_msg, blocks = check_report(data)
        self.assertEqual(per_msg["Original-Envelope-Id"], "QQ+314")
        self.assertEqual([b["Final-Recipient"] for b in blocks], ["rfc822; bad@dest.example"])
        self.assertEqual(blocks[0]["Original-Recipient"], "rfc822; Orig+x@dest.example")
        self.assertEqual((blocks[0]["Action"], blocks[0]["Status"]), ("failed", "5.1.1"))
        returned = email.message_from_bytes(data, policy=email.policy.default).get_payload()[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertIn(b"the body line", returned.as_bytes())

    async def test_ret_hdrs_and_full_over_the_limit_return_headers(self):
        self.sinks["127.0.0.2"].b.rcpt_replies = {"bad@dest.example": "550 5.1.1 no such user"}
        big = BODY + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40
        await self.transaction([("bad@dest.example", [])], ["RET=HDRS"], body=big)
        await self.transaction([("bad@dest.example", [])], ["RET=FULL"], body=big)
        await apoll(lambda: len(self.notices()) >= 2, timeout=20, what="two bounces")
        for data in self.notices():
            check_report(data)
            msg = email.message_from_bytes(data, policy=email.policy.default)
            third = msg.get_payload()[2]
            self.assertEqual(third.get_content_type(), "text/rfc822-headers")
            self.assertNotIn(b"yyyy", data)
        self.assertEqual(sum(b"only its headers are returned" in d for d in self.notices()), 1)

    async def test_notify_never_and_success_only_send_no_bounce(self):
        self.sinks["127.0.0.2"].b.rcpt_replies = {"a@dest.example": "550 5.1.1 no", "b@dest.example": "550 5.1.1 no"}
        await self.transaction([("a@dest.example", ["NOTIFY=NEVER"]), ("b@dest.example", ["NOTIFY=SUCCESS"])])
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        await self.transaction([("a@dest.example", [])])  # a marker: without NOTIFY it bounces as before
        await apoll(lambda: self.notices(), timeout=20, what="the marker's bounce")
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        self.assertEqual(len(self.notices()), 1)
        _, blocks = check_report(self.notices()[0])
        self.assertEqual(len(blocks), 1)


class Success(DsnCase):
    async def test_local_delivery_gets_delivered(self):
        await self.transaction([("alice@local.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;alice@local.test"])],
                               ["ENVID=local-1", "RET=FULL"])
        data = await self.one_notice("the success notice")
        per_msg, (b,) = check_report(data)
        self.assertEqual((b["Action"], b["Status"]), ("delivered", "2.0.0"))
        self.assertEqual(per_msg["Original-Envelope-Id"], "local-1")
        msg = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")  # never the body

    async def test_next_hop_without_dsn_gets_relayed(self):
        await self.transaction([("r@dest.example", ["NOTIFY=SUCCESS,FAILURE"])])
        data = await self.one_notice("the relayed notice")
        _, (b,) = check_report(data)
        self.assertEqual(b["Action"], "relayed")
        self.assertEqual(b["Remote-MTA"], "dns; mx.dest.example")
        t = self.sinks["127.0.0.2"].transactions[0]
        self.assertNotIn("NOTIFY", " ".join(t.session.commands))  # not offered: not sent

    async def test_next_hop_with_dsn_gets_the_request_and_no_notice_here(self):
        await self.transaction([("a@dsn.example", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;first@dsn.example"]),
                                ("b@dsn.example", [])], ["RET=HDRS", "ENVID=abc+2Bdef"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, timeout=20, what="delivery")
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        t = self.sinks["127.0.0.3"].transactions[0]
        cmds = t.session.commands
        self.assertIn("MAIL FROM:<sender@client.example> RET=HDRS ENVID=abc+2Bdef",
                      [c.replace(" SIZE=" + c.split("SIZE=")[1].split()[0], "") if "SIZE=" in c else c
                       for c in cmds])
        self.assertIn("RCPT TO:<a@dsn.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;first@dsn.example", cmds)
        self.assertIn("RCPT TO:<b@dsn.example> ORCPT=rfc822;b@dsn.example", cmds)  # as Postfix adds it
        self.assertEqual(self.notices(), [])


class Delay(DsnCase):
    overrides = {"delivery": {"max_lifetime": 3, "delay_warning": 1, "retry_min": 1, "retry_max": 1}}

    async def test_delay_notice_only_for_who_asked(self):
        self.zone.mx("down.example", 10, "mx.down.example").a("mx.down.example", "127.0.0.4")
        await self.sinks["127.0.0.4"].stop()
        await self.transaction([("f@down.example", ["NOTIFY=FAILURE"]), ("d@down.example", ["NOTIFY=DELAY"]),
                                ("n@down.example", [])])
        # f and n expire (their retries are jittered apart: one bounce each, or one for both)
        failed = lambda: sorted(b["Final-Recipient"] for d in self.notices()  # noqa: E731
                                for b in check_report(d)[1] if b["Action"] == "failed")
        await apoll(lambda: len(failed()) >= 2, timeout=25, what="delay notice and bounces")
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        self.assertEqual(failed(), ["rfc822; f@down.example", "rfc822; n@down.example"])  # d asked DELAY only
        delays = [check_report(d)[1] for d in self.notices()
                  if email.message_from_bytes(d)["Subject"].startswith("Delayed")]
        self.assertEqual(len(delays), 1)
        self.assertEqual([b["Final-Recipient"] for b in delays[0]],
                         ["rfc822; d@down.example", "rfc822; n@down.example"])
        self.assertTrue(all(b["Action"] == "delayed" for b in delays[0]))


class Backscatter(DsnCase):
    """A client outside relay.networks, unauthenticated: its SUCCESS and DELAY
    are not honoured (nor carried), its NEVER and FAILURE are."""

    overrides = {"relay": {"networks": ["10.0.0.0/8"]}}

    async def test_untrusted_success_is_not_honoured(self):
        await self.transaction([("alice@local.test", ["NOTIFY=SUCCESS"])], ["ENVID=x1"])
        await apoll(self.queue_empty, timeout=20, what="empty queue")
        self.assertTrue(os.listdir(os.path.join(self.tmp, "mail", "local.test", "alice", "new")))
        self.assertEqual(self.notices(), [])

    async def test_untrusted_request_is_stored_limited_and_shown(self):
        await self.relay.stop()  # a relay that does not deliver: the message stays to be looked at
        self.relay = InProcessRelay(self.tmp, {"relay": {"networks": ["10.0.0.0/8"]}}, deliver=False)
        await self.relay.start()
        await self.transaction([("alice@local.test", ["NOTIFY=SUCCESS,FAILURE,DELAY"])], ["RET=HDRS"])
        (qid,) = self.relay.service.spool.queue_ids()
        with open(self.relay.service.spool.message_path(qid), "rb") as f:
            env = Envelope.from_line(f.readline())
        self.assertTrue(env.dsn.limited)
        self.assertEqual(env.dsn_of("alice@local.test"), ("SUCCESS,FAILURE,DELAY", None))
        d = view.details(env, State.fresh(env), 10, "active", b"")
        self.assertEqual(d["dsn"], {"ret": "HDRS", "envid": None, "limited": True})
        self.assertEqual(d["recipients"][0]["notify"], "SUCCESS,FAILURE,DELAY")


class Syntax(DsnCase):
    async def test_reply_codes(self):
        def run():
            out = {}
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                for cmd in ("MAIL FROM:<s@client.example> ENVID=a+ZZ",
                            "MAIL FROM:<s@client.example> ENVID=" + "x" * 101,
                            "MAIL FROM:<s@client.example> RET=BOGUS", "MAIL FROM:<s@client.example> RET=FULL RET=HDRS",
                            "MAIL FROM:<s@client.example> FOO=1"):
                    out[cmd] = s.docmd(cmd)
                s.docmd("MAIL FROM:<s@client.example> RET=HDRS ENVID=ok")
                for cmd in ("RCPT TO:<alice@local.test> NOTIFY=NEVER,SUCCESS", "RCPT TO:<alice@local.test> NOTIFY=X",
                            "RCPT TO:<alice@local.test> ORCPT=rfc822;a+Z1@b", "RCPT TO:<alice@local.test> ORCPT=a@b",
                            "RCPT TO:<alice@local.test> NOTIFY=NEVER NOTIFY=NEVER",
                            "RCPT TO:<alice@local.test> FOO=1", "RCPT TO:<alice@local.test> NOTIFY=success"):
                    out[cmd] = s.docmd(cmd)
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.helo("client.example")
                s.docmd("MAIL FROM:<s@client.example>")
                out["HELO RCPT"] = s.docmd("RCPT TO:<alice@local.test> NOTIFY=NEVER")
            return out

        out = await in_thread(run)
        codes = {k: (c, t.decode()) for k, (c, t) in out.items()}
        for k, (c, t) in codes.items():
            if "FOO" in k or k == "HELO RCPT":
                self.assertEqual(c, 555, k)
            elif k.endswith("NOTIFY=success"):
                self.assertEqual(c, 250, k)
            else:
                self.assertEqual(c, 501, (k, t))
                self.assertTrue(t.startswith("5.5.4"), t)
        self.assertIn("ENVID", codes["MAIL FROM:<s@client.example> ENVID=a+ZZ"][1])
        self.assertIn("NEVER cannot be combined", codes["RCPT TO:<alice@local.test> NOTIFY=NEVER,SUCCESS"][1])
        self.assertIn("Duplicate parameter RET", codes["MAIL FROM:<s@client.example> RET=FULL RET=HDRS"][1])
        self.assertIn("ORCPT", codes["RCPT TO:<alice@local.test> ORCPT=a@b"][1])


class Durable(DsnCase):
    async def test_a_restart_keeps_the_request(self):
        await self.relay.stop()
        self.relay = InProcessRelay(self.tmp, {"delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"],
                                                            "port": self.port}}, deliver=False)
        await self.relay.start()
        await self.transaction([("a@dsn.example", ["NOTIFY=SUCCESS", "ORCPT=rfc822;o@dsn.example"])],
                               ["RET=HDRS", "ENVID=keep-me"])
        await self.relay.stop()
        self.relay = InProcessRelay(self.tmp, {"delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"],
                                                            "port": self.port, "retry_min": 1}})
        await self.relay.start()
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, timeout=20, what="delivery after the restart")
        cmds = self.sinks["127.0.0.3"].transactions[0].session.commands
        self.assertTrue(any("RET=HDRS ENVID=keep-me" in c for c in cmds), cmds)
        self.assertIn("RCPT TO:<a@dsn.example> NOTIFY=SUCCESS ORCPT=rfc822;o@dsn.example", cmds)


class Chain(DsnCase):
    """Two relays: A relays to B (which offers DSN) by a route; B delivers
    locally and sends the success notice; A sends none (it carried the request)."""

    def more_config(self):
        return {"relay": {"routes": {"chain.example": f"127.0.0.6:{self.port}"}}}

    async def test_success_reported_by_the_last_hop(self):
        tmp_b = tempfile.mkdtemp(prefix="relay-dsn-b-")
        self.addCleanup(shutil.rmtree, tmp_b, True)
        usersmod.add_user(os.path.join(tmp_b, "users"), "bob@chain.example", "pw")
        b = InProcessRelay(tmp_b, {
            "hostname": "relay-b.test",
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.6"]},
            "local": {"domains": ["chain.example"]},
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port, "retry_min": 1},
        }, ip="127.0.0.6")
        await b.start()
        self.addCleanup(b.stop)
        await self.transaction([("bob@chain.example", ["NOTIFY=SUCCESS,FAILURE"])], ["ENVID=chain-1"])
        data = await self.one_notice("B's success notice")
        per_msg, (blk,) = check_report(data)
        self.assertEqual(per_msg["Reporting-MTA"], "dns; relay-b.test")
        self.assertEqual(per_msg["Original-Envelope-Id"], "chain-1")
        self.assertEqual(blk["Action"], "delivered")
        self.assertEqual(blk["Original-Recipient"], "rfc822; bob@chain.example")
        await apoll(lambda: not b.service.queue.messages, timeout=20, what="B's queue empty")
