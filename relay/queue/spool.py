"""The on-disk queue: ids, durable writes, envelopes, per-recipient state.

Layout under the spool directory (all 0700)::

    incoming/<id>.tmp   a message being received; never acknowledged
    queue/<id>          a queued message: one envelope line, then the message
    queue/<id>.state    per-recipient delivery state (absent: all pending)
    quarantine/         entries that could not be read, moved aside
    drop/               messages from relay-sendmail, picked up at start

A message file is written once: the envelope line (``RELAYQ1 <json>\\n``)
followed by the message bytes exactly as they will be delivered (CRLF line
endings, our Received header first).  It is fsynced in incoming/, renamed
into queue/ and the directory fsynced: only then does the client get its
250.  A crash at any instant leaves either no file in queue/ or a complete
one.  The state file is small and rewritten atomically (temp, fdatasync,
rename, directory fsync; a deferral skips only the directory fsync)
whenever a recipient's state changes.  The layout's directories are made
durable too (Spool.create).  When every
recipient is final, the message file is unlinked *before* the state file,
so a crash in between can never make delivered recipients look pending.

Everything here is blocking plain Python; relay.queue.diskio runs it in threads.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import secrets
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from relay.common import fileio
from relay.common.fileio import DurableFile, fsync_dir, makedirs_durable, unlink_quiet

MAGIC = b"RELAYQ1 "
STATE_SUFFIX = ".state"
TMP_SUFFIX = ".tmp"
STOCK_PREFIX = "stock-"  # empty files made ahead of time in incoming/

# Crockford's base32: digits then letters, in ASCII order, so ids sort by time.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
FINAL = (DELIVERED, BOUNCED)
_STATUSES = frozenset((PENDING, DEFERRED, DELIVERED, BOUNCED))
PENDING_ACTIONS = frozenset(("", "retry", "delete", "bounce"))  # State.pending
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=...) builds one per call
_NO_CLIENT: dict = {}  # shared by the lean in-memory envelopes (never modified)


class SpoolError(Exception):
    pass


class CorruptEntry(SpoolError):
    pass


class SpoolLocked(SpoolError):
    """Another relay process holds the spool."""


class UnsafeSpoolFile(SpoolError, OSError):
    """A name in the spool is not what the relay made there (a symbolic
    link, a FIFO): not followed, not used.  An OSError, with the reason
    as its strerror."""


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


class IdGenerator:
    """Queue ids: 11 chars of microseconds since the epoch, then 5 random chars.

    Sortable by arrival (fixed width, alphabet in ASCII order), unique across
    processes sharing a spool (the random part) and strictly increasing within
    one process (the time part never repeats).
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        # not secret, only unlikely to collide across processes: a PRNG
        # seeded from the OS (reseeded in a forked child) spares a
        # getrandom() system call per id
        self._rand = random.Random(secrets.randbits(128))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: self._rand.seed(secrets.randbits(128)))

    def __call__(self) -> str:
        with self._lock:
            now = time.time_ns() // 1000
            if now <= self._last:
                now = self._last + 1
            self._last = now
            r = self._rand.getrandbits(25)
        return _b32((now << 25) | r, 16)


new_id = IdGenerator()


_QID = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}\Z")


def is_queue_id(text: str) -> bool:
    return len(text) == 16 and _QID.match(text) is not None


def id_time(qid: str) -> float:
    n = 0
    for c in qid[:11]:
        n = n * 32 + _ALPHABET.index(c)
    return n / 1e6


# ---------------------------------------------------------------------------
# envelope and state


@dataclass(slots=True)
class Recipient:
    """One envelope recipient and its delivery state."""

    address: str
    orcpt: str | None = None  # the address as the client gave it, if expanded
    status: str = PENDING
    attempts: int = 0
    reply: str = ""  # last reply or reason
    next_attempt: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(slots=True)
