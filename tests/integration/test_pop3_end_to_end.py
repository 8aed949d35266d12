"""Whole relay: a message goes in through SMTP, is delivered to the local
Maildir by the queue, and comes out through POP3 byte for byte."""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from tests.support.relay import InProcessRelay, in_thread
from tests.support.wait import apoll

BODY = (
    b"From: Carol <carol@client.example>\r\n"
    b"To: alice@local.test\r\n"
    b"Subject: end to end\r\n"
    b"Message-ID: <e2e@client.example>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"\r\n"
    b"8-bit bytes: \xc3\xa9\xe2\x82\xac\xff\r\n"
    + b"x" * 990 + b"\r\n"
    b"last line\r\n"
)


class SMTPToPOP3Tests(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-e2e-pop3-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice pw")
        self.relay = InProcessRelay(self.tmp, {"pop3": {"listen": ["tcp:0:interface=127.0.0.1"]}})
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    async def test_smtp_in_pop3_out_byte_for_byte(self):
        def send():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                return s.sendmail("carol@client.example", ["alice@local.test"], BODY)

        self.assertEqual(await in_thread(send), {})
        new = os.path.join(self.tmp, "mail", "local.test", "alice", "new")
        await apoll(lambda: os.path.isdir(new) and os.listdir(new), timeout=20, what="local delivery")

        def fetch():
            c = poplib.POP3(*self.relay.ports["pop3"], timeout=10)
            c.user("alice@local.test")
            c.pass_("alice pw")
            size = int(c.list(1).split()[2])
            _, lines, _ = c.retr(1)
            c.dele(1)
            c.quit()
            return size, b"\r\n".join(lines) + b"\r\n"

        size, got = await in_thread(fetch)
        self.assertEqual(size, len(got))
        self.assertTrue(got.startswith(b"Return-Path: <carol@client.example>\r\n"
                                       b"Delivered-To: alice@local.test\r\n"), got[:200])
        head, _, rest = got.partition(b"\r\nFrom: Carol")
        self.assertIn(b"\r\nReceived: from client.example", head)
        self.assertEqual(b"From: Carol" + rest, BODY)
        await apoll(lambda: not os.listdir(new) and not os.listdir(os.path.dirname(new) + "/cur"),
                    what="the message deleted at QUIT")
