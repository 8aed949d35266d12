"""The queue runner's records in memory: a queued Message and its Jobs.

A Message is one queued message as the runner holds it (its envelope, its
per-recipient state, what is under way); a Job is the part of one
activation that goes to one destination.  Shared by the runner
(relay.queue.manager), its outcome records (relay.queue.outcomes) and the
administrator's actions (relay.queue.actions); no I/O, no Twisted but the
Deferred type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer

from relay.delivery import bounce as bouncemod
from relay.delivery import routing
from relay.queue.envelope import PENDING, Envelope, Recipient, State


class UnknownMessage(KeyError):
    pass


class ActionFailed(Exception):
    """An administrator's action that could not be recorded: nothing changed."""


# State.pending values applied by a finalisation (the message leaves the queue)
LEAVING = ("delete", "bounce")
LEAVING_WORDS = {"delete": "deleted", "bounce": "returned to the sender"}


@dataclass(eq=False, slots=True)
class Message:
    qid: str
    env: Envelope
    state: State
    size: int
    offset: int
    active: int = 0  # jobs of this activation not finished (waiting for a slot or running)
    attempting: int = 0  # jobs whose attempt is under way
    busy: bool = False  # an activation is being finalised
    jobs: list[Job] | None = None  # jobs waiting for a slot
    io: defer.Deferred[None] | None = None  # fires when the last spool write or removal queued for it ends
    forced: float | None = None  # when a retry asked for the next activation (see Job.forced)
    token: int = 0  # heap entries with another token are stale
    failures: list[bouncemod.Failure] = field(default_factory=list)  # bounce.Failure of this activation
    successes: list[bouncemod.Failure] = field(default_factory=list)  # NOTIFY=SUCCESS: delivered, relayed
    settled: bool = False  # a recipient became final in this activation: fsync the state
    tried: bool = False  # an attempt was really made in this activation (not only suspended)
    eight_bit: bool | None = None  # the body has 8-bit bytes (None: not known, the client scans)
    started: float = 0.0
    data: bytes | None = None  # the message, just received: the first attempt need not read the file
    state_file: bool = True  # a state file may exist (False: never written, nothing to unlink)

    @property
    def hold(self) -> bool:
        return self.state.hold

    @property
    def deleted(self) -> bool:
        """A delete was accepted (and recorded): gone for the administrator."""
        return self.state.pending == "delete"

    @property
    def bounce_now(self) -> bool:
        return self.state.pending == "bounce"

    @property
    def leaving(self) -> bool:
        return self.state.pending in LEAVING

    @property
    def in_progress(self) -> bool:
        """An attempt under way or waiting for a slot, or its outcome being recorded."""
        return bool(self.active or self.busy)

    def open_recipients(self) -> list[Recipient]:
        return [r for r in self.state.recipients if not r.final]

    def next_time(self) -> float | None:
        ts = [r.next_attempt for r in self.state.recipients if not r.final]
        return min(ts) if ts else None

    @property
    def queue_name(self) -> str:
        if self.hold:
            return "hold"
        if self.active or any(r.status == PENDING for r in self.state.recipients):
            return "active"
        return "deferred"


@dataclass(eq=False)
class Job:
    msg: Message
    dest: routing.Destination
    recipients: list[Recipient]
    local: bool
    withdrawn: bool = False  # ended without an attempt while it waited (an admin action)
    # an administrator's retry at this time: a dead-destination mark does not
    # suspend it unless an attempt started after the retry set that mark
    forced: float | None = None
