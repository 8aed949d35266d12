"""The outbound SMTP client over real sockets against the test sink.

The cases Twisted's own client gets wrong (issue 3) each have a test here:
dot-stuffing at the start of the message and at chunk boundaries, CRLF kept
exactly, default timeouts, pipelined RCPTs (454 to STARTTLS is in
test_smtp_client_tls.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc

from twisted.internet import reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.delivery.mx import Hop
from relay.outbound.client import deliver
from relay.outbound.clientproto import ClientProtocol
from relay.outbound.msgproducer import CHUNK
from relay.outbound.replies import DeliveryReport, Reply
from relay.outbound.request import MessageFile, Outbound, Timeouts, TLSPolicy
from tests.support.sink import Sink

MSG = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: test\r\n\r\nHello.\r\n"


async def send(
    reactor, hops, *, sender: str, recipients, message_path: str, message_size: int, message_offset: int = 0,
    message_data: bytes | None = None, body_8bit: bool | None = None, helo: str, tls_mode: str = "may",
    tls_hostname: str | None = None, trust_root=None, auth: tuple[str, str] | None = None,
    connect_timeout: float = 30.0, timeouts: Timeouts | None = None, max_rcpts_per_txn: int = 50,
    queue_id: str | None = None, threadpool=None, cache=None, host_limit=None,
) -> DeliveryReport:
    """deliver() with each setting as a keyword (the tests' spelling): the
    Outbound built from them, the parts passed beside it."""
    out = Outbound(
        sender=sender, recipients=tuple(recipients),
        message=MessageFile(message_path, message_size, message_offset, message_data, body_8bit),
        helo=helo, tls=TLSPolicy(tls_mode, tls_hostname, trust_root), auth=auth, connect_timeout=connect_timeout,
        timeouts=timeouts or Timeouts(), max_rcpts_per_txn=max_rcpts_per_txn, queue_id=queue_id,
    )
    return await deliver(reactor, hops, out, threadpool=threadpool, cache=cache, host_limit=host_limit)


def write_big(path: str, line: bytes, count: int) -> int:
    """A big message file of count copies of line; returns its size."""
    block = line * 1024
    with open(path, "wb") as f:
        f.writelines(block for _ in range(count // 1024))
    return os.path.getsize(path)


class ClientCase(unittest.TestCase):
    """Helpers: sinks on 127.0.0.x, spool files, deliver() with short timeouts."""

    timeout = 60

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-client-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self._n = 0

    def sink(self, address: str = "127.0.0.2", **kw) -> Sink:
        s = Sink(address, **kw).start()
        self.addCleanup(s.stop)
        return s

    def hop(self, sink: Sink, host: str = "mx.test", pref: int = 10) -> Hop:
        return Hop(host, sink.interface, sink.port, pref)

    def spool(self, message: bytes, prefix: bytes = b"", suffix: bytes = b"") -> tuple[str, int, int]:
        self._n += 1
        path = os.path.join(self.dir, f"msg{self._n}")
        with open(path, "wb") as f:
            f.write(prefix + message + suffix)
        return path, len(prefix), len(message)

    async def deliver(
        self, hops, message: bytes = MSG, recipients=("rcpt@dest.test",), *, prefix=b"", suffix=b"", **kw
    ) -> DeliveryReport:
        path, offset, size = self.spool(message, prefix, suffix)
        kw.setdefault("sender", "sender@origin.test")
        kw.setdefault("helo", "relay.test")
        kw.setdefault("tls_mode", "none")
        kw.setdefault("timeouts", Timeouts.uniform(2.0))
        kw.setdefault("connect_timeout", 2.0)
        return await send(
            reactor,
            hops,
            recipients=list(recipients),
            message_path=path,
            message_offset=offset,
            message_size=size,
            **kw,
        )

    def assertDelivered(self, report: DeliveryReport, *rcpts: str):
        for r in rcpts:
            self.assertEqual(report.results[r].kind, "delivered", report.results[r])


class BasicTests(ClientCase):
    async def test_one_recipient(self):
        s = self.sink()
        rep = await self.deliver([self.hop(s)])
        res = rep.results["rcpt@dest.test"]
        self.assertEqual((res.kind, res.code, res.status), ("delivered", 250, "2.0.0"))
        self.assertIn("queued as SINK1", res.text)
        self.assertEqual(res.hop, self.hop(s))
        self.assertEqual(rep.hop, self.hop(s))
        self.assertEqual(rep.attempts, [])
        t = s.transactions[0]
        self.assertEqual(t.mail_from, "sender@origin.test")
        self.assertEqual(t.rcpts, ["rcpt@dest.test"])
        self.assertEqual(t.data, MSG)
        sess = s.sessions[0]
        self.assertEqual(sess.helo, "relay.test")
        self.assertTrue(sess.esmtp)
        self.assertEqual(sess.commands[-1], "QUIT")

    async def test_ipv6_hop(self):
        s = self.sink("::1")
        rep = await self.deliver([Hop("mx6.test", "::1", s.port, 10)])
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(str(rep.hop), f"mx6.test[::1]:{s.port}")

    async def test_null_sender(self):
        s = self.sink()
        rep = await self.deliver([self.hop(s)], sender="")
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.sessions[0].commands[1].split(" ")[0:2], ["MAIL", "FROM:<>"])

    async def test_several_recipients_one_transaction(self):
        s = self.sink()
        rcpts = [f"u{i}@dest.test" for i in range(5)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertDelivered(rep, *rcpts)
        self.assertEqual(len(s.transactions), 1)
        self.assertEqual(s.transactions[0].rcpts, rcpts)
        self.assertEqual(len(s.sessions), 1)
        self.assertEqual(sum(1 for c in s.sessions[0].commands if c == "DATA"), 1)

    async def test_duplicate_recipients_sent_once(self):
        s = self.sink()
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "a@dest.test"])
        self.assertEqual(list(rep.results), ["a@dest.test"])
        self.assertEqual(s.transactions[0].rcpts, ["a@dest.test"])

    async def test_per_recipient_results(self):
        s = self.sink(
            rcpt_replies={
                "bad@dest.test": "550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown",
                "full@dest.test": "452 4.2.2 Mailbox full",
                "grey@dest.test": "450 4.7.1 Greylisted, try later",
            }
        )
        rcpts = ["ok@dest.test", "bad@dest.test", "full@dest.test", "grey@dest.test", "ok2@dest.test"]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertDelivered(rep, "ok@dest.test", "ok2@dest.test")
        bad = rep.results["bad@dest.test"]
        self.assertEqual((bad.kind, bad.code, bad.status, bad.stage), ("bounced", 550, "5.1.1", "RCPT TO"))
        self.assertIn("User unknown", bad.text)
        self.assertEqual(bad.diagnostic, "smtp; 550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown")
        self.assertIn("(in reply to RCPT TO command)", bad.describe())
        self.assertEqual(rep.results["full@dest.test"].kind, "deferred")
        self.assertEqual(rep.results["grey@dest.test"].status, "4.7.1")
        self.assertEqual(s.transactions[0].rcpts, ["ok@dest.test", "ok2@dest.test"])
        self.assertEqual(len(s.transactions), 1)

    async def test_all_recipients_rejected_no_data(self):
        s = self.sink(rcpt_replies={"a@dest.test": "550 5.1.1 no", "b@dest.test": "550 5.1.1 no"})
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.recipients("bounced"), ["a@dest.test", "b@dest.test"])
        self.assertEqual(s.transactions, [])
        self.assertEqual(len(s.sessions), 1)  # a completed conversation: no next hop

    async def test_mail_from_rejected_applies_to_all(self):
        s = self.sink(replies={"MAIL": "553 5.7.1 <sender@origin.test>: Sender address rejected"})
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        for r in ("a@dest.test", "b@dest.test"):
            self.assertEqual(
                (rep.results[r].kind, rep.results[r].status, rep.results[r].stage), ("bounced", "5.7.1", "MAIL FROM")
            )

    async def test_mail_from_4xx_defers_all(self):
        s = self.sink(replies={"MAIL": "451 4.3.0 Temporary local problem"})
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.recipients("deferred"), ["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.results["a@dest.test"].code, 451)

    async def test_data_rejected(self):
        s = self.sink(replies={"DATA": "554 5.3.0 no data today"}, pipelining=False)
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test"])
        self.assertEqual((rep.results["a@dest.test"].kind, rep.results["a@dest.test"].stage), ("bounced", "DATA"))

    async def test_final_reply_rejected_and_deferred(self):
        s = self.sink(replies={"final": "554 5.7.1 Message rejected as spam"})
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.recipients("bounced"), ["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.results["a@dest.test"].stage, "end of DATA")
        s.b.replies["final"] = "451 4.3.0 Queue file write error"
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test"])
        self.assertEqual(rep.results["a@dest.test"].kind, "deferred")

    async def test_4xx_then_success_across_attempts(self):
        s = self.sink(rcpt_replies={"a@dest.test": ["450 4.7.1 Greylisted", "250 2.1.5 Ok"]})
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.results["a@dest.test"].kind, "deferred")
        self.assertDelivered(rep, "b@dest.test")
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test"])
        self.assertDelivered(rep, "a@dest.test")
        self.assertEqual(s.delivered_to(), ["b@dest.test", "a@dest.test"])

    async def test_derived_enhanced_codes(self):
        s = self.sink(
            enhancedstatuscodes=False, rcpt_replies={"bad@dest.test": "550 no such user", "t@dest.test": "451 later"}
        )
        rep = await self.deliver([self.hop(s)], recipients=["ok@dest.test", "bad@dest.test", "t@dest.test"])
        self.assertEqual(rep.results["ok@dest.test"].status, "2.0.0")
        self.assertEqual(rep.results["bad@dest.test"].status, "5.0.0")
        self.assertEqual(rep.results["t@dest.test"].status, "4.0.0")

    async def test_bad_addresses_never_reach_the_wire(self):
        s = self.sink()
        rep = await self.deliver([self.hop(s)], recipients=["ok@dest.test", "evil@dest.test>\r\nRCPT TO:<x@y.test"])
        self.assertDelivered(rep, "ok@dest.test")
        self.assertEqual(rep.results["evil@dest.test>\r\nRCPT TO:<x@y.test"].kind, "bounced")
        self.assertEqual(s.transactions[0].rcpts, ["ok@dest.test"])
        rep = await self.deliver([self.hop(s)], sender="a@b\r\nRSET", recipients=["ok@dest.test"])
        self.assertEqual(rep.results["ok@dest.test"].status, "5.1.7")

    async def test_smtputf8(self):
        s = self.sink()
        rep = await self.deliver([self.hop(s)], recipients=["ok@dest.test", "j\u00f6rg@dest.test"])
        self.assertDelivered(rep, "ok@dest.test")
        self.assertEqual(rep.results["j\u00f6rg@dest.test"].status, "5.6.7")
        s.b.smtputf8 = True
        rep = await self.deliver([self.hop(s)], recipients=["j\u00f6rg@dest.test"])
        self.assertDelivered(rep, "j\u00f6rg@dest.test")
        self.assertIn("SMTPUTF8", s.transactions[-1].mail_params)


class ExtensionTests(ClientCase):
    async def test_pipelining_sends_mail_rcpts_data_together(self):
        s = self.sink(pipelining=True, delay=0.01)
        rcpts = [f"u{i}@dest.test" for i in range(4)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertDelivered(rep, *rcpts)
        # MAIL + 4 RCPT + DATA were all waiting for replies at once.
        self.assertGreaterEqual(s.sessions[0].max_outstanding, 6)

    async def test_pipelined_replies_matched_in_order(self):
        s = self.sink(
            pipelining=True, rcpt_replies={"u1@dest.test": "550 5.1.1 one", "u3@dest.test": "450 4.2.1 three"}
        )
        rcpts = [f"u{i}@dest.test" for i in range(5)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertEqual(
            [rep.results[r].kind for r in rcpts], ["delivered", "bounced", "delivered", "deferred", "delivered"]
        )
        self.assertIn("one", rep.results["u1@dest.test"].text)
        self.assertIn("three", rep.results["u3@dest.test"].text)

    async def test_pipelined_all_rejected_with_354(self):
        # A server that answers 354 although no recipient was accepted:
        # the client ends the empty message so the session stays in step.
        s = self.sink(pipelining=True, rcpt_replies={"a@dest.test": "550 5.1.1 no"})
        s.b.replies["DATA"] = "354 go ahead"
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"], max_rcpts_per_txn=1)
        self.assertEqual(rep.results["a@dest.test"].kind, "bounced")
        self.assertDelivered(rep, "b@dest.test")
        sess = s.sessions[0]
        self.assertEqual(sess.commands[2:5], ["RCPT TO:<a@dest.test>", "DATA", "RSET"])
        self.assertEqual((sess.transactions[0].rcpts, sess.transactions[0].raw), ([], b".\r\n"))

    async def test_no_pipelining_one_by_one(self):
        s = self.sink(pipelining=False, delay=0.01)
        rcpts = [f"u{i}@dest.test" for i in range(4)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertDelivered(rep, *rcpts)
        self.assertEqual(s.sessions[0].max_outstanding, 1)

    async def test_helo_fallback(self):
        s = self.sink(ehlo=False)
        rep = await self.deliver([self.hop(s)])
        self.assertDelivered(rep, "rcpt@dest.test")
        sess = s.sessions[0]
        self.assertEqual(sess.commands[:2], ["EHLO relay.test", "HELO relay.test"])
        self.assertFalse(sess.esmtp)
        self.assertEqual(sess.max_outstanding, 1)  # no extensions known: no pipelining
        self.assertEqual(s.transactions[0].mail_params, "")

    async def test_ehlo_and_helo_rejected_is_hop_failure(self):
        s = self.sink(ehlo=False, replies={"HELO": "550 5.7.1 go away"})
        rep = await self.deliver([self.hop(s)])
        self.assertEqual(rep.results["rcpt@dest.test"].kind, "deferred")
        self.assertIn("HELO", rep.attempts[0][1])

    async def test_size_parameter(self):
        s = self.sink(size=10_000)
        rep = await self.deliver([self.hop(s)])
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIn(f"SIZE={len(MSG)}", s.transactions[0].mail_params)

    async def test_size_not_offered_no_parameter(self):
        s = self.sink(size=None)
        await self.deliver([self.hop(s)])
        self.assertNotIn("SIZE", s.transactions[0].mail_params)

    async def test_message_larger_than_server_limit(self):
        s = self.sink(size=100)
        rep = await self.deliver([self.hop(s)], message=b"x" * 200 + b"\r\n", recipients=["a@dest.test", "b@dest.test"])
        for r in ("a@dest.test", "b@dest.test"):
            self.assertEqual((rep.results[r].kind, rep.results[r].status), ("bounced", "5.3.4"))
        self.assertIn("exceeds size limit 100", rep.results["a@dest.test"].text)
        self.assertFalse(any(c.startswith("MAIL") for c in s.sessions[0].commands))

    async def test_body_8bitmime(self):
        s = self.sink(eightbitmime=True)
        await self.deliver([self.hop(s)], message=b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n")
        self.assertIn("BODY=8BITMIME", s.transactions[0].mail_params)
        self.assertEqual(s.transactions[0].data, b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n")
        await self.deliver([self.hop(s)], message=MSG)
        self.assertNotIn("BODY", s.transactions[1].mail_params)
        await self.deliver([self.hop(s)], message=MSG, body_8bit=True)
        self.assertIn("BODY=8BITMIME", s.transactions[2].mail_params)

    async def test_8bit_without_8bitmime_sent_anyway(self):
        s = self.sink(eightbitmime=False)
        body = b"Subject: x\r\n\r\n\xff\xfe bytes\r\n"
        rep = await self.deliver([self.hop(s)], message=body)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.transactions[0].data, body)
        self.assertNotIn("BODY", s.transactions[0].mail_params)


class TransactionLimitTests(ClientCase):
    async def test_max_rcpts_per_transaction(self):
        s = self.sink()
        rcpts = [f"u{i}@dest.test" for i in range(5)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts, max_rcpts_per_txn=2)
        self.assertDelivered(rep, *rcpts)
        self.assertEqual([t.rcpts for t in s.transactions], [rcpts[:2], rcpts[2:4], rcpts[4:]])
        self.assertEqual(len(s.sessions), 1)

    async def test_452_too_many_recipients_next_transaction(self):
        s = self.sink(max_rcpts=2)
        rcpts = [f"u{i}@dest.test" for i in range(5)]
        rep = await self.deliver([self.hop(s)], recipients=rcpts)
        self.assertDelivered(rep, *rcpts)
        self.assertEqual([t.rcpts for t in s.transactions], [rcpts[:2], rcpts[2:4], rcpts[4:]])
        self.assertEqual(len(s.sessions), 1)

    async def test_452_without_any_accepted_is_deferred(self):
        s = self.sink(max_rcpts=0)
        rep = await self.deliver([self.hop(s)], recipients=["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.recipients("deferred"), ["a@dest.test", "b@dest.test"])
        self.assertEqual(rep.results["a@dest.test"].code, 452)

    async def test_rset_between_failed_transactions(self):
        s = self.sink(replies={"MAIL": ["451 4.3.0 busy", "250 2.1.0 Ok"]})
        rcpts = ["a@dest.test", "b@dest.test"]
        rep = await self.deliver([self.hop(s)], recipients=rcpts, max_rcpts_per_txn=1)
        self.assertEqual(rep.results["a@dest.test"].kind, "deferred")
        self.assertDelivered(rep, "b@dest.test")
        self.assertIn("RSET", s.sessions[0].commands)


class DataTests(ClientCase):
    """Dot-stuffing and bytes on the wire: what Twisted's client gets wrong."""

    async def roundtrip(self, message: bytes, **kw) -> bytes:
        s = self.sink(**kw)
        rep = await self.deliver([self.hop(s)], message=message)
        self.assertDelivered(rep, "rcpt@dest.test")
        return s.transactions[0]

    async def test_leading_dot_of_the_message(self):
        msg = b".leading dot on the first line\r\nsecond\r\n"
        t = await self.roundtrip(msg)
        self.assertEqual(t.data, msg)
        self.assertTrue(t.raw.startswith(b"..leading"))

    async def test_lines_that_are_only_a_dot(self):
        msg = b"Subject: x\r\n\r\n.\r\nbetween\r\n.\r\n..\r\n...x\r\nend\r\n"
        t = await self.roundtrip(msg)
        self.assertEqual(t.data, msg)
        self.assertIn(b"\r\n..\r\nbetween\r\n..\r\n...\r\n....x\r\n", t.raw)

    async def test_message_that_is_only_a_dot(self):
        t = await self.roundtrip(b".\r\n")
        self.assertEqual(t.data, b".\r\n")
        self.assertEqual(t.raw, b"..\r\n.\r\n")

    async def test_smuggling_sequence_is_stuffed(self):
        msg = b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
        s = self.sink()
        rep = await self.deliver([self.hop(s)], message=msg)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(len(s.transactions), 1)
        self.assertEqual(s.transactions[0].data, msg)

    async def test_dots_at_every_chunk_boundary(self):
        # "\r\n." straddling the client's read chunks (64 KiB) and Twisted's
        # 16 KiB boundaries, in every alignment.
        for boundary in (16384, CHUNK, 2 * CHUNK):
            for shift in (-2, -1, 0, 1):
                # The "." lands at index boundary + shift + 2.
                head = b"a" * 70 + b"\r\n"
                filler_len = boundary + shift - len(head)
                body = head + b"b" * filler_len + b"\r\n.dot after boundary\r\n.\r\nend\r\n"
                t = await self.roundtrip(body)
                self.assertEqual(t.data, body, f"boundary {boundary} shift {shift}")

    async def test_chunk_ends_with_crlf_and_next_starts_with_dot(self):
        n = CHUNK
        body = b"x" * (n - 2) + b"\r\n" + b".next chunk starts with a dot\r\n"
        self.assertEqual(body[n : n + 1], b".")
        t = await self.roundtrip(body)
        self.assertEqual(t.data, body)
        self.assertIn(b"\r\n..next chunk", t.raw)

    async def test_crlf_preserved_exactly(self):
        msg = b"Subject: crlf\r\n\r\nline1\r\nline2\r\n\r\n\r\nlast\r\n"
        t = await self.roundtrip(msg)
        self.assertEqual(t.data, msg)
        self.assertNotIn(b"\r\r\n", t.raw)
        s = self.sink("127.0.0.3")
        await self.deliver([self.hop(s)], message=msg)
        self.assertNotIn(b"\r\r", bytes(s.sessions[0].wire))

    async def test_message_without_final_crlf(self):
        t = await self.roundtrip(b"Subject: x\r\n\r\nno newline at the end")
        self.assertEqual(t.data, b"Subject: x\r\n\r\nno newline at the end\r\n")
        self.assertTrue(t.raw.endswith(b"no newline at the end\r\n.\r\n"))

    async def test_message_ending_in_bare_cr(self):
        t = await self.roundtrip(b"Subject: x\r\n\r\nends in CR\r")
        self.assertTrue(t.raw.endswith(b"ends in CR\r\r\n.\r\n"))

    async def test_empty_message(self):
        t = await self.roundtrip(b"")
        self.assertEqual(t.data, b"")
        self.assertEqual(t.raw, b".\r\n")

    async def test_message_at_offset_in_spool_file(self):
        s = self.sink()
        rep = await self.deliver(
            [self.hop(s)], message=MSG, prefix=b"ENVELOPE {json}\n" * 3, suffix=b"TRAILER\r\n.\r\n"
        )
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(s.transactions[0].data, MSG)

    async def test_truncated_spool_file_is_never_sent_as_complete(self):
        s = self.sink()
        path, offset, size = self.spool(MSG)
        rep = await send(
            reactor,
            [self.hop(s)],
            sender="a@b.test",
            recipients=["r@dest.test"],
            message_path=path,
            message_offset=offset,
            message_size=size + 100,
            helo="relay.test",
            tls_mode="none",
            timeouts=Timeouts.uniform(2),
        )
        res = rep.results["r@dest.test"]
        self.assertEqual(res.kind, "deferred")
        self.assertIn("shorter than its recorded size", res.text)
        self.assertEqual(s.transactions, [])

    async def test_big_message_streams_with_flat_memory(self):
        path = os.path.join(self.dir, "big")
        size = write_big(path, b"y" * 998 + b"\r\n", 16 * 1024)  # 16 MB
        s = self.sink(keep_data=False)
        tracemalloc.start()
        try:
            rep = await send(
                reactor,
                [self.hop(s)],
                sender="a@b.test",
                recipients=["r@dest.test"],
                message_path=path,
                message_size=size,
                helo="relay.test",
                tls_mode="none",
                timeouts=Timeouts.uniform(10),
                body_8bit=False,
            )
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertDelivered(rep, "r@dest.test")
        self.assertEqual(s.transactions[0].size, size)
        # Client and sink together stay far below the message size.
        self.assertLess(peak, 4 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size}-byte message")


class InMemoryDataTests(DataTests):
    """The same wire bytes when the message comes from memory (just
    received, relay.queue.manager keeps it for the first attempt) instead of the
    spool file.  The file is overwritten first, so a small message can only
    arrive intact if it was really sent from memory."""

    async def deliver(self, hops, message: bytes = MSG, recipients=("rcpt@dest.test",), *, prefix=b"",
                      suffix=b"", **kw) -> DeliveryReport:
        path, offset, size = self.spool(message, prefix, suffix)
        if size <= CHUNK:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(b"X" * size)
        kw.setdefault("sender", "sender@origin.test")
        kw.setdefault("helo", "relay.test")
        kw.setdefault("tls_mode", "none")
        kw.setdefault("timeouts", Timeouts.uniform(2.0))
        kw.setdefault("connect_timeout", 2.0)
        return await send(reactor, hops, recipients=list(recipients), message_path=path,
                             message_offset=offset, message_size=size, message_data=message, **kw)

    async def test_data_of_another_size_is_not_used(self):
        s = self.sink()
        path, offset, size = self.spool(MSG)
        rep = await send(reactor, [self.hop(s)], sender="a@b.test", recipients=["r@dest.test"],
                            message_path=path, message_offset=offset, message_size=size,
                            message_data=MSG[:-2], helo="relay.test", tls_mode="none",
                            timeouts=Timeouts.uniform(2))
        self.assertDelivered(rep, "r@dest.test")
        self.assertEqual(s.transactions[0].data, MSG)

    async def test_8bit_known_from_memory(self):
        s = self.sink(eightbitmime=True)
        await self.deliver([self.hop(s)], message=b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n")
        self.assertIn("BODY=8BITMIME", s.transactions[0].mail_params)
        self.assertEqual(s.transactions[0].data, b"Subject: x\r\n\r\ncaf\xc3\xa9\r\n")


class DefaultsTests(unittest.TestCase):
    def test_rfc5321_default_timeouts(self):
        t = Timeouts()
        self.assertEqual(
            (t.greeting, t.mail, t.rcpt, t.data_init, t.data_block, t.data_end),
            (300.0, 300.0, 300.0, 120.0, 180.0, 600.0),
        )
        self.assertGreater(t.session, 0)

    def test_reply_status(self):
        self.assertEqual(Reply(250, ("2.1.5 Ok",)).status, "2.1.5")
        self.assertEqual(Reply(550, ("5.1.1 no",)).status, "5.1.1")
        self.assertEqual(Reply(550, ("4.1.1 wrong class",)).status, "5.0.0")
        self.assertEqual(Reply(451, ("try later",)).status, "4.0.0")
        self.assertEqual(Reply(250, ("mx.test greets", "PIPELINING")).text, "250-mx.test greets\n250 PIPELINING")


class ReplyParserTests(unittest.TestCase):
    """The reply reader on a StringTransport (no sockets)."""

    def setUp(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.proto = ClientProtocol(self.clock)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_multiline_and_order(self):
        got = []
        self.proto.expect("a", 10).addCallback(got.append)
        self.proto.expect("b", 10).addCallback(got.append)
        self.proto.dataReceived(b"250-first\r\n250-sec")
        self.assertEqual(got, [])
        self.proto.dataReceived(b"ond\r\n250 third\r\n550 5.1.1 no\r\n")
        self.assertEqual(got, [Reply(250, ("first", "second", "third")), Reply(550, ("5.1.1 no",))])

    def test_malformed_reply_aborts(self):
        errors = []
        self.proto.expect("greeting", 10).addErrback(errors.append)
        self.proto.dataReceived(b"hello there\r\n")
        self.assertTrue(self.transport.disconnecting or self.proto._failure is not None)
        self.proto.connectionLost(None)
        self.assertEqual(errors[0].value.kind, "protocol")

    def test_timeout(self):
        errors = []
        self.proto.expect("greeting", 5).addErrback(errors.append)
        self.clock.advance(4.9)
        self.assertEqual(errors, [])
        self.clock.advance(0.2)
        self.proto.connectionLost(None)
        self.assertEqual((errors[0].value.kind, errors[0].value.stage), ("timeout", "greeting"))

    def test_each_waiter_times_out_from_its_own_start(self):
        # the timer is moved lazily (one per connection): a reply restarts
        # the clock for the next waiter, with that waiter's timeout and stage
        got, errors = [], []
        self.proto.expect("MAIL FROM", 10).addCallback(got.append)
        self.proto.expect("DATA", 3).addErrback(errors.append)
        self.clock.advance(8)
        self.proto.dataReceived(b"250 ok\r\n")
        self.assertEqual(len(got), 1)
        self.clock.advance(2.9)  # 10.9 s since the start, 2.9 s since the reply
        self.assertEqual((errors, self.proto._failure), ([], None))
        self.clock.advance(0.2)
        self.assertEqual((self.proto._failure.kind, self.proto._failure.stage), ("timeout", "DATA"))
        self.proto.connectionLost(None)
        self.assertEqual(errors[0].value.stage, "DATA")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expect_group_in_order_then_lost(self):
        got = []
        self.proto.expect_group([("MAIL FROM", 5), ("RCPT TO", 5), ("DATA", 5)]).addCallback(got.append)
        self.proto.dataReceived(b"250 a\r\n550 5.1.1 b\r\n")
        self.assertEqual(got, [])
        self.proto.connectionLost(None)  # the DATA reply never came
        [results] = got
        self.assertEqual(results[:2], [(True, Reply(250, ("a",))), (True, Reply(550, ("5.1.1 b",)))])
        ok, failure = results[2]
        self.assertFalse(ok)
        self.assertEqual((failure.value.kind, failure.value.stage), ("lost", "greeting"))
        # after the loss, a new group fails at once, without raising
        later = []
        self.proto.expect_group([("MAIL FROM", 5)]).addCallback(later.append)
        self.assertFalse(later[0][0][0])

    def test_expect_group_takes_early_replies(self):
        self.proto.dataReceived(b"250 early\r\n")
        got = []
        self.proto.expect_group([("MAIL FROM", 5), ("DATA", 5)]).addCallback(got.append)
        self.proto.dataReceived(b"354 go\r\n")
        self.assertEqual(got, [[(True, Reply(250, ("early",))), (True, Reply(354, ("go",)))]])

    def test_expect_group_timeout(self):
        got = []
        self.proto.expect_group([("MAIL FROM", 5), ("DATA", 5)]).addCallback(got.append)
        self.clock.advance(5.1)
        self.proto.connectionLost(None)
        self.assertEqual([r[1].value.kind for r in got[0]], ["timeout", "timeout"])

    def test_no_timeout_without_a_waiter(self):
        self.proto.expect("greeting", 5)
        self.proto.dataReceived(b"220 hi\r\n")
        self.clock.advance(100)
        self.assertIsNone(self.proto._failure)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the early timer ended by itself
        errors = []
        self.proto.expect("EHLO", 5).addErrback(errors.append)
        self.clock.advance(5.1)
        self.assertEqual(self.proto._failure.stage, "EHLO")

    def test_reply_after_starttls_boundary_discarded(self):
        got = []
        self.proto.expect("STARTTLS", 10, tls_boundary=True).addCallback(got.append)
        self.proto.dataReceived(b"220 go ahead\r\n250 injected\r\n")
        self.assertEqual(got, [Reply(220, ("go ahead",))])
        self.proto.dataReceived(b"250 more injected\r\n")
        self.assertEqual(self.proto._early, type(self.proto._early)())
        self.assertGreater(self.proto.discarded, 0)

    def test_overlong_line_aborts(self):
        errors = []
        self.proto.expect("greeting", 10).addErrback(errors.append)
        self.proto.dataReceived(b"220 " + b"x" * 10000)
        self.proto.connectionLost(None)
        self.assertEqual(errors[0].value.kind, "protocol")
