"""Limits shared by a fleet of relays, kept in Redis (``limits.redis``).

Why Redis and why this way: relays of a fleet share nothing but counters
(as KumoMTA and Haraka keep their throttles in Redis); a per-IP connection
limit or a per-sender rate is only a limit if every node counts into one
place.  The in-process tables (relay.common.connlimit, relay.common.ratelimit)
stay the source of truth for this machine and the fallback: every count
that Redis admits is also counted there, so when Redis goes away the relay
goes on with local limits that already know this node's share.

Client: txredisapi (Twisted-native, non-blocking: no thread, nothing that
could wait on the path of a 250).  One connection per process (each worker
of ``workers > 1`` has its own and its own node id: no hop through the
master on every MAIL and RCPT, and a worker that dies simply stops its
heartbeat).  Every call has a short time limit (``limits.redis_timeout``);
when Redis is not connected, errs or is slow, the answer is the local one
at once: the relay never refuses mail because of Redis, it counts less
strictly (each node its own limit) until Redis is back.  The outage is
logged once (and its end once), counted in ``relay_limits_redis_errors_total``
and shown by ``relay_limits_redis_up``; txredisapi reconnects by itself.

Rate limits: the same sliding window as RateTable (two fixed windows
aligned on the window length, ``previous * (1 - elapsed / window) +
current``), one Redis key per limit, key and window start, INCRBY'd and
given an expiry of two windows, all wants of a command checked and counted
in one Lua script (atomic: two nodes cannot both take the last one).  The
time is the caller's (the reactor's wall clock; NTP keeps the nodes' windows
aligned); "logged once per window" is a key too, so a fleet logs a client's
first refusal once.

Connection counts: one hash per protocol and client address, one field
per node (its open connections there).  A node is alive while its entry in
the ``nodes`` sorted set (score: Redis's clock + ``NODE_TTL``) is fresh; a
heartbeat renews it every ``NODE_TTL / 3``.  The acquire script sums the
fields of live nodes only and deletes those of dead ones: a node that dies
(SIGKILL, power) leaves no count behind for more than ``NODE_TTL``.  A node
id is new per process start, so a restarted node never inherits its
predecessor's counts.  A release whose answer was lost (Redis down) marks
its key dirty: when Redis is back, the node writes its true count there.

Not supported: Redis Cluster (a script's keys are in different slots).
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Any, Callable

from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import provider

from relay.common.ratelimit import RateTable, Refusal, Usage, Want
from relay.common.redisurl import RedisTarget

log = Logger(namespace="relay.limits")

NODE_TTL = 30.0  # seconds a node counts for without a heartbeat
HASH_TTL = 86400  # a connection-count hash nobody touched for a day is dropped
RECONNECT_MAX_DELAY = 5.0  # seconds between reconnection attempts, at most
RESTART_AFTER_REFUSAL = 60.0  # seconds before trying again a password or database Redis refused

# KEYS: for each want: current window, previous window, logged-in-this-window.
# ARGV: n, now, then for each want: max, window, window start.
RATE_SCRIPT = """
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local count = (#ARGV - 2) / 3
for i = 0, count - 1 do
  local max = tonumber(ARGV[3 + 3 * i])
  local window = tonumber(ARGV[4 + 3 * i])
  local start = tonumber(ARGV[5 + 3 * i])
  local cur = tonumber(redis.call('GET', KEYS[1 + 3 * i]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2 + 3 * i]) or '0')
  local elapsed = math.min(math.max(now - start, 0), window)
  local est = prev * (1 - elapsed / window) + cur
  if est + n > max then
    local first = redis.call('SET', KEYS[3 + 3 * i], '1', 'NX', 'PX', math.ceil(window * 1000) + 1000)
    if first then first = 1 else first = 0 end
    return {i + 1, math.ceil(est), first}
  end
end
for i = 0, count - 1 do
  local window = tonumber(ARGV[4 + 3 * i])
  redis.call('INCRBY', KEYS[1 + 3 * i], n)
  redis.call('PEXPIRE', KEYS[1 + 3 * i], math.ceil(2 * window * 1000) + 1000)
