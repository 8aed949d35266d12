"""Outbound pacing (delivery.pacing): at most N deliveries per window to a destination.

Why in the queue and not in the deliverer: a delivery held back by pacing
is not an attempt.  Its job stays waiting in its ``relay.queue.slots.SlotPool``
(no deferral, no retry counted, no backoff) and starts as the window moves;
``relayctl queue show`` / ``queue list`` say it waits and why.  A start
counts when the pool hands the job out (one message to one destination).

The counts are kept in the relay's ``relay.common.ratelimit.RateTable``
(limit "delivery.pacing", keyed by the Destination key): with workers > 1
that table is the master's shared one, so the pace is one for the relay,
not one per worker.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.common.ratelimit import RateTable, Want
from relay.config import Config
from relay.config.ratevalues import Rate
from relay.queue.message import Job
from relay.queue.ports import Clock, Timer, cancel

LIMIT = "delivery.pacing"


class Pacer:
    def __init__(self, table: RateTable, now: Callable[[], float], config: Config):
        self.table = table
        self.now = now
        self.config = config
        self.paced: dict[str, tuple[float, str]] = {}  # destination key -> (when one more fits, why it waits)
        self._call: Timer | None = None
        self._call_at = 0.0

    def rate_for(self, key: str) -> Rate | None:
        star = None
        for k, rate in self.config.delivery.pacing:
            if k == key:
                return rate
            if k == "*":
                star = rate
        return star if key.startswith("mx:") else None

    def take(self, key: str) -> bool:
        """True (and counted) if a delivery to key may start now."""
        rate = self.rate_for(key)
        if rate is None:
            self.paced.pop(key, None)
            return True
        want = Want(LIMIT, key, rate.count, rate.window)
        now = self.now()
        if self.table.take([want], now) is None:
            self.paced.pop(key, None)
            return True
        at = max(self.table.free_at(want, now), now + 0.01)
        self.paced[key] = (at, f"pacing limit {rate.text} for {key}")
        return False

    def waiting(self, key: str) -> str:
        """Why deliveries to key wait ("" if they do not wait for pacing)."""
        entry = self.paced.get(key)
        return entry[1] if entry else ""

    def next_time(self, keys: set[str]) -> float | None:
        """When the first of these paced destinations gets room."""
        ts = [at for k, (at, _) in self.paced.items() if k in keys]
        return min(ts) if ts else None

    def arm(self, keys: set[str], clock: Clock, dispatch: Callable[[], None]) -> None:
        """Call dispatch when the first of these paced destinations gets room."""
        at = self.next_time(keys)
        if at is None:
            return
        if self._call is not None and self._call.active():
            if self._call_at <= at:
                return
            self._call.cancel()
        self._call_at = at
        self._call = clock.callLater(max(0.0, at - self.now()), dispatch)

    def stop(self) -> None:
        cancel(self._call)
        self._call = None

    def waiting_for(self, jobs: list[Job] | None) -> str:
        """Why a message's waiting jobs wait, if for pacing ("" otherwise)."""
        for job in jobs or ():
            text = "" if job.local else self.waiting(job.dest.key)
            if text:
                return text
        return ""
