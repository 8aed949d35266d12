"""Polling with deadlines: tests wait for a condition, never a fixed time."""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task


def poll(cond, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Blocking: call cond() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def apoll(cond, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """In a Deferred-returning trial test: poll cond() on the reactor."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if isinstance(v, defer.Deferred):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)
