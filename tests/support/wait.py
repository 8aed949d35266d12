"""Polling with deadlines: tests wait for a condition, never a fixed time.

The default deadline is generous (30 s): a poll returns as soon as its
condition holds, so a wide deadline costs nothing when the code works, and
a CI machine shared by parallel jobs may be many times slower than a
developer's."""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task

DEFAULT_TIMEOUT = 30.0


def poll(cond, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = "condition"):
    """Blocking: call cond() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def apoll(cond, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = "condition"):
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
