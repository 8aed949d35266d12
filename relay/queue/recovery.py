"""Start-up recovery: what a crash or outside damage left in queue/.

Run once at start (``Spool.recover``, in the disk pool), after
``Spool.clean_incoming`` and before anything delivers: stray temporary
files and state files without a message are removed, unreadable entries
moved to quarantine/, messages whose recipients are all final removed;
every other entry is yielded for the queue to load.  Its own module: the
spool's steady-state writes and reads do not need any of it.
"""

from __future__ import annotations

import os
import secrets
from typing import Callable, Iterator, Protocol

from relay.common.fileio import unlink_quiet
from relay.queue.envelope import NO_CLIENT, Envelope, QueueEntry, State
from relay.queue.layout import STATE_SUFFIX, TMP_SUFFIX, is_queue_id

LogFn = Callable[..., None]  # log(fmt, **fields)


class RecoveredSpool(Protocol):
    """What recovery uses of relay.queue.spool.Spool."""

    queue_dir: str
    quarantine_dir: str
    cleaned: bool  # clean_incoming() ran: a temporary file in queue/ is a live write

    def create(self) -> None: ...
    def state_path(self, qid: str) -> str: ...
    def read_envelope(self, qid: str) -> tuple[Envelope, int, int]: ...
    def load(self, qid: str, history: bool = True) -> QueueEntry: ...
    def remove(self, qid: str, *, sync_dir: bool = True) -> None: ...


def recover(spool: RecoveredSpool, log: LogFn | None = None) -> Iterator[QueueEntry]:
    """Clean up after a crash and yield every readable queued message.

    (Call clean_incoming() first, before anything listens.)  Stray temp
    files and state files without a message are removed; unreadable
    entries are moved to quarantine/.  Logs what it did.
    """
    spool.create()
    msgs, states = _sort_names(spool, log)
    for qid in states - msgs:
        unlink_quiet(spool.state_path(qid))
        if log:
            log("{queue_id}: removed state file of a finished message", queue_id=qid)
    for qid in sorted(msgs):
        try:
            entry = spool.load(qid, history=False)
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - one bad entry never blocks the rest
            found = without_state(spool, qid, e, log) if qid in states else None
            if found is None:
                quarantine(spool, qid, str(e) or e.__class__.__name__, log)
                if qid in states:
                    quarantine(spool, qid + STATE_SUFFIX, str(e), log)
                continue
            entry = found
        if entry.state.done:
            spool.remove(qid)
            if log:
                log("{queue_id}: removed, all recipients were final", queue_id=qid)
            continue
        yield entry


def _sort_names(spool: RecoveredSpool, log: LogFn | None) -> tuple[set[str], set[str]]:
    """The ids of the messages and of the state files in queue/; stray
    temporary files removed, anything else quarantined."""
    msgs = set()
    states = set()
    for name in os.listdir(spool.queue_dir):
        if is_queue_id(name):
            msgs.add(name)
        elif name.endswith(STATE_SUFFIX) and is_queue_id(name[: -len(STATE_SUFFIX)]):
            states.add(name[: -len(STATE_SUFFIX)])
        elif name.endswith(TMP_SUFFIX):
            if spool.cleaned:
                continue  # clean_incoming() removed the stale ones; this one is live
            unlink_quiet(os.path.join(spool.queue_dir, name))
            if log:
                log("removed temporary file {name} from queue/", name=name)
        else:
            quarantine(spool, name, "unexpected file in queue/", log)
    return msgs, states


def without_state(spool: RecoveredSpool, qid: str, error: Exception, log: LogFn | None = None) -> QueueEntry | None:
    """A readable message whose state file is not.  Every state file is
    fdatasynced before its rename, so no crash or power loss leaves one
    torn: this is damage from outside (a disk error, a hand edit).  The
    message stays queued with every recipient pending again, and the
    state file goes to quarantine (logged): recipients delivered before
    may get a second copy; nothing is lost.  None when the message
    itself is bad."""
    try:
        env, offset, size = spool.read_envelope(qid)
    except Exception:  # noqa: BLE001 - the message is bad too: the caller quarantines both
        return None
    env.client = NO_CLIENT
    quarantine(spool, qid + STATE_SUFFIX, str(error) or error.__class__.__name__, log)
    if log:
        log("{queue_id}: state file unreadable ({error}): kept the message with every recipient "
            "pending again", queue_id=qid, error=str(error) or error.__class__.__name__)
    return QueueEntry(env, State.fresh(env), size, offset)


def quarantine(spool: RecoveredSpool, name: str, reason: str, log: LogFn | None = None) -> None:
    src = os.path.join(spool.queue_dir, name)
    dst = os.path.join(spool.quarantine_dir, name)
    if os.path.exists(dst):
        dst = f"{dst}.{secrets.token_hex(3)}"
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return
    except OSError as e:
        if log:
            log("{name}: cannot move to quarantine ({error}); left in place: {reason}",
                name=name, error=e.strerror, reason=reason, queue_id=name[:16])
        return
    if log:
        log("{name}: moved to quarantine: {reason}", name=name, reason=reason, queue_id=name[:16])
