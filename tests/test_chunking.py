"""CHUNKING (RFC 3030) on the inbound server, driven by StringTransport:
BDAT chunks, their errors, pipelining, durability, and smuggling attempts
inside chunks (relay.smtp.chunking)."""

from __future__ import annotations

import tracemalloc

from twisted.internet import defer

from relay.smtp.chunking import ChunkReader
from tests.test_smtp_protocol import Harness

TXN = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\n"
MSG = b"Subject: chunked\r\n\r\nline one\r\n.\r\n..dots stay\r\n"


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


class Base(Harness):
    def spool(self):
        return self.ctx.intake.spool.spool

    def queued(self) -> list[bytes]:
        out = []
        for qid in self.spool().queue_ids():
            env, off, size = self.spool().read_envelope(qid)
            with open(self.spool().message_path(qid), "rb") as f:
                f.seek(off)
                out.append(f.read())
        return out

    def body(self) -> bytes:
        [msg] = self.queued()
        return msg.split(b"\r\n", 1)[1].split(b"\r\n", 1)[1] if msg.startswith(b"Received:") else msg

    def replies(self, t) -> list[bytes]:
        return [ln for ln in self.take(t).split(b"\r\n") if ln and ln[3:4] == b" "]

    def session(self, data: bytes):
        p, t = self.connect()
        self.take(t)
        p.dataReceived(data)
        return p, t


class Chunks(Base):
    def test_ehlo_offers_chunking_not_binarymime(self):
        p, t = self.connect()
        self.take(t)
        p.dataReceived(b"EHLO x\r\n")
        out = self.take(t)
        self.assertIn(b"250-CHUNKING\r\n", out)
        self.assertNotIn(b"BINARYMIME", out)

    def test_chunks_make_one_message_binary_safe(self):
        p, t = self.session(TXN + bdat(MSG[:7]) + bdat(MSG[7:20]) + bdat(MSG[20:], last=True))
        r = self.replies(t)
        self.assertEqual(r[-3:-1], [b"250 2.0.0 7 octets received", b"250 2.0.0 13 octets received"])
        self.assertTrue(r[-1].startswith(b"250 2.0.0 Ok: queued as "), r)
        [msg] = self.queued()
        self.assertTrue(msg.startswith(b"Received: "))
        # no unstuffing, no terminator: "." and ".." lines are text
        self.assertTrue(msg.endswith(b"\r\n" + MSG), msg)

    def test_one_byte_at_a_time(self):
        p, t = self.connect()
        self.take(t)
        for b in TXN + bdat(MSG, last=True) + b"QUIT\r\n":
            p.dataReceived(bytes([b]))
        self.assertTrue(self.queued()[0].endswith(MSG))
        self.assertTrue(self.replies(t)[-1].startswith(b"221"))

    def test_bdat_0_last_ends_the_message(self):
        p, t = self.session(TXN + bdat(MSG) + b"BDAT 0 LAST\r\n")
        self.assertTrue(self.replies(t)[-1].startswith(b"250 2.0.0 Ok: queued as"))
        self.assertTrue(self.queued()[0].endswith(MSG))

    def test_last_line_without_crlf_gets_one(self):
        self.session(TXN + bdat(b"Subject: x\r\n\r\nno newline", last=True))
        self.assertTrue(self.queued()[0].endswith(b"\r\n\r\nno newline\r\n"))

    def test_pipelined_bdat_replies_in_order(self):
        p, t = self.session(TXN + bdat(MSG[:10]) + bdat(MSG[10:], last=True) + b"NOOP\r\n"
                            + b"MAIL FROM:<c@d.example>\r\nRCPT TO:<alice@local.test>\r\n"
                            + bdat(MSG, last=True) + b"QUIT\r\n")
        codes = [r[:3] for r in self.replies(t)]
        self.assertEqual(codes[-8:], [b"250"] * 7 + [b"221"])
        self.assertEqual(len(self.queued()), 2)

    def test_last_250_only_after_the_commit(self):
        held: list = []
        intake = self.ctx.intake
        orig = intake.accept

        def accept(*a, **kw):
            d: defer.Deferred = defer.Deferred()
            held.append(lambda: orig(*a, **kw).chainDeferred(d))
            return d

        intake.accept = accept
        p, t = self.session(TXN + bdat(MSG, last=True) + b"NOOP\r\n")
        self.assertEqual(len(held), 1)
        self.assertNotIn(b"queued as", self.take(t))  # nor NOOP's reply: held behind the commit
        self.assertEqual(self.spool().queue_ids(), [])
        held[0]()
        r = self.replies(t)
        self.assertTrue(r[0].startswith(b"250 2.0.0 Ok: queued as"))
        self.assertEqual(r[1], b"250 2.0.0 Ok")
        self.assertEqual(len(self.spool().queue_ids()), 1)


