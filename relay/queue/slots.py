"""Delivery slots: how many jobs run at once, in all and per destination.

The runner keeps two pools: the remote one (delivery.max_concurrency
connections, delivery.max_per_destination per destination) and a small
local one.  Jobs wait per destination and are started round-robin, so one
destination's backlog never starves the others; a destination under
delivery.pacing (relay.queue.pacing) waits until its window moves.
"""

from __future__ import annotations

from collections import deque

from relay.queue.message import Job
from relay.queue.pacing import Pacer


class SlotPool:
    """Concurrency limits: global and per destination, round-robin fair."""

    def __init__(self, limit: int, per_dest: int):
        self.limit = limit
        self.per_dest = per_dest
        self.running = 0
        self.by_dest: dict[str, int] = {}
        self.waiting: dict[str, deque[Job]] = {}
        self.ready: deque[str] = deque()
        self.pacer: Pacer | None = None  # delivery.pacing (relay.queue.pacing): the remote pool's

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
            if self.pacer is not None and not self.pacer.take(key):  # its jobs wait for the window to move
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

    def take_waiting(self) -> list[Job]:
        """Every job still waiting, removed from the pool (at stop)."""
        waiting = [j for q in self.waiting.values() for j in q]
        self.waiting.clear()
        self.ready.clear()
        return waiting