end
return {0, 0, 0}
"""

# KEYS: the address's hash, the nodes set.  ARGV: node, limit, node ttl, hash ttl.
ACQUIRE_SCRIPT = """
local t = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[2], t + tonumber(ARGV[3]), ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  local f, c = all[i], tonumber(all[i + 1])
  if f == ARGV[1] then
    total = total + c
  else
    local s = redis.call('ZSCORE', KEYS[2], f)
    if s and tonumber(s) >= t then total = total + c else redis.call('HDEL', KEYS[1], f) end
  end
end
if total >= tonumber(ARGV[2]) then return {0, total} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, total}
"""

# KEYS: the address's hash.  ARGV: node.
RELEASE_SCRIPT = """
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if c <= 1 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
return 1
"""

# KEYS: the address's hash.  ARGV: node, count, hash ttl.
SET_SCRIPT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS: the nodes set.  ARGV: node, node ttl.
HEARTBEAT_SCRIPT = """
local t = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t - 1)
return 1
"""


@provider(ILogObserver)
def _drop(event: dict) -> None:
    pass


class _QuietClientService(ClientService):
    """txredisapi's reconnecting service without its line per attempt ("Scheduling
    retry 5 to connect ..." every few seconds of an outage): the link says once
    that Redis is away, and once that it is back."""

    _log = Logger(namespace="relay.limits.redis", observer=_drop)


class Unavailable(Exception):
    """Redis is not connected: the local limits answer."""


def node_id() -> str:
    """This process's name in Redis: host, pid, and a random part (a new id per start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class RedisLink(service.Service):
    """The connection to Redis, whether it is up, its log lines and counters."""

    def __init__(self, target: RedisTarget, *, prefix: str, timeout: float, reactor: Any,
                 node_ttl: float = NODE_TTL, node: str | None = None):
        self.target = target
        self.prefix = prefix.encode("utf-8", "surrogateescape")
        self.timeout = timeout
        self.reactor = reactor
        self.node_ttl = node_ttl
        self.node = node or node_id()
        self.nodes_key = self.prefix + b"nodes"
        self.up: bool | None = None  # None: no answer yet (nothing logged)
        self.errors = 0  # calls answered locally: Redis erred, was slow or not connected
        self.on_up: list[Callable[[], None]] = []  # called when Redis answers again after an outage
        self._handler: Any = None
        self._started = 0.0
        self._grace = 2 * max(timeout, 1.0)  # a connection takes up to its connect timeout
        self._first: Any = None
        self._restart_at: float | None = None  # when to connect afresh after a refused AUTH
        self._beat = task.LoopingCall(self.heartbeat)
        self._beat.clock = reactor

    # -- the service -----------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._connect()
        self._started = self.reactor.seconds()
        self._beat.start(self.node_ttl / 3, now=True)
        self._first = self.reactor.callLater(self._grace, self.heartbeat)  # a Redis down at start: say so
        log.info("limits: shared with the fleet in Redis {where} (node {node})", where=str(self.target),
                 node=self.node)

    def _connect(self) -> None:
        """A lazy, reconnecting txredisapi connection.  No reply timeout of its own
        (a timeout during its AUTH or SELECT would stop its reconnecting for good):
        ``run`` times every call and gives a connection that does not answer up."""
        import txredisapi  # here: only a relay that uses Redis imports the client

        txredisapi.ClientService = _QuietClientService  # the pool slots it makes from now on
        t = self.target
        common = dict(dbid=t.db or None, reconnect=True, password=t.password, username=t.username,
                      connectTimeout=max(self.timeout, 1.0), replyTimeout=None)
        if t.path:
            self._handler = txredisapi.lazyUnixConnection(t.path, **common)
        else:
            self._handler = txredisapi.lazyConnection(t.host, t.port, **common)
        first = self._handler._factory.deferred  # the first connection: a refused AUTH or SELECT fails it
        if first is not None:
            first.addErrback(lambda f: self._failed(f.getErrorMessage(), starting=False))
        self._handler._factory.maxDelay = RECONNECT_MAX_DELAY
        self._handler._factory.initialDelay = 0.2

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._beat.running:
            self._beat.stop()
        if self._first is not None and self._first.active():
            self._first.cancel()
        h, self._handler = self._handler, None
        if h is None:
            return None
        d: defer.Deferred = defer.succeed(None)
        if h._factory.size:  # leave the fleet now rather than after NODE_TTL
            d = h.zrem(self.nodes_key, self.node)
            d.addTimeout(self.timeout, self.reactor)
            d.addErrback(lambda _: None)
        return d.addCallback(lambda _: h.disconnect()).addErrback(lambda _: None)

    # -- calls -------------------------------------------------------------------
    def connected(self) -> bool:
        return self._handler is not None and self._handler._factory.size > 0

    def run(self, script: str, keys: list[bytes], args: list[Any]) -> defer.Deferred:
        """The script's answer, or a failure within ``timeout`` (Unavailable, a Redis
        error, a timeout): the caller then decides locally."""
        if not self.connected():
            self._failed("not connected")
            return defer.fail(Unavailable())
        try:
            d = self._handler.eval(script, keys, args)
        except Exception as e:  # noqa: BLE001 - e.g. not connected between the check and the call
            self._failed(str(e))
            return defer.fail(e)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._ok, self._error)
        return d

    def _ok(self, result: Any) -> Any:
        if self.up is not True:
            if self.up is False:
                log.info("limits: Redis {where} is back: limits are shared by the fleet again",
                         where=str(self.target))
            self.up = True
            for f in list(self.on_up):
                f()
        return result

    def _error(self, f: Failure) -> Failure:
        if f.check(defer.TimeoutError, defer.CancelledError):
            self._failed("no answer within the time limit")
            self._drop()
        else:
            self._failed(f.getErrorMessage() or f.type.__name__)
        return f

    def _drop(self) -> None:
        """A Redis that does not answer: give its connection up (and what was sent on it),
        so that the next checks are answered locally at once, not after the time
        limit each; the client reconnects, and the link is up again when Redis answers."""
        if self._handler is None:
            return
        for conn in list(self._handler._factory.pool):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def _starting(self) -> bool:
        """Not connected yet, since a start too recent to call it an outage."""
        return self.up is None and self.reactor.seconds() < self._started + self._grace

    def _failed(self, why: str, starting: bool = True) -> None:
        self.errors += 1
        if starting and self._starting():
            return
        if self.up is not False:
            self.up = False
            log.warn("limits: Redis {where} unavailable ({why}): each node counts with its local limits "
                     "until it is back", where=str(self.target), why=why)

    def heartbeat(self) -> defer.Deferred:
        """Keep this node alive in the nodes set (and find out that Redis is back)."""
        if self._starting() and not self.connected():
            return defer.succeed(None)
        if self._handler is not None and self._handler._factory.stopped and self.running:
            # txredisapi stops for good after a refused AUTH or SELECT: start afresh, once a minute
            now = self.reactor.seconds()
            if self._restart_at is None:
                self._restart_at = now + RESTART_AFTER_REFUSAL
            elif now >= self._restart_at:
                self._restart_at = None
                self._handler.disconnect().addErrback(lambda _: None)
                self._connect()
        d = self.run(HEARTBEAT_SCRIPT, [self.nodes_key], [self.node, int(self.node_ttl)])
        return d.addErrback(lambda _: None)


