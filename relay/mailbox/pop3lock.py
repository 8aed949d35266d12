"""Keeping a POP3 session's mailbox lock fresh while the session lives.

The dot-lock part of the lock (relay.mailbox.mboxlock) is judged stale by
another host when it has not been touched for mboxlock.STALE_AFTER seconds,
so a logged-in session touches it every mboxlock.REFRESH_EVERY seconds,
whether the client is busy or idle.  The touch is file-system work (on NFS
a round trip), so it runs in the disk pool (``run_blocking``); the timer is
the factory's reactor (task.Clock in tests).  The lock's release stops the
timer (``MailboxLock.on_release``), so no timer outlives its session.

A lock found no longer ours (another host broke it: this host was cut off
from the storage for longer than the stale age) is logged once; the
session goes on (the messages it deletes at QUIT that are already gone
count as deleted, so nothing is lost), and the operator learns that the
stale age is too short for that storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.mailbox import mboxlock

log = Logger()


def keep_fresh(lock: mboxlock.MailboxLock, reactor: Any,
               run_blocking: Callable[..., defer.Deferred[Any]], user: str,
               every: float = mboxlock.REFRESH_EVERY) -> None:
    """Touch lock every `every` seconds until it is released."""
    state: dict[str, Any] = {"call": None, "stopped": False, "warned": False}

    def tick() -> None:
        state["call"] = None
        if state["stopped"]:
            return
        run_blocking(lock.refresh).addCallbacks(done, failed)

    def done(ours: bool) -> None:
        if not ours and lock.held and not state["warned"]:
            state["warned"] = True
            log.warn("pop3: the mailbox lock of {user} was taken by another session "
                     "(judged stale: storage out of reach for longer than {stale}s?)",
                     user=user,
                     stale=lock.dotlock.stale_after)
        schedule()

    def failed(f: Any) -> None:
        log.failure("pop3: refreshing the mailbox lock of {user} failed", f, user=user)
        schedule()

    def schedule() -> None:
        if not state["stopped"] and lock.held:
            state["call"] = reactor.callLater(every, tick)

    def stop() -> None:
        state["stopped"] = True
        call, state["call"] = state["call"], None
        if call is not None and call.active():
            call.cancel()

    broke = lock.dotlock.broke
    if broke is not None:
        log.info("pop3: broke a stale mailbox lock of {user}: host={host} pid={pid} time={time}",
                 user=user, host=broke.host, pid=broke.pid, time=broke.time)
    lock.on_release = stop
    schedule()
