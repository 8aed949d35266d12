"""The POP3 server over real TCP sockets on 127.0.0.1 (poplib and raw sockets).

Covers every command and mailbox rule of the POP3 issue; TLS is in
test_pop3_tls.py, time-driven behaviour (Clock) in test_pop3_unit.py, the
fuzzing in test_pop3_fuzz.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import poplib
import time
from typing import ClassVar

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.support.pop3server import (
    ALICE,
    BOB,
    PASSWORDS,
    POP3ServerMixin,
    recv_lines,
    recv_until,
    write_users,
)
from tests.support.wait import apoll, poll

MSG = (
    b"From: carol@example.net\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"first line\r\n"
    b".starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"8-bit: \xc3\xa9\xff\r\n"
    b"\r\n"
    b"last line\r\n"
)
PREFIX = b"Return-Path: <carol@example.net>\r\nDelivered-To: alice@example.org\r\n"


def stuffed(text: bytes) -> bytes:
    out = b"\r\n".join((b"." + ln if ln.startswith(b".") else ln) for ln in text.split(b"\r\n"))
    return out


def err(e: Exception) -> bytes:
    return e.args[0] if isinstance(e.args[0], bytes) else str(e).encode()


class Base(POP3ServerMixin, unittest.TestCase):
    pass


class CapabilityTests(Base):
    async def test_greeting_and_capa(self):
        def client():
            c = self.pop()
            welcome = c.getwelcome()
            before = c.capa()
            c.user(ALICE)
            c.pass_(PASSWORDS[ALICE])
            after = c.capa()
            c.quit()
            return welcome, before, after

        welcome, before, after = await self.run_client(client)
        self.assertTrue(welcome.startswith(b"+OK pop.example.org"))
        self.assertEqual(before, {
            "TOP": [], "UIDL": [], "RESP-CODES": [], "AUTH-RESP-CODE": [], "PIPELINING": [],
            "USER": [], "SASL": ["PLAIN"], "IMPLEMENTATION": ["twisted-relay"], "UTF8": ["USER"],
        })  # no STLS: no certificate configured
        self.assertNotIn("USER", after)
        self.assertNotIn("SASL", after)
        self.assertIn("UIDL", after)

    async def test_auth_without_argument_lists_mechanisms(self):
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"AUTH\r\n")
            return recv_until(s, b"\r\n.\r\n")

        self.assertEqual(await self.run_client(client), b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n")

    async def test_quit_in_authorization_state(self):
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"QUIT\r\n")
            return recv_until(s, b"NEVER")

        self.assertEqual(await self.run_client(client), b"+OK Bye\r\n")


class TransactionTests(Base):
    async def test_stat_list_uidl(self):
        paths = [self.deliver(MSG, prefix=PREFIX) for _ in range(2)]
        paths.append(self.deliver(b"Subject: short\r\n\r\nx\r\n"))
        sizes = [len(PREFIX + MSG)] * 2 + [len(b"Subject: short\r\n\r\nx\r\n")]

        def client():
            c = self.login()
            r = (c.stat(), c.list(), c.list(2), c.uidl(), c.uidl(3))
            c.quit()
            return r

        stat, listing, one, uidl, uidl3 = await self.run_client(client)
        self.assertEqual(stat, (3, sum(sizes)))
        self.assertEqual(listing[1], [b"%d %d" % (i + 1, n) for i, n in enumerate(sizes)])
        self.assertEqual(one, b"+OK 2 %d" % sizes[1])
        uids = [ln.split()[1] for ln in uidl[1]]
        self.assertEqual(len(set(uids)), 3)
        for u in uids:
            self.assertTrue(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u))
        self.assertEqual(uidl3, b"+OK 3 " + uids[2])

    async def test_retr_on_the_wire_is_crlf_and_dot_stuffed(self):
        """Exactly: +OK line, CRLF text with dot-stuffing, ".": the unstuffed
        text has the size LIST announced and equals what was delivered."""
        self.deliver(MSG, prefix=PREFIX)
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"USER %s\r\nPASS %s\r\nLIST 1\r\n" % (ALICE.encode(), PASSWORDS[ALICE].encode()))
            lines = recv_lines(s, 3)
            s.sendall(b"RETR 1\r\n")
            return lines, recv_until(s, b"\r\n.\r\n")

        lines, wire = await self.run_client(client)
        size = int(lines[2].split()[2])
        self.assertEqual(size, len(PREFIX + MSG))
        self.assertEqual(wire, b"+OK %d octets\r\n" % size + stuffed(PREFIX + MSG) + b".\r\n")
        self.assertIn(b"\r\n..starts with a dot\r\n...two dots\r\n..\r\n", wire)

    async def test_message_without_final_line_end(self):
        body = b"Subject: x\r\n\r\nno final newline"
        self.deliver(body)
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (ALICE.encode(), PASSWORDS[ALICE].encode()))
            return recv_until(s, b"\r\n.\r\n")

        wire = await self.run_client(client)
        self.assertTrue(wire.endswith(b"+OK %d octets\r\n" % len(body) + body + b"\r\n.\r\n"))

    async def test_message_starting_with_a_dot_and_empty_message(self):
        self.deliver(b".odd first line\r\n")
        self.deliver(b"")
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (ALICE.encode(), PASSWORDS[ALICE].encode()))
            a = recv_until(s, b"\r\n.\r\n")
            s.sendall(b"RETR 2\r\n")
            return a, recv_until(s, b".\r\n")

        a, b = await self.run_client(client)
        self.assertTrue(a.endswith(b"+OK 17 octets\r\n..odd first line\r\n.\r\n"))
        self.assertEqual(b, b"+OK 0 octets\r\n.\r\n")

    async def test_poplib_retrieves_byte_for_byte(self):
        """A message as local delivery stores it (maildir.deliver from a spool
        file) comes back through POP3 byte for byte.  (The variant that goes in
        through the SMTP server is pending the SMTP server.)"""
        self.deliver(MSG, prefix=PREFIX)

        def client():
            c = self.login()
            _, lines, octets = c.retr(1)
            c.quit()
            return lines, octets

        lines, _octets = await self.run_client(client)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", PREFIX + MSG)

    async def test_retrieval_in_and_out_of_order(self):
        """The read-ahead of the next message never serves the wrong one."""
        bodies = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(1, 6)]
        for b in bodies:
            self.deliver(b)

        def client():
            c = self.login()
            got = {}
            for n in (1, 2, 3, 5, 4, 1, 2):
                got.setdefault(n, []).append(b"\r\n".join(c.retr(n)[1]) + b"\r\n")
            c.dele(4)
            try:
                c.retr(4)
                r = b"retrieved a deleted message"
            except poplib.error_proto as e:
                r = err(e)
            c.quit()
            return got, r

        got, r = await self.run_client(client)
        for n, texts in got.items():
            for t in texts:
                self.assertEqual(t, bodies[n - 1])
        self.assertEqual(r, b"-ERR Message 4 is deleted")

    async def test_top(self):
        self.deliver(MSG, prefix=PREFIX)
        self.deliver(b"A: 1\r\nB: 2\r\n")  # headers only, no body
        head = PREFIX + MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n"

        def client():
            c = self.login()
            r = [c.top(1, 0), c.top(1, 2), c.top(1, 1000), c.top(2, 5)]
            for bad in (b"TOP 1", b"TOP 1 x", b"TOP 1 -1", b"TOP 9 1", b"TOP 1 1 1"):
                try:
                    c._shortcmd(bad.decode())
                    r.append(b"no error")
                except poplib.error_proto as e:
                    r.append(err(e))
            c.quit()
            return r

        r = await self.run_client(client)
        self.assertEqual(b"\r\n".join(r[0][1]) + b"\r\n", head)
        self.assertEqual(b"\r\n".join(r[1][1]) + b"\r\n", head + b"first line\r\n.starts with a dot\r\n")
        self.assertEqual(b"\r\n".join(r[2][1]) + b"\r\n", PREFIX + MSG)
        self.assertEqual(b"\r\n".join(r[3][1]) + b"\r\n", b"A: 1\r\nB: 2\r\n")
        for reply in r[4:]:
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        # TOP is a peek: nothing moved to cur/
        self.assertEqual(len(self.files(sub="new")), 2)

    async def test_retr_moves_to_cur_keeps_uidl_and_leaves_mail(self):
        self.deliver(MSG)
        self.deliver(MSG)

        def session(retr):
            c = self.login()
            uidl = c.uidl()[1]
            if retr:
                c.retr(1)
            c.quit()
            return uidl

        first = await self.run_client(session, True)
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0)
        cur = self.files(sub="cur")
        self.assertEqual(len(cur), 1)
        self.assertTrue(cur[0].endswith(":2,S"))
        self.assertEqual(len(self.files(sub="new")), 1)
        second = await self.run_client(session, True)
        self.assertEqual(first, second)  # same numbering and UIDLs
        # another reader adds a flag: UIDL still the same
        box = os.path.join(self.maildir_of(), "cur")
        os.rename(os.path.join(box, cur[0]), os.path.join(box, cur[0] + "F"))
        third = await self.run_client(session, False)
        self.assertEqual(first, third)

    async def test_dele_acts_only_at_quit(self):
        paths = [self.deliver(MSG) for _ in range(3)]

        def client():
            c = self.login()
            out = [c.dele(2), c.stat(), c.list()[1], c.uidl()[1]]
            for cmd in ("RETR 2", "DELE 2", "LIST 2", "UIDL 2", "TOP 2 0"):
                try:
                    c._shortcmd(cmd)
                except poplib.error_proto as e:
                    out.append(err(e))
            out.append(sorted(os.listdir(os.path.dirname(paths[0]))))
            out.append(c.quit())
            return out

        out = await self.run_client(client)
        self.assertEqual(out[0], b"+OK Message 2 marked for deletion")
        self.assertEqual(out[1], (2, 2 * len(MSG)))
        self.assertEqual([ln.split()[0] for ln in out[2]], [b"1", b"3"])
        self.assertEqual([ln.split()[0] for ln in out[3]], [b"1", b"3"])
        for e in out[4:9]:
            self.assertEqual(e, b"-ERR Message 2 is deleted")
        self.assertEqual(len(out[9]), 3)  # still on disk before QUIT
        self.assertIn(b"(1 messages deleted)", out[10])
        remaining = self.files(sub="new") + self.files(sub="cur")
        self.assertEqual(len(remaining), 2)
        self.assertNotIn(os.path.basename(paths[1]), remaining)

    async def test_dropped_connection_deletes_nothing(self):
        self.deliver(MSG)
        self.deliver(MSG)

        def client():
            c = self.login()
            c.dele(1)
            c.dele(2)
            c.sock.close()  # no QUIT

        await self.run_client(client)
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0)
        self.assertEqual(len(self.files(sub="new")), 2)

    async def test_rset_unmarks(self):
        self.deliver(MSG)
        self.deliver(MSG)

        def client():
            c = self.login()
            c.dele(1)
            c.dele(2)
            r = c.rset()
            s = c.stat()
            c.quit()
            return r, s

        r, s = await self.run_client(client)
        self.assertEqual(r, b"+OK Maildrop has 2 messages (%d octets)" % (2 * len(MSG)))
        self.assertEqual(s, (2, 2 * len(MSG)))
        self.assertEqual(len(self.files(sub="new")), 2)

    async def test_noop_and_empty_mailbox(self):
        def client():
            c = self.login(BOB)  # has never received mail: no Maildir yet
            r = (c.noop(), c.stat(), c.list()[1], c.uidl()[1])
            c.quit()
            return r

        self.assertEqual(await self.run_client(client), (b"+OK", (0, 0), [], []))
        self.assertTrue(os.path.isdir(os.path.join(self.maildir_of(BOB), "new")))

    async def test_invalid_message_numbers(self):
        self.deliver(MSG)

        def client():
            c = self.login()
            out = []
            for cmd in ("LIST 0", "LIST 2", "LIST x", "RETR -1", "DELE", "RETR 1 2", "UIDL 99999999999",
                        "STAT 1", "RSET x", "NOOP x"):
                try:
                    c._shortcmd(cmd)
                    out.append(b"no error")
                except poplib.error_proto as e:
                    out.append(err(e))
            out.append(c.stat())
            c.quit()
            return out

        out = await self.run_client(client)
        for reply in out[:-1]:
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertEqual(out[0], b"-ERR No such message 0")
        self.assertEqual(out[2], b"-ERR Invalid message number")
        self.assertEqual(out[-1], (1, len(MSG)))

    async def test_mail_delivered_during_a_session(self):
        self.deliver(MSG)

        def client():
            c = self.login()
            self.deliver(MSG + b"new\r\n")
            r = (c.stat(), c.list()[1])
            c.dele(1)
            c.quit()
            return r

        stat, listing = await self.run_client(client)
        self.assertEqual(stat, (1, len(MSG)))
        self.assertEqual(len(listing), 1)
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0)

        def again():
            c = self.login()
            r = c.retr(1)
            c.quit()
            return r

        r = await self.run_client(again)
        self.assertEqual(r[1][-1], b"new")

    async def test_large_message_is_streamed(self):
        line = b"0123456789" * 7 + b"\r\n"
        big = b"Subject: big\r\n\r\n" + b"".join(b".%07d " % i + line for i in range(100_000))  # ~8 MB
        self.deliver(big)
        want = hashlib.sha256(big).hexdigest()

        def client():
            c = self.login()
            size = int(c.list(1).split()[2])
            _, lines, _ = c.retr(1)
            got = hashlib.sha256(b"\r\n".join(lines) + b"\r\n").hexdigest()
            top = c.top(1, 2)[1]
            c.quit()
            return size, got, top

        size, got, top = await self.run_client(client)
        self.assertEqual(size, len(big))
        self.assertEqual(got, want)
        self.assertEqual(top, [b"Subject: big", b"", b".0000000 " + line[:-2], b".0000001 " + line[:-2]])

    async def test_dropped_during_a_large_retr(self):
        big = b"Subject: big\r\n\r\n" + b"x" * 78 + b"\r\n" * 1
        big = big + (b"y" * 78 + b"\r\n") * 200_000  # ~16 MB
        self.deliver(big)
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"USER %s\r\nPASS %s\r\nRETR 1\r\n" % (ALICE.encode(), PASSWORDS[ALICE].encode()))
            got = 0
            while got < 300_000:
                got += len(s.recv(65536))
            s.close()

        await self.run_client(client)
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0, timeout=15)

        def relogin():
            c = self.login()
            r = c.stat()
            c.quit()
            return r

        self.assertEqual(await self.run_client(relogin), (1, len(big)))


class LockTests(Base):
    async def test_second_session_in_use_until_first_ends(self):
        self.deliver(MSG)

        def client():
            first = self.login()
            second = self.pop()
            second.user(ALICE)
            try:
                second.pass_(PASSWORDS[ALICE])
                r = b"logged in twice"
            except poplib.error_proto as e:
                r = err(e)
            other = self.login(BOB)  # another mailbox is not affected
            other.quit()
            first.sock.close()  # dropped, not QUIT: the lock must still go
            second.close()
            return r

        r = await self.run_client(client)
        self.assertEqual(r, b"-ERR [IN-USE] Mailbox is locked by another POP3 session")
        await apoll(lambda: self.factory.open_sessions == 0 and self.pending == 0)

        def again():
            c = self.login()
            r = c.stat()
            c.quit()
            return r

        self.assertEqual(await self.run_client(again), (1, len(MSG)))

    async def test_lock_released_after_quit(self):
        def client():
            for _ in range(3):
                c = self.login()
                c.quit()
                poll(lambda: self.factory.logged_in == 0, what="logout")
            return True

        self.assertTrue(await self.run_client(client))


class LoginTests(Base):
    factory_kwargs: ClassVar[dict] = {"login_failure_delay": 0.3}

    async def test_failed_logins_look_alike_and_are_delayed(self):
        def attempt(user, pw):
            c = self.pop()
            user_reply = c.user(user)
            t0 = time.monotonic()
            try:
                c.pass_(pw)
                r = b"logged in"
            except poplib.error_proto as e:
                r = err(e)
            elapsed = time.monotonic() - t0
            c.quit()
            return user_reply, r, elapsed

        for user, pw in ((ALICE, "wrong"), ("nobody@example.org", "x"), ("alice@other.org", "x")):
            user_reply, r, elapsed = await self.run_client(attempt, user, pw)
            self.assertEqual(user_reply, b"+OK Send your password")
            self.assertEqual(r, b"-ERR [AUTH] Authentication failed")
            self.assertGreaterEqual(elapsed, 0.29)

    async def test_connection_closed_after_three_failures(self):
        s = self.raw()

        def client():
            s.recv(100)
            out = []
            for _ in range(3):
                s.sendall(b"USER alice@example.org\r\nPASS nope\r\n")
                out += recv_lines(s, 2)
            out.append(s.recv(100))  # EOF
            return out

        out = await self.run_client(client)
        self.assertEqual(out[:4], [b"+OK Send your password", b"-ERR [AUTH] Authentication failed"] * 2)
        self.assertEqual(out[5], b"-ERR [AUTH] Authentication failed; too many failures, closing connection")
        self.assertEqual(out[6], b"")

    async def test_unsafe_user_names_fail_like_wrong_passwords(self):
        # Even with a users file entry, a name that could leave the mailbox
        # root or is not in a local domain never logs in.
        self.factory.login_failure_delay = 0.01
        write_users(self.users_path, dict(PASSWORDS, **{"alice@other.org": "pw", "a.b@example.org": "pw"}))
        names = [
            "../../etc@example.org", "a/b@example.org", "..@example.org", ".hidden@example.org",
            "alice@example.org/../../x", "alice@../example.org", "alice\x00@example.org",
            "alice", "@example.org", "alice@other.org", '"a/b"@example.org', "alice@[127.0.0.1]",
        ]
        out = []
        remaining = list(names)
        while remaining:
            batch, remaining = remaining[:3], remaining[3:]
            sock = self.raw()

            def one(sock=sock, batch=batch):
                sock.recv(100)
                got = []
                for n in batch:
                    sock.sendall(b"USER " + n.encode("utf-8", "surrogateescape") + b"\r\nPASS pw\r\n")
                    got += recv_lines(sock, 2)
                return got

            out += await self.run_client(one)
        for i in range(len(names)):
            self.assertEqual(out[2 * i + 1][:24], b"-ERR [AUTH] Authentication"[:24], names[i])
        # nothing was created outside the mailbox root, nor a maildir for them
        self.assertLessEqual(set(os.listdir(self.tmp)), {"mail", "users"})
        if os.path.exists(self.root):
            self.assertEqual(os.listdir(self.root), [])

    async def test_user_added_while_running_can_log_in(self):
        def client():
            write_users(self.users_path, dict(PASSWORDS, **{"carol@example.org": "c-pw"}))
            c = self.pop()
            c.user("Carol@Example.ORG")
            r = c.pass_("c-pw")
            c.quit()
            return r

        r = await self.run_client(client)
        self.assertTrue(r.startswith(b"+OK Logged in"))

    async def test_password_with_spaces_and_case_insensitive_user(self):
        def client():
            c = self.pop()
            c.user("BOB@example.ORG")
            r = c.pass_(PASSWORDS[BOB])
            c.quit()
            return r

        self.assertEqual(await self.run_client(client), b"+OK Logged in, 0 messages (0 octets)")

    async def test_pass_without_user(self):
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"PASS x\r\n")
            return recv_lines(s, 1)

        self.assertEqual(await self.run_client(client), [b"-ERR Send USER first"])


class SASLTests(Base):
    factory_kwargs: ClassVar[dict] = {"login_failure_delay": 0.01}

    def _plain(self, authz: str, user: str, pw: str) -> bytes:
        return base64.b64encode(f"{authz}\0{user}\0{pw}".encode())

    async def exchange(self, *lines: bytes, n: int | None = None) -> list[bytes]:
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"".join(ln + b"\r\n" for ln in lines))
            return recv_lines(s, n or len(lines))

        return await self.run_client(client)

    async def test_initial_response(self):
        r = await self.exchange(b"AUTH PLAIN " + self._plain("", ALICE, PASSWORDS[ALICE]), b"STAT")
        self.assertEqual(r, [b"+OK Logged in, 0 messages (0 octets)", b"+OK 0 0"])

    async def test_without_initial_response(self):
        r = await self.exchange(b"AUTH PLAIN", self._plain(ALICE, ALICE, PASSWORDS[ALICE]), b"STAT")
        self.assertEqual(r, [b"+ ", b"+OK Logged in, 0 messages (0 octets)", b"+OK 0 0"])

    async def test_failures(self):
        r = await self.exchange(
            b"AUTH PLAIN " + self._plain("", ALICE, "wrong"),
            b"AUTH PLAIN", b"*",
            b"AUTH PLAIN !!!notbase64",
            b"AUTH PLAIN " + base64.b64encode(b"no nuls"),
            b"AUTH CRAM-MD5",
        )
        self.assertEqual(r[0], b"-ERR [AUTH] Authentication failed")
        self.assertEqual(r[1:3], [b"+ ", b"-ERR Authentication cancelled"])
        self.assertTrue(r[3].startswith(b"-ERR Invalid base64"))
        self.assertTrue(r[4].startswith(b"-ERR Invalid SASL PLAIN"))
        self.assertTrue(r[5].startswith(b"-ERR Unsupported authentication mechanism"))

    async def test_authorization_identity_rule(self):
        """relay.common.sasl's rule, the same as SMTP's (tests/test_smtp_tls.py): an
        authzid is accepted when empty or the authcid's user modulo case."""
        got = {}
        for authz in ("", ALICE, ALICE.upper(), " " + ALICE, BOB):
            # QUIT: the mailbox lock is free for the next login
            r = await self.exchange(b"AUTH PLAIN " + self._plain(authz, ALICE, PASSWORDS[ALICE]), b"QUIT")
            got[authz] = r[0].startswith(b"+OK Logged in")
        self.assertEqual(got, {"": True, ALICE: True, ALICE.upper(): True, " " + ALICE: True, BOB: False})

    async def test_other_authorization_identity_refused(self):
        r = await self.exchange(b"AUTH PLAIN " + self._plain(BOB, ALICE, PASSWORDS[ALICE]))
        self.assertEqual(r, [b"-ERR [AUTH] Authentication failed"])


