"""CHUNKING (RFC 3030) end to end over real sockets: a raw client sending
BDAT through a relay to a sink; relay -> relay over BDAT (our outbound as
the client of our inbound); and Postfix, an independent implementation, as
our next hop receiving our BDAT, and as our client (Postfix's client sends
DATA, never BDAT: it must still work with our CHUNKING offered).  Skipped
with the reason without Postfix or root, as tests/integration/test_dsn_postfix."""

from __future__ import annotations

import os
import re
import smtplib
from unittest import mock

from relay.smtp.chunking import ChunkingSession
from tests.integration import test_dsn_postfix as pfmod
from tests.integration.test_delivery import DeliveryCase
from tests.support.relay import InProcessRelay, in_thread
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll

B_IP = "127.0.0.6"
PF_IP = pfmod.PF_IP
# a message whose text holds what would end DATA and start commands: it is
# text in a chunk, and must arrive as text (dot-stuffed again over DATA)
BODY = (b"Subject: chunked\r\nMessage-ID: <bdat@client.example>\r\n\r\nfirst line\r\n.\r\n"
        b"MAIL FROM:<evil@x.example>\r\n..two dots\r\n" + b"x" * 900 + b"\r\n") * 3
# Postfix adds Date: and From: to the header section; the rest arrives as sent
TAIL = BODY[BODY.index(b"\r\n\r\n"):]


def bdat_client(host: str, port: int, rcpt: str, chunks: list[bytes]) -> list[str]:
    """A raw client: MAIL, RCPT, then the chunks (the last one LAST), pipelined."""
    with RawSMTP(host, port) as c:
        assert c.reply().code == 220
        ehlo = c.cmd("EHLO client.example")
        assert "CHUNKING" in ehlo.text, ehlo
        wire = b"MAIL FROM:<sender@client.example>\r\nRCPT TO:<%s>\r\n" % rcpt.encode()
        for i, ch in enumerate(chunks):
            wire += b"BDAT %d%s\r\n" % (len(ch), b" LAST" if i == len(chunks) - 1 else b"") + ch
        c.send(wire)
        out = [c.reply() for _ in range(2 + len(chunks))]
        c.cmd("QUIT")
        return [f"{r.code} {r.lines[-1]}" for r in out]


class Spy:
    """Records the BDAT commands our inbound servers see (the real code runs)."""

    def __init__(self, case):
        self.seen: list[tuple[str, str]] = []
        orig = ChunkingSession.do_BDAT
        seen = self.seen

        def do_BDAT(session, arg):
            seen.append((session.ctx.config.hostname, arg))
            return orig(session, arg)

        p = mock.patch.object(ChunkingSession, "do_BDAT", do_BDAT)
        p.start()
        case.addCleanup(p.stop)


