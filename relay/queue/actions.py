"""The administrator's actions on queued messages: hold, release, retry, delete, bounce.

Every action is applied durably or refused (ActionFailed, nothing
changed).  A message that is busy (an attempt under way, or its outcome
being recorded) gets the action recorded in its state file at once
(State.pending, or the hold flag), and the end of the busy step (the
runner's after_finalize) applies it; so does the next start after a restart
in between (QueueManager._resume).  Jobs still waiting for a slot are
withdrawn, so hold, delete and bounce take effect without waiting for a
slot.  Each returns the text relayctl shows.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from relay.delivery import bounce as bouncemod
from relay.queue.envelope import BOUNCED
from relay.queue.message import LEAVING_WORDS, ActionFailed, Message, UnknownMessage
from relay.queue.msgio import MessageIO
from relay.queue.notices import Notices
from relay.queue.outcomes import Counters

log = Logger(namespace="relay.queue")


class Runner(Protocol):
    """What the actions use of the queue runner (relay.queue.manager.QueueManager)."""

    messages: dict[str, Message]
    io: MessageIO
    notices: Notices
    counters: Counters

    def now(self) -> float: ...
    def schedule(self, msg: Message, at: float | None = None) -> None: ...
    def withdraw(self, msg: Message) -> None: ...
    def drop_data(self, msg: Message) -> None: ...
    def forget_dead(self, msg: Message) -> None: ...
    def apply_retry(self, msg: Message) -> None: ...
    def forget(self, msg: Message, why: str) -> None: ...
    def after_finalize(self, msg: Message, retry: bool = False) -> None: ...


class AdminActions:
    def __init__(self, runner: Runner):
        self.runner = runner

    def get(self, qid: str) -> Message:
        try:
            return self.runner.messages[qid]
        except KeyError:
            raise UnknownMessage(qid)

    async def _record(self, msg: Message, what: str, undo: Callable[[], None]) -> None:
        """The durable write of an action; on failure undo() and refuse."""
        try:
            await self.runner.io.write(msg, durable=True)
        except OSError as e:
            if msg.qid not in self.runner.messages:
                return  # removed meanwhile (delivered, or the action itself applied)
            undo()
            if not msg.in_progress:
                self.runner.schedule(msg)
            log.error("{queue_id}: cannot record the administrator's {what}: {error}",
                      queue_id=msg.qid, what=what, error=e.strerror or str(e))
            raise ActionFailed(f"not done: cannot record the {what} ({e.strerror or e}); try again")

    async def hold(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.hold:
            return "already on hold"
        if msg.leaving:
            raise ActionFailed(f"is being {LEAVING_WORDS[msg.state.pending]}")
        old_pending = msg.state.pending
        msg.state.hold = True
        msg.state.pending = ""  # a retry asked for before is void
        msg.token += 1  # drop it from the heap
        self.runner.withdraw(msg)
        in_progress = msg.attempting or msg.busy

        def undo() -> None:
            msg.state.hold = False
            if not msg.state.pending:
                msg.state.pending = old_pending

        await self._record(msg, "hold", undo)
        if not msg.active:
            self.runner.drop_data(msg)
        log.info("{queue_id}: held by the administrator", queue_id=qid)
        return "on hold (the delivery in progress finishes)" if in_progress else "on hold"

    async def release(self, qid: str) -> str:
        msg = self.get(qid)
        if not msg.hold:
            return "was not on hold"
        msg.state.hold = False

        def undo() -> None:
            msg.state.hold = True

        await self._record(msg, "release", undo)
        log.info("{queue_id}: released from hold", queue_id=qid)
        self.runner.schedule(msg)
        return "released"

    def retry(self, qid: str) -> defer.Deferred[str]:
        """Fires with the text; an attempt is made at once (the destination's
        dead-destination suspension forgotten), or right after the busy step."""
        return defer.ensureDeferred(self._retry(qid))

    async def _retry(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.hold:
            raise ActionFailed("is on hold: release it first (relayctl queue release)")
        if msg.leaving:
            raise ActionFailed(f"is being {LEAVING_WORDS[msg.state.pending]}")
        self.runner.forget_dead(msg)
        for job in msg.jobs or ():
            job.forced = self.runner.now()  # not suspended by what attempts started before found
        if msg.in_progress:
            if not msg.attempting and not msg.busy:
                log.info("{queue_id}: retry requested (waiting for a delivery slot)", queue_id=qid)
                return "waiting for a delivery slot: attempted as soon as one is free"
            msg.state.pending = "retry"

            def undo() -> None:
                if msg.state.pending == "retry":
                    msg.state.pending = ""

            await self._record(msg, "retry", undo)
            log.info("{queue_id}: retry requested (after the delivery in progress)", queue_id=qid)
            return "will be attempted again when the delivery in progress ends"
        self.runner.apply_retry(msg)
        log.info("{queue_id}: retry requested", queue_id=qid)
        self.runner.schedule(msg, at=self.runner.now())
        return "will be attempted now"

    async def delete(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.deleted:
            return "already being deleted (after the delivery in progress)"
        return await self._leave(msg, "delete")

    async def bounce(self, qid: str) -> str:
        msg = self.get(qid)
        if msg.leaving:
            return f"already being {LEAVING_WORDS[msg.state.pending]} (after the delivery in progress)"
        return await self._leave(msg, "bounce")

    async def _leave(self, msg: Message, action: str) -> str:
        """delete or bounce: the message leaves the queue."""
        old_pending = msg.state.pending
        msg.state.pending = action
        msg.token += 1
        if not msg.in_progress:
            await self._leave_now(msg, action, old_pending)
            return "deleted" if action == "delete" else "returned to the sender"
        self.runner.withdraw(msg)

        def undo() -> None:
            if msg.state.pending == action:
                msg.state.pending = old_pending

        await self._record(msg, "deletion" if action == "delete" else "bounce", undo)
        log.info("{queue_id}: will be {what} when the delivery in progress ends", queue_id=msg.qid,
                 what=LEAVING_WORDS[action])
        if action == "delete":
            return "will be deleted when the delivery in progress ends"
        return "will be returned to the sender when the delivery in progress ends"

    async def _leave_now(self, msg: Message, action: str, old_pending: str) -> None:
        """A message not busy leaves at once (a busy step of its own)."""
        msg.busy = True
        retry = False
        try:
            if action == "delete":
                await self.runner.io.remove(msg)
                self.runner.forget(msg, "deleted by the administrator")
            else:
                await self.return_to_sender(msg)
        except OSError as e:
            if action == "bounce" and msg.state.done:
                retry = True  # returned (the DSN is queued); the removal is made again
            else:
                msg.state.pending = old_pending
                log.error("{queue_id}: cannot {action} it: {error}", queue_id=msg.qid, action=action,
                          error=e.strerror or str(e))
                raise ActionFailed(f"not done: {e.strerror or e}; try again")
        finally:
            self.runner.after_finalize(msg, retry)

    async def return_to_sender(self, msg: Message) -> None:
        """A bounce: a DSN for every open recipient that wants one (its
        NOTIFY, as an ordinary bounce: relay.delivery.bounce.admin_returns) and
        the attempt's own failures, then removal.  A failure before the DSN
        is queued changes nothing."""
        now = self.runner.now()
        open_rcpts = [r for r in msg.state.recipients if not r.final]
        d = msg.env.dsn
        returned, silent = bouncemod.admin_returns(open_rcpts, msg.env.dsn_of, d.limited if d is not None else False,
                                                   now)
        failures = list(msg.failures) + returned
        for address, notify in silent:
            log.info("{queue_id}: <{to}>: no non-delivery notification (NOTIFY={notify})",
                     queue_id=msg.qid, to=address, notify=notify)
        if failures:
            await self.runner.notices.send(msg, bouncemod.FAILED, failures)
        msg.failures = []
        for r in open_rcpts:
            r.status = BOUNCED
            r.history.append({"t": round(now, 3), "relay": "none", "status": "bounced",
                              "reply": "returned to sender by the administrator"})
            self.runner.counters.bounced += 1
        msg.settled = True
        await self.runner.io.remove(msg)
        self.runner.forget(msg, "returned to sender by the administrator")
