"""Idle outbound SMTP sessions kept for the next message to the same host.

After a clean delivery the session may be parked here for a moment
(Postfix's connection cache); the next delivery with the same key (host,
port, TLS mode and name, AUTH identity: route, user and password, HELO
name, CA file) takes it instead of connecting, greeting, EHLO, STARTTLS and
AUTH again.  One sweeper timer
closes the sessions idle too long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from relay.outbound.clientproto import ClientProtocol
from relay.outbound.dane import Tlsa
from relay.outbound.replies import ConversationError
from relay.outbound.request import Hop


@dataclass(eq=False)
class Parked:
    """A session parked idle: what the next delivery on it needs to know."""

    proto: ClientProtocol
    hop: Hop
    ext: dict[str, str]
    tls: dict[str, Any] | None
    since: float
    uses: int
    timer: float = 0.0  # (reactor time) when it has idled long enough to be closed


# (address, port, host, TLS mode, plaintext only, TLS name, AUTH identity (route, user,
# password digest), HELO name, CA file, the host's TLSA records): a session is only
# ever reused with the same credentials of the same route, and under the same DANE records
CacheKey = tuple[str, int, str, str, bool, str | None, str | None, str, str | None, tuple[Tlsa, ...]]


class ConnectionCache:
    """Idle SMTP sessions kept for a moment after a delivery, so the next
    message to the same host skips the connect, greeting, EHLO, STARTTLS
    and AUTH (Postfix's smtp connection cache: smtp_connection_cache_time_limit
    = 2s, smtp_connection_reuse_time_limit = 300s).

    A session is parked only after a clean end (no transaction open, no
    unanswered command); a parked session that says anything, or dies, is
    dropped; one that idles longer than ``idle`` is closed with QUIT.
    """

    def __init__(self, reactor: Any, idle: float = 2.0, max_age: float = 300.0, max_parked: int = 200):
        self.reactor = reactor
        self.idle = idle
        self.max_age = max_age
        self.max_parked = max_parked
        self._idle: dict[CacheKey, list[Parked]] = {}
        self.reused = 0
        self.closing = False
        # one timer for all parked sessions (not a callLater and a cancel
        # per message): it fires at the earliest end of idleness
        self._sweeper: Any = None  # IDelayedCall

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, key: CacheKey) -> Parked | None:
        lst = self._idle.get(key)
        while lst:
            p = lst.pop()
            if not lst:
                del self._idle[key]
            if p.proto.lost is None and p.proto.idle_clean():
                self.reused += 1
                return p
            self._drop(p)
        return None

    def park(self, key: CacheKey, p: Parked) -> bool:
        if self.closing or len(self) >= self.max_parked or self.reactor.seconds() - p.since > self.max_age:
            return False
        p.timer = self.reactor.seconds() + self.idle  # when it has idled enough
        self._idle.setdefault(key, []).append(p)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle, self._sweep)
        return True

    def _sweep(self) -> None:
        """QUIT the sessions parked for ``idle`` seconds; sleep until the next."""
        self._sweeper = None
        now = self.reactor.seconds()
        first = None
        for key in list(self._idle):
            lst = self._idle[key]
            for p in [p for p in lst if p.timer <= now]:
                lst.remove(p)
                self._quit(p)
            if not lst:
                del self._idle[key]
            else:
                t = min(p.timer for p in lst)
                first = t if first is None else min(first, t)
        if first is not None and not self.closing:
            self._sweeper = self.reactor.callLater(max(0.0, first - now), self._sweep)

    def _quit(self, p: Parked) -> None:
        proto = p.proto
        if proto.lost is not None:
            return
        d = proto.command(b"QUIT", "QUIT", 10)

        def close(_: object) -> None:
            if proto.lost is None:
                proto.tcp.loseConnection()

        d.addBoth(close)

    def evict(self, n: int | None = None, to: tuple[str, int] | None = None) -> int:
        """Close parked sessions at once (QUIT, then close without waiting
        for the reply): the n parked longest (parked sessions count toward
        ``delivery.max_concurrency``), or every one to the host ``to`` =
        (address, port), whose connection slots an attempt needs (HostLimit)."""
        parked = [(key, p) for key, lst in self._idle.items() for p in lst
                  if to is None or (p.hop.address, p.hop.port) == to]
        if n is not None:
            parked = sorted(parked, key=lambda kp: kp[1].timer)[:n]
        for key, p in parked:
            lst = self._idle[key]
            lst.remove(p)
            if not lst:
                del self._idle[key]
            if p.proto.lost is None:
                p.proto.tcp.write(b"QUIT\r\n")
                p.proto.tcp.loseConnection()
        return len(parked)

    def _drop(self, p: Parked) -> None:
        if p.proto.lost is None:
            p.proto.fail(ConversationError("local", "close", "cached connection dropped"))

    def close_all(self) -> defer.Deferred[Any]:
        """At shutdown: QUIT every parked session; fires when all are closed."""
        self.closing = True
        parked = [p for lst in self._idle.values() for p in lst]
        self._idle.clear()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for p in parked:
            self._quit(p)
        if not parked:
            return defer.succeed(None)
        # a peer that does not answer QUIT at once is simply cut off
        def cut_off() -> None:
            for p in parked:
                self._drop(p)

        abort = self.reactor.callLater(2.0, cut_off)

        def stop_abort(r: object) -> object:
            if abort.active():
                abort.cancel()
            return r

        d: defer.Deferred[Any] = defer.DeferredList([p.proto.closed for p in parked], consumeErrors=True)
        d.addBoth(stop_abort)
        return d
