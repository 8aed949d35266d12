"""The queue runner: what to try when, within limits, and what to record.

Every queued message lives in memory as a ``Message`` (relay.queue.message:
its envelope, its per-recipient state) and on disk in the spool.  A heap
orders messages by their next attempt; when one is due, its due recipients
are grouped by destination (relay.delivery.routing) into jobs, one per
destination, and the jobs run within the limits (relay.queue.slots:
delivery.max_concurrency outbound connections, delivery.max_per_destination
per destination; local deliveries have their own small pool).  When all
jobs of an activation are done (their outcomes applied by
relay.queue.outcomes), the outcome is made durable *before* anything relies
on it, in this order:

1. DSNs for recipients that failed for good (and a delay notice if due) are
   queued and fsynced (relay.queue.notices);
2. then the message is removed (all recipients final) or its state file is
   rewritten (fsync, rename, directory fsync);
3. only then is the message rescheduled.

A crash between a remote 250 and step 2 means that recipient is tried again
(at-least-once); a recipient recorded as delivered or bounced is never
tried again.  An outcome whose write fails (a full disk) stays in memory,
flags and all, and is written again FINALIZE_RETRY later: never dropped.
Time comes from the reactor (task.Clock in tests).

Administrator's actions (relayctl, through relay.control.server) are
relay.queue.actions; on a busy message they are recorded at once and
applied by after_finalize, the end of every busy step, or by _resume at the
next start.  The spool operations of one message run one after another
(relay.queue.msgio), so an action's write and an outcome's write can never
land out of order.
"""

from __future__ import annotations

import heapq
import random
import time
from typing import Any, Callable, Coroutine

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.common.ratelimit import RateTable
from relay.config import Config
from relay.delivery import bounce as bouncemod
from relay.delivery import routing
from relay.delivery.attempt import Outcome
from relay.queue import outcomes as outcomemod
from relay.queue.actions import AdminActions
from relay.queue.diskio import AsyncSpool
from relay.queue.envelope import QueueEntry
from relay.queue.message import LEAVING, ActionFailed, Job, Message, UnknownMessage
from relay.queue.msgio import MessageIO
from relay.queue.notices import Notices
from relay.queue.outcomes import Counters
from relay.queue.pacing import Pacer
from relay.queue.ports import Clock, NextHop, ParkedSessions, Timer, cancel
from relay.queue.slots import SlotPool

__all__ = ["ActionFailed", "QueueManager", "UnknownMessage"]  # the errors relay.control.server catches

log = Logger(namespace="relay.queue")

LOCAL_CONCURRENCY = 8
FINALIZE_RETRY = 10.0  # seconds before recording an outcome again after a disk error
DEAD_WINDOW = 30.0  # seconds a destination that did not answer is not retried for new mail
WAKE_PER_TURN = 1000  # due messages activated per reactor turn
DISPATCH_PER_TURN = 500  # jobs started (or ended at once) per reactor turn
# messages kept in memory after reception, for their first attempt (small
# ones only, see spool.MEMORY_LIMIT); beyond this total the file is read
MAX_HELD_BYTES = 16 * 1024 * 1024


