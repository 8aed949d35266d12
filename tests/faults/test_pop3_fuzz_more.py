"""More POP3 fuzzing, for what tests/test_pop3_fuzz.py does not reach:

* command and SASL lines right around their limits (255 and 2048 octets
  with CRLF), cut anywhere, with the output pushing back (a slow reader)
  and pipelined input past the 64 KB read-ahead: one reply per line, in
  order, "Line too long" exactly for the lines over the limit;
* a model of the deletion marks: DELE / RSET / RETR / LIST in any order,
  then QUIT, a dropped connection, or the idle timeout: after QUIT exactly
  the messages marked (and not reset) are gone; otherwise none is.
"""

from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relay.mailbox import maildir, pop3protocol
from tests.support.pop3server import ALICE, PASSWORDS
from tests.test_pop3_fuzz import MESSAGES, check_well_formed, chunked, make_protocol

LOGIN = f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode()


class Base(unittest.TestCase):
    def setUp(self):
        self.errors = []

        def observer(event):
            level = event.get("log_level")
            if event.get("log_failure") is not None or (level is not None and level.name in ("error", "critical")):
                self.errors.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def protocol(self):
        p, t, clock, box = make_protocol(False)
        self.addCleanup(shutil.rmtree, os.path.dirname(os.path.dirname(box)), True)
        return p, t, clock, box


@st.composite
def near_limit_line(draw) -> tuple[bytes, bool]:
    """(line, too long?) around MAX_COMMAND, or a SASL response around MAX_SASL_LINE."""
    verb = draw(st.sampled_from([b"NOOP", b"STAT", b"LIST", b"XTND", b"UIDL"]))
    total = draw(st.integers(pop3protocol.MAX_COMMAND - 4, pop3protocol.MAX_COMMAND + 4))
    pad = max(0, total - len(verb) - 3)
    line = verb + b" " + b"9" * pad + b"\r\n"
    return line, len(line) > pop3protocol.MAX_COMMAND


