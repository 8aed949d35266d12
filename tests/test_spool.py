"""relay.queue.spool: queue ids, envelope and state files, durable writes, recovery, the lock.

Plain blocking Python, tested on a real directory.  Crash states are built
by hand (the files a crash at each instant would leave) and recover() must
finish or discard each of them, log what it did, and never let one bad entry
block the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from relay.common import fileio
from relay.queue import spool as spoolmod
from relay.queue.spool import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    MAGIC,
    PENDING,
    CorruptEntry,
    Envelope,
    Recipient,
    Spool,
    SpoolLocked,
    State,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Log:
    """Collects the log calls recover() makes (format, fields)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, fmt: str, **kw) -> None:
        self.calls.append((fmt, kw))

    def lines(self) -> list[str]:
        return [fmt.format(**kw) for fmt, kw in self.calls]

    def mentioning(self, text: str) -> list[str]:
        return [ln for ln in self.lines() if text in ln]


class QueueIds(unittest.TestCase):
    def test_format(self):
        qid = spoolmod.new_id()
        self.assertEqual(len(qid), 16)
        self.assertTrue(spoolmod.is_queue_id(qid))
        self.assertAlmostEqual(spoolmod.id_time(qid), time.time(), delta=5)

    def test_is_queue_id(self):
        self.assertFalse(spoolmod.is_queue_id(""))
        self.assertFalse(spoolmod.is_queue_id("0" * 15))
        self.assertFalse(spoolmod.is_queue_id("0" * 17))
        self.assertFalse(spoolmod.is_queue_id("0" * 15 + "I"))  # not in Crockford's alphabet
        self.assertFalse(spoolmod.is_queue_id("0" * 15 + "a"))
        self.assertFalse(spoolmod.is_queue_id("0" * 10 + ".state"))

    def test_unique_and_sorted_in_order_of_creation(self):
        ids = [spoolmod.new_id() for _ in range(5000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(ids, sorted(ids))

    def test_sortable_across_a_clock_step_back(self):
        gen = spoolmod.IdGenerator()
        with mock.patch("time.time_ns", return_value=2_000_000_000 * 10**9):
            a = gen()
        with mock.patch("time.time_ns", return_value=1_000_000_000 * 10**9):
            b = gen()
        self.assertLess(a, b)

    def test_unique_and_sorted_across_threads(self):
        gen = spoolmod.IdGenerator()
        per_thread: list[list[str]] = [[] for _ in range(8)]
        start = threading.Barrier(8)

        def run(out):
            start.wait()
            for _ in range(1000):
                out.append(gen())

        threads = [threading.Thread(target=run, args=(out,)) for out in per_thread]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        everything = [i for out in per_thread for i in out]
        self.assertEqual(len(set(everything)), 8000)
        for out in per_thread:
            self.assertEqual(out, sorted(out))  # each thread sees increasing ids

    def test_time_part_orders_ids_from_different_generators(self):
        a, b = spoolmod.IdGenerator(), spoolmod.IdGenerator()
        with mock.patch("time.time_ns", return_value=1_700_000_000_000_000_000):
            x = a()
        with mock.patch("time.time_ns", return_value=1_700_000_000_000_001_000):
            y = b()
        self.assertLess(x, y)
        self.assertEqual(spoolmod.id_time(x), 1_700_000_000.0)


def envelope(qid: str | None = None, rcpts=("a@local.test", "b@remote.example"), **kw) -> Envelope:
    return Envelope(queue_id=qid or spoolmod.new_id(), sender=kw.pop("sender", "s@remote.example"),
                    recipients=list(rcpts), arrival=kw.pop("arrival", 1_700_000_000.25),
                    orcpts=kw.pop("orcpts", [None] * len(rcpts)), **kw)


class EnvelopeAndState(unittest.TestCase):
    def test_envelope_round_trip(self):
        env = envelope(orcpts=["info@local.test", None], client={"ip": "192.0.2.1", "helo": "h\u00e9lo"},
                       extra={"kind": "bounce"}, sender="")
        line = env.to_line()
        self.assertTrue(line.startswith(MAGIC))
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.isascii())
        self.assertEqual(Envelope.from_line(line), env)

    def test_envelope_without_orcpts(self):
        env = envelope()
        self.assertNotIn(b'"orcpt"', env.to_line())
        self.assertEqual(Envelope.from_line(env.to_line()).orcpts, [None, None])

    def test_newlines_in_fields_stay_on_one_line(self):
        env = envelope(client={"helo": "a\r\nb"}, sender="x\n@y")
        self.assertEqual(env.to_line().count(b"\n"), 1)
        self.assertEqual(Envelope.from_line(env.to_line()), env)

    def test_corrupt_envelopes(self):
        good = {"id": "X", "from": "", "rcpt": ["a@b"], "t": 1}
        bad = [
            b"", b"\n", b"RELAYQ1 {}", b"RELAYQ0 {}\n", b"RELAYQ1 not json\n", b"RELAYQ1 [1]\n",
            MAGIC + b"[" * 100000 + b"\n", MAGIC + b"\xff\xfe\n",
        ]
        for change in ({"rcpt": []}, {"rcpt": "abc"}, {"rcpt": [1]}, {"rcpt": [""]}, {"rcpt": None},
                       {"orcpt": ["x", "y"]}, {"orcpt": [5]}, {"orcpt": "x"}, {"t": "soon"}, {"t": None},
                       {"id": 5}, {"from": None}, {"client": [1, 2]}, {"x": "s"}):
            bad.append(MAGIC + json.dumps({**good, **change}).encode() + b"\n")
        bad.append(MAGIC + b'{"id":"X","from":"","rcpt":["a@b"],"t":NaN}\n')
        for key in good:
            bad.append(MAGIC + json.dumps({k: v for k, v in good.items() if k != key}).encode() + b"\n")
        for line in bad:
            with self.assertRaises(CorruptEntry, msg=line[:80]):
                Envelope.from_line(line)

    def test_state_round_trip(self):
        env = envelope(rcpts=("a@x", "b@y", "c@z"))
        st = State.fresh(env)
        self.assertEqual([r.status for r in st.recipients], [PENDING] * 3)
        st.recipients[0].status = DELIVERED
        st.recipients[1] = Recipient("b@y", None, DEFERRED, 3, "451 4.3.0 try later", 1_700_000_600.5,
                                     [{"t": 1.0, "reply": "451"}])
        st.recipients[2].status = BOUNCED
        st.hold = True
        st.warned = True
        again = State.from_bytes(env, st.to_bytes())
        self.assertEqual(again, st)
        self.assertFalse(again.done)
        again.recipients[1].status = DELIVERED
        self.assertTrue(again.done)
        self.assertTrue(again.recipients[0].final)

    def test_corrupt_states(self):
        env = envelope(rcpts=("a@x",))
        good = {"rcpt": [{"a": "a@x", "s": "pending"}]}
        bad = [b"", b"nope", b"[]", b"{}", b'{"rcpt": 5}', b'{"rcpt": [1]}', b'{"rcpt": []}',
               b'{"rcpt": [{"a": "other@x", "s": "pending"}]}', b'{"rcpt": [{"a": "a@x", "s": "lost"}]}',
               b'{"rcpt": [{"a": "a@x"}]}', b'{"rcpt": [{"a": "a@x", "s": "pending", "n": "x"}]}',
               b'{"rcpt": [{"a": "a@x", "s": "pending", "h": 5}]}', b"[" * 100000, b"\xff"]
        for data in bad:
            with self.assertRaises(CorruptEntry, msg=data[:60]):
                State.from_bytes(env, data)
        State.from_bytes(env, json.dumps(good).encode())


class SpoolCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-spool-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.spool = Spool(os.path.join(self.dir, "spool"))
        self.spool.create()

    def queue(self, body: bytes = b"Subject: t\r\n\r\nbody\r\n", **kw) -> Envelope:
        env = envelope(**kw)
        inc = self.spool.incoming(env)
        inc.write(body)
        self.assertEqual(inc.finish(), env.queue_id)
        return env

    def files(self, sub: str = "queue") -> list[str]:
        return sorted(os.listdir(os.path.join(self.spool.root, sub)))


class Writing(SpoolCase):
    def test_create_layout_0700(self):
        for sub in ("incoming", "queue", "quarantine", "drop"):
            p = os.path.join(self.spool.root, sub)
            self.assertTrue(os.path.isdir(p))
            self.assertEqual(os.stat(p).st_mode & 0o777, 0o700)
        self.spool.create()  # idempotent

    def test_incoming_then_finish(self):
        env = envelope()
        inc = self.spool.incoming(env)
        self.assertEqual(self.files("incoming"), [env.queue_id + ".tmp"])
        self.assertEqual(self.files(), [])
        inc.write(b"Subject: x\r\n\r\n")
        inc.write(b"\x80\xff 8-bit\r\n")
        self.assertEqual(inc.size, len(b"Subject: x\r\n\r\n\x80\xff 8-bit\r\n"))
        inc.finish()
        self.assertEqual(self.files("incoming"), [])
        self.assertEqual(self.files(), [env.queue_id])
        self.assertEqual(os.stat(self.spool.message_path(env.queue_id)).st_mode & 0o777, 0o600)
        entry = self.spool.load(env.queue_id)
        self.assertEqual(entry.envelope, env)
        self.assertEqual(entry.size, inc.size)
        with open(self.spool.message_path(env.queue_id), "rb") as f:
            self.assertEqual(f.readline(), env.to_line())
            self.assertEqual(f.tell(), entry.offset)
            self.assertEqual(f.read(), b"Subject: x\r\n\r\n\x80\xff 8-bit\r\n")
        self.assertEqual(self.spool.queue_ids(), [env.queue_id])

    def test_abort_leaves_nothing(self):
        inc = self.spool.incoming(envelope())
        inc.write(b"partial")
        inc.abort()
        inc.abort()
        self.assertEqual(self.files("incoming") + self.files(), [])

    def test_failed_finish_leaves_nothing(self):
        inc = self.spool.incoming(envelope())
        inc.write(b"data")
        with mock.patch("os.fdatasync", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                inc.finish()
        self.assertEqual(self.files("incoming") + self.files(), [])

    def test_in_memory_until_finish(self):
        env = envelope()
        inc = self.spool.incoming(env, in_memory=True)
        inc.write(b"Subject: x\r\n\r\n")
        inc.write(b"body\r\n")
        self.assertEqual(self.files("incoming") + self.files(), [])  # nothing on disk yet
        self.assertIsNone(inc.data)
        with mock.patch("os.fdatasync", wraps=os.fdatasync) as sync:
            self.assertEqual(inc.finish(), env.queue_id)
        self.assertEqual(sync.call_count, 1)
        self.assertEqual(self.files("incoming"), [])
        self.assertEqual(self.files(), [env.queue_id])
        self.assertEqual(inc.data, b"Subject: x\r\n\r\nbody\r\n")
        entry = self.spool.load(env.queue_id)
        self.assertEqual(entry.envelope, env)
        self.assertEqual(entry.size, inc.size)
        with open(self.spool.message_path(env.queue_id), "rb") as f:
            self.assertEqual(f.readline(), env.to_line())
            self.assertEqual(f.read(), inc.data)

    def test_in_memory_moves_to_a_file_when_big(self):
        env = envelope()
        made = []

        def spill():
            made.append(1)
            return self.spool.prepare_incoming(1)[0]

        inc = self.spool.incoming(env, in_memory=True, spill=spill)
        line = b"y" * 998 + b"\r\n"
        n = spoolmod.MEMORY_LIMIT // len(line) + 2
        for _ in range(n):
            inc.write(line)
        self.assertEqual(made, [1])
        self.assertEqual(len(self.files("incoming")), 1)  # streaming to disk now
        inc.finish()
        self.assertIsNone(inc.data)  # too big to keep
        entry = self.spool.load(env.queue_id)
        self.assertEqual(entry.size, n * len(line))
        with open(self.spool.message_path(env.queue_id), "rb") as f:
            f.readline()
            self.assertEqual(f.read(), line * n)

    def test_in_memory_abort_and_failures_leave_nothing(self):
        inc = self.spool.incoming(envelope(), in_memory=True)
        inc.write(b"partial")
        inc.abort()
        inc.abort()
        with self.assertRaises(OSError):
            inc.finish()
        inc = self.spool.incoming(envelope(), in_memory=True)
        inc.write(b"data")
        with mock.patch("os.fdatasync", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                inc.finish()
        self.assertIsNone(inc.data)
        inc = self.spool.incoming(envelope(), in_memory=True)
        inc.write(b"data")
        with mock.patch("os.rename", side_effect=OSError(5, "I/O error")):
            with self.assertRaises(OSError):
                inc.finish()
        self.assertEqual(self.files("incoming") + self.files(), [])

    def test_in_memory_unwritable_incoming(self):
        os.rmdir(self.spool.incoming_dir)
        inc = self.spool.incoming(envelope(), in_memory=True)
        inc.write(b"data")
        with self.assertRaises(OSError):
            inc.finish()
        inc.abort()
        self.assertEqual(self.files(), [])

    def test_read_headers(self):
        env = self.queue(b"Received: x\r\nSubject: s\r\n\r\nbody\r\nX: not a header\r\n")
        self.assertEqual(self.spool.read_headers(env.queue_id), b"Received: x\r\nSubject: s\r\n")
        env = self.queue(b"A: " + b"x" * 5000 + b"\r\nB: y\r\n\r\nbody")
        self.assertLessEqual(len(self.spool.read_headers(env.queue_id, limit=1000)), 5010)

    def test_state_written_atomically(self):
        env = self.queue()
        qid = env.queue_id
        self.assertEqual(self.spool.read_state(qid, env), State.fresh(env))
        st = State.fresh(env)
        st.recipients[0].status = DELIVERED
        self.spool.write_state(qid, st)
        self.assertEqual(self.spool.read_state(qid, env), st)
        self.assertEqual(self.files(), [qid, qid + ".state"])
        self.assertEqual(os.stat(self.spool.state_path(qid)).st_mode & 0o777, 0o600)
        ino = os.stat(self.spool.state_path(qid)).st_ino
        # a rewrite that fails half-way (disk full) leaves the old state whole, and no temp file
        st2 = State.fresh(env)
        st2.recipients[1].status = BOUNCED
        real_write = os.write

        def half(fd, data):
            real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")

        with mock.patch("os.write", half):
            with self.assertRaises(OSError):
                self.spool.write_state(qid, st2)
        self.assertEqual(self.spool.read_state(qid, env), st)
        self.assertEqual(self.files(), [qid, qid + ".state"])
        with mock.patch("os.rename", side_effect=OSError(5, "I/O error")):
            with self.assertRaises(OSError):
                self.spool.write_state(qid, st2)
        self.assertEqual(self.files(), [qid, qid + ".state"])
        self.spool.write_state(qid, st2)
        self.assertEqual(self.spool.read_state(qid, env), st2)
        self.assertNotEqual(os.stat(self.spool.state_path(qid)).st_ino, ino)  # replaced, not rewritten

    def test_state_write_syncs_file_before_rename_and_directory_after(self):
        env = self.queue()
        calls = []
        real_rename, real_fdatasync, real_fsync_dir = os.rename, os.fdatasync, fileio.fsync_dir
        with mock.patch("os.fdatasync", side_effect=lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))), \
             mock.patch("os.rename", side_effect=lambda a, b: (calls.append("rename"), real_rename(a, b))), \
             mock.patch.object(fileio, "fsync_dir", side_effect=lambda d: (calls.append("fsync_dir"),
                                                                            real_fsync_dir(d))):
            self.spool.write_state(env.queue_id, State.fresh(env))
        self.assertEqual(calls, ["fdatasync", "rename", "fsync_dir"])

    def test_state_of_a_removed_message_is_not_written(self):
        env = self.queue()
        self.spool.remove(env.queue_id)
        with self.assertRaises(FileNotFoundError):
            self.spool.write_state(env.queue_id, State.fresh(env))
        self.assertEqual(self.files(), [])

    def test_remove_message_first(self):
        env = self.queue()
        qid = env.queue_id
        self.spool.write_state(qid, State.fresh(env))
        calls = []
        real_unlink, real_fsync_dir = spoolmod.unlink_quiet, spoolmod.fsync_dir
        with mock.patch.object(spoolmod, "unlink_quiet",
                               side_effect=lambda p: (calls.append(("unlink", os.path.basename(p))), real_unlink(p))), \
             mock.patch.object(spoolmod, "fsync_dir",
                               side_effect=lambda d: (calls.append(("fsync_dir", os.path.basename(d))),
                                                      real_fsync_dir(d))):
            self.spool.remove(qid)
        self.assertEqual(calls, [("unlink", qid), ("fsync_dir", "queue"), ("unlink", qid + ".state")])
        self.assertEqual(self.files(), [])
        self.spool.remove(qid)  # already gone: fine

    def test_crash_between_the_two_unlinks_recovers(self):
        env = self.queue()
        qid = env.queue_id
        st = State.fresh(env)
        for r in st.recipients:
            r.status = DELIVERED
        self.spool.write_state(qid, st)
        os.unlink(self.spool.message_path(qid))  # the crash: message gone, state left
        log = Log()
        self.assertEqual(list(self.spool.recover(log)), [])
        self.assertEqual(self.files(), [])
        self.assertTrue(log.mentioning(qid))


class Recover(SpoolCase):
    def put(self, name: str, data: bytes, sub: str = "queue") -> str:
        path = os.path.join(self.spool.root, sub, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_empty(self):
        self.assertEqual(list(self.spool.recover(Log())), [])

    def test_creates_missing_directories(self):
        sp = Spool(os.path.join(self.dir, "fresh"))
        self.assertEqual(list(sp.recover()), [])
        self.assertTrue(os.path.isdir(sp.quarantine_dir))

    def test_yields_readable_entries_in_order(self):
        envs = [self.queue() for _ in range(3)]
        st = State.fresh(envs[1])
        st.recipients[0].status = DELIVERED
        st.recipients[1].status = DEFERRED
        st.recipients[1].attempts = 2
        self.spool.write_state(envs[1].queue_id, st)
        entries = list(self.spool.recover(Log()))
        self.assertEqual([e.envelope for e in entries], envs)
        self.assertEqual(entries[1].state, st)
        self.assertEqual(entries[0].state, State.fresh(envs[0]))

    def test_removes_stray_temp_files_and_orphan_states(self):
        env = self.queue()
        orphan = spoolmod.new_id()
        self.put(orphan + ".state", b'{"rcpt": []}')
        self.put(env.queue_id + ".state.1a2b3c4d.tmp", b"half a state")
        self.put(orphan + ".state.deadbeef.tmp", b"")
        log = Log()
        entries = list(self.spool.recover(log))
        self.assertEqual([e.envelope.queue_id for e in entries], [env.queue_id])
        self.assertEqual(self.files(), [env.queue_id])
        self.assertEqual(len(log.mentioning("temporary file")), 2)
        self.assertEqual([ln for ln in log.mentioning(orphan) if "state file" in ln],
                         [f"{orphan}: removed state file of a finished message"])
        self.assertEqual(self.files("quarantine"), [])

    def test_removes_entries_whose_recipients_are_all_final(self):
        done = self.queue()
        st = State.fresh(done)
        st.recipients[0].status = DELIVERED
        st.recipients[1].status = BOUNCED
        self.spool.write_state(done.queue_id, st)
        live = self.queue()
        log = Log()
        entries = list(self.spool.recover(log))
        self.assertEqual([e.envelope.queue_id for e in entries], [live.queue_id])
        self.assertEqual(self.files(), [live.queue_id])
        self.assertEqual(len(log.mentioning(done.queue_id)), 1)
        self.assertIn("final", log.mentioning(done.queue_id)[0])

    def test_quarantines_unreadable_entries_and_goes_on(self):
        good1 = self.queue()
        garbage = spoolmod.new_id()
        self.put(garbage, b"this is not an envelope\r\n")
        wrong_id = spoolmod.new_id()
        self.put(wrong_id, envelope().to_line() + b"body")
        empty = spoolmod.new_id()
        self.put(empty, b"")
        nested = spoolmod.new_id()
        self.put(nested, MAGIC + b"[" * 200000 + b"\n")
        bad_state = self.queue()
        self.put(bad_state.queue_id + ".state", b"{broken")
        mismatched = self.queue()
        self.put(mismatched.queue_id + ".state",
                 State.fresh(envelope(rcpts=("someone@else",))).to_bytes())
        a_dir = spoolmod.new_id()
        os.mkdir(os.path.join(self.spool.queue_dir, a_dir))  # unreadable as a file
        stranger = self.put("notes.txt", b"who put this here")
        torn_state = self.queue()
        self.put(torn_state.queue_id + ".state", b"")  # a rename without fsync, then a power failure
        good2 = self.queue()
        log = Log()
        entries = list(self.spool.recover(log))
        kept = sorted([good1.queue_id, good2.queue_id, bad_state.queue_id, mismatched.queue_id,
                       torn_state.queue_id])
        self.assertEqual(sorted(e.envelope.queue_id for e in entries), kept)
        self.assertEqual(self.files(), kept)
        quarantined = self.files("quarantine")
        for name in (garbage, wrong_id, empty, nested, bad_state.queue_id + ".state",
                     mismatched.queue_id + ".state", torn_state.queue_id + ".state", a_dir, "notes.txt"):
            self.assertIn(name, quarantined)
            lines = log.mentioning(name)
            self.assertTrue(lines, name)
            self.assertIn("quarantine", lines[0])
        # a message whose state is unreadable stays queued, every recipient pending again
        unreadable = {bad_state.queue_id, mismatched.queue_id, torn_state.queue_id}
        again = [e for e in entries if e.envelope.queue_id in unreadable]
        self.assertEqual({e.envelope.queue_id for e in again}, unreadable)
        for e in again:
            self.assertTrue(all(r.status == spoolmod.PENDING for r in e.state.recipients))
            self.assertTrue(any("pending again" in line for line in log.mentioning(e.envelope.queue_id)))
        self.assertFalse(os.path.exists(stranger))
        # the quarantined bytes are kept as they were
        with open(os.path.join(self.spool.quarantine_dir, garbage), "rb") as f:
            self.assertEqual(f.read(), b"this is not an envelope\r\n")

    def test_quarantine_name_clash_keeps_both(self):
        qid = spoolmod.new_id()
        self.put(qid, b"old junk", sub="quarantine")
        self.put(qid, b"new junk")
        list(self.spool.recover(Log()))
        names = self.files("quarantine")
        self.assertEqual(len(names), 2)
        self.assertIn(qid, names)

    def test_quarantine_failure_does_not_block_the_rest(self):
        bad = spoolmod.new_id()
        self.put(bad, b"junk")
        good = self.queue()
        log = Log()
        real_rename = os.rename

        def rename(src, dst):
            if os.path.basename(src) == bad:
                raise OSError(13, "Permission denied")
            return real_rename(src, dst)

        with mock.patch("os.rename", rename):
            entries = list(self.spool.recover(log))
        self.assertEqual([e.envelope.queue_id for e in entries], [good.queue_id])
        self.assertTrue(log.mentioning(bad))

    def test_recover_without_log(self):
        self.put(spoolmod.new_id(), b"junk")
        self.put("x.tmp", b"")
        self.assertEqual(list(self.spool.recover()), [])

    def test_clean_incoming(self):
        self.put("A.tmp", b"half", sub="incoming")
        self.put("B.tmp", b"", sub="incoming")
        os.mkdir(os.path.join(self.spool.incoming_dir, "odd-dir"))
        env = self.queue()
        self.put(env.queue_id + ".state.0badc0de.tmp", b"half a state")
        log = Log()
        self.assertEqual(self.spool.clean_incoming(log), 2)
        self.assertEqual(self.files("incoming"), ["odd-dir"])
        self.assertEqual(self.files(), [env.queue_id])
        self.assertEqual(len(log.mentioning("removed half-received")), 2)
        self.assertEqual(len(log.mentioning("temporary file")), 1)
        self.assertEqual(len(log.mentioning("odd-dir")), 1)

    def test_recover_after_clean_incoming_leaves_live_temp_files(self):
        # the relay accepts and delivers while the start-up scan runs: a temp
        # file in queue/ by then is a state rewrite in progress, not debris
        env = self.queue()
        self.spool.clean_incoming(Log())
        live = self.put(env.queue_id + ".state.1234abcd.tmp", b"being written")
        entries = list(self.spool.recover(Log()))
        self.assertEqual([e.envelope.queue_id for e in entries], [env.queue_id])
        self.assertTrue(os.path.exists(live))
        self.assertEqual(self.files("quarantine"), [])


class Lock(SpoolCase):
    def test_second_locker_in_this_process_refused(self):
        fd = self.spool.lock()
        try:
            with self.assertRaises(SpoolLocked) as cm:
                Spool(self.spool.root).lock()
            self.assertIn(self.spool.root, str(cm.exception))
            with open(os.path.join(self.spool.root, "lock")) as f:
                self.assertEqual(f.read(), f"{os.getpid()}\n")
        finally:
            os.close(fd)
        os.close(Spool(self.spool.root).lock())  # free again once closed

    def test_other_process_refused_while_held(self):
        script = ("import sys\nfrom relay.queue.spool import Spool, SpoolLocked\n"
                  "try:\n    Spool(sys.argv[1]).lock()\nexcept SpoolLocked as e:\n    print(e)\n    sys.exit(3)\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        fd = self.spool.lock()
        try:
            r = subprocess.run([sys.executable, "-c", script, self.spool.root], env=env, capture_output=True,
                               text=True, timeout=60)
            self.assertEqual(r.returncode, 3, r.stderr)
            self.assertIn("in use by a running relay", r.stdout)
        finally:
            os.close(fd)
        r = subprocess.run([sys.executable, "-c", script, self.spool.root], env=env, capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_lock_dies_with_the_process(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom relay.queue.spool import Spool\nSpool(sys.argv[1]).lock()\n"
             "print('locked', flush=True)\ntime.sleep(60)\n", self.spool.root],
            env=env, stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(holder.stdout.readline().strip(), "locked")
            with self.assertRaises(SpoolLocked):
                Spool(self.spool.root).lock()
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        os.close(Spool(self.spool.root).lock())


if __name__ == "__main__":
    unittest.main()