class Chunking(DeliveryCase):
    def more_config(self):
        return {"relay": {"routes": {"b.example": f"{B_IP}:{self.port}"}}}

    async def test_raw_bdat_client_through_the_relay_to_a_sink(self):
        self.zone.mx("dest.example", 10, "mx.dest.example").a("mx.dest.example", "127.0.0.2")
        replies = await in_thread(bdat_client, *self.relay.smtp, "a@dest.example",
                                  [BODY[:100], BODY[100:1001], BODY[1001:]])
        self.assertEqual(replies[:4], ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 100 octets received",
                                       "250 2.0.0 901 octets received"])
        self.assertRegex(replies[4], r"^250 2\.0\.0 Ok: queued as ")
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="delivery to the sink")
        t = self.sinks["127.0.0.2"].transactions[0]
        self.assertTrue(t.data.endswith(b"\r\n" + BODY), t.data[-300:])
        self.assertEqual(t.rcpts, ["a@dest.example"])  # nothing of the chunk ran as a command
        self.assertEqual(len(self.sinks["127.0.0.2"].transactions), 1)
        await apoll(self.queue_empty, what="empty queue")

    async def test_relay_to_relay_over_bdat(self):
        spy = Spy(self)
        b = InProcessRelay(os.path.join(self.tmp, "b"), {
            "hostname": "b.test", "smtp": {"listen": [f"tcp:{self.port}:interface={B_IP}"]},
            "relay": {"domains": ["b.example"]}}, ip=B_IP, deliver=False)
        os.makedirs(os.path.join(self.tmp, "b"), exist_ok=True)
        await b.start()
        self.addCleanup(b.stop)
        await self.send(["x@b.example"], body=BODY)
        await apoll(lambda: b.service.spool.queue_ids(), what="the message on relay b")
        await apoll(self.queue_empty, what="our queue empty")
        self.assertEqual(spy.seen, [("b.test", f"{len(self.queued_size_hint(b))} LAST")])
        self.assertTrue(self.queued_size_hint(b).endswith(BODY))

    async def test_relay_to_relay_big_message_streamed(self):
        """Over 64 KB: streamed from the spool file by the producer, not stuffed."""
        spy = Spy(self)
        b = InProcessRelay(os.path.join(self.tmp, "b"), {
            "hostname": "b.test", "smtp": {"listen": [f"tcp:{self.port}:interface={B_IP}"]},
            "relay": {"domains": ["b.example"]}}, ip=B_IP, deliver=False)
        os.makedirs(os.path.join(self.tmp, "b"), exist_ok=True)
        await b.start()
        self.addCleanup(b.stop)
        big = BODY + (b".dot line\r\n" + b"y" * 500 + b"\r\n") * 600  # ~300 KB
        await self.send(["x@b.example"], body=big)
        await apoll(lambda: b.service.spool.queue_ids(), what="the message on relay b")
        await apoll(self.queue_empty, what="our queue empty")
        got = self.queued_size_hint(b)
        self.assertTrue(got.endswith(big))
        self.assertEqual(spy.seen, [("b.test", f"{len(got)} LAST")])

    def queued_size_hint(self, relay) -> bytes:
        """What relay b stored after its own Received header: the message
        our relay sent (its size is the BDAT count)."""
        [qid] = relay.service.spool.queue_ids()
        env, off, size = relay.service.spool.read_envelope(qid)
        with open(relay.service.spool.message_path(qid), "rb") as f:
            f.seek(off)
            data = f.read()
        # drop b's Received header (a folded header: up to the next line not starting with blanks)
        m = re.match(rb"Received:[^\r]*\r\n(?:[ \t][^\r]*\r\n)*", data)
        assert m, data[:200]
        return data[m.end():]


class PostfixPeer(DeliveryCase):
    skip = pfmod._skip_reason()
    start_postfix = pfmod.PostfixNextHop.start_postfix
    route_to_postfix = pfmod.PostfixNextHop.route_to_postfix

    def maillog(self, pf) -> str:
        try:
            with open(os.path.join(pf.dir, "maillog"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def test_postfix_receives_our_bdat(self):
        pf = await self.start_postfix()
        await self.route_to_postfix(pf)
        await self.send(["a@pf.example"], body=BODY)
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, timeout=60, what="Postfix relaying to the sink")
        await apoll(self.queue_empty, timeout=20, what="our queue empty")
        got = self.sinks["127.0.0.3"].transactions[0].data
        self.assertTrue(got.endswith(TAIL), got[-300:])
        # Postfix's smtpd counts the commands of each session
        await apoll(lambda: re.search(r"disconnect from \S+\[127\.0\.0\.1\].* bdat=1 ", self.maillog(pf)),
                    timeout=20, what="Postfix logging our session")
        self.assertNotRegex(self.maillog(pf), r"disconnect from \S+\[127\.0\.0\.1\].* data=")

    async def test_postfix_as_our_client_uses_data(self):
        """Postfix's SMTP client does not send BDAT (Postfix supports CHUNKING
        in smtpd only, BDAT_README): it sees CHUNKING in our EHLO and sends
        DATA, which goes on working (no BDAT client is at hand here)."""
        spy = Spy(self)
        self.zone.mx("dest.example", 10, "mx.dest.example").a("mx.dest.example", "127.0.0.2")
        pf = await self.start_postfix(next_hop=self.relay.smtp)

        def run():
            with smtplib.SMTP(PF_IP, pf.port) as s:
                s.ehlo("client.example")
                assert s.sendmail("sender@client.example", ["a@dest.example"], BODY) == {}

        await in_thread(run)
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, timeout=60, what="Postfix -> us -> the sink")
        self.assertTrue(self.sinks["127.0.0.2"].transactions[0].data.endswith(TAIL))
        self.assertEqual(spy.seen, [])
        await apoll(self.queue_empty, timeout=20, what="our queue empty")