class QueueManager:
    """The queue runner of one spool.

    ``deliverer`` carries out the attempts; ``parked`` is the deliverer's
    cache of idle sessions (counted within delivery.max_concurrency, closed
    at stop), if it has one; ``disk_stopped`` tells whether the disk pool
    has stopped (past the shutdown bound nothing can be recorded).
    ``config`` changes through ``reconfigure`` at a reload.
    """

    def __init__(self, reactor: Clock, aspool: AsyncSpool, deliverer: NextHop, config: Config, *,
                 parked: ParkedSessions | None = None, disk_stopped: Callable[[], bool] | None = None,
                 rates: RateTable | None = None):
        self.reactor = reactor
        self.aspool = aspool
        self.deliverer = deliverer
        self.parked = parked
        self.disk_stopped: Callable[[], bool] = disk_stopped or (lambda: False)
        self.messages: dict[str, Message] = {}
        self.heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._dispatch_call: Timer | None = None
        self.running = False
        self.loaded = False
        self.counters = Counters()
        self.held_bytes = 0  # sum of Message.data
        self.random = random.Random()
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._inflight: set[defer.Deferred[Any]] = set()  # finalisations and admin actions under way
        # destinations that just failed to answer at all:
        # key -> (until, reason, start time of the attempt that found it dead)
        self.dead: dict[str, tuple[float, str, float]] = {}
        self.finalize_retry = FINALIZE_RETRY
        self._refinalize_calls: dict[str, Timer] = {}
        self.on_attempt: Callable[[bool, float], None] | None = None  # metrics: f(local, seconds) after each attempt
        self.config = config
        d = config.delivery
        self.remote = SlotPool(d.max_concurrency, d.max_per_destination)
        self.local = SlotPool(LOCAL_CONCURRENCY, LOCAL_CONCURRENCY)
        # delivery.pacing, counted in the relay's rate table (shared by the workers)
        self.pacer = Pacer(rates if rates is not None else RateTable.local(), self.now, config)
        self.remote.pacer = self.pacer
        self.io = MessageIO(aspool, self._check_idle)
        self.notices = Notices(aspool, lambda: self.config, self.now, self.counters, self.add)
        self.actions = AdminActions(self)

    def configure(self, config: Config) -> None:
        """(Re)apply the delivery settings; running jobs keep their limits."""
        self.config = config
        self.remote.limit = config.delivery.max_concurrency
        self.remote.per_dest = config.delivery.max_per_destination
        self.pacer.config = config

    def reconfigure(self, config: Config) -> None:
        """A reload: new limits and delivery settings for new attempts (a new
        resolver for new nameservers is the deliverer's, set by the reload)."""
        self.configure(config)
        self._dispatch()

    # -- life cycle -----------------------------------------------------------
    def now(self) -> float:
        return self.reactor.seconds()

    def start(self) -> defer.Deferred[None]:
        """Load the spool (in a thread) and start delivering."""
        self.running = True
        notes: list[tuple[str, dict[str, Any]]] = []

        def scan() -> list[QueueEntry]:
            return list(self.aspool.spool.recover(log=lambda fmt, **kw: notes.append((fmt, kw))))

        t0 = time.monotonic()
        d = self.aspool.run(scan)

        def loaded(entries: list[QueueEntry]) -> None:
            for fmt, kw in notes:
                log.info(fmt, **kw)
            for e in entries:
                self.add(e, schedule=False)
            self.loaded = True
            for m in list(self.messages.values()):
                self._resume(m)
            log.info("queue loaded: {count} messages in {secs:.2f}s", count=len(entries),
                     secs=time.monotonic() - t0)

        return d.addCallback(loaded)

    def stop(self, grace: float = 20.0) -> defer.Deferred[Any]:
        """Stop starting jobs; wait (bounded) for the jobs in flight."""
        self.running = False
        cancel(self._timer)
        self._timer = None
        cancel(self._dispatch_call)
        self._dispatch_call = None
        self.pacer.stop()
        for call in self._refinalize_calls.values():
            cancel(call)
        self._refinalize_calls.clear()
        # jobs still waiting for a slot are not started: they end without an
        # attempt, so what other jobs of their activation recorded is saved
        for pool in (self.local, self.remote):
            for job in pool.take_waiting():
                if not job.withdrawn:
                    self._job_finished(job, [])
        parked = self.parked
        if not self.busy():
            return parked.close_all() if parked is not None else defer.succeed(None)
        d: defer.Deferred[Any] = defer.Deferred()
        self._idle_waiters.append(d)
        if parked is not None:
            d.addCallback(lambda _: parked.close_all())

        def give_up() -> None:
            if not d.called:
                d.callback(None)

        timeout = self.reactor.callLater(grace, give_up)

        def end(result: object) -> object:
            cancel(timeout)
            return result

        d.addBoth(end)
        return d

    def busy(self) -> bool:
        return bool(self._inflight) or any(m.active or m.busy or m.io is not None for m in self.messages.values())

    def _check_idle(self) -> None:
        if self._idle_waiters and not self.busy():
            ws, self._idle_waiters = self._idle_waiters, []
            for w in ws:
                if not w.called:
                    w.callback(None)

    # -- adding and scheduling -------------------------------------------------------
    def add(self, entry: QueueEntry, schedule: bool = True) -> Message:
        env = entry.envelope
        if env.queue_id in self.messages:
            return self.messages[env.queue_id]
        msg = Message(env.queue_id, env, entry.state, entry.size, entry.offset)
        msg.eight_bit = entry.eight_bit
        msg.state_file = entry.state_file
        data = entry.data
        if data is not None and self.held_bytes + len(data) <= MAX_HELD_BYTES:
            msg.data = data
            self.held_bytes += len(data)
        self.messages[msg.qid] = msg
        if schedule and self.loaded:
            self.schedule(msg)
        return msg

    def _resume(self, msg: Message) -> None:
        """A message read at start: an administrator's action recorded while it
        was busy before the restart is applied now."""
        pending = msg.state.pending
        if pending:
            log.info("{queue_id}: applying the administrator's {action} recorded before the restart",
                     queue_id=msg.qid, action=pending)
        if pending in LEAVING:
            self._start_finalize(msg)
            return
        if pending == "retry":
            self.apply_retry(msg)
        self.schedule(msg)

    def schedule(self, msg: Message, at: float | None = None) -> None:
        """Its next attempt on the heap (at its recipients' next time, or at)."""
        if msg.hold or msg.active or msg.busy or msg.leaving or not self.running:
            return
        t = msg.next_time() if at is None else at
        if t is None:
            return
        self._seq += 1
        msg.token = self._seq
        heapq.heappush(self.heap, (t, self._seq, msg.qid, msg.token))
        self._arm()

    def _arm(self) -> None:
        if not self.heap or not self.running:
            return
        first = self.heap[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer_at is not None and self._timer_at <= first:
                return
            self._timer.cancel()
        delay = max(0.0, first - self.now())
        self._timer_at = first
        self._timer = self.reactor.callLater(delay, self._wakeup)

    def _wakeup(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.now()
        budget = WAKE_PER_TURN  # a big due queue is activated over several reactor turns
        while self.heap and self.heap[0][0] <= now and self.running and budget > 0:
            budget -= 1
            _, _, qid, token = heapq.heappop(self.heap)
            msg = self.messages.get(qid)
            if msg is None or msg.token != token:
                continue
            self._activate(msg, now)
        self._arm()

    # -- activation -----------------------------------------------------------------------
    def _activate(self, msg: Message, now: float) -> None:
        if msg.hold or msg.active or msg.busy or msg.leaving:
            return
        due = [r for r in msg.state.recipients if not r.final and r.next_attempt <= now]
        if not due:
            self.schedule(msg)
            return
        groups: dict[str, tuple[routing.Destination, list]] = {}
        for r in due:
            dest = routing.route(self.config, r.address, msg.env.sender)
            groups.setdefault(dest.key, (dest, []))[1].append(r)
        msg.failures = []
        msg.successes = []
        msg.started = now
        forced, msg.forced = msg.forced, None
        for dest, rcpts in groups.values():
            job = Job(msg, dest, rcpts, local=not dest.remote, forced=forced)
            msg.active += 1
            if msg.jobs is None:
                msg.jobs = []
            msg.jobs.append(job)
            (self.local if job.local else self.remote).add(job)
        self._dispatch()

    def _dispatch(self) -> None:
        if not self.running:
            return
        budget = DISPATCH_PER_TURN
        for pool in (self.local, self.remote):
            while True:
                if budget <= 0:
                    # jobs that end at once (a dead destination's backlog, deleted
                    # messages) could go on for seconds: the rest in the next turn
                    if self._dispatch_call is None or not self._dispatch_call.active():
                        self._dispatch_call = self.reactor.callLater(0, self._dispatch)
                    return
                job = pool.next_job()
                if job is None:
                    if pool.pacer is not None:  # dispatch again when a paced destination gets room
                        pool.pacer.arm(set(pool.waiting), self.reactor, self._dispatch)
                    break
                budget -= 1
                if pool is self.remote:
                    self._make_room(pool)
                self._run(job, pool)

    def _make_room(self, pool: SlotPool) -> None:
        """Sessions parked in the connection cache are connections too: keep
        running attempts + parked sessions within delivery.max_concurrency by
        closing the longest-parked ones."""
        if self.parked is None:
            return
        over = pool.running + len(self.parked) - pool.limit
        if over > 0:
            self.parked.evict(over)

    def _run(self, job: Job, pool: SlotPool) -> None:
        msg = job.msg
        if job.withdrawn:
            pool.done(job)  # ended already (withdraw)
            return
        self._unlist(job)
        if msg.leaving or msg.hold:
            # deleted, returned or held while waiting for a free slot: do not start it
            pool.done(job)
            self._job_finished(job, [])
            return  # the _dispatch loop that started it goes on with the freed slot
        dead = self.dead.get(job.dest.key) if not job.local else None
        if dead is not None and job.forced is not None and dead[2] < job.forced:
            dead = None  # found before the administrator's retry: stale news, try for real
        if dead is not None and dead[0] > self.now():
            # like Postfix's dead destinations: no new connection for a while
            pool.done(job)
            self._job_finished(job, outcomemod.suspended(job, dead[1]))
            return  # the _dispatch loop that started it goes on with the freed slot
        self.counters.attempts += 1
        started = self.now()
        msg.attempting += 1
        d = self.deliverer.attempt(msg, job.dest, [r.address for r in job.recipients])

        def failed(f: Failure) -> list[Outcome]:
            log.failure("{queue_id}: delivery attempt crashed", f, queue_id=msg.qid)
            return outcomemod.crashed(job, f.getErrorMessage())

        def done(outcomes: list[Outcome]) -> None:
            msg.attempting -= 1
            if self.on_attempt is not None:
                self.on_attempt(job.local, self.now() - started)
            pool.done(job)
            if not job.local:
                self._note_destination(job.dest.key, outcomes, started)
            self._job_finished(job, outcomes)
            self._dispatch()

        d.addErrback(failed).addCallback(done).addErrback(
            lambda f: log.failure("{queue_id}: recording the attempt failed", f, queue_id=msg.qid))

    def _unlist(self, job: Job) -> None:
        jobs = job.msg.jobs
        if jobs is not None:
            try:
                jobs.remove(job)
            except ValueError:
                pass
            if not jobs:
                job.msg.jobs = None

    def withdraw(self, msg: Message) -> None:
        """End the message's jobs still waiting for a slot, without an attempt:
        an action that stops its delivery (hold, delete, bounce) takes effect
        now, not when a slot frees (which may take as long as the slowest
        next hop).  The jobs stay in their pool's queue, marked, and are
        skipped when their turn comes."""
        jobs, msg.jobs = msg.jobs or [], None
        for job in jobs:
            job.withdrawn = True
        for job in jobs:
            self._job_finished(job, [])

    def forget_dead(self, msg: Message) -> None:
        """An administrator's retry: the destinations of its open recipients
        are tried for real, not suspended as dead (like postqueue -f)."""
        if not self.dead:
            return
        for r in msg.open_recipients():
            key = routing.route(self.config, r.address, msg.env.sender).key
            if self.dead.pop(key, None) is not None:
                log.info("{queue_id}: retry: {dest} is tried again at once (no longer suspended)",
                         queue_id=msg.qid, dest=key)

    def apply_retry(self, msg: Message) -> None:
        """Every open recipient due now, its destinations not suspended."""
        now = self.now()
        if msg.state.pending == "retry":
            msg.state.pending = ""
        for r in msg.open_recipients():
            r.next_attempt = min(r.next_attempt, now)
        self.forget_dead(msg)
        msg.forced = now  # even if an attempt started before marks the destination dead meanwhile

    def _note_destination(self, key: str, outcomes: list[Outcome], started: float) -> None:
        """No hop answered (connection refused, timeouts, DNS): mark it dead."""
        if outcomes and all(o.kind == "deferred" and not o.remote for o in outcomes):
            window = min(self.config.delivery.retry_min, DEAD_WINDOW)
            self.dead[key] = (self.now() + window, outcomes[0].reply, started)
        else:
            self.dead.pop(key, None)

    # -- recording results ------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        return outcomemod.backoff(self.config.delivery, attempts, self.random)

    def drop_data(self, msg: Message) -> None:
        if msg.data is not None:
            self.held_bytes -= len(msg.data)
            msg.data = None

    def _job_finished(self, job: Job, outcomes: list[Outcome]) -> None:
        msg = job.msg
        self._unlist(job)
        outcomemod.record(msg, job.recipients, outcomes, now=self.now(), delivery=self.config.delivery,
                          counters=self.counters, backoff=self.backoff)
        msg.active -= 1
        if msg.active == 0:
            self.drop_data(msg)
            self._start_finalize(msg)

    # -- finalisation: the end of an activation, made durable ------------------------------
    def _simple_outcome(self, msg: Message) -> bool:
        """Nothing to record but the attempt itself: no DSN, no notice, no
        administrator's request (the common cases get a short path)."""
        if msg.deleted or msg.bounce_now or msg.failures or msg.successes or self.disk_stopped():
            return False
        return not self.notices.delay_due(msg, self.now())

    def _start_finalize(self, msg: Message) -> None:
        msg.busy = True
        d: defer.Deferred[Any]
        if self._simple_outcome(msg):
            if msg.state.done:
                # delivered (or bounced without a DSN to send): remove it
                d = self.io.remove(msg)
                d.addCallback(lambda _: self.forget(msg, "all recipients final"))
            elif not (msg.settled or msg.tried):
                # only suspended (a dead destination, nothing tried): the
                # record stays in memory; after a crash it is simply tried again
                self.after_finalize(msg)
                return
            else:
                d = defer.ensureDeferred(self._finalize(msg))
        else:
            d = defer.ensureDeferred(self._finalize(msg))
        self._inflight.add(d)

        def failed(f: Failure) -> bool:
            if f.check(OSError):
                log.error("{queue_id}: cannot record the outcome ({error}); trying again in {delay:g}s",
                          queue_id=msg.qid, error=f.getErrorMessage(), delay=self.finalize_retry)
            else:
                log.failure("{queue_id}: finalising failed", f, queue_id=msg.qid)
            return True

        def ended(retry: bool) -> None:
            self._inflight.discard(d)
            self.after_finalize(msg, retry)

        d.addCallbacks(lambda _: False, failed).addCallback(ended)

    def _refinalize(self, msg: Message) -> None:
        """A DSN or state write that failed (a full disk): record it now."""
        self._refinalize_calls.pop(msg.qid, None)
        if msg.qid in self.messages and not (msg.active or msg.busy) and self.running:
            self._start_finalize(msg)

    async def _finalize(self, msg: Message) -> None:
        if self.disk_stopped():
            # past the shutdown bound: nothing can be recorded any more; the
            # recipients are still "not delivered" on disk and are retried
            log.info("{queue_id}: attempt ended after shutdown; it is retried at the next start",
                     queue_id=msg.qid)
            return
        now = self.now()
        if msg.deleted:
            await self.io.remove(msg)
            self.forget(msg, "deleted by the administrator")
            return
        if msg.bounce_now:
            await self.actions.return_to_sender(msg)
            return
        if msg.failures:
            await self.notices.send(msg, bouncemod.FAILED, msg.failures)
            msg.failures = []
        if msg.successes:  # NOTIFY=SUCCESS (relay.queue.notices)
            await self.notices.send(msg, bouncemod.SUCCESS, msg.successes)
            msg.successes = []
        if self.notices.delay_due(msg, now):
            await self.notices.send(msg, bouncemod.DELAYED, self.notices.delayed(msg, now))
            msg.state.warned = True
            msg.settled = True  # the notice is sent: never a second one
        if msg.state.done:
            await self.io.remove(msg)
            self.forget(msg, "all recipients final")
        elif msg.settled or msg.tried:
            # the flags are cleared only once written: a write that fails (a
            # full disk) is made again with the same outcome, never dropped
            await self.io.write(msg, durable=msg.settled)
            msg.settled = msg.tried = False
        # else: only suspended (a dead destination, nothing tried): the
        # record stays in memory; after a crash it is simply tried again

    def after_finalize(self, msg: Message, retry: bool = False) -> None:
        """The end of every busy step: what an administrator asked for
        meanwhile (recorded in State.pending) is applied here."""
        msg.busy = False
        if msg.qid in self.messages:
            if retry and self.running:
                # what happened is only in memory: record it before anything else
                cancel(self._refinalize_calls.pop(msg.qid, None))
                self._refinalize_calls[msg.qid] = self.reactor.callLater(
                    self.finalize_retry, self._refinalize, msg)
            elif msg.leaving:
                # a delete or bounce that came during this step; when shutting
                # down it is on disk and applied at the next start
                if self.running and not msg.active and not self.disk_stopped():
                    self._start_finalize(msg)
                    return
            else:
                if msg.state.pending == "retry" and not msg.active:
                    self.apply_retry(msg)
                    self.schedule(msg, at=self.now())
                else:
                    self.schedule(msg)
        self._check_idle()

    def forget(self, msg: Message, why: str) -> None:
        self.messages.pop(msg.qid, None)
        self.drop_data(msg)
        cancel(self._refinalize_calls.pop(msg.qid, None))
        self.counters.removed += 1
        log.info("{queue_id}: removed ({why})", queue_id=msg.qid, why=why)

    # -- administration (relayctl): relay.queue.actions --------------------------------------
    def get(self, qid: str) -> Message:
        return self.actions.get(qid)

    def hold(self, qid: str) -> Coroutine[Any, Any, str]:
        return self.actions.hold(qid)

    def release(self, qid: str) -> Coroutine[Any, Any, str]:
        return self.actions.release(qid)

    def retry(self, qid: str) -> defer.Deferred[str]:
        """Fires with the text; an attempt is made at once (the destination's
        dead-destination suspension forgotten), or right after the busy step."""
        return self.actions.retry(qid)

    def delete(self, qid: str) -> Coroutine[Any, Any, str]:
        return self.actions.delete(qid)

    def bounce(self, qid: str) -> Coroutine[Any, Any, str]:
        return self.actions.bounce(qid)

    # -- inspection -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"active": 0, "deferred": 0, "hold": 0}
        for m in self.messages.values():
            out[m.queue_name] += 1
        return out