class FleetCounter:
    """A relay.common.connlimit counter (acquire / release / count / counts)
    whose limit also holds across the fleet: ``confirm`` asks Redis after the
    local ``acquire`` admitted (see the module docstring)."""

    def __init__(self, inner: Any, namespace: str, link: RedisLink):
        self.inner = inner
        self.namespace = namespace
        self.link = link
        self._held: Counter[str] = Counter()  # connections counted in Redis
        self._pending: Counter[str] = Counter()  # confirms not answered yet
        self._gone: Counter[str] = Counter()  # released while their confirm was pending
        self._uncounted: Counter[str] = Counter()  # releases owed no Redis decrement
        self._dirty: set[str] = set()  # Redis may be wrong about these: rewrite when it is back
        link.on_up.append(self._resync)

    def _key(self, key: str) -> bytes:
        return self.link.prefix + f"conn:{self.namespace}:{key}".encode("utf-8", "surrogateescape")

    def acquire(self, key: str, limit: int) -> tuple[bool, int]:
        return self.inner.acquire(key, limit)

    def confirm(self, key: str, limit: int) -> defer.Deferred | None:
        """After an admitting ``acquire``: fires (admitted, count across the fleet).
        Refused: the caller refuses the connection and releases it as usual.
        None: Redis is not connected, the local answer stands."""
        link = self.link
        if not link.connected():
            link._failed("not connected")
            self._uncounted[key] += 1
            return None
        self._pending[key] += 1
        d = link.run(ACQUIRE_SCRIPT, [self._key(key), link.nodes_key],
                     [link.node, limit, int(link.node_ttl), HASH_TTL])

        def answer(r: Any) -> tuple[bool, int]:
            self._pending[key] -= 1
            ok, total = bool(r[0]), int(r[1])
            if self._gone[key] > 0:  # its connection is closed already
                self._gone[key] -= 1
                if ok:
                    self._send_release(key)
                self._tidy(key)
                return ok, total
            if ok:
                self._held[key] += 1
            else:
                self._uncounted[key] += 1
            self._tidy(key)
            return ok, total

        def failed(_: Failure) -> tuple[bool, int]:
            self._pending[key] -= 1
            self._dirty.add(key)  # counted or not: unknown
            if self._gone[key] > 0:
                self._gone[key] -= 1
            else:
                self._uncounted[key] += 1
            self._tidy(key)
            return True, self.inner.count(key)

        return d.addCallbacks(answer, failed)

    def release(self, key: str) -> None:
        self.inner.release(key)
        if self._uncounted[key] > 0:
            self._uncounted[key] -= 1
        elif self._held[key] > 0:
            self._held[key] -= 1
            self._send_release(key)
        elif self._pending[key] > 0:
            self._gone[key] += 1
        self._tidy(key)

    def _tidy(self, key: str) -> None:
        for c in (self._held, self._pending, self._gone, self._uncounted):
            if c[key] <= 0:
                del c[key]

    def _send_release(self, key: str) -> None:
        d = self.link.run(RELEASE_SCRIPT, [self._key(key)], [self.link.node])
        d.addErrback(self._mark_dirty, key)

    def _mark_dirty(self, _: Failure, key: str) -> None:
        self._dirty.add(key)

    def _resync(self) -> None:
        """Redis is back: write this node's true counts of the keys it may be wrong about."""
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            if self._pending[key]:
                self._dirty.add(key)
                continue
            d = self.link.run(SET_SCRIPT, [self._key(key)], [self.link.node, self._held[key], HASH_TTL])
            d.addErrback(self._mark_dirty, key)
            self._tidy(key)

    def count(self, key: str) -> int:
        return self.inner.count(key)

    def counts(self) -> dict[str, int]:
        return self.inner.counts()


