"""relay.queue.diskio: the thread-side group commit of directory fsyncs, and
results of the disk pool coming back to the reactor."""

from __future__ import annotations

import shutil
import tempfile
import threading
from unittest import mock

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relay.common import fileio
from relay.queue import diskio


class QueueDirSyncTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-diskio-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_each_caller_waits_for_a_sync_that_started_after_it(self):
        qs = diskio.QueueDirSync(self.dir)
        log: list[tuple] = []
        gate = threading.Event()
        lock = threading.Lock()
        real = fileio.fsync_dir

        def fsync(path):
            with lock:
                log.append(("start", len(log)))
            gate.wait(5)
            real(path)
            with lock:
                log.append(("end", len(log)))

        with mock.patch.object(fileio, "fsync_dir", side_effect=fsync):
            first = threading.Thread(target=qs.sync_after)
            first.start()
            while not log:  # the first fsync is running (and blocked)
                threading.Event().wait(0.001)
            # these arrive while it runs: it may have started before their
            # rename, so they need the next one, and all share it
            others = [threading.Thread(target=qs.sync_after) for _ in range(5)]
            for t in others:
                t.start()
            threading.Event().wait(0.05)
            self.assertEqual(qs.syncs, 1)
            gate.set()
            first.join(5)
            for t in others:
                t.join(5)
        self.assertEqual(qs.syncs, 2)
        self.assertEqual([e[0] for e in log], ["start", "end", "start", "end"])

    def test_one_caller_alone_syncs(self):
        qs = diskio.QueueDirSync(self.dir)
        qs.sync_after()
        qs.sync_after()
        self.assertEqual(qs.syncs, 2)

    def test_a_failed_sync_fails_its_waiters_then_recovers(self):
        qs = diskio.QueueDirSync(self.dir)
        with mock.patch.object(fileio, "fsync_dir", side_effect=OSError(5, "I/O error")):
            with self.assertRaises(OSError):
                qs.sync_after()
        qs.sync_after()  # the next one works again


class DiskPoolTests(unittest.TestCase):
    def setUp(self):
        self.pool = diskio.DiskPool(reactor, maxthreads=4)
        self.addCleanup(self.pool.stop)

    @defer.inlineCallbacks
    def test_results_and_errors_in_order(self):
        ds = [self.pool.run(lambda i=i: i * 2) for i in range(20)]
        bad = self.pool.run(lambda: 1 / 0)
        got = yield defer.gatherResults(ds)
        self.assertEqual(got, [i * 2 for i in range(20)])
        with self.assertRaises(ZeroDivisionError):
            yield bad
