"""The POP3 mailbox lock that holds across hosts: an NFS-safe dot-lock.

Several relays may serve one ``local.mailboxes`` tree on shared storage
(docs/shared-storage.md); an flock or an in-memory lock only excludes the
sessions of one host, so a POP3 session also holds ``<maildir>/relay-pop3.dotlock``,
made as lockfile(1)/liblockfile and Dovecot's dotlock make theirs, because
O_EXCL alone is not atomic on every NFS and a lost reply to a retransmitted
request can report failure for a link that was made:

1. a temporary file with a unique name (host, pid, random) is created in the
   maildir (O_EXCL | O_NOFOLLOW: never an existing file or a planted link),
   holding ``host=... node=... pid=... time=... token=...``;
2. it is link()ed to the lock name, whatever link() answers;
3. the lock is ours when the temporary file's link count is 2 and the lock
   name has its inode (lstat, no link followed); the temporary name goes.

A lock that is not ours is stale, and is broken, when
* it was made on this host (same host name and same node: boot and pid
  namespace) by a process that no longer exists: at once (a crash, a SIGKILL);
  also at once when the caller holds this host's flock (MailboxLock), which
  every session of this host holds while it holds the dot-lock;
* otherwise when it has not been refreshed for ``stale_after`` seconds
  (default STALE_AFTER), the age measured against the mtime of our own
  temporary file, so both times come from the file server's clock (no clock
  skew between hosts).  A live session refreshes (touches) it every
  REFRESH_EVERY seconds, well inside that.

Breaking renames the stale lock to a unique name first and checks that the
renamed file is the one judged stale (another host may have broken and
re-taken it in between: then it is put back with link(), which never
overwrites); only then is it removed.  Release removes the lock only while
it is still ours (same inode and token).

Nothing here follows a symbolic link: the lock name, a planted symlink or a
non-regular file there is refused (LockRefused), never followed or removed;
check_real_dirs refuses a Maildir (or its tmp/new/cur) that is a symlink.

MailboxLock is what a POP3 session takes: this host's flock first (cheap),
then the DotLock; relay.mailbox.pop3lock keeps it fresh.  Blocking (stats,
links, maybe over NFS): callers run it in a thread, except
MailboxLock.release (see there).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

LOCK_NAME = "relay-pop3.lock"  # the flock
DOTLOCK_NAME = "relay-pop3.dotlock"  # no leading dot: Maildir++ readers take ".x" for folders
STALE_AFTER = 300.0  # seconds without a refresh after which another host's lock is stale
REFRESH_EVERY = 30.0  # seconds between refreshes of a held lock
MAX_CONTENT = 512
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class LockHeld(Exception):
    """The lock is held by a live session (on this or another host)."""


class LockRefused(OSError):
    """Something that is not our lock file sits at the lock name (a symlink,
    a directory, a FIFO): refused, never followed nor removed."""


def escape_host(h: str) -> str:
    """A host name as the Maildir spec wants it in a file name: "/" and ":"
    would break the name, "," would be taken for a Dovecot field, and
    whitespace or "=" would break the lock file's fields."""
    out = h.replace("\\", r"\134").replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x3D else f"\\{b:03o}"
                   for b in out.encode("utf-8", "surrogateescape"))


