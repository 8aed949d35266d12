"""The durable-file module: every file the relay makes durable goes through here.

One sequence, written once (run it in a thread, never on the reactor):
create a temporary name exclusively, write, flush, fsync (or fdatasync) the
file, rename it into place, fsync the directory that holds the new name.
Only after the last step is a new name sure to survive a power loss; a crash
at any step leaves the old state (and at worst a temporary file, which each
caller's recovery removes), never a torn file under the final name.

``DurableFile`` is the sequence for a file written in pieces (spool
messages, Maildir deliveries, drop files); ``write_atomic`` for one written
in one call (state files, the users file).  The options the callers need:
the mode (``chmod``: whatever the umask), a group or owner, fdatasync
instead of fsync, no directory fsync (the caller groups them, or a deferral
need not be durable), a directory fd instead of paths (relay-sendmail
never follows a name below the spool), and a syncfs(2) fallback for a
directory that may be written but not read.
"""

from __future__ import annotations

import os
import secrets
from typing import Callable

# O_EXCL: a temporary name is never an existing file (nor a link to one);
# O_NOFOLLOW and O_CLOEXEC: no link followed, nothing leaked to a child.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: str) -> None:
    """fsync a directory: its entries (files created, renamed or removed in it) become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir_fd(dir_fd: int, fallback_fd: int | None = None) -> None:
    """fsync the directory dir_fd names (an O_PATH or O_DIRECTORY fd).

    A directory that may be written but not read (a group-opened drop
    directory, mode 3730) cannot be opened to fsync it: with fallback_fd
    (a file on the same file system) syncfs(2) does it then."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        if fallback_fd is None:
            raise
        syncfs(fallback_fd)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quiet(path: str, *, dir_fd: int | None = None, missing_only: bool = True) -> None:
    """Remove path; a name already gone is fine (missing_only=False: so is
    any OSError, for clean-up after a failure that is already being raised)."""
    try:
        if dir_fd is None:
            os.unlink(path)
        else:
            os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        if missing_only:
            raise


def temp_name(name: str, suffix: str = ".tmp", *, hidden: bool = True, pid: bool = False) -> str:
    """A temporary name for name (a base name): ``.name.<random>.tmp``.
    (The spool's callers give their own, ``TMP_SUFFIX`` names.)"""
    middle = f"{os.getpid()}." if pid else ""
    return f"{'.' if hidden else ''}{name}.{middle}{secrets.token_hex(4)}{suffix}"


def create_exclusive(path: str, mode: int = 0o600, *, dir_fd: int | None = None, chmod: bool = False,
                     flags: int = CREATE_FLAGS) -> int:
    """A new file (never an existing one); chmod=True: mode whatever the umask."""
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    if chmod:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            unlink_quiet(path, dir_fd=dir_fd, missing_only=False)
            raise
    return fd