class WireTests(Base):
    """Pipelining, line limits, junk."""

    async def test_pipelined_commands_answered_in_order(self):
        self.deliver(MSG)
        self.deliver(b"Subject: 2\r\n\r\ntwo\r\n")
        cmds = (b"CAPA\r\nUSER alice@example.org\r\nPASS " + PASSWORDS[ALICE].encode() + b"\r\n"
                b"STAT\r\nLIST 2\r\nUIDL 1\r\nRETR 2\r\nTOP 1 0\r\nNOOP\r\nDELE 1\r\nLIST\r\nRSET\r\n"
                b"BOGUS\r\nQUIT\r\n")
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(cmds)
            return recv_until(s, b"NEVER")

        wire = await self.run_client(client)
        replies = wire.split(b"\r\n")
        order = [ln for ln in replies if ln.startswith((b"+OK", b"-ERR"))]
        self.assertEqual(len(order), 14, wire)
        self.assertEqual(order[0], b"+OK Capability list follows")
        self.assertEqual(order[1], b"+OK Send your password")
        self.assertTrue(order[2].startswith(b"+OK Logged in"))
        self.assertEqual(order[3], b"+OK 2 %d" % (len(MSG) + len(b"Subject: 2\r\n\r\ntwo\r\n")))
        self.assertEqual(order[4], b"+OK 2 %d" % len(b"Subject: 2\r\n\r\ntwo\r\n"))
        self.assertTrue(order[5].startswith(b"+OK 1 "))
        self.assertEqual(order[6], b"+OK %d octets" % len(b"Subject: 2\r\n\r\ntwo\r\n"))
        self.assertEqual(order[7], b"+OK Top of message follows")
        self.assertEqual(order[8], b"+OK")
        self.assertEqual(order[9], b"+OK Message 1 marked for deletion")
        self.assertEqual(order[10], b"+OK 1 messages (%d octets)" % len(b"Subject: 2\r\n\r\ntwo\r\n"))
        self.assertTrue(order[11].startswith(b"+OK Maildrop has 2"))
        self.assertEqual(order[12], b"-ERR Unknown command")
        self.assertIn(b"(0 messages deleted)", order[13])

    async def test_long_line_is_one_error_never_commands(self):
        self.deliver(MSG)
        s = self.raw()
        long = b"NOOP " + b"x" * 300 + b" QUIT\r\nQUIT\r\n"

        def client():
            s.recv(100)
            s.sendall(b"USER alice@example.org\r\nPASS " + PASSWORDS[ALICE].encode() + b"\r\n")
            recv_lines(s, 2)
            s.sendall(b"DELE 1\r\n" + b"A" * 200)
            s.sendall(b"B" * 200 + b"QUIT\r\nSTAT\r\n")
            first = recv_lines(s, 3)
            s.sendall(long)
            return first, recv_until(s, b"NEVER")

        first, rest = await self.run_client(client)
        self.assertEqual(first[0], b"+OK Message 1 marked for deletion")
        self.assertEqual(first[1], b"-ERR Line too long (max 255 octets with CRLF)")
        self.assertEqual(first[2], b"+OK 0 0")  # the QUIT inside the long line was not run
        self.assertTrue(rest.startswith(b"-ERR Line too long"))
        self.assertIn(b"signing off (1 messages deleted)", rest)

    async def test_max_length_line_accepted(self):
        s = self.raw()
        line = b"USER " + b"a" * (255 - 5 - 2) + b"\r\n"  # exactly 255 with CRLF
        self.assertEqual(len(line), 255)

        def client():
            s.recv(100)
            s.sendall(line + b"USER " + b"a" * 249 + b"\r\n")
            return recv_lines(s, 2)

        r = await self.run_client(client)
        self.assertEqual(r, [b"+OK Send your password", b"-ERR Line too long (max 255 octets with CRLF)"])

    async def test_bare_lf_and_bare_cr(self):
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"NOOP\nNO\rOP\r\nNOOP\r\n\r\n\x00\xff\r\n")
            return recv_lines(s, 5)

        r = await self.run_client(client)
        self.assertEqual(r[0], b"-ERR Line must end with CRLF")
        self.assertEqual(r[1], b"-ERR Bare CR in command line")
        self.assertEqual(r[2], b"+OK")
        self.assertEqual(r[3], b"-ERR Unknown command")
        self.assertEqual(r[4], b"-ERR Unknown command")

    async def test_wrong_state_commands(self):
        self.deliver(MSG)
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"STAT\r\nRETR 1\r\nAPOP x y\r\nSTLS\r\nUSER alice@example.org\r\nPASS "
                      + PASSWORDS[ALICE].encode() + b"\r\nUSER x\r\nPASS y\r\nAUTH PLAIN\r\nSTLS\r\n")
            return recv_lines(s, 10)

        r = await self.run_client(client)
        self.assertEqual(r[0], b"-ERR STAT is not valid in the AUTHORIZATION state")
        self.assertEqual(r[1], b"-ERR RETR is not valid in the AUTHORIZATION state")
        self.assertTrue(r[2].startswith(b"-ERR APOP is not supported"))
        self.assertTrue(r[3].startswith(b"-ERR STLS is not available"))
        self.assertTrue(r[5].startswith(b"+OK Logged in"))
        for line in r[6:10]:
            self.assertTrue(line.startswith(b"-ERR") and b"TRANSACTION" in line, line)

    async def test_too_many_bad_commands_close(self):
        s = self.raw()

        def client():
            s.recv(100)
            s.sendall(b"XYZZY\r\n" * 25)
            return recv_until(s, b"NEVER")

        wire = await self.run_client(client)
        lines = wire.split(b"\r\n")
        self.assertEqual(lines[:19], [b"-ERR Unknown command"] * 19)
        self.assertEqual(lines[20], b"-ERR Too many bad commands, closing connection")
        self.assertEqual(lines[21:], [b""])


