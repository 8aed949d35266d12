"""The inbound SMTP server over real TCP sockets on loopback.

The relay runs in-process on the test reactor; the clients (smtplib and a
raw socket client for malformed input) run in a thread.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.relay import InProcessRelay, in_thread
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll


def queued_files(relay) -> list[str]:
    return relay.service.spool.queue_ids()


def read_queued(relay, qid):
    env, off, size = relay.service.spool.read_envelope(qid)
    with open(relay.service.spool.message_path(qid), "rb") as f:
        f.seek(off)
        return env, f.read()


class RelayTestCase(unittest.TestCase):
    overrides: dict = {}
    users = ("alice@local.test", "bob@local.test")

    async def setUp(self):
        tmp = tempfile.mkdtemp(prefix="relay-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.tmp = tmp
        for u in self.users:
            usersmod.add_user(os.path.join(tmp, "users"), u, "secret-" + u)
        self.relay = InProcessRelay(tmp, self.overrides, deliver=False)
        await self.relay.start()
        self.addCleanup(self.stop_relay)
        self.host, self.port = self.relay.smtp

    async def stop_relay(self):
        # a cleanup, not tearDown: trial (26.10) runs cleanups before tearDown,
        # and the relay must stop before its directory is removed
        await self.relay.stop()

    def raw(self, **kw) -> RawSMTP:
        c = RawSMTP(self.host, self.port, **kw)
        return c

    def session(self, fn):
        """Run fn(client) in a thread with a connected raw client (greeting read)."""

        def run():
            with self.raw() as c:
                greet = c.reply()
                assert greet.code == 220, greet
                return fn(c)

        return in_thread(run)


class EHLOAndBasics(RelayTestCase):
    async def test_ehlo_advertises_extensions(self):
        def fn(c):
            return c.cmd("EHLO client.example")

        r = await self.session(fn)
        self.assertEqual(r.code, 250)
        self.assertEqual(r.lines[0], "relay.test")
        for ext in ("PIPELINING", "SIZE 36700160", "8BITMIME", "ENHANCEDSTATUSCODES"):
            self.assertIn(ext, r.lines)
        self.assertNotIn("STARTTLS", r.lines)

    async def test_enhanced_codes_on_replies(self):
        def fn(c):
            out = {}
            c.cmd("EHLO x")
            out["NOOP"] = c.cmd("NOOP")
            out["VRFY"] = c.cmd("VRFY alice@local.test")
            out["MAIL"] = c.cmd("MAIL FROM:<a@b.example>")
            out["RCPT"] = c.cmd("RCPT TO:<alice@local.test>")
            out["RSET"] = c.cmd("RSET")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            out["DATA354"] = c.cmd("DATA")
            c.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
            out["DATA"] = c.reply()
            out["HELP"] = c.cmd("HELP")
            out["QUIT"] = c.cmd("QUIT")
            return out

        out = await self.session(fn)
        self.assertEqual((out["NOOP"].code, out["NOOP"].lines[0][:5]), (250, "2.0.0"))
        self.assertEqual(out["VRFY"].code, 252)
        self.assertTrue(out["VRFY"].lines[0].startswith("2.5.2"))
        self.assertEqual(out["MAIL"].lines[0], "2.1.0 Ok")
        self.assertEqual(out["RCPT"].lines[0], "2.1.5 Ok")
        self.assertEqual(out["RSET"].lines[0], "2.0.0 Ok")
        self.assertEqual(out["DATA354"].code, 354)
        self.assertEqual(out["DATA"].code, 250)
        self.assertRegex(out["DATA"].lines[0], r"^2\.0\.0 Ok: queued as [0-9A-Z]{16}$")
        self.assertEqual(out["HELP"].code, 214)
        self.assertEqual(out["QUIT"].lines[0], "2.0.0 Bye")

    async def test_vrfy_does_not_disclose(self):
        def fn(c):
            c.cmd("EHLO x")
            return c.cmd("VRFY alice@local.test"), c.cmd("VRFY nobody@local.test")

        a, b = await self.session(fn)
        self.assertEqual(a.code, 252)
        self.assertEqual((a.code, a.lines), (b.code, b.lines))

    async def test_helo_works(self):
        def fn(c):
            return [c.cmd("HELO client.example"), c.cmd("MAIL FROM:<a@b.example>"),
                    c.cmd("RCPT TO:<bob@local.test>"), c.cmd("DATA")]

        rs = await self.session(fn)
        self.assertEqual([r.code for r in rs], [250, 250, 250, 354])


class Queueing(RelayTestCase):
    async def test_smtplib_message_queued_intact_with_received(self):
        body = ("Subject: caf\u00e9\r\nFrom: a@b.example\r\n\r\n8-bit: \u00fc\u00f1\u00ee\r\n"
                ".leading dot\r\n").encode("utf-8") + bytes(range(0x80, 0x100)) + b"\r\n"

        def send():
            with smtplib.SMTP(self.host, self.port) as s:
                s.ehlo("client.example")
                code, resp = s.mail("sender@b.example")
                s.rcpt("alice@local.test")
                s.rcpt("bob@local.test")
                s.rcpt("friend@remote.example")
                code, resp = s.data(body)
                return code, resp.decode()

        code, resp = await in_thread(send)
        self.assertEqual(code, 250)
        qid = resp.rsplit(" ", 1)[1]
        self.assertTrue(spoolmod.is_queue_id(qid))
        # one file, whatever the number of recipients
        self.assertEqual(queued_files(self.relay), [qid])
        env, data = read_queued(self.relay, qid)
        self.assertEqual(env.sender, "sender@b.example")
        self.assertEqual(env.recipients, ["alice@local.test", "bob@local.test", "friend@remote.example"])
        # the Received header first, then the message byte for byte
        hdr, _, rest = data.partition(b"\r\n\t(")
        self.assertTrue(data.startswith(b"Received: from client.example ([127.0.0.1])\r\n"
                                        b"\tby relay.test (twisted-relay) with ESMTP id " + qid.encode()))
        self.assertEqual(data.count(b"Received:"), 1)
        received_end = data.index(b"\r\n", data.index(b"+0000") if b"+0000" in data else 0) + 2
        self.assertEqual(data[received_end:], body)
        self.assertFalse(self.relay.service.spool.incoming_leftovers())

    async def test_ids_unique_and_sortable(self):
        def send():
            # The ids in the order the messages were acknowledged (from the
            # 250 replies): they must sort in that order.
            ids = []
            with smtplib.SMTP(self.host, self.port) as s:
                s.ehlo()
                for i in range(5):
                    self.assertEqual(s.mail("a@b.example")[0], 250)
                    self.assertEqual(s.rcpt("alice@local.test")[0], 250)
                    code, reply = s.data(b"Subject: %d\r\n\r\nx\r\n" % i)
                    self.assertEqual(code, 250, reply)
                    ids.append(re.search(rb"queued as (\S+)", reply).group(1).decode())
            return ids

        ids = await in_thread(send)
        self.assertEqual(len(set(ids)), 5, ids)
        self.assertEqual(sorted(queued_files(self.relay)), sorted(ids))
        self.assertEqual(sorted(ids), ids, "ids do not sort in arrival order")
        times = [spoolmod.id_time(i) for i in ids]
        self.assertEqual(sorted(times), times, "id times do not follow arrival order")

    async def test_null_sender_accepted(self):
        def fn(c):
            c.cmd("EHLO x")
            return c.cmd("MAIL FROM:<>"), c.cmd("RCPT TO:<alice@local.test>")

        m, r = await self.session(fn)
        self.assertEqual((m.code, r.code), (250, 250))

    async def test_received_header_cannot_be_injected(self):
        def fn(c):
            c.cmd(b"EHLO evil(\x01)\\host")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            return c.reply()

        r = await self.session(fn)
        self.assertEqual(r.code, 250)
        qid = r.lines[0].rsplit(" ", 1)[1]
        env, data = read_queued(self.relay, qid)
        first = data.split(b"\r\n")[0]
        self.assertEqual(first, b"Received: from evil????host ([127.0.0.1])")

    async def test_pipelining_in_order_two_messages(self):
        def fn(c):
            c.cmd("EHLO x")
            c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@local.test>\r\n"
                   b"RCPT TO:<nobody@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n")
            rs = [c.reply() for _ in range(5)]
            c.send(b"one\r\n.\r\nMAIL FROM:<c@d.example>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n")
            rs += [c.reply() for _ in range(4)]
            c.send(b"two\r\n.\r\nNOOP\r\nQUIT\r\n")
            rs += [c.reply() for _ in range(3)]
            return rs

        rs = await self.session(fn)
        self.assertEqual([r.code for r in rs], [250, 250, 550, 250, 354, 250, 250, 250, 354, 250, 250, 221])
        ids = queued_files(self.relay)
        self.assertEqual(len(ids), 2)
        bodies = [read_queued(self.relay, i)[1] for i in ids]
        self.assertTrue(bodies[0].endswith(b";\r\n\t" + bodies[0].split(b";\r\n\t")[1].split(b"\r\n")[0]
                                           + b"\r\none\r\n"))
        self.assertTrue(bodies[1].endswith(b"\r\ntwo\r\n"))
        envs = [read_queued(self.relay, i)[0] for i in ids]
        self.assertEqual(envs[0].recipients, ["alice@local.test", "bob@local.test"])
        self.assertEqual(envs[1].sender, "c@d.example")

    async def test_duplicate_recipients_once(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            for a in ("alice@local.test", "ALICE@LOCAL.TEST", "alice@Local.Test."):
                assert c.cmd(f"RCPT TO:<{a}>").code == 250
            c.cmd("DATA")
            c.send(b"x\r\n.\r\n")
            return c.reply()

        r = await self.session(fn)
        qid = r.lines[0].rsplit(" ", 1)[1]
        env, _ = read_queued(self.relay, qid)
        self.assertEqual(env.recipients, ["alice@local.test"])


class Policy(RelayTestCase):
    overrides = {"relay": {"networks": ["10.0.0.0/8"], "domains": ["backup.example"]}}

    async def rcpt(self, addr, sender="a@b.example"):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd(f"MAIL FROM:<{sender}>")
            return c.cmd(f"RCPT TO:{addr}")

        return await self.session(fn)

    async def test_local_user_and_postmaster(self):
        self.assertEqual((await self.rcpt("<alice@local.test>")).code, 250)
        self.assertEqual((await self.rcpt("<Postmaster@LOCAL.test>")).code, 250)
        self.assertEqual((await self.rcpt("<postmaster>")).code, 250)

    async def test_unknown_local_user(self):
        r = await self.rcpt("<nobody@local.test>")
        self.assertEqual(r.code, 550)
        self.assertTrue(r.lines[0].startswith("5.1.1"))

    async def test_relay_denied_outside_networks(self):
        r = await self.rcpt("<someone@elsewhere.example>")
        self.assertEqual(r.code, 554)
        self.assertTrue(r.lines[0].startswith("5.7.1"))

    async def test_backup_mx_domain_from_anyone(self):
        self.assertEqual((await self.rcpt("<x@BACKUP.example.>")).code, 250)

    async def test_sender_routing_never_relayed(self):
        for addr in (
            "<user%elsewhere.example@local.test>",
            "<user!elsewhere.example@local.test>",
            '<"user@elsewhere.example"@local.test>',
            "<user%elsewhere.example@backup.example>",
            '<"user@elsewhere.example"@backup.example>',
            "<@local.test:user@elsewhere.example>",
            "<someone@[192.0.2.1]>",
        ):
            r = await self.rcpt(addr)
            self.assertIn(r.code, (550, 554), addr)
            self.assertTrue(r.lines[0][:5] in ("5.1.1", "5.7.1"), (addr, r))
        r = await self.rcpt("<a@b@local.test>")
        self.assertEqual(r.code, 501)

    async def test_source_route_to_local_is_plain_address(self):
        r = await self.rcpt("<@elsewhere.example,@x.example:alice@local.test>")
        self.assertEqual(r.code, 250)

    async def test_ip_literal_of_ours_is_local(self):
        r = await self.rcpt("<alice@[127.0.0.1]>")
        self.assertEqual(r.code, 250)

    async def test_idna_domain(self):
        # a U-label for a relay domain is compared in A-label form
        r = await self.rcpt("<x@b\u00fccher.example>")
        self.assertEqual(r.code, 553)  # non-ASCII without SMTPUTF8


class PolicyTrusted(RelayTestCase):
    async def test_relay_from_networks(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            return c.cmd("RCPT TO:<someone@elsewhere.example>"), c.cmd("RCPT TO:<x@XN--BCHER-KVA.example>")

        r, r2 = await self.session(fn)
        self.assertEqual((r.code, r2.code), (250, 250))


class Limits(RelayTestCase):
    overrides = {"smtp": {"max_message_size": 2048, "max_recipients": 3, "max_connections_per_ip": 2}}

    async def test_size_param_too_big(self):
        def fn(c):
            c.cmd("EHLO x")
            return c.cmd("MAIL FROM:<a@b.example> SIZE=4096")

        r = await self.session(fn)
        self.assertEqual(r.code, 552)
        self.assertTrue(r.lines[0].startswith("5.3.4"))

    async def test_actual_data_too_big_nothing_queued(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example> SIZE=100")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send((b"x" * 70 + b"\r\n") * 100 + b".\r\n")
            return c.reply(), c.cmd("NOOP")

        r, noop = await self.session(fn)
        self.assertEqual(r.code, 552)
        self.assertTrue(r.lines[0].startswith("5.3.4"))
        self.assertEqual(noop.code, 250)
        self.assertEqual(queued_files(self.relay), [])
        self.assertEqual(self.relay.service.spool.incoming_leftovers(), [])

    async def test_too_many_recipients(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            return [c.cmd(f"RCPT TO:<{a}>") for a in ("alice@local.test", "bob@local.test",
                                                       "postmaster@local.test", "x@y.example")]

        rs = await self.session(fn)
        self.assertEqual([r.code for r in rs], [250, 250, 250, 452])
        self.assertTrue(rs[3].lines[0].startswith("4.5.3"))

    async def test_connections_per_ip(self):
        def fn():
            a = self.raw()
            b = self.raw()
            ga, gb = a.reply(), b.reply()
            c = self.raw()
            gc = c.reply()
            closed = c.closed()
            for x in (a, b, c):
                x.close()
            return ga, gb, gc, closed

        ga, gb, gc, closed = await in_thread(fn)
        self.assertEqual((ga.code, gb.code), (220, 220))
        self.assertEqual(gc.code, 421)
        self.assertTrue(gc.lines[0].startswith("4.7.0"))
        self.assertTrue(closed)


class BadInput(RelayTestCase):
    async def test_bare_lf_in_data_rejected_and_smuggled_commands_not_run(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<bob@local.test>\r\n"
                   b"DATA\r\nsmuggled\r\n.\r\n")
            r = c.reply()
            return r, c.cmd("NOOP")

        r, noop = await self.session(fn)
        self.assertEqual(r.code, 550)
        self.assertIn("bare CR or LF", r.lines[0])
        self.assertEqual(noop.code, 250)
        self.assertEqual(queued_files(self.relay), [])

    async def test_mail_loop_refused_554_5_4_6(self):
        def fn(c, hops):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Received: from a by b; Fri, 27 Nov 2026 10:00:00 +0000\r\n" * hops
                   + b"Subject: loop\r\n\r\nx\r\n.\r\n")
            return c.reply()

        r = await self.session(lambda c: fn(c, 101))
        self.assertEqual(r.code, 554)
        self.assertTrue(r.lines[0].startswith("5.4.6 Too many hops"), r.lines)
        self.assertEqual(queued_files(self.relay), [])
        r = await self.session(lambda c: fn(c, 100))
        self.assertEqual(r.code, 250)

    async def test_big_rejected_message_leaves_no_file(self):
        # over the in-memory limit: it went to a file in incoming/, removed in the disk pool
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 3000 + b"bare\nLF\r\n.\r\n")
            return c.reply()

        r = await self.session(fn)
        self.assertEqual(r.code, 550)
        self.assertEqual(queued_files(self.relay), [])
        await apoll(lambda: not self.relay.service.spool.incoming_leftovers(), 10,
                    what="the aborted file removed")

    async def test_bare_cr_in_data_rejected(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"a\rb\r\n.\r\n")
            return c.reply()

        r = await self.session(fn)
        self.assertEqual(r.code, 550)
        self.assertEqual(queued_files(self.relay), [])

    async def test_bare_lf_in_command_closes_the_session(self):
        def fn(c):
            c.send(b"EHLO x\n")
            r1 = c.reply()
            return r1, c.sock.recv(100)

        r1, rest = await self.session(fn)
        self.assertEqual(r1.code, 521)
        self.assertTrue(r1.lines[0].startswith("5.5.2"))
        self.assertEqual(rest, b"")  # closed

    async def test_bare_lf_cannot_smuggle_a_command(self):
        # "NOOP<LF>RCPT TO:..." must not run the RCPT, in any session state
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.send(b"NOOP\nRCPT TO:<alice@local.test>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
            r = c.reply()
            return r, c.sock.recv(1000)

        r, rest = await self.session(fn)
        self.assertEqual(r.code, 521)
        self.assertEqual(rest, b"")
        self.assertEqual(queued_files(self.relay), [])

    async def test_bare_cr_in_command(self):
        def fn(c):
            c.send(b"NOOP\rRCPT TO:<alice@local.test>\r\n")
            r1 = c.reply()
            return r1, c.cmd("NOOP")

        r1, r2 = await self.session(fn)
        self.assertEqual(r1.code, 500)
        self.assertIn("bare CR", r1.lines[0])
        self.assertEqual(r2.code, 250)

    async def test_long_data_line_rejected_rest_not_commands(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Subject: x\r\n\r\n" + b"A" * 3000 + b"QUIT\r\nRSET\r\n.\r\n")
            return c.reply(), c.cmd("NOOP")

        r, noop = await self.session(fn)
        self.assertEqual(r.code, 550)
        self.assertIn("line longer than 1000", r.lines[0])
        self.assertEqual(noop.code, 250)
        self.assertEqual(queued_files(self.relay), [])

    async def test_long_command_line_skipped(self):
        def fn(c):
            c.cmd("EHLO x")
            c.send(b"NOOP " + b"x" * 600 + b"QUIT\r\n")
            r = c.reply()
            return r, c.cmd("NOOP")

        r, noop = await self.session(fn)
        self.assertEqual(r.code, 500)
        self.assertIn("5.5.2 Line too long", r.lines[0])
        self.assertEqual(noop.code, 250)

    async def test_out_of_order_syntax_unknown(self):
        def fn(c):
            out = [c.cmd("MAIL FROM:<a@b.example>")]
            c.cmd("EHLO x")
            out += [c.cmd("RCPT TO:<alice@local.test>"), c.cmd("DATA"),
                    c.cmd("MAIL FROM:a@b@c"), c.cmd("MAIL TO:<a@b.example>"), c.cmd("FOO bar"),
                    c.cmd("MAIL FROM:<a@b.example>"), c.cmd("MAIL FROM:<a@b.example>"), c.cmd("DATA"),
                    c.cmd("MAIL FROM:<a@b.example> FOO=BAR")]
            return out

        rs = await self.session(fn)
        got = [(r.code, r.lines[0][:5]) for r in rs]
        self.assertEqual(got, [
            (503, "5.5.1"), (503, "5.5.1"), (503, "5.5.1"), (501, "5.1.7"), (501, "5.5.4"),
            (500, "5.5.2"), (250, "2.1.0"), (503, "5.5.1"), (554, "5.5.1"), (503, "5.5.1"),
        ])

    async def test_twenty_errors_close(self):
        def fn(c):
            rs = [c.cmd("BOGUS") for _ in range(19)]
            c.send(b"BOGUS\r\n")
            last = c.reply()
            bye = c.reply()
            return rs, last, bye, c.closed()

        rs, last, bye, closed = await self.session(fn)
        self.assertTrue(all(r.code == 500 for r in rs))
        self.assertEqual(last.code, 500)
        self.assertEqual(bye.code, 421)
        self.assertTrue(closed)

    async def test_unknown_mail_parameter(self):
        def fn(c):
            c.cmd("EHLO x")
            return c.cmd("MAIL FROM:<a@b.example> BODY=BINARYMIME"), c.cmd("MAIL FROM:<a@b.example> BODY=8BITMIME")

        a, b = await self.session(fn)
        self.assertEqual(a.code, 555)
        self.assertEqual(b.code, 250)

    async def test_rcpt_parameters_refused(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            return c.cmd("RCPT TO:<alice@local.test> FOO=BAR")

        r = await self.session(fn)
        self.assertEqual(r.code, 555)


class SpoolFailures(RelayTestCase):
    async def test_incoming_unwritable_gives_452(self):
        inc = self.relay.service.spool.incoming_dir
        os.rmdir(inc)
        with open(inc, "w") as f:
            f.write("not a directory")

        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            r = c.cmd("DATA")
            if r.code == 354:
                # a small message is held in memory and written at the end
                # of DATA: the failure shows there
                c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                r = c.reply()
            return r, c.cmd("NOOP")

        r, noop = await self.session(fn)
        os.unlink(inc)
        os.mkdir(inc)
        self.assertEqual(r.code, 452)
        self.assertTrue(r.lines[0].startswith("4.3.1"))
        self.assertEqual(noop.code, 250)

    async def test_commit_failure_gives_452_and_no_torn_file(self):
        q = self.relay.service.spool.queue_dir
        os.rename(q, q + ".away")

        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<alice@local.test>")
            c.cmd("DATA")
            c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            return c.reply()

        r = await self.session(fn)
        os.rename(q + ".away", q)
        self.assertEqual(r.code, 452)
        self.assertEqual(self.relay.service.spool.incoming_leftovers(), [])
        self.assertEqual(queued_files(self.relay), [])


class JunkCommandLimit(RelayTestCase):
    """smtp.junk_command_limit (default 100), as Postfix's smtpd_junk_command_limit:
    past it each NOOP/RSET/HELP/VRFY/HELO/EHLO counts as an error, and 20
    errors end the session; a message received starts the count afresh."""

    async def test_pipelined_junk_ends_the_session(self):
        def fn(c):
            c.send(b"NOOP\r\nRSET\r\nHELP\r\nVRFY x\r\n" * 50)  # 200 junk commands
            replies = []
            while not replies or replies[-1].code != 421:
                replies.append(c.reply())
            return replies, c.closed()

        replies, closed = await self.session(fn)
        # 100 free, then 20 that count as errors: the 120th is answered, then 421
        self.assertEqual(len(replies), 121)
        self.assertEqual([r.code for r in replies[:4]], [250, 250, 214, 252])
        self.assertEqual(replies[-2].code, 252)  # the 120th, a VRFY
        self.assertEqual(replies[-1].code, 421)
        self.assertEqual(replies[-1].lines[0], "4.7.0 Too many errors, closing connection")
        self.assertTrue(closed)

    async def test_a_message_received_starts_the_count_afresh(self):
        def fn(c):
            out = []
            for i in range(3):
                c.send(b"NOOP\r\n" * 90)
                out += [c.reply() for _ in range(90)]
                out.append(c.cmd("EHLO client.test"))
                out.append(c.cmd("MAIL FROM:<a@b.example>"))
                out.append(c.cmd("RCPT TO:<alice@local.test>"))
                out.append(c.cmd("DATA"))
                c.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i)
                out.append(c.reply())
            return out, c.cmd("QUIT")

        out, bye = await self.session(fn)
        self.assertEqual({r.code for r in out}, {250, 354})
        self.assertEqual(bye.code, 221)
        self.assertEqual(len(queued_files(self.relay)), 3)


class JunkCommandLimitOff(RelayTestCase):
    overrides = {"smtp": {"junk_command_limit": 0}}

    async def test_zero_is_no_limit(self):
        def fn(c):
            c.send(b"NOOP\r\n" * 300)
            return [c.reply().code for _ in range(300)], c.cmd("QUIT")

        codes, bye = await self.session(fn)
        self.assertEqual(set(codes), {250})
        self.assertEqual(bye.code, 221)
