"""Moving queued messages between the spools of one relay: the single-process
queue (``<spool>/queue``) and the workers' queues (``<spool>/w<i>/queue``).

When the number of workers changes, and when a worker dies for good
(relay.runtime.master), messages move to the process that will deliver
them.  A queue is only ever moved by the one holding its spool lock (the
lock every relay process holds while it runs on a spool): no message ever has
two owners, and one whose owner still runs (only slow, not dead) stays.
Renames within one file system; the state file moves before its message, so
a crash in between leaves a message whose recipients are all pending again
(a duplicate delivery at worst, never a loss).
"""

from __future__ import annotations

import os

from relay.common.fileio import fsync_dir
from relay.config.workerpaths import worker_spool
from relay.queue import spool as spoolmod


def _lock(root: str) -> int | None:
    """The spool lock of root (a worker's or the relay's), or None while a
    process holds it: a queue is only ever moved by the one holding its lock."""
    try:
        return spoolmod.Spool(root).lock()
    except spoolmod.SpoolLocked:
        return None


def queued_ids(root: str) -> list[str]:
    qdir = os.path.join(root, "queue")
    return sorted(n for n in os.listdir(qdir) if spoolmod.is_queue_id(n)) if os.path.isdir(qdir) else []


def move_queue(root: str, dst: spoolmod.Spool) -> int:
    """Move every queued message of the spool at root into dst (both locked
    by the caller; the state file first, see the module docstring)."""
    moved = 0
    qdir = os.path.join(root, "queue")
    dst.create()
    for name in queued_ids(root):
        st = os.path.join(qdir, name + spoolmod.STATE_SUFFIX)
        if os.path.exists(st):
            os.rename(st, dst.state_path(name))
        os.rename(os.path.join(qdir, name), dst.message_path(name))
        moved += 1
    if moved:
        fsync_dir(dst.queue_dir)
        fsync_dir(qdir)
    return moved


def _worker_dirs(top: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(top) if os.path.isdir(top) else ():
        if name.startswith("w") and name[1:].isdigit():
            out.append((int(name[1:]), os.path.join(top, name)))
    return sorted(out)


def _move_locked(root: str, dst: spoolmod.Spool, logfn=None) -> int:
    """move_queue from root if its lock is free (else nothing: a process still owns it)."""
    if not queued_ids(root):
        return 0
    fd = _lock(root)
    if fd is None:
        if logfn:
            logfn("{root} is locked by a running process: its queued messages stay there", root=root)
        return 0
    try:
        return move_queue(root, dst)
    finally:
        os.close(fd)


def adopt_orphans(top: str, workers: int, logfn=None) -> int:
    """Move queued messages from directories no worker owns into worker 0..N-1:
    the single-process queue (``<spool>/queue``: the caller holds the top lock)
    into worker 0, ``w<j>`` with j >= N into ``w<j mod N>`` (only once its lock
    is free)."""
    moved = 0
    if queued_ids(top):
        moved += move_queue(top, spoolmod.Spool(worker_spool(top, 0)))
    for j, root in _worker_dirs(top):
        if j >= workers:
            moved += _move_locked(root, spoolmod.Spool(worker_spool(top, j % workers)), logfn)
    if moved and logfn:
        logfn("moved {count} queued messages into the workers' queues", count=moved)
    return moved


def adopt_worker_queues(top: spoolmod.Spool, logfn=None) -> int:
    """A single-process relay (workers = 1) on a spool that had workers: the
    messages of every ``w<j>/queue`` move into its own queue, each only once
    w<j>'s lock is free.  The caller holds the top spool's lock (so no master
    runs, and no worker of one: they die with it)."""
    moved = 0
    for _j, root in _worker_dirs(top.root):
        moved += _move_locked(root, top, logfn)
    if moved and logfn:
        logfn("moved {count} queued messages from the workers' queues (<spool>/w<i>/) into the queue",
              count=moved)
    return moved


def hand_over(top: str, dead: int, to: int) -> int:
    """Worker ``dead``'s queue into worker ``to``'s, neither running (in a thread:
    renames and directory fsyncs).  -1 if a process still holds a lock: the
    dead worker's queue is only taken from a worker that no longer holds it."""
    src, dst = worker_spool(top, dead), spoolmod.Spool(worker_spool(top, to))
    fd_src = _lock(src)
    if fd_src is None:
        return -1
    try:
        fd_dst = _lock(dst.root)
        if fd_dst is None:
            return -1
        try:
            return move_queue(src, dst)
        finally:
            os.close(fd_dst)
    finally:
        os.close(fd_src)
