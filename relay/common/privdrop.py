"""Root touching files in a directory another user controls.

The spool (and often the users file's directory) belongs to the relay's
user, the account that faces the network.  Whoever holds that account can
put a symbolic link, or another directory, at any name in it: root
following such a name (``open(O_CREAT)``, ``chown``, ``rename``, writing a
temp file in ``queue/``) would create or give away a file of the
attacker's choosing (``/etc/ld.so.preload``).

The one rule, for every place a root process (relayctl, relay-sendmail)
touches such a directory: **do it as the user who controls the directory**
(``as_user``: effective uid, gid and groups switched around the access,
restored afterwards).  Any link the attacker planted is then followed with
the attacker's own rights, so it gains nothing, whatever the code path;
and the files made get the owner the relay itself would give them, with
no chown at all.  This is preferred over making every open in the spool
code link-safe (``openat``/``O_NOFOLLOW`` on each call): that has to be
right at every call site, today's and tomorrow's, in code shared with the
relay; a privilege switch is right by construction.

While the effective uid is the other user's, the real and saved uids stay
0: that user can neither signal nor ptrace the process (the kernel checks
the real and saved uids, and a switched process is not dumpable), and the
process switches back with ``seteuid(0)``.

Who controls a path (``controller``): the one non-root owner of the path
or of any directory on the way to it, lexically and once resolved; root
when all of them are root's.  A directory writable by group or others
(without the sticky bit) that belongs to root has no single user to act
as: ``UnsafePath``.
"""

from __future__ import annotations

import errno
import functools
import os
import pwd
import stat
import threading
from contextlib import contextmanager
from typing import Iterator


class UnsafePath(OSError):
    """No single user to act as: the path is under several users' control."""

    def __init__(self, message: str):
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return self.strerror or ""


def _prefixes(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def controller(path: str) -> tuple[int, int]:
    """(uid, gid) to act as on ``path`` (which need not exist yet): the
    non-root user who controls it or a directory above it, else (0, 0).
    The gid is that user's primary group (else the directory's group)."""
    path = os.path.abspath(path)
    found: dict[int, int] = {}  # uid -> gid of the first object of theirs
    for chain in (_prefixes(path), _prefixes(os.path.realpath(path))):
        shared = None  # the last directory was root's and others may create names in it
        for p in chain:
            try:
                st = os.lstat(p)
            except (FileNotFoundError, NotADirectoryError):
                if shared is not None:
                    raise UnsafePath(f"{p} does not exist and {shared} is writable by others: "
                                     "refusing to create it as root")
                break
            shared = None
            if st.st_uid != 0:
                found.setdefault(st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022:
                if not st.st_mode & stat.S_ISVTX:
                    raise UnsafePath(f"{p} is writable by its group or by others (mode "
                                     f"{stat.S_IMODE(st.st_mode):04o}): refusing to work as root below it")
                shared = p  # sticky (/tmp): existing names are safe, a new one is not
    if not found:
        return 0, 0
    if len(found) > 1:
        owners = ", ".join(f"uid {u}" for u in sorted(found))
        raise UnsafePath(f"{path}: the directories on its path belong to several users ({owners}): "
                         "refusing to work as root on it")
    ((uid, gid),) = found.items()
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        pass
    return uid, gid


@functools.lru_cache(maxsize=8)
def _groups(uid: int, gid: int) -> list[int]:
    """The user's groups (the password and group files are read once per
    process: relayctl and relay-sendmail are short-lived)."""
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return [gid]


_lock = threading.RLock()
_depth = 0


@contextmanager
def as_user(uid: int, gid: int) -> Iterator[None]:
    """Run the block with effective uid/gid (and the user's groups) of uid,
    when this process is root; otherwise (or uid 0) nothing changes."""
    global _depth
    if os.geteuid() != 0 or uid == 0:
        if _depth and os.geteuid() != uid:
            raise RuntimeError("as_user: already acting as another user")
        yield
        return
    with _lock:
        old_egid = os.getegid()
        old_groups = os.getgroups()
        os.setgroups(_groups(uid, gid))
        os.setegid(gid)
        try:
            os.seteuid(uid)
        except BaseException:
            os.setegid(old_egid)
            os.setgroups(old_groups)
            raise
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            os.seteuid(0)
            os.setegid(old_egid)
            os.setgroups(old_groups)


@contextmanager
def as_controller(path: str) -> Iterator[tuple[int, int]]:
    """as_user(*controller(path)); yields the (uid, gid)."""
    if os.geteuid() != 0 or _depth:
        yield os.geteuid(), os.getegid()
        return
    who = controller(path)
    with as_user(*who):
        yield who
