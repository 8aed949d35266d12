"""``workers = "auto"`` (the default): one worker per core, one process when a
listener cannot be shared; and the moves of queued messages between the
single-process queue and the workers' queues (relay.runtime.queuemoves)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import unittest
from unittest import mock

from relay import config as configmod
from relay.queue import spool as spoolmod
from relay.runtime import queuemoves


def load(**data):
    return configmod.load(None, data={"spool": "/tmp/relay-workers-default", **data})


class DefaultIsOnePerCore(unittest.TestCase):
    def cores(self, n: int):
        return mock.patch("os.sched_getaffinity", return_value=set(range(n)))

    def test_no_workers_line_is_one_per_core(self):
        with self.cores(3):
            self.assertEqual(load().workers, 3)
            self.assertEqual(load().workers_note, "")

    def test_auto_written_is_the_same(self):
        with self.cores(5):
            self.assertEqual(load(workers="auto").workers, 5)

    def test_at_most_64(self):
        with self.cores(200):
            self.assertEqual(configmod.default_workers(), 64)
            self.assertEqual(load().workers, 64)

    def test_without_sched_getaffinity_the_cpu_count(self):
        with mock.patch("os.sched_getaffinity", side_effect=OSError("no")), \
                mock.patch("os.cpu_count", return_value=6):
            self.assertEqual(configmod.default_workers(), 6)
        with mock.patch("os.sched_getaffinity", side_effect=OSError("no")), \
                mock.patch("os.cpu_count", return_value=None):
            self.assertEqual(configmod.default_workers(), 1)

    def test_an_explicit_number_wins(self):
        with self.cores(8):
            self.assertEqual(load(workers=1).workers, 1)
            self.assertEqual(load(workers=3).workers, 3)

    def test_bad_values_are_refused_naming_the_key(self):
        for bad in (0, 65, "many", True, 2.5, ""):
            with self.assertRaises(configmod.ConfigError) as cm:
                load(workers=bad)
            self.assertIn("workers", str(cm.exception), bad)
            self.assertIn('"auto" or an integer from 1 to 64', str(cm.exception), bad)

    def test_a_unix_listener_without_workers_is_one_process_and_says_why(self):
        with self.cores(4):
            cfg = load(smtp={"listen": ["tcp:2525", "unix:/tmp/relay.sock"]})
        self.assertEqual(cfg.workers, 1)
        self.assertIn("workers = 1, not one per core (4)", cfg.workers_note)
        self.assertIn("smtp.listen 'unix:/tmp/relay.sock' cannot be shared", cfg.workers_note)

    def test_a_unix_listener_on_one_core_needs_no_note(self):
        with self.cores(1):
            cfg = load(pop3={"listen": ["unix:/tmp/pop.sock"]})
        self.assertEqual((cfg.workers, cfg.workers_note), (1, ""))

    def test_explicit_workers_with_a_unix_listener_is_still_refused(self):
        with self.cores(4):
            with self.assertRaises(configmod.ConfigError) as cm:
                load(workers=2, smtp={"listen": ["unix:/tmp/relay.sock"]})
        self.assertIn("smtp.listen", str(cm.exception))
        self.assertIn("only tcp:, tcp6:, ssl: and systemd: endpoints can be shared", str(cm.exception))

    def tcp_control(self, d: str) -> dict:
        cert, key, secret = (os.path.join(d, n) for n in ("c.pem", "k.pem", "secret"))
        for path in (cert, key, secret):
            with open(path, "w") as f:
                f.write("x" * 20)
        return {"tls": {"certificate": cert, "key": key},
                "control": {"tcp_listen": "127.0.0.1:9026", "secret_file": secret}}

    def test_a_tcp_control_endpoint_without_workers_is_one_process_and_says_why(self):
        with tempfile.TemporaryDirectory() as d, self.cores(4):
            cfg = load(**self.tcp_control(d))
        self.assertEqual(cfg.workers, 1)
        self.assertIn("workers = 1, not one per core (4): control.tcp_listen", cfg.workers_note)

    def test_explicit_workers_with_a_tcp_control_endpoint_is_still_refused(self):
        with tempfile.TemporaryDirectory() as d, self.cores(4):
            with self.assertRaises(configmod.ConfigError) as cm:
                load(workers=2, **self.tcp_control(d))
        self.assertIn("control.tcp_listen", str(cm.exception))
        self.assertIn("not with workers > 1", str(cm.exception))

    def test_a_config_made_in_code_says_how_many(self):
        with self.assertRaises(TypeError):
            configmod.Config(hostname="h.test", spool="/s")  # type: ignore[call-arg]
        self.assertEqual(configmod.Config(hostname="h.test", spool="/s", workers=1).workers, 1)


class QueueMoves(unittest.TestCase):
    def setUp(self):
        self.top = tempfile.mkdtemp(prefix="relay-moves-")
        self.addCleanup(shutil.rmtree, self.top, True)

    def put(self, root: str, n: int = 1) -> list[str]:
        sp = spoolmod.Spool(root)
        sp.create()
        ids = []
        for _ in range(n):
            env = spoolmod.Envelope(spoolmod.new_id(), "a@client.test", ["x@dest.test"], time.time())
            sp.inject(env, b"Subject: x\r\n\r\nbody\r\n")
            ids.append(env.queue_id)
        return ids

    def w(self, i: int) -> str:
        return os.path.join(self.top, f"w{i}")

    def test_one_process_takes_every_workers_queue(self):
        ids = self.put(self.w(0), 2) + self.put(self.w(1), 3)
        with open(spoolmod.Spool(self.w(1)).state_path(ids[2]), "wb") as f:
            f.write(b"the state of a message with a recipient done")
        top = spoolmod.Spool(self.top)
        lines = []
        self.assertEqual(queuemoves.adopt_worker_queues(top, lambda fmt, **kw: lines.append(fmt.format(**kw))), 5)
        self.assertEqual(queuemoves.queued_ids(self.top), sorted(ids))
        self.assertEqual(queuemoves.queued_ids(self.w(0)) + queuemoves.queued_ids(self.w(1)), [])
        for qid in ids:
            self.assertEqual(top.read_envelope(qid)[0].queue_id, qid)
        with open(top.state_path(ids[2]), "rb") as f:  # its state with it: nothing done is done again
            self.assertEqual(f.read(), b"the state of a message with a recipient done")
        self.assertEqual(lines, ["moved 5 queued messages from the workers' queues (<spool>/w<i>/) into the queue"])

    def test_a_locked_worker_queue_is_left_to_its_owner(self):
        self.put(self.w(0), 1)
        held = self.put(self.w(1), 2)
        fd = spoolmod.Spool(self.w(1)).lock()  # a process still runs on it
        self.addCleanup(os.close, fd)
        lines = []
        self.assertEqual(queuemoves.adopt_worker_queues(spoolmod.Spool(self.top),
                                                    lambda fmt, **kw: lines.append(fmt.format(**kw))), 1)
        self.assertEqual(queuemoves.queued_ids(self.w(1)), sorted(held))
        self.assertIn(f"{self.w(1)} is locked by a running process: its queued messages stay there", lines)

    def test_workers_take_the_single_process_queue_and_the_extra_workers(self):
        old = self.put(self.top, 2)
        extra = self.put(self.w(3), 1)
        self.put(self.w(1), 1)
        self.assertEqual(queuemoves.adopt_orphans(self.top, 2), 3)
        self.assertEqual(queuemoves.queued_ids(self.top), [])
        self.assertEqual(queuemoves.queued_ids(self.w(0)), sorted(old))
        self.assertIn(extra[0], queuemoves.queued_ids(self.w(1)))  # w3 -> w(3 mod 2)

    def test_hand_over_only_from_a_worker_that_holds_nothing(self):
        dead = self.put(self.w(1), 3)
        self.put(self.w(0), 1)
        fd = spoolmod.Spool(self.w(1)).lock()  # only slow: its process has its lock
        self.assertEqual(queuemoves.hand_over(self.top, 1, 0), -1)
        os.close(fd)
        fd = spoolmod.Spool(self.w(0)).lock()  # the taker still running
        self.assertEqual(queuemoves.hand_over(self.top, 1, 0), -1)
        os.close(fd)
        self.assertEqual(queuemoves.queued_ids(self.w(1)), sorted(dead))
        self.assertEqual(queuemoves.hand_over(self.top, 1, 0), 3)
        self.assertEqual(queuemoves.queued_ids(self.w(1)), [])
        self.assertEqual(len(queuemoves.queued_ids(self.w(0))), 4)
        self.assertEqual(queuemoves.hand_over(self.top, 1, 0), 0)  # nothing left: nothing moved