class LineLimits(Base):
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(near_limit_line(), min_size=1, max_size=15), st.lists(st.integers(0, 5000), max_size=12),
           st.booleans(), st.integers(0, 3))
    def test_lines_around_the_limit(self, lines, cuts, login, drains):
        p, t, clock, box = self.protocol()
        t.pause_at = 200  # the client reads slowly: the server must stop and resume its output
        t.drain()
        head = LOGIN if login else b""
        stream = head + b"".join(ln for ln, _ in lines)
        out = bytearray()
        for i, c in enumerate(chunked(stream, cuts)):
            p.dataReceived(c)
            clock.advance(2.5)
            if i % (drains + 1) == 0:
                out += t.drain()
        for _ in range(200):
            clock.advance(2.5)
            more = t.drain()
            if not more and not t.out_paused:
                break
            out += more
        replies = check_well_formed(bytes(out))
        if login:
            replies = replies[2:]
        self.assertEqual(len(replies), len(lines), (stream[-600:], bytes(out)[-600:]))
        for (_line, too_long), reply in zip(lines, replies):
            self.assertEqual(b"Line too long" in reply, too_long, reply)
        p.connectionLost(None)
        self.assertEqual(self.errors, [])

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(pop3protocol.MAX_SASL_LINE - 3, pop3protocol.MAX_SASL_LINE + 3),
           st.lists(st.integers(0, 3000), max_size=6))
    def test_sasl_line_around_its_limit(self, total, cuts):
        p, t, clock, box = self.protocol()
        t.drain()
        line = b"A" * (total - 2) + b"\r\n"
        stream = b"AUTH PLAIN\r\n" + line + b"NOOP\r\n"
        for c in chunked(stream, cuts):
            p.dataReceived(c)
            clock.advance(2.5)
        clock.advance(5)
        replies = check_well_formed(t.drain())
        self.assertEqual(len(replies), 3, replies)
        self.assertTrue(replies[0].startswith(b"+ "))
        self.assertEqual(b"Line too long" in replies[1], total > pop3protocol.MAX_SASL_LINE, replies[1])
        self.assertTrue(replies[2].startswith(b"+OK"))
        p.connectionLost(None)
        self.assertEqual(self.errors, [])

    def test_pipelined_input_past_the_read_ahead(self):
        p, t, clock, box = self.protocol()
        t.pause_at = 1000
        t.drain()
        n = 12000  # ~120 KB of commands in one go: past MAX_INPUT_BUFFER
        p.dataReceived(LOGIN + b"STAT\r\nNOOP\r\nLIST 1\r\n" * (n // 3) + b"QUIT\r\n")
        out = bytearray()
        for _ in range(100000):
            clock.advance(0.01)
            more = t.drain()
            out += more
            if t.disconnecting and not more:
                break
        replies = check_well_formed(bytes(out))
        self.assertEqual(len(replies), 2 + n + 1)  # USER, PASS, the commands, QUIT
        self.assertTrue(replies[-1].startswith(b"+OK fuzz.example.org POP3 server signing off (0"))
        self.assertEqual(self.errors, [])


_op = st.one_of(
    st.tuples(st.just("DELE"), st.integers(0, len(MESSAGES) + 1)),
    st.tuples(st.just("RETR"), st.integers(0, len(MESSAGES) + 1)),
    st.tuples(st.just("TOP"), st.integers(0, len(MESSAGES) + 1)),
    st.tuples(st.just("UIDL"), st.integers(0, len(MESSAGES) + 1)),
    st.tuples(st.sampled_from(["RSET", "LIST", "STAT", "NOOP"]), st.just(0)),
)


def files(box: str) -> set[str]:
    return {maildir.uidl_for(n.split(":", 1)[0]) for d in ("new", "cur") for n in os.listdir(os.path.join(box, d))}


class Deletions(Base):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_op, max_size=20), st.sampled_from(["QUIT", "drop", "timeout"]),
           st.lists(st.integers(0, 2000), max_size=8))
    def test_marks_model(self, ops, end, cuts):
        p, t, clock, box = self.protocol()
        t.drain()
        p.dataReceived(LOGIN + b"UIDL\r\n")
        clock.advance(2.5)
        first = t.drain()
        lines = first.split(b"\r\n")
        self.assertTrue(all(ln.startswith(b"+OK") for ln in lines[:3]), lines[:3])  # greeting, USER, PASS
        uids = {}
        i = lines.index(b"+OK Unique-ID listing follows") + 1
        while lines[i] != b".":
            num, uid = lines[i].split(b" ")
            uids[int(num)] = uid.decode()
            i += 1
        self.assertEqual(len(uids), len(MESSAGES))
        before = files(box)
        self.assertEqual(before, set(uids.values()))
        stream = b"".join(f"{op} {n}\r\n".encode() if op in ("DELE", "RETR", "TOP", "UIDL")
                          else f"{op}\r\n".encode() for op, n in ops)
        if end == "QUIT":
            stream += b"QUIT\r\n"
        for c in chunked(stream, cuts):
            p.dataReceived(c)
            clock.advance(0.5)
        replies = check_well_formed(t.drain())
        marked: set[int] = set()
        for (op, n), reply in zip(ops, replies):
            ok = reply.startswith(b"+OK")
            exists = 1 <= n <= len(MESSAGES) and n not in marked
            if op == "DELE":
                self.assertEqual(ok, exists, (op, n, reply))
                if ok:
                    marked.add(n)
            elif op in ("RETR", "UIDL"):
                self.assertEqual(ok, exists, (op, n, reply))
            elif op == "TOP":
                self.assertFalse(ok, reply)  # "TOP n" without a line count is a syntax error
            elif op == "RSET":
                self.assertTrue(ok)
                marked.clear()
            else:
                self.assertTrue(ok, (op, reply))
        self.assertEqual(len(replies), len(ops) + (end == "QUIT"))
        if end == "timeout":
            clock.advance(601)
            self.assertTrue(t.disconnecting)
        p.connectionLost(None)
        expect = before - {uids[n] for n in marked} if end == "QUIT" else before
        self.assertEqual(files(box), expect)
        self.assertEqual(self.errors, [])