class FleetRates:
    """The [limits] table of relay.common.ratelimit, counted across the fleet:
    ``check`` answers with a Deferred from Redis, or at once from the local
    table when Redis is not there.  The rest (status, pacing) is the local table's."""

    def __init__(self, local: RateTable, link: RedisLink):
        self.local = local
        self.link = link

    def _keys(self, want: Want, start: float) -> list[bytes]:
        base = self.link.prefix + f"rate:{want.limit}:{want.window!r}:".encode()
        name = want.key.encode("utf-8", "surrogateescape")
        return [base + f"{start!r}:".encode() + name, base + f"{start - want.window!r}:".encode() + name,
                base + f"logged:{start!r}:".encode() + name]

    def check(self, wants: list[Want], now: float, n: int = 1) -> Refusal | None | defer.Deferred:
        if not wants:
            return None
        if not self.link.connected():
            self.link._failed("not connected")
            return self.local.take(wants, now, n)
        keys: list[bytes] = []
        args: list[Any] = [n, repr(now)]
        for w in wants:
            start = (now // w.window) * w.window
            keys += self._keys(w, start)
            args += [w.max, repr(w.window), repr(start)]

        def answer(r: Any) -> Refusal | None:
            i, est, first = int(r[0]), int(r[1]), bool(r[2])
            if i:
                return Refusal(wants[i - 1], est, first)
            self.local.add(wants, now, n)
            return None

        return self.link.run(RATE_SCRIPT, keys, args).addCallbacks(
            answer, lambda _: self.local.take(wants, now, n))

    def take(self, wants: list[Want], now: float, n: int = 1) -> Refusal | None:
        return self.local.take(wants, now, n)

    def count(self, want: Want, now: float) -> int:
        return self.local.count(want, now)

    def free_at(self, want: Want, now: float) -> float:
        return self.local.free_at(want, now)

    def usage(self, now: float, at_least: float = 0.8) -> list[Usage]:
        return self.local.usage(now, at_least)