class Streaming(Base):
    def test_a_big_chunk_is_never_held_in_memory(self):
        p, t = self.connect()
        self.take(t)
        line = b"z" * 998 + b"\r\n"
        piece = line * 64  # 64 KB, as a socket read gives them
        size = len(piece) * 128  # 8 MB in one chunk
        p.dataReceived(TXN + b"BDAT %d LAST\r\n" % size)
        tracemalloc.start()
        try:
            for _ in range(128):
                p.dataReceived(piece)
            _cur, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 3 << 20)  # the spool holds it, not the session
        self.assertIn(b"250 2.0.0 Ok: queued as", self.take(t))
        [msg] = self.queued()
        self.assertGreater(len(msg), size)

    def test_idle_timeout_in_a_chunk(self):
        p, t = self.session(TXN + b"BDAT 1000 LAST\r\n" + b"x" * 10)
        self.take(t)
        self.clock.advance(self.timeout_s - 1)
        p.dataReceived(b"y" * 10)  # data keeps it alive
        self.clock.advance(self.timeout_s - 1)
        self.assertEqual(self.take(t), b"")
        self.clock.advance(2)
        self.assertEqual(self.take(t), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        p.connectionLost(None)
        self.assertEqual(self.spool().incoming_leftovers(), [])
        self.assertEqual(self.spool().queue_ids(), [])


class Errors(Base):
    def test_bdat_without_mail_reads_and_discards_the_octets(self):
        evil = b"MAIL FROM:<x@y.example>\r\nRCPT TO:<alice@local.test>\r\n"
        p, t = self.session(b"EHLO x\r\n" + bdat(evil) + b"NOOP\r\n")
        self.assertEqual(self.replies(t)[-2:], [b"503 5.5.1 Error: need MAIL command", b"250 2.0.0 Ok"])
        self.assertFalse(p.has_sender)  # the chunk's content never ran as commands

    def test_bdat_without_rcpt(self):
        p, t = self.session(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n" + bdat(b"x\r\n", last=True))
        self.assertEqual(self.replies(t)[-1], b"554 5.5.1 Error: no valid recipients")

    def test_bad_size_argument_501_and_hang_up(self):
        for arg in (b"", b" x", b" -1", b" 10 NOTLAST", b" 1 LAST x", b" " + b"9" * 21):
            p, t = self.session(TXN + b"BDAT" + arg + b"\r\nNOOP\r\n")
            self.assertEqual(self.replies(t)[-1], b"501 5.5.4 Syntax: BDAT chunk-size [LAST]", arg)
            self.assertTrue(t.disconnecting)
            self.assertEqual(self.spool().incoming_leftovers(), [])

    def test_data_after_bdat_refused(self):
        p, t = self.session(TXN + bdat(MSG) + b"DATA\r\n" + bdat(b"", last=True))
        r = self.replies(t)
        self.assertEqual(r[-2], b"503 5.5.1 Error: DATA after BDAT in one transaction")
        self.assertTrue(r[-1].startswith(b"250 2.0.0 Ok: queued as"))

    def test_rset_discards_the_partial_message(self):
        p, t = self.session(TXN + bdat(MSG) + b"RSET\r\n")
        self.assertEqual(self.replies(t)[-1], b"250 2.0.0 Ok")
        self.assertEqual(self.spool().incoming_leftovers(), [])
        p.dataReceived(b"BDAT 0 LAST\r\n")
        self.assertEqual(self.replies(t)[-1], b"503 5.5.1 Error: need MAIL command")
        self.assertEqual(self.spool().queue_ids(), [])

    def test_disconnect_mid_chunk_leaves_nothing(self):
        p, t = self.session(TXN + b"BDAT 100000 LAST\r\n" + b"x" * 500)
        p.connectionLost(None)
        self.assertEqual(self.spool().incoming_leftovers(), [])
        self.assertEqual(self.spool().queue_ids(), [])

    def test_size_limit_552_after_the_octets(self):
        limit = self.cfg.smtp.max_message_size
        p, t = self.connect()
        self.take(t)
        p.dataReceived(TXN + b"BDAT %d LAST\r\n" % (limit + 1))
        line = b"y" * 998 + b"\r\n"
        sent = 0
        while sent < limit + 1:
            piece = line[: limit + 1 - sent]
            p.dataReceived(piece)
            sent += len(piece)
            if sent < limit + 1:
                self.assertNotIn(b"552", t.value())
        p.dataReceived(b"NOOP\r\n")
        self.assertEqual(self.replies(t)[-2:], [b"552 5.3.4 Message size exceeds fixed limit", b"250 2.0.0 Ok"])
        self.assertEqual(self.spool().incoming_leftovers(), [])
        self.assertEqual(self.spool().queue_ids(), [])

    def test_later_chunks_after_a_failed_one_are_discarded(self):
        p, t = self.session(TXN + bdat(b"bad\nline\r\n") + bdat(b"MAIL FROM:<x@y>\r\n") + bdat(MSG, last=True)
                            + b"NOOP\r\n")
        r = self.replies(t)[-4:]
        self.assertTrue(r[0].startswith(b"550 5.6.0"), r)
        self.assertEqual(r[1:], [b"503 5.5.1 Error: need MAIL command"] * 2 + [b"250 2.0.0 Ok"])
        self.assertEqual(self.spool().queue_ids(), [])


class Smuggling(Base):
    """What DATA refuses, a chunk refuses; nothing in a chunk is a command."""

    def refused(self, content: bytes, *splits: int) -> list[bytes]:
        cuts = [0, *splits, len(content)]
        chunks = b"".join(bdat(content[a:b], last=(i == len(cuts) - 2)) for i, (a, b) in enumerate(zip(cuts, cuts[1:])))
        p, t = self.session(TXN + chunks + b"NOOP\r\n")
        self.assertEqual(self.spool().queue_ids(), [], content)
        self.assertEqual(self.spool().incoming_leftovers(), [])
        return self.replies(t)

    def test_bare_lf_dot_lf(self):
        r = self.refused(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x.example>\r\n")
        self.assertTrue(r[-2].startswith(b"550 5.6.0 Message rejected: bare CR or LF"), r)
        self.assertEqual(r[-1], b"250 2.0.0 Ok")

    def test_bare_cr_and_cr_dot_cr(self):
        for content in (b"a\r\n\r.\r\r\n", b"a\rb\r\n", b"a\r\n.\r"):
            r = self.refused(content)
            self.assertTrue(r[-2].startswith(b"550 5.6.0"), (content, r))

    def test_bare_lf_split_across_chunks(self):
        self.assertTrue(self.refused(b"Subject: x\r\n\r\nab\r\r\n", 16)[-2].startswith(b"550 5.6.0"))
        self.assertTrue(self.refused(b"Subject: x\r\n\r\nab\n\r\n", 16)[-2].startswith(b"550 5.6.0"))

    def test_crlf_split_across_chunks_is_fine(self):
        self.session(TXN + bdat(b"Subject: x\r") + bdat(b"\n\r\nbody\r") + bdat(b"\n", last=True))
        self.assertTrue(self.queued()[0].endswith(b"Subject: x\r\n\r\nbody\r\n"))

    def test_long_line(self):
        r = self.refused(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n", 500)
        self.assertTrue(r[-2].startswith(b"550 5.6.0 Message rejected: line longer"), r)

    def test_too_many_hops(self):
        r = self.refused(b"Received: x\r\n" * 101 + b"\r\nbody\r\n")
        self.assertTrue(r[-2].startswith(b"554 5.4.6"), r)

    def test_terminator_inside_a_chunk_is_text(self):
        content = b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<evil@x.example>\r\n"
        p, t = self.session(TXN + bdat(content, last=True))
        self.assertTrue(self.queued()[0].endswith(content))
        self.assertFalse(p.has_sender)


class Reader(Base):
    def test_reader_counts_and_flags(self):
        r = ChunkReader(100)
        r.announce(30)
        text, _ = r.feed(b"Received: a\r\nSubject: \xc3\xa9\r\n\r\nReceived: b")
        self.assertEqual(text, b"Received: a\r\nSubject: \xc3\xa9\r\n\r\n")
        self.assertEqual(r.end(), (b"Received: b\r\n", b""))
        self.assertEqual((r.received, r.eight_bit, r.error), (1, True, None))
        r.announce(71)
        self.assertEqual(r.error, "size")
