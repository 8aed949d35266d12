"""The on-disk queue: durable writes, reads and the lock of one spool directory.

The layout under the spool directory is in relay.queue.layout.  A message
file is written once: the envelope line (``RELAYQ1 <json>\\n``, see
relay.queue.envelope) followed by the message bytes exactly as they will be
delivered (CRLF line endings, our Received header first).  It is fsynced in
incoming/ (relay.queue.incoming), renamed into queue/ and the directory
fsynced: only then does the client get its 250.  A crash at any instant
leaves either no file in queue/ or a complete one.  The state file is small
and rewritten atomically (temp, fdatasync, rename, directory fsync; a
deferral skips only the directory fsync) whenever a recipient's state
changes.  The layout's directories are made durable too (Spool.create).
When every recipient is final, the message file is unlinked *before* the
state file, so a crash in between can never make delivered recipients look
pending.  Start-up recovery is relay.queue.recovery.

The names split out into relay.queue.layout, envelope and incoming are
reachable here too (``spool.Envelope``, ``spool.new_id``...): the SMTP
server, the pickup, relay-sendmail, the offline tools and the master use
them through this module.

Everything here is blocking plain Python; relay.queue.diskio runs it in threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import sys
from typing import Callable, Iterator

from relay.common import fileio, privdrop
from relay.common.fileio import fsync_dir, makedirs_durable, unlink_quiet
from relay.queue import recovery
from relay.queue.envelope import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    FINAL,
    MAGIC,
    NO_CLIENT,
    PENDING,
    PENDING_ACTIONS,
    CorruptEntry,
    Envelope,
    QueueEntry,
    Recipient,
    SpoolError,
    State,
)
from relay.queue.incoming import MEMORY_LIMIT, IncomingMessage
from relay.queue.layout import STATE_SUFFIX, STOCK_PREFIX, TMP_SUFFIX, IdGenerator, id_time, is_queue_id, new_id

__all__ = [
    "BOUNCED", "DEFERRED", "DELIVERED", "FINAL", "MAGIC", "MEMORY_LIMIT", "PENDING", "PENDING_ACTIONS",
    "STATE_SUFFIX", "STOCK_PREFIX", "TMP_SUFFIX", "CorruptEntry", "Envelope", "IdGenerator", "IncomingMessage",
    "QueueEntry", "Recipient", "Spool", "SpoolError", "SpoolLocked", "State", "UnsafeSpoolFile", "fsync_dir",
    "id_time", "is_queue_id", "new_id", "unlink_quiet", "write_atomic",
]


class SpoolLocked(SpoolError):
    """Another relay process holds the spool."""


class UnsafeSpoolFile(SpoolError, OSError):
    """A name in the spool is not what the relay made there (a symbolic
    link, a FIFO): not followed, not used.  An OSError, with the reason
    as its strerror."""


# ---------------------------------------------------------------------------
# durable file primitives: relay.common.fileio (fsync_dir is also reached as
# spool.fsync_dir by the offline tools and the master's spool move)


def write_atomic(path: str, data: bytes, *, sync_dir: bool = True) -> None:
    """temp file, write, fdatasync, rename over path, fsync the directory."""
    fileio.write_atomic(path, data, tmp_path=f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}", datasync=True,
                        sync_dir=sync_dir)


class Spool:
    """The queue directory; every method is blocking."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.incoming_dir = os.path.join(self.root, "incoming")
        self.queue_dir = os.path.join(self.root, "queue")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        self.drop_dir = os.path.join(self.root, "drop")
        # set by clean_incoming(): from then on a temp file in queue/ may be
        # a state rewrite in progress, which recover() must leave alone
        self.cleaned = False

    def create(self) -> None:
        """Make the layout (each directory 0700), durably: a message fsynced
        into queue/ must not vanish with queue/ itself in a power loss, so the
        spool's parent and the spool directory are fsynced too (also when
        they exist: a first start may have crashed before its fsync).
        relay-sendmail uses this too (before the first start), as the user
        the relay runs as."""
        makedirs_durable(self.root, parents=False)
        for d in (self.incoming_dir, self.queue_dir, self.quarantine_dir, self.drop_dir):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                continue
            fsync_dir(d)  # its own inode, before the entry that names it is made durable
        fsync_dir(self.root)

    def open_lock(self) -> int:
        """An fd on ``<root>/lock``, made if missing; never through a link
        (``O_NOFOLLOW``) and only a regular file (a FIFO or a device there
        would make whoever opens it hang or worse)."""
        path = os.path.join(self.root, "lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeSpoolFile(errno.ELOOP, f"{path} is a symbolic link: not following it (remove it; "
                                      "the relay makes a new one)", path)
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeSpoolFile(errno.EINVAL, f"{path} is not a regular file: not using it (remove it; "
                                      "the relay makes a new one)", path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lock(self) -> int:
        """Take the spool's exclusive lock (held by a running relay); return the fd.

        Raises SpoolLocked if another process holds it.  The lock dies with
        the process, so a crash never leaves a stale lock behind.
        """
        self._refuse_root_on_another_users_spool()
        self.create()
        fd = self.open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{self.root} is in use by a running relay")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _refuse_root_on_another_users_spool(self) -> None:
        """A relay running as root on a spool another user controls would
        follow whatever links that user puts in it, as root."""
        if os.geteuid() != 0:
            return
        try:
            uid = privdrop.controller(self.root)[0]
        except privdrop.UnsafePath:
            return  # no single other user: an administrator's set-up, not refused here
        if uid != 0:
            raise UnsafeSpoolFile(errno.EPERM, f"{self.root} is controlled by uid {uid}: a relay running as root "
                                  "would follow the links that user can put in it; start the relay as that user "
                                  "(twistd -u/-g, or User= in the systemd unit)", self.root)

    def clean_incoming(self, log: recovery.LogFn | None = None) -> int:
        """Remove half-written files left by a crash: received messages never
        acknowledged (incoming/) and state rewrites never renamed (queue/*.tmp).

        Call it before anything listens or delivers: afterwards a temp file
        may belong to a live writer.
        """
        n = 0
        self.create()
        for name in os.listdir(self.queue_dir):
            if name.endswith(TMP_SUFFIX):
                unlink_quiet(os.path.join(self.queue_dir, name))
                if log:
                    log("removed temporary file {name} from queue/", name=name)
        self.cleaned = True
        for name in os.listdir(self.incoming_dir):
            try:
                unlink_quiet(os.path.join(self.incoming_dir, name))
            except OSError as e:  # a directory, say: not ours to remove, and not fatal
                if log:
                    log("cannot remove {name} from incoming/: {error}", name=name, error=str(e))
                continue
            n += 1
            if log:
                log("removed half-received {name} from incoming/", name=name)
        return n

    # -- writing ---------------------------------------------------------
    def incoming(self, envelope: Envelope, prepared: tuple[str, int] | None = None, *,
                 in_memory: bool = False,
                 spill: Callable[[], tuple[str, int] | None] | None = None) -> IncomingMessage:
        return IncomingMessage(self.incoming_dir, self.queue_dir, envelope, prepared, in_memory=in_memory,
                               spill=spill)

    def prepare_incoming(self, count: int) -> list[tuple[str, int]]:
        """Create count empty files in incoming/ (blocking): (path, fd) pairs.

        Creating a file costs a few hundred microseconds of system time;
        doing it ahead of time in a thread keeps it off the reactor.
        """
        out = []
        for _ in range(count):
            path = os.path.join(self.incoming_dir, f"{STOCK_PREFIX}{secrets.token_hex(8)}{TMP_SUFFIX}")
            fd = fileio.create_exclusive(path)
            out.append((path, fd))
        return out

    def inject(self, envelope: Envelope, data: bytes) -> "QueueEntry":
        """Queue a message we make ourselves (a DSN): durable except for the
        directory fsync, which the caller does (grouped)."""
        inc = IncomingMessage(self.incoming_dir, self.queue_dir, envelope)
        inc.write(data)
        inc.finish()
        return QueueEntry(envelope, State.fresh(envelope), len(data), len(inc.header), state_file=False)

    def message_path(self, qid: str) -> str:
        return os.path.join(self.queue_dir, qid)

    def state_path(self, qid: str) -> str:
        return os.path.join(self.queue_dir, qid + STATE_SUFFIX)

    def write_state(self, qid: str, state: State, *, sync_dir: bool = True) -> None:
        if not os.path.exists(self.message_path(qid)):
            raise FileNotFoundError(errno.ENOENT, "message is no longer queued", qid)
        write_atomic(self.state_path(qid), state.to_bytes(), sync_dir=sync_dir)

    def remove(self, qid: str, *, sync_dir: bool = True) -> None:
        """Remove a message whose recipients are all final (message first)."""
        unlink_quiet(self.message_path(qid))
        if sync_dir:
            fsync_dir(self.queue_dir)
        unlink_quiet(self.state_path(qid))

    # -- reading ---------------------------------------------------------
    def read_envelope(self, qid: str) -> tuple[Envelope, int, int]:
        """(envelope, offset of the message, message size)."""
        fd = os.open(f"{self.queue_dir}/{qid}", os.O_RDONLY)
        try:
            head = os.read(fd, 8192)
            nl = head.find(b"\n")
            if nl >= 0:
                line = head[: nl + 1]
            else:
                with os.fdopen(os.dup(fd), "rb") as f:
                    line = f.readline(1 << 20)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        env = Envelope.from_line(line)
        if env.queue_id != qid:
            raise CorruptEntry(f"envelope names {env.queue_id}, file is {qid}")
        return env, len(line), size - len(line)

    def read_state(self, qid: str, env: Envelope, history: bool = True) -> State:
        """The state file; history=False leaves the attempt history on disk
        (the queue keeps in memory only what it has not written yet)."""
        try:
            fd = os.open(f"{self.queue_dir}/{qid}{STATE_SUFFIX}", os.O_RDONLY)
        except FileNotFoundError:
            return State.fresh(env)
        try:
            chunks = []
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        return State.from_bytes(env, b"".join(chunks), history)

    def load(self, qid: str, history: bool = True) -> QueueEntry:
        """history=False is the lean form the queue keeps in memory: no
        attempt history, no client details (relayctl queue show reads both
        from disk), common strings shared."""
        env, offset, size = self.read_envelope(qid)
        if not history:
            env.client = NO_CLIENT
            env.sender = sys.intern(env.sender)
        return QueueEntry(env, self.read_state(qid, env, history), size, offset)

    def write_state_merged(self, qid: str, state: State, *, durable: bool, max_history: int = 200) -> list[int]:
        """Write state whose recipients' history holds only new entries: the
        file's history comes first (read here, in the writer's thread, so the
        queue need not keep every attempt of every message in memory).
        Returns how many new entries were written per recipient."""
        if not os.path.exists(self.message_path(qid)):
            raise FileNotFoundError(errno.ENOENT, "message is no longer queued", qid)
        env_rcpts = [r.address for r in state.recipients]
        old: list[list] = [[] for _ in env_rcpts]
        try:
            with open(self.state_path(qid), "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
            for i, x in enumerate(d.get("rcpt", [])[: len(old)]):
                h = x.get("h")
                if isinstance(h, list):
                    old[i] = h
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError, TypeError):
            pass  # an unreadable old state: its history is lost, the state is rewritten whole
        written = [len(r.history) for r in state.recipients]
        full = State(
            [Recipient(r.address, r.orcpt, r.status, r.attempts, r.reply, r.next_attempt,
                       (old[i] + r.history)[-max_history:]) for i, r in enumerate(state.recipients)],
            state.hold, state.warned, state.pending,
        )
        # The file's data is always fdatasynced before the rename, durable or
        # not: any later fsync of queue/ (the next message's commit) makes
        # the rename durable, and a rename that outlives the data it points
        # to would leave an empty state file, losing the delivered and
        # bounced records it replaced.  durable=False only spares the
        # directory fsync: a deferral lost to a power cut leaves the previous
        # state file, whole.
        write_atomic(self.state_path(qid), full.to_bytes(), sync_dir=False)
        return written

    def read_headers(self, qid: str, limit: int = 256 * 1024) -> bytes:
        """The message's header section (up to the blank line), bounded."""
        with open(self.message_path(qid), "rb") as f:
            f.readline(1 << 20)
            out = []
            total = 0
            for line in f:
                if line in (b"\r\n", b"\n"):
                    break
                out.append(line)
                total += len(line)
                if total > limit:
                    break
        return b"".join(out)

    def incoming_leftovers(self) -> list[str]:
        """Files in incoming/ other than the empty stock (for tests and checks)."""
        return sorted(n for n in os.listdir(self.incoming_dir) if not n.startswith(STOCK_PREFIX))

    def queue_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.queue_dir) if is_queue_id(n))

    # -- start-up recovery (relay.queue.recovery) --------------------------
    def recover(self, log: recovery.LogFn | None = None) -> Iterator[QueueEntry]:
        """Clean up after a crash and yield every readable queued message
        (recovery.recover)."""
        return recovery.recover(self, log)

    def quarantine(self, name: str, reason: str, log: recovery.LogFn | None = None) -> None:
        recovery.quarantine(self, name, reason, log)
