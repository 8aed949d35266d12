"""Small blocking file helpers shared by the spool, the Maildir writer and
the users file (run them in a thread, never on the reactor)."""

from __future__ import annotations

import os


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
