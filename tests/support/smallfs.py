"""A real, small, separately mounted filesystem for disk-full tests.

``SmallFS(path, size="2m").mount()`` mounts a tmpfs of that size on path
(root only; the test is skipped, not failed, where mounting is not
permitted).  ``fill()`` writes a filler file until the kernel says ENOSPC,
``free()`` removes it; ``exhaust_inodes()`` creates empty files until no
inode is left (mount with ``inodes=N``); ``read_only(True/False)`` remounts
it read-only or back.  ``umount()`` is lazy, so a test's cleanup never
fails on a busy mount.
"""

from __future__ import annotations

import errno
import os
import subprocess
import unittest


class SmallFS:
    def __init__(self, path: str, size: str = "2m", inodes: int | None = None):
        self.path = path
        self.size = size
        self.inodes = inodes
        self.mounted = False
        self.filler = os.path.join(path, "filler")
        self.inode_dir = os.path.join(path, "inodes")

    def mount(self) -> SmallFS:
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a small tmpfs needs root")
        os.makedirs(self.path, exist_ok=True)
        opts = f"size={self.size},mode=0700"
        if self.inodes:
            opts += f",nr_inodes={self.inodes}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", self.path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise unittest.SkipTest(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        self.mounted = True
        return self

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], capture_output=True)
            self.mounted = False

    def fill(self) -> int:
        """Write until ENOSPC; return the bytes written."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 4096
        total = 0
        try:
            while True:
                try:
                    total += os.write(fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
            # the last partial page too
            try:
                while True:
                    total += os.write(fd, b"\0")
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        finally:
            os.close(fd)
        return total

    def free(self) -> None:
        try:
            os.unlink(self.filler)
        except FileNotFoundError:
            pass

    def exhaust_inodes(self) -> int:
        os.makedirs(self.inode_dir, exist_ok=True)
        n = 0
        while True:
            try:
                os.close(os.open(os.path.join(self.inode_dir, str(n)), os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return n
            n += 1

    def free_inodes(self) -> None:
        if os.path.isdir(self.inode_dir):
            for name in os.listdir(self.inode_dir):
                os.unlink(os.path.join(self.inode_dir, name))

    def read_only(self, ro: bool) -> None:
        r = subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", self.path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"remount {self.path}: {r.stderr.strip()}")

    def available(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize
