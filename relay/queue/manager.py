"""The queue runner: what to try when, within limits, and what to record.

Every queued message lives in memory as a ``Message`` (its envelope, its
per-recipient state) and on disk in the spool.  A heap orders messages by
their next attempt; when one is due, its due recipients are grouped by
destination (relay.delivery.routing) into jobs, one per destination, and the jobs
run within the limits (delivery.max_concurrency outbound connections,
delivery.max_per_destination per destination; local deliveries have their
own small pool).  When all jobs of an activation are done, the outcome is
made durable *before* anything relies on it, in this order:

1. DSNs for recipients that failed for good (and a delay notice if due) are
   queued and fsynced;
2. then the message is removed (all recipients final) or its state file is
   rewritten (fsync, rename, directory fsync);
3. only then is the message rescheduled.

A crash between a remote 250 and step 2 means that recipient is tried again
(at-least-once); a recipient recorded as delivered or bounced is never
tried again.  An outcome whose write fails (a full disk) stays in memory,
flags and all, and is written again FINALIZE_RETRY later: never dropped.
Time comes from the reactor (task.Clock in tests).

Administrator's actions (relayctl, through relay.admin.control) are applied
durably or refused.  On a busy message (an attempt under way, or its
outcome being written) the action is recorded at once in the state file
(the hold flag, or State.pending: "retry", "delete", "bounce") and applied
by _after_finalize, the end of every busy step, or by _resume at the next
start; jobs still waiting for a slot are withdrawn at once.  The spool
operations of one message run one after another (_io), so an action's
write and an outcome's write can never land out of order.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from relay.common import logsafe
from relay.delivery import bounce as bouncemod
from relay.delivery import routing
from relay.queue import spool as spoolmod
from relay.queue.spool import BOUNCED, DEFERRED, DELIVERED, PENDING

log = Logger(namespace="relay.queue")

LOCAL_CONCURRENCY = 8
FINALIZE_RETRY = 10.0  # seconds before recording an outcome again after a disk error
DEAD_WINDOW = 30.0  # seconds a destination that did not answer is not retried for new mail
MAX_HISTORY = 200
JITTER = 0.1
WAKE_PER_TURN = 1000  # due messages activated per reactor turn
DISPATCH_PER_TURN = 500  # jobs started (or ended at once) per reactor turn
# messages kept in memory after reception, for their first attempt (small
# ones only, see spool.MEMORY_LIMIT); beyond this total the file is read
MAX_HELD_BYTES = 16 * 1024 * 1024


class UnknownMessage(KeyError):
    pass


class ActionFailed(Exception):
    """An administrator's action that could not be recorded: nothing changed."""


# State.pending values applied by a finalisation (the message leaves the queue)
LEAVING = ("delete", "bounce")
_LEAVING_WORDS = {"delete": "deleted", "bounce": "returned to the sender"}


@dataclass(eq=False, slots=True)
class Message:
    qid: str
    env: spoolmod.Envelope
    state: spoolmod.State
    size: int
    offset: int
    active: int = 0  # jobs of this activation not finished (waiting for a slot or running)
    attempting: int = 0  # jobs whose attempt is under way
    busy: bool = False  # an activation is being finalised
    jobs: list | None = None  # jobs waiting for a slot
    io: defer.Deferred | None = None  # fires when the last spool write or removal queued for it ends
    forced: float | None = None  # when a retry asked for the next activation (see Job.forced)
    token: int = 0  # heap entries with another token are stale
    failures: list = field(default_factory=list)  # bounce.Failure of this activation
    settled: bool = False  # a recipient became final in this activation: fsync the state
    tried: bool = False  # an attempt was really made in this activation (not only suspended)
    eight_bit: bool | None = None  # the body has 8-bit bytes (None: not known, the client scans)
    started: float = 0.0
    data: bytes | None = None  # the message, just received: the first attempt need not read the file
    state_file: bool = True  # a state file may exist (False: never written, nothing to unlink)

    @property
    def hold(self) -> bool:
        return self.state.hold

    @property
    def deleted(self) -> bool:
        """A delete was accepted (and recorded): gone for the administrator."""
        return self.state.pending == "delete"

    @property
    def bounce_now(self) -> bool:
        return self.state.pending == "bounce"

    @property
    def leaving(self) -> bool:
        return self.state.pending in LEAVING

    def open_recipients(self) -> list[spoolmod.Recipient]:
        return [r for r in self.state.recipients if not r.final]

    def next_time(self) -> float | None:
        ts = [r.next_attempt for r in self.state.recipients if not r.final]
        return min(ts) if ts else None

    @property
    def queue_name(self) -> str:
        if self.hold:
            return "hold"
        if self.active or any(r.status == PENDING for r in self.state.recipients):
            return "active"
        return "deferred"


@dataclass(eq=False)
class Job:
    msg: Message
    dest: routing.Destination
    recipients: list[spoolmod.Recipient]
    local: bool
    withdrawn: bool = False  # ended without an attempt while it waited (an admin action)
    # an administrator's retry at this time: a dead-destination mark does not
    # suspend it unless an attempt started after the retry set that mark
    forced: float | None = None


@dataclass
class Counters:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    dsn_sent: int = 0
    removed: int = 0
    attempts: int = 0


class _Pool:
    """Concurrency limits: global and per destination, round-robin fair."""

    def __init__(self, limit: int, per_dest: int):
        self.limit = limit
        self.per_dest = per_dest
        self.running = 0
        self.by_dest: dict[str, int] = {}
        self.waiting: dict[str, deque[Job]] = {}
        self.ready: deque[str] = deque()

    def add(self, job: Job) -> None:
        q = self.waiting.get(job.dest.key)
        if q is None:
            q = self.waiting[job.dest.key] = deque()
            self.ready.append(job.dest.key)
        q.append(job)

    def next_job(self) -> Job | None:
        for _ in range(len(self.ready)):
            if self.running >= self.limit:
                return None
            key = self.ready.popleft()
            q = self.waiting.get(key)
            if not q:
                self.waiting.pop(key, None)
                continue
            if self.by_dest.get(key, 0) >= self.per_dest:
                self.ready.append(key)
                continue
            job = q.popleft()
            if q:
                self.ready.append(key)
            else:
                del self.waiting[key]
            self.running += 1
            self.by_dest[key] = self.by_dest.get(key, 0) + 1
            return job
        return None

    def done(self, job: Job) -> None:
        self.running -= 1
        n = self.by_dest.get(job.dest.key, 1) - 1
        if n <= 0:
            self.by_dest.pop(job.dest.key, None)
        else:
            self.by_dest[job.dest.key] = n

    def waiting_count(self) -> int:
        return sum(len(q) for q in self.waiting.values())


class QueueManager:
    def __init__(self, service, config, *, deliverer=None, resolver=None):
        self.svc = service
        self.reactor = service.reactor
        self.aspool = service.aspool
        self.messages: dict[str, Message] = {}
        self.heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self._timer = None
        self._timer_at: float | None = None
        self._dispatch_call = None
        self.running = False
        self.loaded = False
        self.counters = Counters()
        self.held_bytes = 0  # sum of Message.data
        self.random = random.Random()
        self._idle_waiters: list[defer.Deferred] = []
        self._inflight: set[defer.Deferred] = set()  # finalisations and admin actions under way
        # destinations that just failed to answer at all: key -> (until, reason)
        # (until, reason, start time of the attempt that found it dead)
        self.dead: dict[str, tuple[float, str, float]] = {}
        self.finalize_retry = FINALIZE_RETRY
        self._refinalize_calls: dict[str, object] = {}
        self.on_attempt = None  # metrics hook: f(local: bool, seconds: float) after each attempt
        self.configure(config)
        if deliverer is None:
            from relay.delivery.attempt import Deliverer
            from relay.delivery.mx import Resolver

            pool = getattr(service, "dns_pool", None)
            resolver = resolver or Resolver(
                nameservers=config.delivery.nameservers, lifetime=10.0, reactor=self.reactor,
                threadpool=pool.pool if pool is not None else None,
            )
            deliverer = Deliverer(service.reactor, resolver, spool=service.spool, disk=service.disk,
                                  users=service.users, listeners=service.listeners, config=config)
        self.deliverer = deliverer

    def configure(self, config) -> None:
        """(Re)apply the delivery settings; running jobs keep their limits."""
        self.config = config
        d = config.delivery
        if not hasattr(self, "remote"):
            self.remote = _Pool(d.max_concurrency, d.max_per_destination)
            self.local = _Pool(LOCAL_CONCURRENCY, LOCAL_CONCURRENCY)
        else:
            self.remote.limit = d.max_concurrency
            self.remote.per_dest = d.max_per_destination

    def reconfigure(self, config) -> None:
        """A reload: new limits and delivery settings for new attempts."""
        old = self.config
        self.configure(config)
        if old.delivery.nameservers != config.delivery.nameservers and hasattr(self.deliverer, "resolver"):
            from relay.delivery.mx import Resolver

            pool = getattr(self.svc, "dns_pool", None)
            self.deliverer.resolver = Resolver(
                nameservers=config.delivery.nameservers, lifetime=10.0, reactor=self.reactor,
                threadpool=pool.pool if pool is not None else None)
        self._dispatch()

    # -- life cycle -----------------------------------------------------------
    def now(self) -> float:
        return self.reactor.seconds()

    def start(self) -> defer.Deferred:
        """Load the spool (in a thread) and start delivering."""
        self.running = True
        notes: list[tuple[str, dict]] = []

        def scan():
            return list(self.aspool.spool.recover(log=lambda fmt, **kw: notes.append((fmt, kw))))

        t0 = time.monotonic()
        d = self.aspool.run(scan)

        def loaded(entries):
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

    def stop(self, grace: float = 20.0) -> defer.Deferred:
        """Stop starting jobs; wait (bounded) for the jobs in flight."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._dispatch_call is not None and self._dispatch_call.active():
            self._dispatch_call.cancel()
        self._dispatch_call = None
        for call in self._refinalize_calls.values():
            if call.active():
                call.cancel()
        self._refinalize_calls.clear()
        # jobs still waiting for a slot are not started: they end without an
        # attempt, so what other jobs of their activation recorded is saved
        for pool in (self.local, self.remote):
            waiting = [j for q in pool.waiting.values() for j in q]
            pool.waiting.clear()
            pool.ready.clear()
            for job in waiting:
                if not job.withdrawn:
                    self._job_finished(job, [])
        cache = getattr(self.deliverer, "cache", None)
        if not self.busy():
            return cache.close_all() if cache is not None else defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        if cache is not None:
            d.addCallback(lambda _: cache.close_all())
        timeout = self.reactor.callLater(grace, lambda: d.called or d.callback(None))
        d.addBoth(lambda r: (timeout.active() and timeout.cancel(), r)[1])
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
    def add(self, entry: spoolmod.QueueEntry, schedule: bool = True) -> Message:
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
            self._schedule(msg)
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
            self._apply_retry(msg)
        self._schedule(msg)

    def _schedule(self, msg: Message, at: float | None = None) -> None:
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
            self._schedule(msg)
            return
        groups: dict[str, tuple[routing.Destination, list[spoolmod.Recipient]]] = {}
        for r in due:
            dest = routing.route(self.config, r.address)
            groups.setdefault(dest.key, (dest, []))[1].append(r)
        msg.failures = []
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
                    break
                budget -= 1
                if pool is self.remote:
                    self._make_room(pool)
                self._run(job, pool)

    def _make_room(self, pool: _Pool) -> None:
        """Sessions parked in the connection cache are connections too: keep
        running attempts + parked sessions within delivery.max_concurrency by
        closing the longest-parked ones."""
        cache = getattr(self.deliverer, "cache", None)
        if cache is None:
            return
        over = pool.running + len(cache) - pool.limit
        if over > 0:
            cache.evict(over)

    def _run(self, job: Job, pool: _Pool) -> None:
        msg = job.msg
        if job.withdrawn:
            pool.done(job)  # ended already (_withdraw)
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
            from relay.delivery.attempt import Outcome

            reason = f"delivery temporarily suspended: {dead[1]}"
            outcomes = [Outcome(r.address, "deferred", "4.4.1", reason, suspended=True) for r in job.recipients]
            pool.done(job)
            self._job_finished(job, outcomes)
            return  # the _dispatch loop that started it goes on with the freed slot
        self.counters.attempts += 1
        started = self.now()
        msg.attempting += 1
        d = self.deliverer.attempt(msg, job.dest, [r.address for r in job.recipients])

        def failed(f):
            log.failure("{queue_id}: delivery attempt crashed", f, queue_id=msg.qid)
            from relay.delivery.attempt import Outcome

            return [Outcome(r.address, "deferred", "4.3.0", f"internal error: {f.getErrorMessage()}")
                    for r in job.recipients]

        def done(outcomes):
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

    def _withdraw(self, msg: Message) -> None:
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

    def _forget_dead(self, msg: Message) -> None:
        """An administrator's retry: the destinations of its open recipients
        are tried for real, not suspended as dead (like postqueue -f)."""
        if not self.dead:
            return
        for r in msg.open_recipients():
            key = routing.route(self.config, r.address).key
            if self.dead.pop(key, None) is not None:
                log.info("{queue_id}: retry: {dest} is tried again at once (no longer suspended)",
                         queue_id=msg.qid, dest=key)

    def _apply_retry(self, msg: Message) -> None:
        now = self.now()
        if msg.state.pending == "retry":
            msg.state.pending = ""
        for r in msg.open_recipients():
            r.next_attempt = min(r.next_attempt, now)
        self._forget_dead(msg)
        msg.forced = now  # even if an attempt started before marks the destination dead meanwhile

    # -- writing: one spool operation at a time per message ------------------------------
    def _io(self, msg: Message, fn) -> defer.Deferred:
        """Run fn() (a Deferred-returning spool operation) after the ones
        queued before for this message have ended: two writes of one state
        file in the disk pool at once could land in either order (an older
        snapshot over a newer one) or follow its removal."""
        prev = msg.io
        tail: defer.Deferred = defer.Deferred()
        msg.io = tail
        out: defer.Deferred = defer.Deferred()

        def start(_=None):
            d = defer.maybeDeferred(fn)

            def end(result):
                if msg.io is tail:
                    msg.io = None
                tail.callback(None)
                self._check_idle()
                return result

            d.addBoth(end).chainDeferred(out)

        if prev is None:
            start()
        else:
            prev.addCallback(start)
        return out

    def _write(self, msg: Message, durable: bool = True) -> defer.Deferred:
        def go():
            msg.state_file = True
            unfinal = {f.recipient for f in msg.failures}  # their DSN is not queued yet
            return self.aspool.write_state(msg.qid, msg.state, durable=durable, unfinal=unfinal)

        return self._io(msg, go)

    def _remove(self, msg: Message) -> defer.Deferred:
        return self._io(msg, lambda: self.aspool.remove(msg.qid, state_file=msg.state_file))

    def _note_destination(self, key: str, outcomes, started: float) -> None:
        """No hop answered (connection refused, timeouts, DNS): mark it dead."""
        if outcomes and all(o.kind == "deferred" and not o.remote for o in outcomes):
            window = min(self.config.delivery.retry_min, DEAD_WINDOW)
            self.dead[key] = (self.now() + window, outcomes[0].reply, started)
        else:
            self.dead.pop(key, None)

    # -- recording results ------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        d = self.config.delivery
        base = min(d.retry_max, d.retry_min * (2 ** max(0, attempts - 1)))
        return max(1.0, base * (1 + self.random.uniform(-JITTER, JITTER)))

    def _drop_data(self, msg: Message) -> None:
        if msg.data is not None:
            self.held_bytes -= len(msg.data)
            msg.data = None

    def _job_finished(self, job: Job, outcomes) -> None:
        msg = job.msg
        self._unlist(job)
        now = self.now()
        by_addr = {o.address: o for o in outcomes}
        d = self.config.delivery
        expires = msg.env.arrival + d.max_lifetime
        for r in job.recipients:
            o = by_addr.get(r.address)
            if o is None:
                continue
            if not o.suspended:
                msg.tried = True
            r.attempts += 1
            r.reply = o.reply
            kind = o.kind
            status = o.status
            if kind == "deferred" and now >= expires and not msg.deleted:
                kind = "bounced"
                status = "5.4.7"
                self.counters.expired += 1
            if not o.suspended or kind != "deferred":  # a suspension is not an attempt worth keeping
                r.history.append({"t": round(now, 3), "relay": o.relay, "status": kind, "reply": o.reply})
            if len(r.history) > MAX_HISTORY:
                del r.history[: len(r.history) - MAX_HISTORY]
            if kind in ("delivered", "bounced"):
                msg.settled = True
            if kind == "delivered":
                r.status = DELIVERED
                self.counters.delivered += 1
            elif kind == "bounced":
                r.status = BOUNCED
                self.counters.bounced += 1
                if status == "5.4.7":
                    diag = f"message expired after {d.max_lifetime / 86400:g} days in the queue; last error: {o.reply}"
                else:
                    diag = o.reply
                msg.failures.append(bouncemod.Failure(
                    recipient=r.address, status=status, diagnostic=diag, original=r.orcpt,
                    remote_mta=o.remote_mta, diagnostic_type="smtp" if o.remote else "x-unix",
                    last_attempt=now,
                ))
            else:
                r.status = DEFERRED
                self.counters.deferred += 1
                r.next_attempt = min(now + self.backoff(r.attempts), max(expires, now + 1.0))
            delay = now - msg.env.arrival
            log.info(
                "{queue_id}: to=<{to}>{_orig}, relay={relay}, delay={delay:.1f}, status={status} ({reply})",
                queue_id=msg.qid, to=r.address,
                orig_to=r.orcpt if r.orcpt and r.orcpt != r.address else None,
                _orig=f", orig_to=<{logsafe.address(r.orcpt)}>" if r.orcpt and r.orcpt != r.address else "",
                relay=o.relay, delay=delay, status="sent" if kind == "delivered" else kind,
                reply=o.reply, recipient=r.address, kind=kind, attempts=r.attempts,
            )
        msg.active -= 1
        if msg.active == 0:
            self._drop_data(msg)
            self._start_finalize(msg)

    def _simple_outcome(self, msg: Message) -> bool:
        """Nothing to record but the attempt itself: no DSN, no notice, no
        administrator's request (the common cases get a short path)."""
        if msg.deleted or msg.bounce_now or msg.failures or getattr(self.svc.disk, "stopped", False):
            return False
        dw = self.config.delivery.delay_warning
        return not (dw > 0 and not msg.state.warned and self.now() - msg.env.arrival >= dw
                    and any(r.status == DEFERRED for r in msg.state.recipients))

    def _start_finalize(self, msg: Message) -> None:
        msg.busy = True
        if self._simple_outcome(msg):
            if msg.state.done:
                # delivered (or bounced without a DSN to send): remove it
                d = self._remove(msg)
                d.addCallback(lambda _: self._forget(msg, "all recipients final"))
            elif not (msg.settled or msg.tried):
                # only suspended (a dead destination, nothing tried): the
                # record stays in memory; after a crash it is simply tried again
                self._after_finalize(msg)
                return
            else:
                d = defer.ensureDeferred(self._finalize(msg))
        else:
            d = defer.ensureDeferred(self._finalize(msg))
        self._inflight.add(d)

        def failed(f):
            if f.check(OSError):
                log.error("{queue_id}: cannot record the outcome ({error}); trying again in {delay:g}s",
                          queue_id=msg.qid, error=f.getErrorMessage(), delay=self.finalize_retry)
            else:
                log.failure("{queue_id}: finalising failed", f, queue_id=msg.qid)
            return True

        d.addCallbacks(lambda _: False, failed)
        d.addBoth(lambda retry: (self._inflight.discard(d), self._after_finalize(msg, retry)))

    def _refinalize(self, msg: Message) -> None:
        """A DSN or state write that failed (a full disk): record it now."""
        self._refinalize_calls.pop(msg.qid, None)
        if msg.qid in self.messages and not (msg.active or msg.busy) and self.running:
            self._start_finalize(msg)

    async def _finalize(self, msg: Message) -> None:
        if getattr(self.svc.disk, "stopped", False):
            # past the shutdown bound: nothing can be recorded any more; the
            # recipients are still "not delivered" on disk and are retried
            log.info("{queue_id}: attempt ended after shutdown; it is retried at the next start",
                     queue_id=msg.qid)
            return
        now = self.now()
        if msg.deleted:
            await self._remove(msg)
            self._forget(msg, "deleted by the administrator")
            return
        if msg.bounce_now:
            await self._admin_bounce(msg)
            return
        if msg.failures:
            await self._send_dsn(msg, bouncemod.FAILED, msg.failures)
            msg.failures = []
        dw = self.config.delivery.delay_warning
        if (dw > 0 and not msg.state.warned and now - msg.env.arrival >= dw
                and any(r.status == DEFERRED for r in msg.state.recipients)):
            delayed = [
                bouncemod.Failure(r.address, _status_of(r.reply, "4.0.0"), r.reply, original=r.orcpt,
                                  last_attempt=now,
                                  will_retry_until=msg.env.arrival + self.config.delivery.max_lifetime)
                for r in msg.state.recipients if r.status == DEFERRED
            ]
            await self._send_dsn(msg, bouncemod.DELAYED, delayed)
            msg.state.warned = True
            msg.settled = True  # the notice is sent: never a second one
        if msg.state.done:
            await self._remove(msg)
            self._forget(msg, "all recipients final")
        elif msg.settled or msg.tried:
            # the flags are cleared only once written: a write that fails (a
            # full disk) is made again with the same outcome, never dropped
            await self._write(msg, durable=msg.settled)
            msg.settled = msg.tried = False
        # else: only suspended (a dead destination, nothing tried): the
        # record stays in memory; after a crash it is simply tried again

    def _after_finalize(self, msg: Message, retry: bool = False) -> None:
        """The end of every busy step: what an administrator asked for
        meanwhile (recorded in State.pending) is applied here."""
        msg.busy = False
        if msg.qid in self.messages:
            if retry and self.running:
                # what happened is only in memory: record it before anything else
                old = self._refinalize_calls.pop(msg.qid, None)
                if old is not None and old.active():
                    old.cancel()
                self._refinalize_calls[msg.qid] = self.reactor.callLater(
                    self.finalize_retry, self._refinalize, msg)
            elif msg.leaving:
                # a delete or bounce that came during this step; when shutting
                # down it is on disk and applied at the next start
                if self.running and not msg.active and not getattr(self.svc.disk, "stopped", False):
                    self._start_finalize(msg)
                    return
            else:
                if msg.state.pending == "retry" and not msg.active:
                    self._apply_retry(msg)
                    self._schedule(msg, at=self.now())
                else:
                    self._schedule(msg)
        self._check_idle()

    def _forget(self, msg: Message, why: str) -> None:
        self.messages.pop(msg.qid, None)
        self._drop_data(msg)
        call = self._refinalize_calls.pop(msg.qid, None)
        if call is not None and call.active():
            call.cancel()
        self.counters.removed += 1
        log.info("{queue_id}: removed ({why})", queue_id=msg.qid, why=why)

    # -- DSNs -------------------------------------------------------------------------------
    async def _send_dsn(self, msg: Message, kind: str, failures: list) -> None:
        if not msg.env.sender:
            for f in failures:
                log.warn("{queue_id}: undeliverable message from <> (a bounce) to <{to}> discarded: "
                         "{reason}", queue_id=msg.qid, to=f.recipient, reason=f.diagnostic)
            return
        try:
            headers = await self.aspool.run(self.aspool.spool.read_headers, msg.qid)
        except OSError:
            headers = b""
        now = self.now()
        data = bouncemod.build_report(
            kind=kind, reporting_mta=self.config.hostname, queue_id=msg.qid, sender=msg.env.sender,
            arrival=msg.env.arrival, failures=failures, original_headers=headers, now=now,
        )
        env = spoolmod.Envelope(
            queue_id=spoolmod.new_id(), sender="", recipients=[msg.env.sender], arrival=now,
            orcpts=[None], client={"proto": "dsn"}, extra={"dsn": kind, "for": msg.qid},
        )
        entry = await self.aspool.inject(env, data)
        self.counters.dsn_sent += 1
        log.info("{queue_id}: sender {kind} notification: {dsn_id}", queue_id=msg.qid,
                 kind="non-delivery" if kind == bouncemod.FAILED else "delay", dsn_id=env.queue_id)
        log.info("{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt} (delivery status notification for {orig})",
                 queue_id=env.queue_id, sender="", size=entry.size, nrcpt=1, orig=msg.qid, dsn=kind,
                 recipients=env.recipients)
        self.add(entry)

    # -- administration (relayctl) ------------------------------------------------------------
    def get(self, qid: str) -> Message:
        try:
            return self.messages[qid]
        except KeyError:
            raise UnknownMessage(qid)

    # Every action is applied durably or refused (ActionFailed, nothing
    # changed).  A message that is busy (an attempt under way, or its outcome
    # being recorded) gets the action recorded in its state file at once
    # (State.pending, or the hold flag), and the end of the busy step
    # (_after_finalize) applies it; so does the next start after a restart
    # in between (_resume).  Jobs still waiting for a slot are withdrawn, so
    # hold, delete and bounce take effect without waiting for a slot.
    # Each returns the text relayctl shows.

    def _in_progress(self, msg: Message) -> bool:
        return bool(msg.active or msg.busy)

    async def _record(self, msg: Message, what: str, undo) -> None:
        """The durable write of an action; on failure undo() and refuse."""
        try:
            await self._write(msg, durable=True)
        except OSError as e:
            if msg.qid not in self.messages:
                return  # removed meanwhile (delivered, or the action itself applied)
            undo()
            if not self._in_progress(msg):
                self._schedule(msg)
            log.error("{queue_id}: cannot record the administrator's {what}: {error}",
                      queue_id=msg.qid, what=what, error=e.strerror or str(e))
            raise ActionFailed(f"not done: cannot record the {what} ({e.strerror or e}); try again")

    async def hold(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.hold:
            return "already on hold"
        if msg.leaving:
            raise ActionFailed(f"is being {_LEAVING_WORDS[msg.state.pending]}")
        old_pending = msg.state.pending
        msg.state.hold = True
        msg.state.pending = ""  # a retry asked for before is void
        msg.token += 1  # drop it from the heap
        self._withdraw(msg)
        in_progress = msg.attempting or msg.busy

        def undo():
            msg.state.hold = False
            if not msg.state.pending:
                msg.state.pending = old_pending

        await self._record(msg, "hold", undo)
        if not msg.active:
            self._drop_data(msg)
        log.info("{queue_id}: held by the administrator", queue_id=qid)
        return "on hold (the delivery in progress finishes)" if in_progress else "on hold"

    async def release(self, qid: str) -> str:
        msg = self.get(qid)
        if not msg.hold:
            return "was not on hold"
        msg.state.hold = False

        def undo():
            msg.state.hold = True

        await self._record(msg, "release", undo)
        log.info("{queue_id}: released from hold", queue_id=qid)
        self._schedule(msg)
        return "released"

    def retry(self, qid: str) -> defer.Deferred:
        """Fires with the text; an attempt is made at once (the destination's
        dead-destination suspension forgotten), or right after the busy step."""
        return defer.ensureDeferred(self._retry(qid))

    async def _retry(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.hold:
            raise ActionFailed("is on hold: release it first (relayctl queue release)")
        if msg.leaving:
            raise ActionFailed(f"is being {_LEAVING_WORDS[msg.state.pending]}")
        self._forget_dead(msg)
        for job in msg.jobs or ():
            job.forced = self.now()  # not suspended by what attempts started before found
        if self._in_progress(msg):
            if not msg.attempting and not msg.busy:
                log.info("{queue_id}: retry requested (waiting for a delivery slot)", queue_id=qid)
                return "waiting for a delivery slot: attempted as soon as one is free"
            msg.state.pending = "retry"

            def undo():
                if msg.state.pending == "retry":
                    msg.state.pending = ""

            await self._record(msg, "retry", undo)
            log.info("{queue_id}: retry requested (after the delivery in progress)", queue_id=qid)
            return "will be attempted again when the delivery in progress ends"
        self._apply_retry(msg)
        log.info("{queue_id}: retry requested", queue_id=qid)
        self._schedule(msg, at=self.now())
        return "will be attempted now"

    async def delete(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.deleted:
            return "already being deleted (after the delivery in progress)"
        return await self._leave(msg, "delete")

    async def bounce(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.leaving:
            return f"already being {_LEAVING_WORDS[msg.state.pending]} (after the delivery in progress)"
        return await self._leave(msg, "bounce")

    async def _leave(self, msg: Message, action: str) -> str:
        """delete or bounce: the message leaves the queue."""
        old_pending = msg.state.pending
        msg.state.pending = action
        msg.token += 1
        if not self._in_progress(msg):
            msg.busy = True
            retry = False
            try:
                if action == "delete":
                    await self._remove(msg)
                    self._forget(msg, "deleted by the administrator")
                else:
                    await self._admin_bounce(msg)
            except OSError as e:
                if action == "bounce" and msg.state.done:
                    retry = True  # returned (the DSN is queued); the removal is made again
                else:
                    msg.state.pending = old_pending
                    log.error("{queue_id}: cannot {action} it: {error}", queue_id=msg.qid, action=action,
                              error=e.strerror or str(e))
                    raise ActionFailed(f"not done: {e.strerror or e}; try again")
            finally:
                self._after_finalize(msg, retry)
            return "deleted" if action == "delete" else "returned to the sender"
        self._withdraw(msg)

        def undo():
            if msg.state.pending == action:
                msg.state.pending = old_pending

        await self._record(msg, "deletion" if action == "delete" else "bounce", undo)
        log.info("{queue_id}: will be {what} when the delivery in progress ends", queue_id=msg.qid,
                 what=_LEAVING_WORDS[action])
        if action == "delete":
            return "will be deleted when the delivery in progress ends"
        return "will be returned to the sender when the delivery in progress ends"

    async def _admin_bounce(self, msg: Message) -> None:
        """A DSN for every open recipient (and the attempt's own failures),
        then removal.  A failure before the DSN is queued changes nothing."""
        now = self.now()
        open_rcpts = [r for r in msg.state.recipients if not r.final]
        failures = list(msg.failures) + [
            bouncemod.Failure(
                r.address, "5.0.0", "message returned to sender by the mail administrator"
                + (f"; last error: {r.reply}" if r.reply else ""), original=r.orcpt, last_attempt=now,
                diagnostic_type="x-relay")
            for r in open_rcpts]
        if failures:
            await self._send_dsn(msg, bouncemod.FAILED, failures)
        msg.failures = []
        for r in open_rcpts:
            r.status = BOUNCED
            r.history.append({"t": round(now, 3), "relay": "none", "status": "bounced",
                              "reply": "returned to sender by the administrator"})
            self.counters.bounced += 1
        msg.settled = True
        await self._remove(msg)
        self._forget(msg, "returned to sender by the administrator")

    # -- inspection -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"active": 0, "deferred": 0, "hold": 0}
        for m in self.messages.values():
            out[m.queue_name] += 1
        return out


def _status_of(reply: str, default: str) -> str:
    import re

    m = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", reply or "")
    return m.group(1) if m else default