class Envelope:
    """What the message file's first line holds (immutable after queueing)."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: list[str]
    arrival: float
    orcpts: list[str | None] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # kind (bounce...), etc.

    def __post_init__(self) -> None:
        if len(self.orcpts) != len(self.recipients):
            self.orcpts = (list(self.orcpts) + [None] * len(self.recipients))[: len(self.recipients)]

    def to_line(self) -> bytes:
        d = {
            "id": self.queue_id,
            "from": self.sender,
            "rcpt": self.recipients,
            "t": self.arrival,
            "client": self.client,
        }
        if any(self.orcpts):
            d["orcpt"] = self.orcpts
        if self.extra:
            d["x"] = self.extra
        line = MAGIC + _encode(d).encode("utf-8") + b"\n"
        return line

    @classmethod
    def from_line(cls, line: bytes) -> "Envelope":
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise CorruptEntry("no envelope line")
        try:
            d = json.loads(line[len(MAGIC) :].decode("utf-8"))
            rcpts = d["rcpt"]
            orcpts = d.get("orcpt") or [None] * len(rcpts)
            if (
                not isinstance(rcpts, list)
                or not rcpts
                or not all(isinstance(r, str) and r for r in rcpts)
                or not isinstance(orcpts, list)
                or len(orcpts) != len(rcpts)
                or not all(o is None or isinstance(o, str) for o in orcpts)
            ):
                raise CorruptEntry("bad envelope: bad recipient list")
            if not isinstance(d["id"], str) or not isinstance(d["from"], str):
                raise CorruptEntry("bad envelope: bad id or sender")
            arrival = float(d["t"])
            if not math.isfinite(arrival):
                raise CorruptEntry("bad envelope: bad arrival time")
            return cls(
                queue_id=d["id"],
                sender=d["from"],
                recipients=rcpts,
                arrival=arrival,
                orcpts=orcpts,
                client=dict(d.get("client") or {}),
                extra=dict(d.get("x") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptEntry(f"bad envelope: {e.__class__.__name__}: {e}")


@dataclass(slots=True)
class State:
    """The mutable part: per-recipient status, hold flag, notices sent."""

    recipients: list[Recipient]
    hold: bool = False
    warned: bool = False  # delay notice sent
    # an administrator's action accepted while the message was busy (an
    # attempt, or the recording of its outcome), applied when that step ends
    # or at the next start: "" (none), "retry", "delete" or "bounce"
    pending: str = ""

    def to_bytes(self) -> bytes:
        d = {
            "hold": self.hold,
            "warned": self.warned,
            **({"admin": self.pending} if self.pending else {}),
            "rcpt": [
                {
                    "a": r.address,
                    "s": r.status,
                    "n": r.attempts,
                    "r": r.reply,
                    "t": r.next_attempt,
                    "h": r.history,
                }
                for r in self.recipients
            ],
        }
        return _encode(d).encode("utf-8")

    @classmethod
    def fresh(cls, env: Envelope) -> "State":
        return cls([Recipient(a, o) for a, o in zip(env.recipients, env.orcpts)])

    @classmethod
    def from_bytes(cls, env: Envelope, data: bytes, history: bool = True) -> "State":
        try:
            d = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
            rs = d["rcpt"]
            if len(rs) != len(env.recipients):
                raise CorruptEntry("state does not match the envelope")
            recipients = []
            for a, o, x in zip(env.recipients, env.orcpts, rs):
                if x["a"] != a:
                    raise CorruptEntry("state does not match the envelope")
                status = x["s"]
                if status not in _STATUSES:
                    raise CorruptEntry(f"unknown status {status!r}")
                h = x.get("h")
                if h is not None and not isinstance(h, list):
                    raise CorruptEntry("bad state file: history is not a list")
                reply = str(x.get("r", ""))
                recipients.append(Recipient(
                    a, o, status, int(x.get("n", 0)), reply if history else sys.intern(reply),
                    float(x.get("t", 0.0)), h if (history and isinstance(h, list)) else [],
                ))
            pending = d.get("admin", "")
            if pending not in PENDING_ACTIONS:
                raise CorruptEntry(f"unknown pending action {pending!r}")
            return cls(recipients, bool(d.get("hold", False)), bool(d.get("warned", False)), pending)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptEntry(f"bad state file: {e.__class__.__name__}: {e}")

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)


# ---------------------------------------------------------------------------
# durable file primitives: relay.common.fileio (fsync_dir is also reached as
# spool.fsync_dir by the offline tools and the master's spool move)


def write_atomic(path: str, data: bytes, *, sync_dir: bool = True) -> None:
    """temp file, write, fdatasync, rename over path, fsync the directory."""
    fileio.write_atomic(path, data, tmp_path=f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}", datasync=True,
                        sync_dir=sync_dir)


# ---------------------------------------------------------------------------


@dataclass
class QueueEntry:
    """What a scan finds for one queued message."""

    envelope: Envelope
    state: State
    size: int  # message bytes (without the envelope line)
    offset: int  # where the message starts in the file
    eight_bit: bool | None = None  # known when it was just received; None: scan when it matters
    data: bytes | None = None  # the message bytes, when just received and small (no need to read the file)
    state_file: bool = True  # False: no state file was ever written (nothing to unlink at removal)


MEMORY_LIMIT = 64 * 1024  # a message up to this size is held in memory until finish()


class IncomingMessage:
    """A message being received; blocking methods.

    Two ways to hold it until ``finish()`` (run it in a thread):

    * in memory (``in_memory=True``, what the SMTP server asks for): the
      bytes are kept in a list until they pass MEMORY_LIMIT; ``finish()``
      then creates the file in incoming/, writes it in one call, fsyncs and
      renames it into queue/, and keeps the bytes (``data``) so that the
      first delivery attempt need not read the file back.  A bigger message
      moves to a file as soon as it passes the limit (``spill`` gives an
      empty file made ahead of time, when there is one).
    * in a buffered file in incoming/ from the start (page cache, cheap).

    Either way nothing is in queue/ before the file is complete and fsynced;
    the caller then fsyncs the queue directory (see diskio.QueueDirSync,
    which groups them).
    """

    def __init__(self, spool: "Spool", envelope: Envelope, prepared: tuple[str, int] | None = None, *,
                 in_memory: bool = False, spill=None):
        self.spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.final_path = os.path.join(spool.queue_dir, self.queue_id)
        self.header = envelope.to_line()
        self.size = 0
        self.closed = False
        self.data: bytes | None = None  # after finish(): the message, when it was held in memory
        self.tmp_path: str | None = None
        self._file = None
        self._spill = spill
        self.defer_io = None  # set by diskio.AsyncSpool: runs abort's file work in the disk pool
        if in_memory:
            self._chunks: list[bytes] | None = [self.header]
            self._held = len(self.header)
            return
        self._chunks = None
        self._open(prepared)
        try:
            self._file.write(self.header)
        except BaseException:
            self.abort()
            raise

    def _open(self, prepared: tuple[str, int] | None) -> None:
        if prepared is not None:
            # a file created ahead of time off the reactor (diskio.IncomingStock)
            self.tmp_path, fd = prepared
            self._file = DurableFile(self.tmp_path, fd=fd, buffering=64 * 1024)
        else:
            self.tmp_path = os.path.join(self.spool.incoming_dir, self.queue_id + TMP_SUFFIX)
            self._file = DurableFile(self.tmp_path, buffering=64 * 1024)

    def write(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is not None:
            chunks.append(data)
            self.size += len(data)
            self._held += len(data)
            if self._held > MEMORY_LIMIT:
                self._to_file()
            return
        self._file.write(data)
        self.size += len(data)

    def _to_file(self) -> None:
        """Too big for memory: on to a file in incoming/."""
        chunks, self._chunks = self._chunks, None
        try:
            self._open(self._spill() if self._spill is not None else None)
            self._file.write(b"".join(chunks))
        except BaseException:
            self.abort()
            raise

    def finish(self) -> str:
        """Blocking: write, fdatasync, rename into queue/ (no dir fsync: the
        caller's, grouped)."""
        if self.closed:
            raise OSError(errno.EBADF, "message was aborted", self.queue_id)
        if self._chunks is not None:
            return self._finish_memory()
        self.closed = True
        try:
            self._file.commit(self.final_path, datasync=True, sync_dir=False)
        finally:
            self.tmp_path = None  # renamed, or removed by the failed commit
        return self.queue_id

    def _finish_memory(self) -> str:
        blob = b"".join(self._chunks)
        self._chunks = None
        self.closed = True
        f = DurableFile(os.path.join(self.spool.incoming_dir, self.queue_id + TMP_SUFFIX))
        try:
            f.write(blob)
        except BaseException:
            f.abort()
            raise
        f.commit(self.final_path, datasync=True, sync_dir=False)
        self.data = blob[len(self.header):]
        return self.queue_id

    def abort(self, here: bool = False) -> None:
        """Drop the message.  here=True: do the file work in this thread;
        otherwise it may be handed to the disk pool (defer_io), as the
        reactor must not wait for it."""
        self._chunks = None
        self.tmp_path = None
        if self.closed:
            return
        self.closed = True
        f = self._file
        if f is None:
            return  # held in memory only: nothing on disk
        if self.defer_io is not None and not here:
            # a rejected big message, from the reactor: closing flushes up to
            # 64 KiB and the unlink may wait for the journal, so in a thread
            self.defer_io(f.abort)
        else:
            f.abort()


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
        self._cleaned = False

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
        import fcntl

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
        from relay.common import privdrop
        try:
            uid = privdrop.controller(self.root)[0]
        except privdrop.UnsafePath:
            return  # no single other user: an administrator's set-up, not refused here
        if uid != 0:
            raise UnsafeSpoolFile(errno.EPERM, f"{self.root} is controlled by uid {uid}: a relay running as root "
                                  "would follow the links that user can put in it; start the relay as that user "
                                  "(twistd -u/-g, or User= in the systemd unit)", self.root)

    def clean_incoming(self, log=None) -> int:
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
        self._cleaned = True
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
                 in_memory: bool = False, spill=None) -> IncomingMessage:
        return IncomingMessage(self, envelope, prepared, in_memory=in_memory, spill=spill)

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
        inc = IncomingMessage(self, envelope)
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
            env.client = _NO_CLIENT
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

    # -- start-up recovery ------------------------------------------------
    def recover(self, log=None) -> Iterator[QueueEntry]:
        """Clean up after a crash and yield every readable queued message.

        (Call clean_incoming() first, before anything listens.)  Stray temp
        files and state files without a message are removed; unreadable
        entries are moved to quarantine/.  Logs what it did.
        """
        self.create()
        names = os.listdir(self.queue_dir)
        msgs = set()
        states = set()
        for name in names:
            if is_queue_id(name):
                msgs.add(name)
            elif name.endswith(STATE_SUFFIX) and is_queue_id(name[: -len(STATE_SUFFIX)]):
                states.add(name[: -len(STATE_SUFFIX)])
            elif name.endswith(TMP_SUFFIX):
                if self._cleaned:
                    continue  # clean_incoming() removed the stale ones; this one is live
                unlink_quiet(os.path.join(self.queue_dir, name))
                if log:
                    log("removed temporary file {name} from queue/", name=name)
            else:
                self.quarantine(name, "unexpected file in queue/", log)
        for qid in states - msgs:
            unlink_quiet(self.state_path(qid))
            if log:
                log("{queue_id}: removed state file of a finished message", queue_id=qid)
        for qid in sorted(msgs):
            try:
                entry = self.load(qid, history=False)
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - one bad entry never blocks the rest
                entry = self._without_state(qid, e, log) if qid in states else None
                if entry is None:
                    self.quarantine(qid, str(e) or e.__class__.__name__, log)
                    if qid in states:
                        self.quarantine(qid + STATE_SUFFIX, str(e), log)
                    continue
            if entry.state.done:
                self.remove(qid)
                if log:
                    log("{queue_id}: removed, all recipients were final", queue_id=qid)
                continue
            yield entry

    def _without_state(self, qid: str, error: Exception, log=None) -> QueueEntry | None:
        """A readable message whose state file is not.  Every state file is
        fdatasynced before its rename, so no crash or power loss leaves one
        torn: this is damage from outside (a disk error, a hand edit).  The
        message stays queued with every recipient pending again, and the
        state file goes to quarantine (logged): recipients delivered before
        may get a second copy; nothing is lost.  None when the message
        itself is bad."""
        try:
            env, offset, size = self.read_envelope(qid)
        except Exception:  # noqa: BLE001 - the message is bad too: the caller quarantines both
            return None
        env.client = _NO_CLIENT
        self.quarantine(qid + STATE_SUFFIX, str(error) or error.__class__.__name__, log)
        if log:
            log("{queue_id}: state file unreadable ({error}): kept the message with every recipient "
                "pending again", queue_id=qid, error=str(error) or error.__class__.__name__)
        return QueueEntry(env, State.fresh(env), size, offset)

    def quarantine(self, name: str, reason: str, log=None) -> None:
        src = os.path.join(self.queue_dir, name)
        dst = os.path.join(self.quarantine_dir, name)
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
