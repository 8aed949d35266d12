"""POP3 protocol units driven by task.Clock and a StringTransport: time
(idle timeout, login failure delay), flow control of streamed messages,
input back-pressure, and the helpers the service uses."""

from __future__ import annotations

import io
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from relay.config import Config, LocalConfig, POP3Config, TLSConfig
from relay.mailbox import maildir, pop3, pop3message
from relay.mailbox.users import UserDB
from tests.support.pop3server import ALICE, PASSWORDS, FakeTransport, write_users


def sync(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class Harness(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="pop3-unit-")
        self.root = os.path.join(self.tmp, "mail")
        users = os.path.join(self.tmp, "users")
        write_users(users, PASSWORDS)
        self.clock = task.Clock()
        self.factory = pop3.POP3Factory(
            hostname="pop.example.org", mailbox_root=self.root, local_domains=["example.org"],
            userdb=UserDB(users), reactor=self.clock,
        )
        self.factory.run_blocking = sync

    def connect(self, **kw) -> tuple[pop3.POP3Server, FakeTransport]:
        p = self.factory.buildProtocol(None)
        t = FakeTransport(**kw)
        p.makeConnection(t)
        self.addCleanup(self._lose, p)
        return p, t

    def _lose(self, p):
        if not p._lost:
            p.connectionLost(None)

    def login(self, p, t):
        p.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
        self.assertIn(b"+OK Logged in", t.value())
        t.clear()

    def deliver(self, data: bytes) -> str:
        src = os.path.join(self.tmp, "src")
        with open(src, "wb") as f:
            f.write(data)
        return maildir.deliver(self.root, "example.org", "alice", src, 0, b"")


class TimeTests(Harness):
    def test_defaults(self):
        f = pop3.POP3Factory(hostname="h", mailbox_root="m", local_domains=["x"], userdb=None)
        self.assertEqual(f.login_failure_delay, 2.0)
        self.assertEqual(f.idle_timeout, 600.0)
        self.assertGreaterEqual(f.idle_timeout, 600)  # RFC 1939: at least 10 minutes

    def test_idle_timeout_closes_without_deleting(self):
        path = self.deliver(b"Subject: x\r\n\r\nx\r\n")
        p, t = self.connect()
        self.clock.advance(500)
        self.login(p, t)  # a command resets the timer
        p.dataReceived(b"DELE 1\r\n")
        self.clock.advance(599)
        self.assertFalse(t.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(t.value().endswith(b"-ERR Disconnected for inactivity\r\n"))
        self.assertTrue(t.disconnecting)
        p.connectionLost(None)
        self.assertTrue(os.path.exists(path))
        self.assertEqual(self.factory.logged_in, 0)
        self.assertEqual(self.factory.open_sessions, 0)

    def test_partial_line_does_not_reset_the_timer(self):
        p, t = self.connect()
        for _ in range(10):
            self.clock.advance(60)
            p.dataReceived(b"N")  # a drip of bytes, never a whole command
        self.assertTrue(t.disconnecting)

    def test_idle_timeout_can_be_changed_at_runtime(self):
        p, t = self.connect()
        self.factory.idle_timeout = 30
        p.dataReceived(b"NOOP\r\n")
        self.clock.advance(31)
        self.assertTrue(t.disconnecting)

    def test_login_failure_delay(self):
        p, t = self.connect()
        t.clear()
        p.dataReceived(b"USER alice@example.org\r\nPASS wrong\r\nNOOP\r\n")
        self.assertEqual(t.value(), b"+OK Send your password\r\n")
        self.clock.advance(1.9)
        self.assertEqual(t.value(), b"+OK Send your password\r\n")  # NOOP waits its turn
        self.clock.advance(0.2)
        self.assertEqual(t.value(), b"+OK Send your password\r\n-ERR [AUTH] Authentication failed\r\n+OK\r\n")

    def test_unknown_user_same_delay(self):
        p, t = self.connect()
        t.clear()
        p.dataReceived(b"USER ../x@example.org\r\nPASS wrong\r\n")
        self.clock.advance(1.9)
        self.assertEqual(t.value(), b"+OK Send your password\r\n")
        self.clock.advance(0.2)
        self.assertTrue(t.value().endswith(b"-ERR [AUTH] Authentication failed\r\n"))

    def test_lost_during_failure_delay(self):
        p, _t = self.connect()
        p.dataReceived(b"USER alice@example.org\r\nPASS wrong\r\n")
        p.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_successful_login_is_not_delayed(self):
        p, t = self.connect()
        self.login(p, t)


class FlowControlTests(Harness):
    def test_large_message_is_read_only_as_fast_as_it_is_sent(self):
        line = b"x" * 98 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * 40_000  # 4 MB
        self.deliver(body)
        reads = []
        real = self.factory.run_blocking

        def counting(f, *a, **kw):
            if getattr(f, "__name__", "") == "read":
                reads.append(a)
            return real(f, *a, **kw)

        self.factory.run_blocking = counting
        p, t = self.connect(pause_at=64 * 1024)
        self.login(p, t)
        p.dataReceived(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(len(reads), 1)  # one chunk, then the transport said stop
        out = [t.drain()]
        rounds = 0
        while not out[-1].endswith(b"\r\n.\r\n+OK\r\n"):
            out.append(t.drain())
            rounds += 1
            self.assertLess(rounds, 1000)
        self.assertLessEqual(t.max_buffered, 64 * 1024 + 2 * maildir.CHUNK)
        wire = b"".join(out)
        self.assertEqual(wire, b"+OK %d octets\r\n" % len(body) + body + b".\r\n+OK\r\n")
        self.assertGreater(len(reads), 10)

    def test_pipelined_input_flood_pauses_reading(self):
        p, t = self.connect()
        p.dataReceived(b"USER alice@example.org\r\nPASS wrong\r\n")  # busy for 2 s
        p.dataReceived(b"NOOP\r\n" * 20000)
        self.assertEqual(t.producerState, "paused")
        self.clock.advance(2.1)
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(t.value().count(b"+OK\r\n"), 20000)

    def test_internal_error_is_answered_and_logged(self):
        p, t = self.connect()
        t.clear()

        def boom(self, arg):
            raise RuntimeError("bug")

        self.patch(pop3.POP3Server, "_AUTH_COMMANDS", {**pop3.POP3Server._AUTH_COMMANDS, b"NOOP": boom})
        p.dataReceived(b"NOOP\r\nCAPA\r\n")
        self.assertTrue(t.value().startswith(b"-ERR [SYS/TEMP] Internal server error\r\n+OK Capability"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_quit_waits_for_deletion_and_releases_lock(self):
        paths = [self.deliver(b"a\r\n"), self.deliver(b"b\r\n")]
        p, t = self.connect()
        self.login(p, t)
        p.dataReceived(b"RETR 1\r\nDELE 2\r\nQUIT\r\nNOOP\r\n")
        self.assertIn(b"signing off (1 messages deleted)", t.value())
        self.assertNotIn(b"+OK\r\n", t.value().split(b"signing off")[1])  # nothing after QUIT
        self.assertFalse(os.path.exists(paths[1]))
        self.assertEqual(len(os.listdir(os.path.join(self.root, "example.org", "alice", "cur"))), 1)
        lock = maildir.MailboxLock(os.path.join(self.root, "example.org", "alice"))
        lock.acquire()
        lock.release()


class STLSUnitTests(Harness):
    def test_stls_discards_pipelined_input(self):
        self.factory.tls_options = object()
        p, t = self.connect()
        t.clear()
        p.dataReceived(b"STLS\r\nUSER alice@example.org\r\nPASS x")
        self.assertIsNotNone(t.tls)
        self.assertEqual(t.value(), b"+OK Begin TLS negotiation\r\n")
        t.clear()
        p.dataReceived(b"\r\nPASS alice-secret\r\n")
        # the USER before the handshake was never run
        self.assertTrue(t.value().startswith(b"-ERR"))
        self.assertIn(b"-ERR Send USER first\r\n", t.value())


class ConfigHelperTests(unittest.TestCase):
    def test_plaintext_warnings(self):
        listen = ["tcp:1100:interface=127.0.0.1", "tcp:110", "tcp:110:interface=192.0.2.1",
                  "tcp6:110:interface=\\:\\:1", "ssl:995", "unix:/run/pop3.sock",
                  "systemd:domain=INET:index=0"]
        w = pop3.plaintext_login_warnings(listen, tls_configured=False)
        self.assertEqual(len(w), 3)
        self.assertIn("tcp:110 is not bound to a loopback address", w[0])
        self.assertIn("192.0.2.1", w[1])
        self.assertIn("systemd", w[2])
        self.assertTrue(all("no TLS certificate" in x for x in w))
        self.assertEqual(pop3.plaintext_login_warnings(listen, tls_configured=True), [])
        w2 = pop3.plaintext_login_warnings(listen, tls_configured=True, auth_requires_tls=False)
        self.assertEqual(len(w2), 3)
        self.assertIn("auth_requires_tls is false", w2[0])

    def test_factory_from_config_and_reload(self):
        cfg = Config(hostname="mx.example.org", spool="/s", workers=1,
                     local=LocalConfig(domains=("example.org",), mailboxes="/m"),
                     pop3=POP3Config(listen=("tcp:110",)))
        f = pop3.factory_from_config(cfg, userdb=None, tls_options=None, idle_timeout=900)
        self.assertEqual((f.hostname, f.mailbox_root, f.local_domains, f.idle_timeout),
                         ("mx.example.org", "/m", ("example.org",), 900))
        self.assertEqual(len(pop3.startup_warnings(cfg)), 1)
        cfg2 = Config(hostname="new.example.org", spool="/s", workers=1,
                      local=LocalConfig(domains=("a.example",), mailboxes="/m2"),
                      tls=TLSConfig(certificate="c", key="k", auth_requires_tls=False))
        marker = object()
        pop3.apply_config(f, cfg2, userdb=None, tls_options=marker)
        self.assertEqual((f.hostname, f.mailbox_root, f.local_domains, f.tls_options, f.auth_requires_tls),
                         ("new.example.org", "/m2", ("a.example",), marker, False))


class RenderTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"x y", b""]), max_size=40),
           st.integers(min_value=1, max_value=9), st.one_of(st.none(), st.integers(0, 5)))
    def test_streaming_equals_whole(self, parts, chunk, top):
        """Chunked conversion (large messages) == whole conversion (small ones),
        and un-stuffing the wire gives back exactly size octets."""
        stored = b"".join(parts)
        whole = pop3message.render(stored, top)
        conv, stuffer = maildir.ToCRLF(), pop3message.DotStuffer()
        topf = pop3message.TopFilter(top) if top is not None else None
        out = []
        for i in range(0, len(stored), chunk):
            text = conv.feed(stored[i:i + chunk])
            if topf:
                text = topf.feed(text)
            out.append(stuffer.feed(text))
        text = conv.flush()
        if topf:
            text = topf.feed(text)
        out.append(stuffer.feed(text))
        out.append(stuffer.end())
        self.assertEqual(b"".join(out), whole)
        if top is None:
            unstuffed = whole[:-3].replace(b"\r\n..", b"\r\n.")
            if unstuffed.startswith(b".."):
                unstuffed = unstuffed[1:]
            c = maildir.ToCRLF()
            size = len(c.feed(stored) + c.flush())
            self.assertIn(len(unstuffed), (size, size + 2))


class StreamerTests(unittest.TestCase):
    """pop3message.Streamer works through the callables it is given (no protocol)."""

    def make(self, data: bytes, run_blocking=sync):
        self.writes: list[bytes] = []
        self.aborts: list[bool] = []
        return pop3message.Streamer(io.BytesIO(data), None, run_blocking=run_blocking, write=self.writes.append,
                                    touch=lambda: None, abort=lambda: self.aborts.append(True))

    def test_reads_only_while_resumed_and_ends_like_render(self):
        data = b"Subject: x\n\n" + b".dot\n" * (maildir.CHUNK // 5 + 10)
        s = self.make(data)
        s.pause()
        d = s.start()
        self.assertEqual(self.writes, [])
        s.resume()
        self.successResultOf(d)
        self.assertGreater(len(self.writes), 1)
        self.assertEqual(b"".join(self.writes), pop3message.render(data, None))
        self.assertEqual(self.aborts, [])

    def test_a_failed_read_aborts_without_the_final_dot(self):
        def failing(f, *a, **kw):
            if getattr(f, "__name__", "") == "read":
                return defer.fail(OSError("EIO"))
            return sync(f, *a, **kw)

        s = self.make(b"x\n", run_blocking=failing)
        self.successResultOf(s.start())
        self.assertEqual((self.writes, self.aborts), ([], [True]))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_a_failed_read_is_logged_with_the_file_it_read(self):
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def failing(f, *a, **kw):
            if getattr(f, "__name__", "") == "read":
                return defer.fail(OSError("EIO"))
            return sync(f, *a, **kw)

        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(b"x\n")
            tmp.flush()
            f = open(tmp.name, "rb")
            s = pop3message.Streamer(f, None, run_blocking=failing, write=lambda b: None,
                                     touch=lambda: None, abort=lambda: None)
            self.successResultOf(s.start())
        self.flushLoggedErrors(OSError)
        paths = [e.get("path") for e in events if "reading {path} failed" in e.get("log_format", "")]
        self.assertEqual(paths, [tmp.name])
