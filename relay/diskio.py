"""Disk work off the reactor: a thread pool and grouped directory fsyncs.

fsync takes milliseconds; the reactor must never wait for it.  Every
blocking spool operation runs in a dedicated pool (many concurrent fsyncs
on one disk are cheaper together than one after another), and directory
fsyncs are grouped: callers that need "the queue directory is durable"
wait for one fsync that *started after* their rename, so ten messages that
finish together share one directory fsync (group commit).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay import spool as spoolmod


class DiskPool:
    """A named thread pool for blocking disk operations, tied to a reactor."""

    def __init__(self, reactor, minthreads: int = 2, maxthreads: int = 16, name: str = "relay-disk",
                 inline: bool = False):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads, maxthreads, name=name)
        # inline: run on the calling thread (unit tests driving time with task.Clock)
        self.inline = inline
        self.stopped = False

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        self.stopped = True
        if self.pool.started:
            self.pool.stop()

    def run(self, fn: Callable[..., Any], *args, **kw) -> defer.Deferred:
        if self.inline:
            return defer.maybeDeferred(fn, *args, **kw)
        if self.stopped:
            return defer.fail(RuntimeError("the relay is stopping: no more disk work"))
        if not self.pool.started:
            self.start()
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kw)


class DirSyncer:
    """Group commit of directory fsyncs for one directory."""

    def __init__(self, disk: DiskPool, path: str):
        self.disk = disk
        self.path = path
        self._waiting: list[defer.Deferred] = []
        self._running = False
        self.syncs = 0  # how many fsyncs ran (for tests and metrics)

    def sync(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        waiters, self._waiting = self._waiting, []
        self._running = True
        self.syncs += 1
        self.disk.run(spoolmod.fsync_dir, self.path).addBoth(self._done, waiters)

    def _done(self, result, waiters: list[defer.Deferred]) -> None:
        self._running = False
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
        if self._waiting:
            self._start()
        return None


class AsyncSpool:
    """The spool's blocking operations, run in the disk pool, as Deferreds."""

    def __init__(self, spool: spoolmod.Spool, disk: DiskPool):
        self.spool = spool
        self.disk = disk
        self.queue_syncer = DirSyncer(disk, spool.queue_dir)

    def commit(self, incoming: spoolmod.IncomingMessage) -> defer.Deferred:
        """fsync + rename in a thread, then a grouped fsync of queue/."""
        d = self.disk.run(incoming.finish)
        d.addCallback(lambda qid: self.queue_syncer.sync().addCallback(lambda _: qid))
        return d

    def inject(self, envelope: spoolmod.Envelope, data: bytes) -> defer.Deferred:
        """Queue a message built in memory (DSNs); fires with its QueueEntry once durable."""
        d = self.disk.run(self.spool.inject, envelope, data)
        d.addCallback(lambda entry: self.queue_syncer.sync().addCallback(lambda _: entry))
        return d

    def write_state(self, qid: str, state: spoolmod.State) -> defer.Deferred:
        data = state.to_bytes()

        def write():
            path = self.spool.state_path(qid)
            if not _exists(self.spool.message_path(qid)):
                raise FileNotFoundError(qid)
            spoolmod.write_atomic(path, data, sync_dir=False)

        d = self.disk.run(write)
        d.addCallback(lambda _: self.queue_syncer.sync())
        return d

    def remove(self, qid: str) -> defer.Deferred:
        """Unlink the message (then the state); durable when the Deferred fires."""

        def unlink_msg():
            spoolmod._unlink_quiet(self.spool.message_path(qid))

        def unlink_state(_):
            return self.disk.run(spoolmod._unlink_quiet, self.spool.state_path(qid))

        d = self.disk.run(unlink_msg)
        d.addCallback(lambda _: self.queue_syncer.sync())
        d.addCallback(unlink_state)
        return d

    def run(self, fn, *args, **kw) -> defer.Deferred:
        return self.disk.run(fn, *args, **kw)


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
