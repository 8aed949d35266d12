"""What the queue runner uses from outside, as typed interfaces.

Twisted's zope interfaces (IReactorTime, IDelayedCall) do not type-check
as such, and the runner's next hop and parked sessions are other stages'
classes (relay.delivery.attempt.Deliverer, relay.outbound.client.ConnectionCache)
that tests replace with stand-ins: these Protocols say what the runner
calls, no more.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import defer

from relay.delivery import routing
from relay.queue.message import Message


class Timer(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The reactor's time (IReactorTime; task.Clock in tests)."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> Timer: ...


class NextHop(Protocol):
    """What carries out an attempt (relay.delivery.attempt.Deliverer)."""

    def attempt(self, msg: Message, dest: routing.Destination, recipients: list[str]) -> defer.Deferred[Any]: ...


class ParkedSessions(Protocol):
    """Idle outbound sessions kept for reuse (relay.outbound.client.ConnectionCache)."""

    def __len__(self) -> int: ...
    def evict(self, n: int | None = None) -> int: ...
    def close_all(self) -> defer.Deferred[Any]: ...


def cancel(call: Timer | None) -> None:
    """Cancel a delayed call that may have run or been cancelled already."""
    if call is not None and call.active():
        call.cancel()
