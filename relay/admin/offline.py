"""relayctl on a stopped relay: the queue verbs act on the spool files.

Safety against a relay starting meanwhile comes from the spool lock (the
``lock`` file a running relay holds with flock): a change is made only
while relayctl holds that lock, and a relay starting meanwhile waits a few
seconds for it (relay.runtime.service) instead of reading a half-made change.
Reading (the listing, ``show``, ``status``) only checks that no relay holds
the lock and then reads without holding it: every spool file is replaced
atomically, so each read is consistent, and a slow reader (``relayctl queue
| less``) never keeps a relay from starting.

Changes are the ones the running queue manager makes (hold flag and
next-attempt times in the state file, removal message-first, a DSN queued
like any message) so the relay picks them up at start.

Run as root on a spool another user controls (the relay's), every access
to it is made as that user (relay.common.privdrop): a link that user planted in
the spool (``lock`` -> ``/etc/ld.so.preload``) is followed with that
user's rights only, and the files relayctl makes are that user's, as if
the relay had made them.  Nothing is chowned.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from typing import Iterator

from relay.common import privdrop
from relay.common.fileio import fsync_dir
from relay.config import Config
from relay.delivery import bounce as bouncemod
from relay.queue import spool as spoolmod
from relay.queue import view as queueview
from relay.queue.spool import FINAL, CorruptEntry, QueueEntry, Spool, is_queue_id

BATCH = 256  # spool files read per switch to the spool owner's uid


class OfflineError(Exception):
    pass


class RelayRunning(OfflineError):
    """A relay holds the spool lock."""

    def __init__(self, root: str, pid: int | None):
        self.pid = pid
        who = f"a relay (pid {pid})" if pid else "a relay"
        super().__init__(f"{who} holds the spool {root}")


class NoSuchMessage(OfflineError):
    pass


class OfflineSpool:
    def __init__(self, config: Config):
        self.config = config
        self.spool = Spool(config.spool)
        self.lock_path = os.path.join(self.spool.root, "lock")
        self._owner: tuple[int, int] | None = None  # (uid, gid) to act as, when root

    @contextmanager
    def _as_owner(self) -> Iterator[None]:
        """The block runs as the user who controls the spool (root only).
        Who that is is looked up once: only root could change it."""
        if os.geteuid() != 0:
            yield
            return
        if self._owner is None:
            try:
                self._owner = privdrop.controller(self.spool.root)
            except privdrop.UnsafePath as e:
                raise OfflineError(f"{e} (spool {self.spool.root})")
        with privdrop.as_user(*self._owner):
            yield

    def _hint(self) -> str:
        """What to do about a permission error."""
        if os.getuid() == 0 and self._owner and self._owner[0] != 0:  # real uid: also while acting as the owner
            return (f"(relayctl run by root acts as the spool's owner, uid {self._owner[0]}; "
                    "something in the spool leads outside it)")
        return "(run relayctl as the relay's user or root)"

    # -- the lock ---------------------------------------------------------
    def exists(self) -> bool:
        with self._as_owner():
            return os.path.isdir(self.spool.queue_dir)

    def holder_pid(self) -> int | None:
        try:
            with self._as_owner():
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            return int(text) if text.isdigit() else None
        except OSError:
            return None

    def _open_lock(self) -> int | None:
        """An fd on the lock file; None when there is no spool at all."""
        with self._as_owner():
            if not os.path.isdir(self.spool.root):
                return None
            try:
                return self.spool.open_lock()
            except PermissionError:
                pass
            # a user who may read the spool but not write it: the lock the relay made will do
            return os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)

    def _try_lock(self) -> int | None:
        """Our fd holding the lock, or raise RelayRunning; None: no spool."""
        try:
            fd = self._open_lock()
        except spoolmod.UnsafeSpoolFile as e:
            raise OfflineError(str(e.strerror))
        except PermissionError as e:
            raise OfflineError(f"cannot open {self.lock_path}: {e.strerror} {self._hint()}")
        except OSError as e:
            raise OfflineError(f"cannot open {self.lock_path}: {e.strerror or e}")
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RelayRunning(self.spool.root, self.holder_pid())
        return fd

    def check_not_running(self) -> None:
        """Raise RelayRunning if a relay holds the spool (then let go at once)."""
        fd = self._try_lock()
        if fd is not None:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        fd = self._try_lock()
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)

    # -- reading ------------------------------------------------------------------
    def ids(self) -> list[str]:
        try:
            with self._as_owner():
                return self.spool.queue_ids()
        except FileNotFoundError:
            return []
        except PermissionError as e:
            raise OfflineError(f"cannot read the spool {self.spool.queue_dir}: {e.strerror} {self._hint()}")

    def entries(self, problems: list[str] | None = None) -> Iterator[QueueEntry]:
        ids = self.ids()
        for start in range(0, len(ids), BATCH):
            batch = []
            with self._as_owner():  # one switch per batch, not per file; never across a yield
                for qid in ids[start:start + BATCH]:
                    try:
                        entry = self.spool.load(qid)
                    except FileNotFoundError:
                        continue
                    except (CorruptEntry, OSError, UnicodeDecodeError) as e:
                        if problems is not None:
                            problems.append(f"{qid}: unreadable, skipped ({e})")
                        continue
                    if not entry.state.done:  # all final: the relay removes it at start
                        batch.append(entry)
            yield from batch

    def lines(self, problems: list[str] | None = None) -> Iterator[bytes]:
        for e in self.entries(problems):
            yield queueview.record_line(e.envelope, e.state, e.size, queueview.queue_name(e.state))

    def load(self, qid: str) -> QueueEntry:
        if not is_queue_id(qid):
            raise NoSuchMessage(f"{qid}: no such message in the queue (not a queue id)")
        try:
            with self._as_owner():
                entry = self.spool.load(qid)
        except FileNotFoundError:
            raise NoSuchMessage(f"{qid}: no such message in the queue")
        except (CorruptEntry, UnicodeDecodeError) as e:
            raise OfflineError(f"{qid}: unreadable spool entry: {e}")
        except PermissionError as e:
            raise OfflineError(f"{qid}: {e.strerror} {self._hint()}")
        if entry.state.done:
            raise NoSuchMessage(f"{qid}: no such message in the queue (all recipients are final)")
        return entry

    def details(self, qid: str) -> dict:
        e = self.load(qid)
        try:
            with self._as_owner():
                headers = self.spool.read_headers(qid)
        except FileNotFoundError:
            raise NoSuchMessage(f"{qid}: no such message in the queue")
        return queueview.details(e.envelope, e.state, e.size, queueview.queue_name(e.state), headers)

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(queueview.QUEUE_NAMES, 0)
        for e in self.entries():
            c[queueview.queue_name(e.state)] += 1
        return c

    # -- changes (call inside ``locked()``) -------------------------------------------------
    def _write_state(self, qid: str, state: spoolmod.State) -> None:
        self.spool.write_state(qid, state)

    def act(self, action: str, qid: str) -> tuple[bool | None, str]:
        """(ok, text) like the running relay's answer; ok None: nothing to do."""
        try:
            with self._as_owner():
                return self._act(action, qid)
        except PermissionError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise OfflineError(f"{qid}: {e.strerror}{where} {self._hint()}")

    def _act(self, action: str, qid: str) -> tuple[bool | None, str]:
        try:
            entry = self.load(qid)
        except NoSuchMessage as e:
            return False, str(e).split(": ", 1)[1]
        st = entry.state
        if action == "delete":
            self.spool.remove(qid)
            return True, "deleted"
        if action == "hold":
            if st.hold:
                return None, "already on hold"
            st.hold = True
            self._write_state(qid, st)
            return True, "on hold"
        if action == "release":
            if not st.hold:
                return None, "was not on hold"
            st.hold = False
            self._write_state(qid, st)
            return True, "released"
        if action == "retry":
            if st.hold:
                return False, "is on hold: release it first (relayctl queue release)"
            for r in st.recipients:
                if not r.final:
                    r.next_attempt = 0.0
            self._write_state(qid, st)
            return True, "will be attempted as soon as the relay starts"
        if action == "bounce":
            dsn = self._bounce(entry)
            if dsn is None:
                return True, "removed (a null-sender message cannot be returned)"
            if not dsn:
                return True, "returned to the sender (no notification: no recipient's NOTIFY asked for one)"
            return True, f"returned to the sender (notification {dsn} queued; sent when the relay starts)"
        raise ValueError(action)

    def _bounce(self, entry: QueueEntry) -> str | None:
        """What AdminActions.return_to_sender (relay.queue.actions) does: a DSN
        for the open recipients whose NOTIFY wants one (the same
        relay.delivery.bounce.admin_returns), then removal.  "" when the sender
        is not <> but no recipient wants a notice; None for <>."""
        env = entry.envelope
        now = time.time()
        failures, _silent = bouncemod.admin_returns(
            [r for r in entry.state.recipients if r.status not in FINAL], env.dsn_of,
            env.dsn.limited if env.dsn is not None else False, now)
        dsn_id = None if not env.sender else ""
        if failures and env.sender:
            try:
                headers = self.spool.read_headers(env.queue_id)
            except OSError:
                headers = b""
            full, too_big = self._full_message(entry)
            data = bouncemod.build_report(
                kind=bouncemod.FAILED, reporting_mta=self.config.hostname, queue_id=env.queue_id,
                sender=env.sender, arrival=env.arrival, failures=failures, original_headers=headers, now=now,
                envid=env.dsn.envid if env.dsn is not None else "", full_message=full, too_big=too_big,
                smtputf8=env.smtputf8,
            )
            extra: dict[str, object] = {"dsn": bouncemod.FAILED, "for": env.queue_id}
            if env.smtputf8:
                extra["smtputf8"] = True  # as relay.queue.notices.notice_extra
            denv = spoolmod.Envelope(
                queue_id=spoolmod.new_id(), sender="", recipients=[env.sender], arrival=now, orcpts=[None],
                client={"proto": "dsn"}, extra=extra,
            )
            self.spool.inject(denv, data)
            fsync_dir(self.spool.queue_dir)
            dsn_id = denv.queue_id
        self.spool.remove(env.queue_id)
        return dsn_id

    def _full_message(self, entry: QueueEntry) -> tuple[bytes | None, int | None]:
        """RET=FULL, as relay.queue.notices.Notices._full_message: (the
        message, None) within delivery.dsn_full_limit, (None, the limit) over it."""
        d = entry.envelope.dsn
        if d is None or d.ret != "FULL":
            return None, None
        limit = self.config.delivery.dsn_full_limit
        if entry.size > limit:
            return None, limit
        try:
            with open(self.spool.message_path(entry.envelope.queue_id), "rb") as f:
                f.seek(entry.offset)
                return f.read(entry.size), None
        except OSError:
            return None, None
