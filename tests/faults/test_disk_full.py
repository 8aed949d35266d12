"""Disk full (a real, small tmpfs under the spool) and a file size limit.

New mail gets ``452 4.3.1`` (at DATA or after the final dot), the session
goes on, nothing already queued is damaged (message files byte for byte,
state files readable), no torn file is left, and once space returns the
relay accepts mail again without a restart and delivers everything.
"""

from __future__ import annotations

import os
import resource
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.procs import LimitedRelayProcess
from tests.support.relay import InProcessRelay, base_config, deep_merge, free_port, in_thread
from tests.support.sink import Sink
from tests.support.smallfs import SmallFS
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll


def body(n: int, size: int) -> bytes:
    head = f"Message-ID: <disk-{n}@client.test>\r\nSubject: disk {n}\r\n\r\n".encode()
    line = f"{n:06d} some text to fill the message up .........................................\r\n".encode()
    return head + line * max(1, size // len(line))


def transaction(c: RawSMTP, msg: bytes, rcpt: str = "dest@remote.test"):
    """MAIL, RCPT, DATA and the message: (reply to DATA, final reply or None)."""
    assert c.cmd("MAIL FROM:<sender@client.test>").code == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
    r = c.cmd("DATA")
    if r.code != 354:
        return r, None
    c.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    return r, c.reply()


class DiskFullCase(unittest.TestCase):
    fs_options: dict = {"size": "2m"}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-disk-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.fs = SmallFS(os.path.join(self.tmp, "spoolfs"), **self.fs_options).mount()
        self.addCleanup(self.fs.umount)
        self.sink = Sink("127.0.0.2", replies={"MAIL": "451 4.3.0 not yet"}).start()
        self.addCleanup(self.sink.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.relay = InProcessRelay(self.tmp, {
            "spool": os.path.join(self.fs.path, "spool"),
            "relay": {"smarthost": f"127.0.0.2:{self.sink.port}", "smarthost_tls": "none"},
            "delivery": {"retry_min": "1h", "retry_max": "1h"},
        })
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.spool = self.relay.service.spool
        self.queue = self.relay.service.queue

    def session(self, fn):
        def run():
            with RawSMTP(*self.relay.smtp) as c:
                assert c.reply().code == 220
                assert c.cmd("EHLO client.test").code == 250
                return fn(c)

        return in_thread(run)

    def send(self, msgs: list[bytes]):
        """Send each message in one session; the final replies."""
        return self.session(lambda c: [transaction(c, m)[1] for m in msgs])

    async def settle(self):
        await apoll(lambda: not self.queue.busy(), 20, what="the queue to finish its attempts")

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for qid in self.spool.queue_ids():
            with open(self.spool.message_path(qid), "rb") as f:
                out[qid] = f.read()
        return out

    def assertIntact(self, before: dict[str, bytes]):
        after = self.snapshot()
        self.assertTrue(before, "nothing was queued before the disk filled: nothing to check")
        for qid, data in before.items():
            self.assertEqual(after.get(qid), data, f"{qid} changed or vanished")
            entry = self.spool.load(qid)  # envelope and state file readable
            self.assertFalse(entry.state.done)
        self.assertEqual(self.spool.incoming_leftovers(), [])
        self.assertEqual(os.listdir(self.spool.quarantine_dir), [])
        self.assertEqual([n for n in os.listdir(self.spool.queue_dir) if n.endswith(".tmp")], [])

    async def retry_all(self):
        await self.settle()
        attempts = self.queue.counters.attempts
        ids = list(self.queue.messages)
        for qid in ids:
            self.queue.retry(qid)
        await apoll(lambda: self.queue.counters.attempts >= attempts + len(ids) and not self.queue.busy(), 20,
                    what="the retries")


class DiskFull(DiskFullCase):
    async def test_full_disk_452_nothing_damaged_recovers_without_restart(self):
        sent = [body(i, size) for i, size in enumerate((2_000, 30_000, 100_000, 300_000))]
        replies = await self.send(sent)
        self.assertEqual([r.code for r in replies], [250] * 4)
        await apoll(lambda: len([n for n in os.listdir(self.spool.queue_dir) if n.endswith(".state")]) == 4,
                    20, what="first attempts recorded")
        await self.settle()
        before = self.snapshot()
        self.assertEqual(len(before), 4)

        self.fs.fill()
        self.assertLess(self.fs.available(), 4096)

        def full(c):
            out = [transaction(c, body(10, 1_000)), transaction(c, body(11, 400_000))]
            out.append(c.cmd("NOOP"))
            return out

        (d1, f1), (d2, f2), noop = await self.session(full)
        for data_reply, final in ((d1, f1), (d2, f2)):
            # 452 4.3.1 either to DATA or after the final dot; never a 250
            r = final if data_reply.code == 354 else data_reply
            self.assertEqual(r.code, 452, r)
            self.assertTrue(r.lines[0].startswith("4.3.1"), r)
        self.assertEqual(noop.code, 250)  # the session goes on

        # attempts while the disk is full: the state rewrite fails, the old one stays
        await self.retry_all()
        self.assertIntact(before)
        self.flushLoggedErrors(OSError)

        # space returns: accepted again, no restart
        self.fs.free()
        again = await self.send([body(20, 5_000)])
        self.assertEqual(again[0].code, 250, again)
        self.assertIntact(before)

        # and everything queued is delivered, byte for byte
        self.sink.b.replies = {}
        await self.retry_all()
        await apoll(lambda: not self.spool.queue_ids(), 20, what="the queue to empty")
        got = {t.data.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0]: t.data for t in self.sink.transactions}
        for i, m in list(enumerate(sent)) + [(20, body(20, 5_000))]:
            key = f"<disk-{i}@client.test>".encode()
            self.assertIn(key, got)
            self.assertTrue(got[key].endswith(m), key)
        self.assertEqual(len(self.sink.transactions), 5)

    async def test_disk_full_while_a_bounce_must_be_queued(self):
        """A recipient refused for good while the disk is full: its DSN
        cannot be queued then, but must be once space returns (no restart),
        and the message must then leave the queue."""
        self.queue.finalize_retry = 0.3  # 10 s in production
        replies = await self.send([body(1, 2_000)])
        self.assertEqual(replies[0].code, 250)
        qid = self.spool.queue_ids()[0]
        await self.settle()  # first attempt: 451, deferred
        self.fs.fill()
        self.sink.b.replies = {"RCPT": "550 5.1.1 no such user"}
        await self.retry_all()  # 550: bounced, but the DSN cannot be written
        self.assertEqual(self.queue.counters.bounced, 1)
        self.flushLoggedErrors(OSError)
        self.fs.free()
        await apoll(lambda: qid not in self.spool.queue_ids() and self.queue.counters.dsn_sent == 1, 60,
                    what=f"the DSN for {qid} to be queued after space returned, and {qid} removed")

class InodesExhausted(DiskFullCase):
    fs_options = {"size": "8m", "inodes": 400}

    async def test_no_inode_left_452_then_recovers(self):
        first = await self.send([body(0, 3_000)])
        self.assertEqual(first[0].code, 250)
        await self.settle()
        before = self.snapshot()
        self.fs.exhaust_inodes()

        def many(c):
            # files made ahead of time (diskio.IncomingStock) still take a
            # few; once they are used up, a new file cannot be created
            out = []
            for i in range(60):
                d, f = transaction(c, body(100 + i, 1_000))
                out.append((d, f))
                if (f or d).code != 250:
                    out.append(c.cmd("NOOP"))
                    break
            return out

        out = await self.session(many)
        d, f = out[-2]
        r = f if d.code == 354 else d
        self.assertEqual(r.code, 452, out[-3:])
        self.assertTrue(r.lines[0].startswith("4.3.1"), r)
        self.assertEqual(out[-1].code, 250)
        accepted = sum(1 for d, f in out[:-2] if f is not None and f.code == 250)
        self.assertEqual(len(self.spool.queue_ids()), 1 + accepted)
        self.assertIntact(before)
        self.flushLoggedErrors(OSError)
        self.fs.free_inodes()
        again = await self.send([body(300, 2_000)])
        self.assertEqual(again[0].code, 250)


class FileSizeLimit(unittest.TestCase):
    """RLIMIT_FSIZE on a relay process (no root needed): a message whose
    spool file would pass the limit gets 452 4.3.1; the relay stays up and
    smaller mail is still accepted."""

    def test_rlimit_fsize(self):
        tmp = tempfile.mkdtemp(prefix="relay-fsize-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_port()
        data = deep_merge(base_config(tmp), {
            "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
            "relay": {"smarthost": f"127.0.0.1:{free_port()}"},
            "delivery": {"retry_min": "1h", "retry_max": "1h"},
        })
        limit = 256 * 1024
        relay = LimitedRelayProcess(tmp, data, limits={resource.RLIMIT_FSIZE: limit})
        self.addCleanup(relay.stop)
        relay.start(wait_for=("127.0.0.1", port))
        small = body(1, 10_000)
        big = body(2, 400_000)
        with RawSMTP("127.0.0.1", port) as c:
            c.reply()
            c.cmd("EHLO client.test")
            _, f1 = transaction(c, small)
            d2, f2 = transaction(c, big)
            _, f3 = transaction(c, small)
        self.assertEqual(f1.code, 250)
        r = f2 if d2.code == 354 else d2
        self.assertEqual((r.code, r.lines[0][:5]), (452, "4.3.1"))
        self.assertEqual(f3.code, 250)
        self.assertIsNone(relay.proc.poll())
        sp = spoolmod.Spool(data["spool"])
        self.assertEqual(len(sp.queue_ids()), 2)
        self.assertEqual(sp.incoming_leftovers(), [])
        self.assertIn("File too large", relay.log())
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@client.test", ["b@remote.test"], small)
