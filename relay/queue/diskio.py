"""Disk work off the reactor: a thread pool and grouped directory fsyncs.

fsync takes milliseconds; the reactor must never wait for it.  Every
blocking spool operation runs in a dedicated pool (many concurrent fsyncs
on one disk are cheaper together than one after another), and directory
fsyncs are grouped: a pool thread that needs "the queue directory is
durable" after its rename waits for one fsync that *started after* the
rename, so ten messages that finish together share one directory fsync
(group commit, QueueDirSync).  A new message is written, fsynced, renamed
and covered by such a directory fsync in one job: one hand-off to a thread
and back per message.
"""

from __future__ import annotations

import queue as queuemod
import threading
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.common import fileio
from relay.queue import spool as spoolmod
from relay.queue.incoming import Sign

log = Logger(namespace="relay.diskio")


class LightThreadPool:
    """A fixed set of worker threads fed by one SimpleQueue.

    It offers the part of twisted.python.threadpool.ThreadPool that
    deferToThreadPool uses (callInThreadWithCallback), at a fraction of its
    per-call cost: Twisted's pool coordinates its workers through a "team"
    of locks and queues, which showed up as ~10% of the reactor thread's
    time when every message costs a few thread hand-offs.
    """

    def __init__(self, minthreads: int = 2, maxthreads: int = 16, name: str = "relay-pool"):
        self.max = max(1, maxthreads)
        self.name = name
        self.q: queuemod.SimpleQueue = queuemod.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.started = False
        self.joined = False
        self._lock = threading.Lock()
        self._idle = 0

    def start(self) -> None:
        self.started = True
        self.joined = False

    def _grow(self) -> None:
        with self._lock:
            if self._idle > 0 or len(self.threads) >= self.max:
                return
            t = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}", daemon=True)
            self.threads.append(t)
        t.start()

    def _work(self) -> None:
        get = self.q.get
        while True:
            with self._lock:
                self._idle += 1
            item = get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            on_result, fn, args, kw = item
            try:
                result = fn(*args, **kw)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            if on_result is not None:
                try:
                    on_result(ok, result)
                except BaseException:  # noqa: BLE001 - a worker must never die
                    pass
            del item, result

    def callInThreadWithCallback(self, onResult, func, *args, **kw) -> None:
        if self.joined:
            raise RuntimeError(f"thread pool {self.name} is stopped")
        self.q.put((onResult, func, args, kw))
        if self._idle == 0:
            self._grow()

    def callInThread(self, func, *args, **kw) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued work, then end the threads (bounded wait)."""
        self.joined = True
        self.started = False
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join(timeout)
        self.threads = []


class DiskPool:
    """A named thread pool for blocking disk operations, tied to a reactor."""

    def __init__(self, reactor, minthreads: int = 2, maxthreads: int = 16, name: str = "relay-disk",
                 inline: bool = False):
        self.reactor = reactor
        self.pool = LightThreadPool(minthreads, maxthreads, name=name)
        # inline: run on the calling thread (unit tests driving time with task.Clock)
        self.inline = inline
        self.stopped = False
        # results come back through one list: one reactor wake-up for all
        # the jobs that finish together (a group commit ends several)
        self._results: list[tuple[defer.Deferred, bool, Any]] = []
        self._results_lock = threading.Lock()

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
        d: defer.Deferred = defer.Deferred()
        self.pool.callInThreadWithCallback(lambda ok, result: self._finished(d, ok, result), fn, *args, **kw)
        return d

    def _finished(self, d: defer.Deferred, ok: bool, result: Any) -> None:
        """In a pool thread: hand the result to the reactor."""
        with self._results_lock:
            self._results.append((d, ok, result))
            first = len(self._results) == 1
        if first:
            self.reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        with self._results_lock:
            results, self._results = self._results, []
        for d, ok, result in results:
            if ok:
                d.callback(result)
            else:
                d.errback(result)


class QueueDirSync:
    """Group commit of directory fsyncs, done by the pool threads themselves.

    A thread that has just renamed a file into the directory calls
    ``sync_after()``: it returns once an fsync of the directory that
    *started after the call* has completed.  One thread at a time runs the
    fsync; those that arrive meanwhile wait for the next one, which covers
    all of them.  Doing this in the thread that wrote the file (rather than
    from the reactor, after the write's result came back) saves a round trip
    through the reactor and the pool per message.
    """

    def __init__(self, path: str):
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # fsyncs started
        self._ok = 0  # the last one that succeeded
        self._failed = 0  # the last one that failed ...
        self._error: BaseException | None = None  # ... and why
        self._running = False
        self.syncs = 0  # how many fsyncs ran (for tests and metrics)

    def sync_after(self) -> None:
        cond = self._cond
        with cond:
            need = self._started + 1  # the running one may have started before our rename
            while True:
                if self._ok >= need:
                    return
                if self._failed >= need:
                    raise self._error  # type: ignore[misc]
                if self._running:
                    cond.wait()
                    continue
                self._running = True
                self._started += 1
                gen = self._started
                self.syncs += 1
                cond.release()
                try:
                    fileio.fsync_dir(self.path)
                    err = None
                except BaseException as e:  # noqa: BLE001 - handed to every waiter
                    err = e
                finally:
                    cond.acquire()
                self._running = False
                if err is None:
                    self._ok = gen
                else:
                    self._failed, self._error = gen, err
                cond.notify_all()


class IncomingStock:
    """A few empty files in incoming/, created ahead of time in a thread.

    The SMTP server takes one at DATA; the stock refills itself in the
    background.  Leftovers are removed at stop (and by clean_incoming() at
    start, after a crash).
    """

    def __init__(self, disk: "DiskPool", spool: spoolmod.Spool, target: int = 32):
        self.disk = disk
        self.spool = spool
        self.target = target
        self.stock: list[tuple[str, int]] = []
        self._filling = False
        self.enabled = not disk.inline

    def take(self) -> tuple[str, int] | None:
        item = self.stock.pop() if self.stock else None
        if self.enabled and not self._filling and len(self.stock) < self.target // 2:
            self._refill()
        return item

    def _refill(self) -> None:
        if self.disk.stopped:
            return
        self._filling = True
        want = self.target - len(self.stock)

        def got(items):
            self._filling = False
            if self.disk.stopped:
                self.spool_discard(items)
                return
            self.stock.extend(items)

        def failed(f):
            self._filling = False

        self.disk.run(self.spool.prepare_incoming, want).addCallbacks(got, failed)

    def spool_discard(self, items) -> None:
        import os

        for path, fd in items:
            try:
                os.close(fd)
            except OSError:
                pass
            fileio.unlink_quiet(path)

    def close(self) -> None:
        items, self.stock = self.stock, []
        self.spool_discard(items)


class AsyncSpool:
    """The spool's blocking operations, run in the disk pool, as Deferreds."""

    def __init__(self, spool: spoolmod.Spool, disk: DiskPool):
        self.spool = spool
        self.disk = disk
        self.queue_sync = QueueDirSync(spool.queue_dir)
        self.stock = IncomingStock(disk, spool)
        self._to_remove: list[tuple[str, defer.Deferred, bool]] = []
        self._removing = False

    def incoming(self, envelope: spoolmod.Envelope) -> spoolmod.IncomingMessage:
        """A new message, held in memory while small (written, fsynced and
        renamed in one go by commit()); a big one goes on to a file from the
        stock when there is one."""
        inc = self.spool.incoming(envelope, in_memory=True, spill=self.stock.take)
        inc.defer_io = self._discard_later
        return inc

    def _discard_later(self, fn, *args) -> None:
        if self.disk.stopped:  # shutting down: no pool any more, do it here
            fn(*args)
            return
        d = self.disk.run(fn, *args)
        d.addErrback(lambda f: log.failure("removing an aborted incoming file failed", f))

    def commit(self, incoming: spoolmod.IncomingMessage, sign: Sign | None = None) -> defer.Deferred:
        """Write, fsync and rename into queue/, then a grouped fsync of
        queue/, all in one job of the disk pool; fires with the queue id.
        sign: see IncomingMessage.finish (DKIM, in the same job)."""
        return self.disk.run(self._commit, incoming, sign)

    def _commit(self, incoming: spoolmod.IncomingMessage, sign: Sign | None = None) -> str:
        qid = incoming.finish(sign)
        self.queue_sync.sync_after()
        return qid

    def inject(self, envelope: spoolmod.Envelope, data: bytes) -> defer.Deferred:
        """Queue a message built in memory (DSNs); fires with its QueueEntry once durable."""
        return self.disk.run(self._inject, envelope, data)

    def _inject(self, envelope: spoolmod.Envelope, data: bytes) -> spoolmod.QueueEntry:
        entry = self.spool.inject(envelope, data)
        self.queue_sync.sync_after()
        return entry

    def write_state(self, qid: str, state: spoolmod.State, durable: bool = True,
                    unfinal: frozenset[str] | set[str] = frozenset()) -> defer.Deferred:
        """Replace the state file atomically.

        durable: fdatasync it and fsync the directory (a recipient became
        delivered or bounced, a notice was sent, a hold changed: what must
        never be undone).  Not durable (deferrals, whose loss means no more
        than an earlier retry): the file is still fdatasynced before its
        rename, only the directory fsync is skipped.  The fdatasync is not
        optional: the next message's commit fsyncs queue/, which makes the
        rename durable, and a durable rename of data that is not would
        leave an empty state file after a power loss, losing the delivered
        and bounced records it replaced (found by tests/faults/test_power_loss.py).
        """
        # a snapshot: the reactor may change the live state meanwhile.
        # unfinal: recipients bounced in memory whose DSN is not queued yet
        # (an administrator's write during an attempt): written as deferred,
        # so a crash before the DSN never loses it
        snap = spoolmod.State(
            [spoolmod.Recipient(r.address, r.orcpt,
                                spoolmod.DEFERRED if r.address in unfinal and r.final else r.status,
                                r.attempts, r.reply, r.next_attempt, list(r.history))
             for r in state.recipients],
            state.hold, state.warned, state.pending,
        )

        def written(counts):
            # what is on disk now need not stay in memory
            for r, n in zip(state.recipients, counts):
                del r.history[:n]

        def write():
            counts = self.spool.write_state_merged(qid, snap, durable=durable)
            if durable:
                self.queue_sync.sync_after()
            return counts

        d = self.disk.run(write)
        d.addCallback(written)
        d.addCallback(lambda _: None)
        return d

    def remove(self, qid: str, state_file: bool = True) -> defer.Deferred:
        """Unlink the message, then its state file, in the disk pool, and
        fsync queue/ before the Deferred fires.

        The message file goes first, so no crash can leave a message without
        the state that says which recipients are done.  Removals are batched:
        those asked for while a batch runs go together in the next one (an
        unlink of a file just fsynced can wait for the journal: never on
        the reactor), and the directory fsync is the grouped one of
        QueueDirSync, shared with the commits of new messages.  Without it a
        power loss could bring back a message delivered at its first
        attempt (no state file): every recipient tried again, which the
        README promises never happens to a recorded recipient.
        state_file=False: the caller knows no state file was ever written
        (one unlink fewer).
        """
        d: defer.Deferred = defer.Deferred()
        self._to_remove.append((qid, d, state_file))
        if not self._removing:
            self._remove_batch()
        return d

    def _remove_batch(self) -> None:
        batch, self._to_remove = self._to_remove, []
        self._removing = True
        paths = [(self.spool.message_path(q), self.spool.state_path(q) if st else None) for q, _, st in batch]

        def unlink_all() -> list[OSError | None]:
            errors: list[OSError | None] = []
            for msg, state in paths:
                try:
                    fileio.unlink_quiet(msg)
                    if state is not None:
                        fileio.unlink_quiet(state)
                    errors.append(None)
                except OSError as e:
                    errors.append(e)
            if any(e is None for e in errors):
                # the removal is the record that every recipient is final:
                # durable (grouped with the commits' fsyncs of queue/) before
                # the queue forgets the message, or a power loss brings it
                # back, with no state file: every recipient pending again
                try:
                    self.queue_sync.sync_after()
                except OSError as e:
                    errors = [e if err is None else err for err in errors]
            return errors

        def done(result):
            self._removing = False
            if isinstance(result, Failure):
                for _, d, _st in batch:
                    d.errback(result)
            else:
                for (_, d, _st), err in zip(batch, result):
                    if err is None:
                        d.callback(None)
                    else:
                        d.errback(Failure(err))
            if self._to_remove:
                self._remove_batch()

        self.disk.run(unlink_all).addBoth(done)

    def run(self, fn, *args, **kw) -> defer.Deferred:
        return self.disk.run(fn, *args, **kw)


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
