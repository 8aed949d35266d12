"""One idle timer, moved lazily (the SMTP server's session timeout, the SMTP
client's reply timeout, the POP3 server's inactivity timeout).

Moving a deadline on every command or reply with ``DelayedCall.reset`` (or a
callLater and a cancel) is a heap operation each time, a measurable part of
the reactor's time with a new connection per message.  Here ``set`` only
writes the deadline while the pending call fires no later than it; when the
call fires early it sleeps again for the rest.  So a session costs one
callLater per timeout period, not one per line.

Time comes from the given clock (``IReactorTime``): tests drive it with
``task.Clock``.
"""

from __future__ import annotations

from typing import Callable


class IdleTimer:
    """Calls ``expired()`` once the deadline last ``set`` has passed.

    ``pause()`` drops the deadline (the peer waits for us: disk, an AUTH
    delay, no reply expected): a pending call that fires then just ends, and
    the next ``set`` starts a new one.  ``cancel()`` also stops the pending
    call (connection lost)."""

    __slots__ = ("clock", "expired", "deadline", "_call")

    def __init__(self, clock, expired: Callable[[], None]):
        self.clock = clock
        self.expired = expired
        self.deadline: float | None = None
        self._call = None

    def set(self, timeout: float) -> None:
        """The deadline is timeout seconds from now (earlier or later than before)."""
        self.deadline = deadline = self.clock.seconds() + timeout
        c = self._call
        if c is not None:
            if c.getTime() <= deadline:
                return
            c.cancel()  # a shorter timeout than the pending call's
        self._call = self.clock.callLater(timeout, self._fire)

    def pause(self) -> None:
        self.deadline = None

    def cancel(self) -> None:
        self.deadline = None
        c, self._call = self._call, None
        if c is not None and c.active():
            c.cancel()

    @property
    def armed(self) -> bool:
        return self._call is not None

    def _fire(self) -> None:
        self._call = None
        deadline = self.deadline
        if deadline is None:
            return
        left = deadline - self.clock.seconds()
        if left > 0:
            self._call = self.clock.callLater(left, self._fire)
            return
        self.deadline = None
        self.expired()