class DurableFile:
    """A new file under a temporary name, made durable and renamed into place.

    Blocking (a thread, never the reactor).  ``commit`` flushes, fsyncs (or
    fdatasyncs) the file, renames it to its final name and fsyncs the
    directory of that name (unless told not to: the spool groups those);
    ``abort`` closes and removes the temporary file.  A failure before the
    rename removes the temporary file too: nothing is left under the final
    name unless it is complete and synced.

    fd: a file created ahead of time (the spool's stock of incoming files);
    buffering: a write buffer for many small writes (0: each write is
    written through with write_all); setup(fd): run once on a new file
    (e.g. a chown), the file removed if it raises; dir_fd: every name is
    relative to that directory fd (nothing followed above it).
    """

    __slots__ = ("tmp_path", "dir_fd", "fd", "_file", "closed", "_named")

    def __init__(self, tmp_path: str, *, mode: int = 0o600, chmod: bool = False, fd: int | None = None,
                 buffering: int = 0, dir_fd: int | None = None, flags: int = CREATE_FLAGS,
                 setup: Callable[[int], None] | None = None):
        self.tmp_path = tmp_path
        self.dir_fd = dir_fd
        self.closed = False
        self._named = True  # the temporary name exists (until renamed or removed)
        if fd is None:
            fd = create_exclusive(tmp_path, mode, dir_fd=dir_fd, chmod=chmod, flags=flags)
        self.fd = fd
        try:
            if setup is not None:
                setup(fd)
            self._file = os.fdopen(fd, "wb", buffering=buffering, closefd=False) if buffering else None
        except BaseException:
            self._discard()
            raise

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            write_all(self.fd, data)

    def flush(self) -> None:
        """What is buffered written to the file (for a reader of its name)."""
        if self._file is not None:
            self._file.flush()

    def commit(self, final: str, *, datasync: bool = False, sync_dir: bool = True,
               dir_path: str | None = None, close_first: bool = True) -> str:
        """flush, fsync (fdatasync: datasync=True), rename to final, fsync its directory.

        dir_path: the directory to fsync (default: final's; with dir_fd, the
        directory of dir_fd, by syncfs when it cannot be read).
        close_first=False: keep the file open until the directory is synced
        (its fd is the syncfs fallback)."""
        try:
            if self._file is not None:
                self._file.flush()
            if datasync:
                os.fdatasync(self.fd)
            else:
                os.fsync(self.fd)
            if close_first:
                self._close()
        except BaseException:
            self._discard()
            raise
        try:
            if self.dir_fd is None:
                os.rename(self.tmp_path, final)
            else:
                os.rename(self.tmp_path, final, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            self._discard()
            raise
        self._named = False
        try:
            if sync_dir:
                if self.dir_fd is not None:
                    fsync_dir_fd(self.dir_fd, None if self.closed else self.fd)
                else:
                    fsync_dir(dir_path if dir_path is not None else os.path.dirname(os.path.abspath(final)))
        finally:
            self._close()
        return final

    def abort(self) -> None:
        """Close and remove the temporary file (blocking: the close may
        flush a buffer, the unlink wait for the journal)."""
        self._discard()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._file is not None:
                self._file.close()
        finally:
            os.close(self.fd)

    def _discard(self) -> None:
        try:
            self._close()
        except OSError:
            pass
        if self._named:
            self._named = False
            unlink_quiet(self.tmp_path, dir_fd=self.dir_fd, missing_only=False)


def write_atomic(path: str, data: bytes, *, tmp_path: str | None = None, mode: int = 0o600, chmod: bool = False,
                 datasync: bool = False, sync_dir: bool = True,
                 setup: Callable[[int], None] | None = None) -> None:
    """Replace (or create) path with data durably: a temporary file next to
    it, written, fsynced (datasync: fdatasynced), renamed over path, the
    directory fsynced (sync_dir=False: not)."""
    d = os.path.dirname(os.path.abspath(path))
    if tmp_path is None:
        tmp_path = os.path.join(d, temp_name(os.path.basename(path)))
    f = DurableFile(tmp_path, mode=mode, chmod=chmod, setup=setup)
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.commit(path, datasync=datasync, sync_dir=sync_dir, dir_path=d)


def makedirs_durable(path: str, mode: int = 0o700, *, parents: bool = True) -> bool:
    """Make sure path is a directory whose name survives a power loss.

    Missing parents are created too (parents=False: they must exist,
    FileNotFoundError otherwise).  A new directory's name is only in its
    parent's page cache until the parent is fsynced, so each directory on
    the way, from path up to the root of its file system, has its parent
    fsynced, also when it already existed: a crash (or another thread) may
    have made it without the fsync.  Returns True when path was created here.
    """
    path = os.path.abspath(path)
    missing: list[str] = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p or not parents:
            break
        p = parent
    created = False
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
            created = d == path or created
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    d = path
    dev = os.stat(d).st_dev
    while True:
        parent = os.path.dirname(d)
        if parent == d or os.stat(parent).st_dev != dev:
            break  # the file system's root: its name is not in a directory of it
        try:
            fsync_dir(parent)
        except PermissionError:
            # a parent we may write but not read (mode 0730, say): flush the
            # whole file system instead, which makes every name in it durable
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(fd)
            finally:
                os.close(fd)
            break
        d = parent
    return created


def syncfs(fd: int) -> None:
    """syncfs(2) on fd's file system (sync(2) where there is none)."""
    try:
        import ctypes  # noqa: PLC0415 - only on this rare path (a parent we cannot read)
        import ctypes.util  # noqa: PLC0415

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()