def _read_small(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


def node_id() -> str:
    """Which kernel and pid namespace this process runs in: two containers
    with one host name (or one name on two machines) must not judge each
    other's pids.  Boot id and pid-namespace inode, hashed."""
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    raw = _read_small("/proc/sys/kernel/random/boot_id") + "/" + ns
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


def pid_alive(pid: int) -> bool:
    """True when a process pid exists (signal 0; EPERM means it exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    """What a lock file says about its holder."""

    host: str = ""
    node: str = ""
    pid: int = 0
    time: int = 0
    token: str = ""

    def render(self) -> bytes:
        return (f"host={self.host} node={self.node} pid={self.pid} time={self.time} "
                f"token={self.token}\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> "Owner":
        """The fields of a lock file; a foreign or torn one gives empty
        fields (then only the age rule applies)."""
        fields: dict[str, str] = {}
        for part in data.decode("ascii", "replace").split():
            k, sep, v = part.partition("=")
            if sep:
                fields[k] = v
        try:
            pid = int(fields.get("pid", "0"))
            t = int(fields.get("time", "0"))
        except ValueError:
            pid, t = 0, 0
        return cls(fields.get("host", ""), fields.get("node", ""), pid, t, fields.get("token", ""))


def _read_lock(path: str) -> tuple[os.stat_result, Owner] | None:
    """lstat and content of the lock file at path; None when there is none.
    Raises LockRefused for anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockRefused(errno.ELOOP, "a symbolic link at the lock name is refused", path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockRefused(errno.EINVAL, "the lock name is not a regular file: refused", path)
        return st, Owner.parse(os.read(fd, MAX_CONTENT))
    finally:
        os.close(fd)


class DotLock:
    """One dot-lock at <directory>/<name>; acquire, refresh, release (blocking).

    host: this host's name (default: the system's); now, alive and node: the
    clock, the pid check and the node id (injected by tests).
    """

    def __init__(self, directory: str, *, name: str = DOTLOCK_NAME, host: str | None = None,
                 stale_after: float = STALE_AFTER, now: Callable[[], float] = time.time,
                 alive: Callable[[int], bool] = pid_alive, node: str | None = None):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.host = escape_host(host if host is not None else (socket.gethostname() or "localhost"))
        self.node = node if node is not None else node_id()
        self.stale_after = stale_after
        self._now = now
        self._alive = alive
        self._ino: tuple[int, int] | None = None  # (dev, ino) of the lock while held
        self._token = ""
        self.broke: Owner | None = None  # the stale holder the last acquire broke, if any

    @property
    def held(self) -> bool:
        return self._ino is not None

    def _owner(self) -> Owner:
        return Owner(self.host, self.node, os.getpid(), int(self._now()), self._token)

    def acquire(self, tries: int = 3, *, host_excluded: bool = False) -> None:
        """Take the lock, breaking a stale one; LockHeld if a live session has it.

        host_excluded: the caller holds a lock that excludes every other
        session of this host (MailboxLock's flock, taken first and released
        last by every session): a lock of this host is then stale whatever
        its pid says (a pid reused, a session of this very process that
        ended without its release).
        """
        if self.held:
            raise LockHeld(self.path)
        for _ in range(tries):
            server_now, link_error = self._try_link()
            if self.held:
                return
            found = _read_lock(self.path)
            if found is None:
                if link_error is not None and link_error.errno != errno.EEXIST:
                    raise link_error  # no lock there and link() cannot make one: the storage fails
                continue  # released meanwhile: try again
            st, owner = found
            if not self._is_stale(st, owner, server_now, host_excluded):
                raise LockHeld(self.path)
            self._break(st, owner)
        raise LockHeld(self.path)

    def _try_link(self) -> tuple[float, OSError | None]:
        """Steps 1-3 above.  Returns the temporary file's mtime (the file
        server's "now") and what link() raised; sets _ino when the lock is ours."""
        link_error: OSError | None = None
        self._token = secrets.token_hex(8)
        tmp = os.path.join(self.directory, f"{os.path.basename(self.path)}.{self.host}.{os.getpid()}.{self._token}")
        fd = os.open(tmp, _TMP_FLAGS, 0o600)
        try:
            try:
                os.write(fd, self._owner().render())
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path, follow_symlinks=False)
            except OSError as e:
                link_error = e  # judged below: on NFS a link may succeed and still report an error
            st = os.lstat(tmp)
            if st.st_nlink == 2:
                try:
                    lst = os.lstat(self.path)
                except FileNotFoundError:
                    lst = None
                if lst is not None and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
                    self._ino = (st.st_dev, st.st_ino)
            return st.st_mtime, link_error
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _is_stale(self, st: os.stat_result, owner: Owner, server_now: float, host_excluded: bool) -> bool:
        if owner.host == self.host and owner.node == self.node:
            if host_excluded or (owner.pid > 0 and not self._alive(owner.pid)):
                return True
        return server_now - st.st_mtime > self.stale_after

    def _break(self, st: os.stat_result, owner: Owner) -> None:
        """Remove the stale lock (st, owner) and only that one."""
        aside = f"{self.path}.stale.{secrets.token_hex(8)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke or released it
        try:
            now = _read_lock(aside)
        except LockRefused:
            now = None
        if now is not None and (now[0].st_dev, now[0].st_ino) == (st.st_dev, st.st_ino) and now[1] == owner:
            self.broke = owner
            os.unlink(aside)
            return
        # Not the file judged stale: another host broke it and took the lock
        # in between.  Put it back (link never overwrites) and go on.
        try:
            os.link(aside, self.path, follow_symlinks=False)
        except OSError:
            pass
        os.unlink(aside)

    def still_ours(self) -> bool:
        """True while the file at the lock name is the one we made."""
        if self._ino is None:
            return False
        try:
            found = _read_lock(self.path)
        except LockRefused:
            return False
        return (found is not None and (found[0].st_dev, found[0].st_ino) == self._ino
                and found[1].token == self._token)

    def refresh(self) -> bool:
        """Touch the lock (its mtime: the file server's time) so no other
        host takes it for stale; False when it is no longer ours."""
        if not self.still_ours():
            return False
        try:
            os.utime(self.path, None, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours; never someone else's."""
        if self._ino is None:
            return
        try:
            if self.still_ours():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            self._ino = None


class MailboxLocked(Exception):
    """Another session (of this or another process or host) holds the mailbox."""


def check_real_dirs(maildir: str) -> None:
    """Refuse a Maildir, or a tmp/new/cur in it, that is a symbolic link (or
    not a directory): one planted there would take the relay's files (and
    it may run as root at start) somewhere else.  LockRefused (an OSError)."""
    # the domain's directory too (made by the relay); the root may be a link the operator made
    for d in (os.path.dirname(maildir), maildir, *(os.path.join(maildir, sub) for sub in ("tmp", "new", "cur"))):
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LockRefused(errno.ENOTDIR, "not a directory (a symbolic link?): refused", d)


class MailboxLock:
    """The POP3 lock of one Maildir: an flock and a dot-lock.

    The flock (on <maildir>/relay-pop3.lock) is the cheap part: it belongs to
    an open file description, so two sessions of one process exclude each
    other as two processes do, and the kernel drops it if the process dies.
    The dot-lock (relay.mailbox.mboxlock.DotLock, <maildir>/relay-pop3.dotlock)
    holds across hosts sharing the mailbox tree over NFS; it has staleness
    rules for a host or process that died with it.  A file system without
    flock (ENOLCK, EOPNOTSUPP) leaves the dot-lock alone to do it.

    ``refresh`` (a thread, every mboxlock.REFRESH_EVERY seconds while the
    session lives) keeps the dot-lock fresh; ``release`` removes it (if
    still ours) and drops the flock.  ``on_release``: a callable run first
    at release (the POP3 side's refresh timer stops).
    """

    def __init__(self, maildir: str, *, dotlock: DotLock | None = None):
        self.path = os.path.join(maildir, LOCK_NAME)
        self.dotlock = DotLock(maildir) if dotlock is None else dotlock
        self._fd: int | None = None
        self._held = False
        self.on_release: Callable[[], None] | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise LockRefused(errno.EINVAL, "the lock name is not a regular file: refused", self.path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MailboxLocked(self.path)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            fd = -1
        try:
            self.dotlock.acquire(host_excluded=fd >= 0)
        except LockHeld:
            if fd >= 0:
                os.close(fd)
            raise MailboxLocked(self.dotlock.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self._fd = fd
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    def refresh(self) -> bool:
        """Touch the dot-lock (blocking); False when it is no longer ours."""
        return self._held and self.dotlock.refresh()

    def release(self) -> None:
        """Cheap (an lstat, a small read, an unlink) and needed even while the
        relay stops, so callers may run it on the reactor."""
        stop, self.on_release = self.on_release, None
        if stop is not None:
            stop()
        if not self._held:
            return
        self._held = False
        fd, self._fd = self._fd, None
        try:
            self.dotlock.release()
        finally:
            if fd is not None and fd >= 0:
                os.close(fd)  # closing the only descriptor drops the flock
