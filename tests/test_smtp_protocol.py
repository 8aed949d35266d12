"""SMTP protocol unit tests driven by StringTransport and task.Clock (timeouts)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay import config as configmod
from relay.intake import policy as policymod
from relay.intake.accept import Intake
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.smtp.context import ServerContext
from relay.smtp.server import SMTPServer


class Harness(unittest.TestCase):
    timeout_s = 60
    smtp: dict = {}  # more [smtp] keys

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-proto-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.clock = task.Clock()
        self.cfg = configmod.load(None, data={
            "hostname": "relay.test", "spool": self.tmp + "/spool",
            "smtp": {"timeout": self.timeout_s, **self.smtp},
            "local": {"domains": ["local.test"], "users": self.tmp + "/users"},
        })
        sp = spoolmod.Spool(self.cfg.spool)
        sp.create()
        self.disk = DiskPool(self.clock, inline=True)
        pol = policymod.Policy(("local.test",), (), self.cfg.relay.networks,
                               user_exists=lambda a: a == "alice@local.test", alias_exists=lambda a: False)
        intake = Intake(spool=AsyncSpool(sp, self.disk), expand=lambda a: [(a, a)], queued=None, clock=self.clock)
        self.ctx = ServerContext(config=self.cfg, policy=pol, intake=intake, reactor=self.clock)

    def connect(self, ip="127.0.0.1"):
        p = SMTPServer(self.ctx)
        t = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        p.makeConnection(t)
        return p, t

    def take(self, t) -> bytes:
        v = t.value()
        t.clear()
        return v


class Timeouts(Harness):
    def test_command_line_dripping_times_out(self):
        p, t = self.connect()
        self.assertTrue(self.take(t).startswith(b"220 "))
        # one byte every 10 s: the line never completes within 60 s of the greeting
        for ch in b"NOOP":
            self.clock.advance(10)
            p.dataReceived(bytes([ch]))
        self.clock.advance(19)
        self.assertEqual(self.take(t), b"")
        self.clock.advance(2)
        self.assertEqual(self.take(t), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertTrue(t.disconnecting)

    def test_complete_lines_reset_the_timer(self):
        p, t = self.connect()
        self.take(t)
        for _ in range(5):
            self.clock.advance(59)
            p.dataReceived(b"NOOP\r\n")
            self.assertEqual(self.take(t), b"250 2.0.0 Ok\r\n")
        self.assertFalse(t.disconnecting)

    def test_data_idle_timeout(self):
        p, t = self.connect()
        p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")
        self.assertIn(b"354 ", self.take(t))
        for _ in range(5):
            self.clock.advance(50)
            p.dataReceived(b"line of data\r\n")
        self.assertEqual(self.take(t), b"")
        self.clock.advance(61)
        self.assertEqual(self.take(t), b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self.assertEqual(self.ctx.intake.spool.spool.queue_ids(), [])

    def test_connection_lost_in_data_leaves_nothing(self):
        p, t = self.connect()
        p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")
        p.dataReceived(b"partial message\r\n")
        p.connectionLost(None)

        self.assertEqual(self.ctx.intake.spool.spool.incoming_leftovers(), [])
        self.assertEqual(self.ctx.connections, {})


class Replies(Harness):
    def test_pipelined_replies_in_one_write(self):
        p, t = self.connect()
        self.take(t)
        writes = []
        orig = t.write
        t.write = lambda d: (writes.append(d), orig(d))
        p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\n"
                       b"RCPT TO:<nobody@local.test>\r\nNOOP\r\n")
        self.assertEqual(len(writes), 1)
        lines = writes[0].split(b"\r\n")
        self.assertEqual([ln[:3] for ln in lines if ln and ln[3:4] == b" "],
                         [b"250", b"250", b"250", b"550", b"250"])

    def test_auth_not_offered_without_checker(self):
        p, t = self.connect()
        p.dataReceived(b"EHLO x\r\n")
        self.assertNotIn(b"AUTH", t.value())
        p.dataReceived(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        self.assertIn(b"502 5.5.1", t.value())

    def test_garbage_never_crashes(self):
        import random

        rnd = random.Random(1)
        for _ in range(50):
            p, t = self.connect(ip=f"127.0.0.{rnd.randint(1, 250)}")
            for _ in range(20):
                n = rnd.randint(0, 700)
                p.dataReceived(bytes(rnd.getrandbits(8) for _ in range(n)))
                if t.disconnecting:
                    break
            out = t.value()
            for line in out.split(b"\r\n"):
                if line:
                    self.assertRegex(line, rb"^[2345]\d\d[ -]")
            p.connectionLost(None)


class PipelinedFlood(Harness):
    smtp = {"junk_command_limit": 0}  # a thousand NOOPs: the limit would end the session

    def test_long_burst_is_handled_in_slices_in_order(self):
        from relay.smtp.connection import LINES_PER_TURN

        p, t = self.connect()
        self.take(t)
        n = LINES_PER_TURN * 4 + 7
        p.dataReceived(b"".join(b"NOOP %d\r\n" % i for i in range(n)))
        # one slice now; the rest waits for the next reactor turn, input paused
        self.assertEqual(self.take(t).count(b"250 "), LINES_PER_TURN)
        self.assertEqual(t.producerState, "paused")
        self.clock.advance(0)  # task.Clock runs the follow-up calls it schedules as it goes
        self.assertEqual(self.take(t).count(b"250 "), n - LINES_PER_TURN)
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(len(p.buf), 0)
        # and the session goes on normally
        p.dataReceived(b"QUIT\r\n")
        self.assertTrue(self.take(t).startswith(b"221 "))


class OutputFlowControl(Harness):
    """The session is its transport's push producer: while the transport says
    its buffer is full, no command is read or handled."""

    smtp = {"junk_command_limit": 0}

    def test_registered_as_streaming_producer(self):
        p, t = self.connect()
        self.assertIs(t.producer, p)
        self.assertTrue(t.streaming)

    def test_paused_output_holds_commands_until_resumed(self):
        p, t = self.connect()
        self.take(t)
        from relay.smtp.connection import PAUSED_INPUT_LIMIT

        p.pauseProducing()  # what the transport does when its write buffer is over its bound
        p.dataReceived(b"NOOP\r\nHELP\r\nNOOP\r\n")
        self.assertEqual(self.take(t), b"")
        self.assertEqual(len(p.buf), 18)
        # a little input is still read (a TLS handshake needs it), then the socket is not read either
        self.assertEqual(t.producerState, "producing")
        n = PAUSED_INPUT_LIMIT // 6 + 1
        p.dataReceived(b"NOOP\r\n" * n)
        self.assertEqual(self.take(t), b"")
        self.assertEqual(t.producerState, "paused")
        p.resumeProducing()
        self.clock.advance(0)
        self.clock.advance(0)
        codes = [ln[:3] for ln in self.take(t).split(b"\r\n") if ln]
        self.assertEqual(codes, [b"250", b"214", b"250"] + [b"250"] * n)
        self.assertEqual(t.producerState, "producing")

    def test_pause_within_a_long_burst(self):
        from relay.smtp.connection import LINES_PER_TURN

        p, t = self.connect()
        self.take(t)
        n = LINES_PER_TURN * 3
        p.dataReceived(b"NOOP\r\n" * n)
        self.assertEqual(self.take(t).count(b"250 "), LINES_PER_TURN)
        p.pauseProducing()
        self.clock.advance(0)  # the follow-up turn: output still paused, nothing handled
        self.assertEqual(self.take(t), b"")
        self.assertEqual(len(p.buf), (n - LINES_PER_TURN) * 6)
        p.resumeProducing()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.take(t).count(b"250 "), n - LINES_PER_TURN)
        self.assertEqual(t.producerState, "producing")

    def test_paused_in_data_the_message_is_still_taken(self):
        p, t = self.connect()
        p.dataReceived(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")
        self.assertIn(b"354 ", self.take(t))
        p.pauseProducing()  # the client has not read the 354 yet: data needs no reply, it goes on
        p.dataReceived(b"Subject: x\r\n\r\n" + b"y" * 60 + b"\r\n")
        p.dataReceived(b".\r\nNOOP\r\n")
        out = self.take(t)
        self.assertIn(b"250 2.0.0 Ok: queued as", out)
        self.assertNotIn(b"2.0.0 Ok\r\n", out)  # the NOOP waits for the client to read
        p.resumeProducing()
        self.assertEqual(self.take(t), b"250 2.0.0 Ok\r\n")

    def test_close_unregisters_so_the_close_is_not_stalled(self):
        p, t = self.connect()
        self.take(t)
        p.pauseProducing()
        p.dataReceived(b"QUIT\r\n")
        self.assertEqual(self.take(t), b"")
        p.resumeProducing()
        self.assertEqual(self.take(t), b"221 2.0.0 Bye\r\n")
        self.assertIsNone(t.producer)
        self.assertTrue(t.disconnecting)


class JunkCommands(Harness):
    smtp = {"junk_command_limit": 5}

    def codes(self, t) -> list[bytes]:
        return [ln[:4] for ln in self.take(t).split(b"\r\n") if ln]

    def test_past_the_limit_junk_counts_as_errors(self):
        from relay.smtp.connection import MAX_ERRORS

        p, t = self.connect()
        self.take(t)
        p.dataReceived(b"NOOP\r\nRSET\r\nHELP\r\nVRFY x\r\nEHLO a\r\n")  # 5: the limit
        codes = self.codes(t)  # the EHLO reply: one line per extension (their number grows)
        self.assertEqual(codes[:5], [b"250 ", b"250 ", b"214 ", b"252 ", b"250-"])
        self.assertEqual(codes[5:], [b"250-"] * (len(codes) - 6) + [b"250 "])
        p.dataReceived(b"NOOP\r\n" * (MAX_ERRORS - 1))
        self.assertEqual(self.codes(t), [b"250 "] * (MAX_ERRORS - 1))
        self.assertFalse(t.disconnecting)
        p.dataReceived(b"HELO a\r\nNOOP\r\n")
        self.assertEqual(self.codes(t), [b"250 ", b"421 "])
        self.assertTrue(t.disconnecting)

    def test_a_message_received_starts_the_count_afresh(self):
        p, t = self.connect()
        self.take(t)
        for _ in range(3):
            p.dataReceived(b"EHLO a\r\nNOOP\r\nNOOP\r\nNOOP\r\n"
                           b"MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\nDATA\r\n")
            p.dataReceived(b"Subject: x\r\n\r\nx\r\n.\r\nRSET\r\n")
            self.assertIn(b"250 2.0.0 Ok: queued as", self.take(t))
        self.assertEqual(p.errors, 0)
        self.assertFalse(t.disconnecting)

    def test_zero_is_no_limit(self):
        self.cfg = dataclasses.replace(self.cfg, smtp=dataclasses.replace(self.cfg.smtp, junk_command_limit=0))
        self.ctx.config = self.cfg
        p, t = self.connect()
        self.take(t)
        p.dataReceived(b"NOOP\r\n" * 200)
        self.assertEqual(self.take(t).count(b"250 "), 200)
        self.assertEqual(p.errors, 0)
