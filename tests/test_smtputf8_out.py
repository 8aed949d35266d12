"""SMTPUTF8 on the way out (issue 17, relaying): the client against real sinks.

A message that came with SMTPUTF8 goes with the MAIL parameter to a hop that
offers it; to one that does not only when it does not need it (ASCII
addresses once in A-labels, ASCII header block); otherwise the other hops
are tried and the recipients bounce with 5.6.7 when none offers it.  The
sinks refuse what a real server without SMTPUTF8 refuses (a non-ASCII
address, the parameter), so a wrong send shows as a refusal too.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial import unittest

from relay.delivery.mx import Hop
from relay.outbound import smtputf8 as u8
from relay.outbound.client import deliver
from relay.outbound.conncache import ConnectionCache
from relay.outbound.replies import DeliveryReport
from relay.outbound.request import DsnParams, MessageFile, Outbound, Timeouts, TLSPolicy
from tests.support.sink import Sink
from tests.test_smtp_client import ClientCase

JOERG = "j\u00f6rg@dest.test"
ASCII_MSG = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: plain\r\n\r\nHello.\r\n"
UTF8_HDR_MSG = "From: a@origin.test\r\nTo: b@dest.test\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHello.\r\n".encode()
UTF8_BODY_MSG = "From: a@origin.test\r\nTo: b@dest.test\r\nSubject: plain\r\n\r\nGr\u00fc\u00dfe.\r\n".encode()


class Utf8Case(ClientCase):
    async def send(self, hops, message: bytes = ASCII_MSG, recipients=("rcpt@dest.test",), *,
                   sender: str = "sender@origin.test", smtputf8: bool = True, in_memory: bool = False,
                   dsn: DsnParams | None = None, cache: ConnectionCache | None = None) -> DeliveryReport:
        path, offset, size = self.spool(message, prefix=b"RELAYQ1 {}\n")
        out = Outbound(
            sender=sender, recipients=tuple(recipients),
            message=MessageFile(path, size, offset, message if in_memory else None),
            helo="relay.test", tls=TLSPolicy("none"), connect_timeout=2.0, timeouts=Timeouts.uniform(2.0),
            smtputf8=smtputf8, dsn=dsn,
        )
        return await deliver(reactor, hops, out, cache=cache)

    def params(self, sink: Sink) -> list[str]:
        return sink.transactions[-1].mail_params.upper().split()


class OfferedTests(Utf8Case):
    async def test_utf8_addresses_go_with_the_parameter(self):
        s = self.sink(smtputf8=True)
        rep = await self.send([self.hop(s)], UTF8_HDR_MSG, [JOERG], sender="s\u00e9n@origin.test")
        self.assertDelivered(rep, JOERG)
        t = s.transactions[0]
        self.assertIn("SMTPUTF8", self.params(s))
        self.assertEqual((t.mail_from, t.rcpts), ("s\u00e9n@origin.test", [JOERG]))
        self.assertEqual(t.data, UTF8_HDR_MSG)  # byte for byte
        wire = bytes(t.session.wire)
        self.assertIn("MAIL FROM:<s\u00e9n@origin.test> BODY=8BITMIME SMTPUTF8\r\n".encode(), wire)  # raw UTF-8
        self.assertIn("RCPT TO:<j\u00f6rg@dest.test>".encode(), wire)

    async def test_the_flag_alone_says_smtputf8_to_a_hop_that_offers_it(self):
        # as Postfix: the sender asked for it, the hop has it, so it goes along
        s = self.sink(smtputf8=True)
        rep = await self.send([self.hop(s)], ASCII_MSG)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertIn("SMTPUTF8", self.params(s))

    async def test_u_label_domain_sent_as_a_labels(self):
        s = self.sink(smtputf8=True)
        rep = await self.send([self.hop(s)], ASCII_MSG, ["j\u00f6rg@b\u00fccher.example"])
        self.assertDelivered(rep, "j\u00f6rg@b\u00fccher.example")
        self.assertEqual(s.transactions[0].rcpts, ["j\u00f6rg@xn--bcher-kva.example"])

    async def test_ascii_mail_is_relayed_as_today(self):
        s = self.sink(smtputf8=True)
        rep = await self.send([self.hop(s)], ASCII_MSG, smtputf8=False)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertNotIn("SMTPUTF8", self.params(s))
        self.assertEqual(s.transactions[0].data, ASCII_MSG)

    async def test_utf8_orcpt_with_dsn(self):
        s = self.sink(smtputf8=True, dsn=True)
        dsn = DsnParams("HDRS", "", {JOERG: ("FAILURE", "utf-8;j\u00f6rg@dest.test")})
        rep = await self.send([self.hop(s)], ASCII_MSG, [JOERG], dsn=dsn)
        self.assertDelivered(rep, JOERG)
        rcpt = [c for c in s.sessions[0].commands if c.startswith("RCPT")][0]
        self.assertEqual(rcpt, "RCPT TO:<j\u00f6rg@dest.test> NOTIFY=FAILURE ORCPT=utf-8;j\u00f6rg@dest.test")


    async def test_utf8_recipient_without_orcpt_gets_the_utf8_type(self):
        s = self.sink(smtputf8=True, dsn=True)
        rep = await self.send([self.hop(s)], ASCII_MSG, [JOERG, "a@dest.test"])
        self.assertDelivered(rep, JOERG, "a@dest.test")
        rcpts = [c for c in s.sessions[0].commands if c.startswith("RCPT")]
        self.assertEqual(rcpts, ["RCPT TO:<j\u00f6rg@dest.test> ORCPT=utf-8;j\u00f6rg@dest.test",
                                 "RCPT TO:<a@dest.test> ORCPT=rfc822;a@dest.test"])


class NotOfferedTests(Utf8Case):
    async def test_utf8_orcpt_goes_in_its_7bit_form(self):
        s = self.sink(smtputf8=False, dsn=True)
        dsn = DsnParams("", "", {"a@dest.test": (None, "utf-8;j\u00f6rg@dest.test")})
        rep = await self.send([self.hop(s)], ASCII_MSG, ["a@dest.test"], dsn=dsn)
        self.assertDelivered(rep, "a@dest.test")
        rcpt = [c for c in s.sessions[0].commands if c.startswith("RCPT")][0]
        self.assertEqual(rcpt, "RCPT TO:<a@dest.test> ORCPT=utf-8;j\\x{F6}rg@dest.test")
        self.assertTrue(bytes(s.sessions[0].wire).isascii())


    async def test_not_needed_goes_without_the_parameter(self):
        s = self.sink(smtputf8=False)
        rep = await self.send([self.hop(s)], ASCII_MSG)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertNotIn("SMTPUTF8", self.params(s))
        self.assertEqual(s.transactions[0].data, ASCII_MSG)

    async def test_utf8_body_alone_does_not_need_it(self):
        s = self.sink(smtputf8=False)
        rep = await self.send([self.hop(s)], UTF8_BODY_MSG)
        self.assertDelivered(rep, "rcpt@dest.test")
        self.assertEqual(self.params(s), ["BODY=8BITMIME"])

    async def test_a_label_domain_with_ascii_local_part_does_not_need_it(self):
        s = self.sink(smtputf8=False)
        rep = await self.send([self.hop(s)], ASCII_MSG, ["info@b\u00fccher.example"])
        self.assertDelivered(rep, "info@b\u00fccher.example")
        self.assertEqual(s.transactions[0].rcpts, ["info@xn--bcher-kva.example"])
        self.assertNotIn("SMTPUTF8", self.params(s))

    async def test_utf8_header_bounces_5_6_7(self):
        for in_memory in (False, True):
            s = self.sink(smtputf8=False)
            rep = await self.send([self.hop(s)], UTF8_HDR_MSG, ["a@dest.test", "b@dest.test"], in_memory=in_memory)
            for r in ("a@dest.test", "b@dest.test"):
                res = rep.results[r]
                self.assertEqual((res.kind, res.status), ("bounced", "5.6.7"))
                self.assertEqual(res.text, f"SMTPUTF8 is required, but was not offered by host mx.test[{s.interface}]")
            self.assertEqual(s.transactions, [])
            cmds = s.sessions[0].commands
            self.assertFalse([c for c in cmds if c.startswith("MAIL")], cmds)
            self.assertEqual(cmds[-1], "QUIT")

    async def test_utf8_sender_bounces_every_recipient(self):
        s = self.sink(smtputf8=False)
        rep = await self.send([self.hop(s)], ASCII_MSG, ["a@dest.test"], sender="s\u00e9n@origin.test")
        self.assertEqual(rep.results["a@dest.test"].status, "5.6.7")
        self.assertEqual(s.transactions, [])

    async def test_only_the_utf8_recipient_fails(self):
        s = self.sink(smtputf8=False)
        rep = await self.send([self.hop(s)], ASCII_MSG, ["a@dest.test", JOERG])
        self.assertDelivered(rep, "a@dest.test")
        self.assertEqual((rep.results[JOERG].kind, rep.results[JOERG].status), ("bounced", "5.6.7"))
        self.assertEqual(s.transactions[0].rcpts, ["a@dest.test"])
        self.assertNotIn("SMTPUTF8", self.params(s))


class TwoHopTests(Utf8Case):
    async def test_second_mx_offers_it(self):
        first = self.sink("127.0.0.2", smtputf8=False)
        second = self.sink("127.0.0.3", smtputf8=True)
        hops = [self.hop(first, "mx1.test", 10), self.hop(second, "mx2.test", 20)]
        rep = await self.send(hops, UTF8_HDR_MSG, [JOERG])
        self.assertDelivered(rep, JOERG)
        self.assertEqual(rep.results[JOERG].hop, hops[1])
        self.assertEqual(first.transactions, [])
        self.assertEqual(second.transactions[0].data, UTF8_HDR_MSG)
        self.assertIn("SMTPUTF8", self.params(second))
        self.assertEqual(rep.attempts,
                         [(hops[0], "SMTPUTF8 is required, but was not offered by host mx1.test[127.0.0.2]")])

    async def test_split_recipients_across_hops(self):
        first = self.sink("127.0.0.2", smtputf8=False)
        second = self.sink("127.0.0.3", smtputf8=True)
        hops = [self.hop(first, "mx1.test", 10), self.hop(second, "mx2.test", 20)]
        rep = await self.send(hops, ASCII_MSG, ["a@dest.test", JOERG])
        self.assertDelivered(rep, "a@dest.test", JOERG)
        self.assertEqual(first.transactions[0].rcpts, ["a@dest.test"])
        self.assertEqual(second.transactions[0].rcpts, [JOERG])

    async def test_no_mx_offers_it(self):
        first = self.sink("127.0.0.2", smtputf8=False)
        second = self.sink("127.0.0.3", smtputf8=False)
        hops = [self.hop(first, "mx1.test", 10), self.hop(second, "mx2.test", 20)]
        rep = await self.send(hops, UTF8_HDR_MSG, [JOERG])
        res = rep.results[JOERG]
        self.assertEqual((res.kind, res.status, res.hop), ("bounced", "5.6.7", hops[1]))
        self.assertIn("mx2.test[127.0.0.3]", res.text)
        self.assertEqual(len(first.sessions) + len(second.sessions), 2)

    async def test_an_unreachable_mx_defers(self):
        # the host that could not be reached may offer it at the next attempt
        first = self.sink("127.0.0.2", smtputf8=False)
        dead = self.sink("127.0.0.3")
        port = dead.port
        await dead.stop()
        hops = [self.hop(first, "mx1.test", 10), Hop("mx2.test", "127.0.0.3", port, 20)]
        rep = await self.send(hops, UTF8_HDR_MSG, [JOERG])
        self.assertEqual(rep.results[JOERG].kind, "deferred")
        self.assertEqual(rep.results[JOERG].status[0], "4")

    async def test_a_parked_session_without_it_is_not_retried(self):
        s = self.sink(smtputf8=False)
        cache = ConnectionCache(reactor)
        self.addCleanup(cache.close_all)
        rep = await self.send([self.hop(s)], ASCII_MSG, cache=cache)  # parks the session
        self.assertDelivered(rep, "rcpt@dest.test")
        rep = await self.send([self.hop(s)], UTF8_HDR_MSG, cache=cache)
        self.assertEqual(rep.results["rcpt@dest.test"].status, "5.6.7")
        self.assertEqual(len(s.sessions), 1)  # no new connection for the same answer


class ScanTests(unittest.TestCase):
    def write(self, data: bytes, offset: int = 0) -> tuple[str, int, int]:
        d = self.mktemp()
        os.makedirs(d)
        p = os.path.join(d, "m")
        with open(p, "wb") as f:
            f.write(b"x" * offset + data)
        return p, offset, len(data)

    def test_header_block_scan(self):
        cases = [
            (ASCII_MSG, False), (UTF8_HDR_MSG, True), (UTF8_BODY_MSG, False),
            (b"\r\nno headers \xc3\xa4\r\n", False),
            (b"Subject: no end \xc3\xa4", True), (b"Subject: no end", False),
        ]
        for data, want in cases:
            self.assertEqual(u8.header_block_utf8(*self.write(data, 5)), want, data)
            self.assertEqual(u8.header_utf8_in_memory(data), want, data)

    def test_header_end_across_chunks(self):
        for cut in range(-4, 4):
            head = b"X: " + b"a" * (u8.SCAN_CHUNK - 3 + cut - 4) + b"\r\n\r\n"
            data = head + b"body \xc3\xa4\r\n"
            self.assertFalse(u8.header_block_utf8(*self.write(data)), cut)
            big = b"X: " + b"a" * (u8.SCAN_CHUNK * 3) + b"\r\nY: \xc3\xa4\r\n\r\nbody\r\n"
            self.assertTrue(u8.header_block_utf8(*self.write(big)))

    def test_orcpt_forms(self):
        self.assertEqual(u8.unitext("j\u00f6 rg+x@d.test"), "j\u00f6\\x{20}rg\\x{2B}x@d.test")
        self.assertEqual(u8.utf8_xtext("j\u00f6rg@d.test"), "j\\x{F6}rg@d.test")
        self.assertEqual(u8.wire_orcpt("utf-8;j\u00f6rg@d.test", False), "utf-8;j\\x{F6}rg@d.test")
        self.assertEqual(u8.wire_orcpt("utf-8;j\u00f6rg@d.test", True), "utf-8;j\u00f6rg@d.test")
        self.assertEqual(u8.wire_orcpt("rfc822;a@d.test", False), "rfc822;a@d.test")

    def test_wire_address(self):
        self.assertEqual(u8.wire_address("a@B\u00fccher.example"), "a@xn--bcher-kva.example")
        self.assertEqual(u8.wire_address("j\u00f6rg@dest.test"), "j\u00f6rg@dest.test")
        self.assertEqual(u8.wire_address("a@[127.0.0.1]"), "a@[127.0.0.1]")
        self.assertEqual(u8.wire_address("a@bad\u00fc..example"), "a@bad\u00fc..example")  # left: needs SMTPUTF8
        self.assertEqual(u8.wire_address(""), "")
