"""At most ``delivery.max_per_destination`` connections to one host.

The queue limits attempts per destination (a domain, a smarthost, a route)
before it knows which hosts they will reach; several domains often share
one MX host.  This counts the outbound connections per host address and
port at connect time, so that no host gets more than the limit from us
whatever the domains: an attempt that would exceed it waits for a
connection to that host to end (sessions parked for reuse are asked to
close first).  A connection holds its slot from before the connect until
its socket is gone, parked or not.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet import defer


class HostLimit:
    def __init__(self, limit: Callable[[], int]):
        self._limit = limit  # read at each use: a reload changes it
        self.open: dict[tuple[str, int], int] = {}
        self.waiting: dict[tuple[str, int], deque[defer.Deferred[None]]] = {}

    def count(self, key: tuple[str, int]) -> int:
        return self.open.get(key, 0)

    def acquire(self, key: tuple[str, int]) -> defer.Deferred[None]:
        """Fires when a connection to key may be made (at once if under the limit)."""
        if self.open.get(key, 0) < max(1, self._limit()) and not self.waiting.get(key):
            self.open[key] = self.open.get(key, 0) + 1
            return defer.succeed(None)

        def cancel(d: defer.Deferred[None]) -> None:
            q = self.waiting.get(key)
            if q is not None and d in q:
                q.remove(d)
                if not q:
                    del self.waiting[key]

        d: defer.Deferred[None] = defer.Deferred(cancel)
        self.waiting.setdefault(key, deque()).append(d)
        return d

    def release(self, key: tuple[str, int]) -> None:
        """A connection to key is gone: hand its slot to the next waiter."""
        n = self.open.get(key, 0) - 1
        q = self.waiting.get(key)
        while q and n < max(1, self._limit()):
            d = q.popleft()
            if not q:
                del self.waiting[key]
            n += 1
            d.callback(None)
            q = self.waiting.get(key)
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)
