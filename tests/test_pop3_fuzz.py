"""Fuzzing the POP3 command parser with hypothesis (issue 8).

Random bytes and random command lines, split into random TCP-like chunks,
are fed to the protocol over a StringTransport with a Clock.  Whatever
arrives: nothing raises or logs an error, every reply is well formed (CRLF
lines starting +OK / -ERR / "+ ", multi-line replies closed by "."), each
complete line gets exactly one reply, and nothing is deleted without QUIT.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relay.mailbox import pop3
from relay.mailbox.users import UserDB
from tests.support.pop3server import ALICE, PASSWORDS, FakeTransport, write_users

VERBS = ["USER", "PASS", "AUTH", "CAPA", "STAT", "LIST", "UIDL", "TOP", "RETR", "DELE",
         "RSET", "NOOP", "QUIT", "STLS", "APOP", "XYZ", ""]
MESSAGES = [
    b"Subject: one\n\n.dot\n..two\nbody\n",
    b".starts\nwith a dot\n",
    b"no final newline",
    b"",
]

_users_dir = tempfile.mkdtemp(prefix="pop3-fuzz-users-")
_users = os.path.join(_users_dir, "users")
write_users(_users, PASSWORDS)


def sync(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


def make_protocol(tls: bool):
    root = tempfile.mkdtemp(prefix="pop3-fuzz-")
    box = os.path.join(root, "example.org", "alice")
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(box, sub))
    for i, data in enumerate(MESSAGES):
        with open(os.path.join(box, "new", f"{1000 + i}.M{i}P1Q{i}.fuzz"), "wb") as f:
            f.write(data)
    clock = task.Clock()
    factory = pop3.POP3Factory(hostname="fuzz.example.org", mailbox_root=root,
                               local_domains=["example.org"], userdb=UserDB(_users),
                               reactor=clock, tls_options=object() if tls else None,
                               auth_requires_tls=False, login_failure_delay=2.0)
    factory.run_blocking = sync
    p = factory.buildProtocol(None)
    t = FakeTransport()
    p.makeConnection(t)
    return p, t, clock, box


def files(box: str) -> int:
    return len(os.listdir(os.path.join(box, "new"))) + len(os.listdir(os.path.join(box, "cur")))


_ARG = st.one_of(
    st.just(""),
    st.integers(-3, 8).map(str),
    st.from_regex(r"[0-9]{1,3} [0-9]{1,3}", fullmatch=True),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    st.sampled_from([ALICE, PASSWORDS[ALICE], "PLAIN", "PLAIN =", "PLAIN AGFsaWNlQGV4YW1wbGUub3Jn", "*"]),
)


@st.composite
def command_lines(draw):
    verb = draw(st.sampled_from(VERBS))
    if draw(st.booleans()):
        verb = verb.lower()
    arg = draw(_ARG)
    line = (verb + (" " + arg if arg else "")).encode()
    return line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n"]))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


_REPLY = re.compile(rb"(\+OK|-ERR)( [\x20-\x7e]*)?\Z|\+ \Z")
_MULTI_HEADS = (b"+OK Capability list follows", b"+OK Supported mechanisms follow",
                b"+OK Unique-ID listing follows", b"+OK Top of message follows")


def check_well_formed(out: bytes) -> list[bytes]:
    """Split the output into replies; fail on anything malformed."""
    assert out.endswith(b"\r\n") or not out, out[-50:]
    lines = out.split(b"\r\n")[:-1]
    replies = []
    i = 0
    while i < len(lines):
        line = lines[i]
        assert _REPLY.match(line), line
        replies.append(line)
        multi = line.startswith(_MULTI_HEADS) or re.match(rb"\+OK \d+ (messages \(\d+ octets\)|octets)\Z", line)
        i += 1
        if multi:
            while lines[i] != b".":
                assert not lines[i].startswith(b".") or lines[i].startswith(b".."), lines[i]
                i += 1
            i += 1
    return replies


class FuzzTests(unittest.TestCase):
    def setUp(self):
        self.errors = []

        def observer(event):
            level = event.get("log_level")
            if event.get("log_failure") is not None or (level is not None and level.name in ("error", "critical")):
                self.errors.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def feed(self, p, t, clock, chunks):
        for c in chunks:
            if p._lost:
                break
            p.dataReceived(c)
            clock.advance(2.5)  # let failed-login delays answer
        clock.advance(5)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=600), st.lists(st.integers(0, 1000), max_size=8), st.booleans())
    def test_random_bytes(self, data, cuts, tls):
        p, t, clock, box = make_protocol(tls)
        self.addCleanup(shutil.rmtree, os.path.dirname(os.path.dirname(box)), True)
        self.feed(p, t, clock, chunked(data, cuts))
        check_well_formed(t.value())
        p.connectionLost(None)
        self.assertEqual(files(box), len(MESSAGES))
        self.assertEqual(self.errors, [])

    def test_random_commands_after_login(self):
        """Random commands, after a login or not; after a login a real share of
        the sessions must have commands answered +OK (a server that refuses
        everything must not pass)."""
        self.sessions: list[int] = []
        self._random_commands_after_login()
        self.assertGreater(len(self.sessions), 50)
        answered = sum(1 for n in self.sessions if n)
        # (about 1 in 5: many lists are short, most arguments random; none is the failure)
        self.assertGreaterEqual(answered / len(self.sessions), 0.05, f"{answered} of {len(self.sessions)}")

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(command_lines(), max_size=25), st.lists(st.integers(0, 2000), max_size=10),
           st.booleans())
    def _random_commands_after_login(self, lines, cuts, login):
        p, t, clock, box = make_protocol(False)
        self.addCleanup(shutil.rmtree, os.path.dirname(os.path.dirname(box)), True)
        head = f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode() if login else b""
        stream = head + b"".join(lines)
        self.feed(p, t, clock, chunked(stream, cuts))
        replies = check_well_formed(t.value())
        greeting, replies = replies[0], replies[1:]
        self.assertTrue(greeting.startswith(b"+OK fuzz.example.org"))
        if login:
            # the login must work, or every command after it is only refused
            self.assertTrue(replies[0].startswith(b"+OK") and replies[1].startswith(b"+OK"), replies[:2])
            self.sessions.append(sum(r.startswith(b"+OK") for r in replies[2:]))
        complete = stream.count(b"\n")
        quit_seen = any(r.startswith((b"+OK fuzz.example.org POP3 server signing off", b"+OK Bye"))
                        or b"closing connection" in r for r in replies)
        if not quit_seen:
            # one reply per line (an AUTH continuation line is answered once too)
            self.assertEqual(len(replies), complete, (stream, t.value()))
        else:
            # closed for too many errors: the last error's reply, then the closing line
            extra = 1 if any(r.startswith(b"-ERR Too many bad commands") for r in replies) else 0
            self.assertLessEqual(len(replies), complete + extra)
        deleted = len(MESSAGES) - files(box)
        if deleted:
            self.assertTrue(any(b"signing off" in r for r in replies))
        p.connectionLost(None)
        self.assertEqual(self.errors, [])