class SessionAccountingTests(Base):
    async def test_open_sessions_and_logging(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.deliver(MSG)
        self.deliver(MSG)
        a = self.raw()
        b = self.raw()

        def opened():
            a.recv(100)
            b.recv(100)

        await self.run_client(opened)
        self.assertEqual(self.factory.open_sessions, 2)
        self.assertEqual(self.factory.logged_in, 0)
        a.close()
        b.close()
        await apoll(lambda: self.factory.open_sessions == 0)

        def client():
            c = self.login()
            c.retr(1)
            c.retr(2)
            c.dele(1)
            logged = self.factory.logged_in
            c.quit()
            return logged

        self.assertEqual(await self.run_client(client), 1)
        await apoll(lambda: self.factory.open_sessions == 0 and self.factory.logged_in == 0)
        logins = [e for e in events if e.get("log_namespace") == "relay.pop3"
                  and e.get("log_format", "").startswith("pop3: login client")]
        logouts = [e for e in events if e.get("log_namespace") == "relay.pop3"
                   and e.get("log_format", "").startswith("pop3: logout")]
        self.assertEqual(len(logins), 1)
        self.assertEqual(logins[0]["user"], ALICE)
        self.assertEqual(logins[0]["client"], "127.0.0.1")
        self.assertEqual(logins[0]["messages"], 2)
        self.assertEqual(len(logouts), 1)
        self.assertEqual((logouts[0]["retrieved"], logouts[0]["deleted"]), (2, 1))
        self.assertFalse([e for e in events if e.get("log_failure") is not None])


class UnreadRepliesTests(Base):
    """A client that pipelines commands and never reads the replies: the
    server stops handling them (it is its transport's producer), the idle
    timeout still ends the session, and the connection is aborted when the
    client does not read the last reply either (it would otherwise stay
    open for ever, and count against the per-address limit)."""

    # The idle timeout is well above the client's stall detection (2 s of no
    # progress), so that a loaded machine cannot end the session before the
    # client saw it stop reading (the timeout then ends it).
    factory_kwargs: ClassVar[dict] = {"idle_timeout": 10.0, "close_grace": 1.0}

    async def test_flood_of_unread_replies_is_bounded_then_dropped(self):
        from tests.support.flood import pour_unread

        junk = await self.run_client(pour_unread, "127.0.0.1", self.portno, b"CAPA\r\n" * 2_000_000, stall=2)
        self.addCleanup(junk.sock.close)
        self.assertTrue(junk.stalled, f"the server read all {junk.sent} octets while its replies piled up")
        await apoll(lambda: self.factory.open_sessions == 0, 60,
                    what="the server to drop a client that does not read")
