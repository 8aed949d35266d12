"""A FUSE file system that forgets what was never made durable (issue 12,
item 15), in the manner of LazyFS.

SIGKILL leaves the kernel's page cache alone, so a crash test built on it
cannot see a missing fsync, a rename whose directory was never fsynced, or
writes in the wrong order.  This file system passes every operation
through to a real backing directory and keeps, beside it, what a power cut
would leave:

* per file (per inode, whatever its names): the contents at its last
  fsync/fdatasync, copied aside at that moment (``<backing>.shadow/<id>``);
  a file never synced has no durable contents (it comes back empty);
* per directory: its entries (name -> inode) at its last fsync; a
  directory never fsynced comes back empty.  A create, rename, link or
  unlink is durable only once its directory is fsynced (for a rename, each
  of the two directories for its side of it); fsyncing a file makes no name
  of it durable.

This is conservative, as LazyFS is: whatever a real file system *may* lose
is lost.  Files and directories present at mount are durable as they are.

A "power cut" is: the processes using the mount are SIGKILLed, then
``PowerFS.cut()`` tells the file system process to throw away everything
not durable and unmounts it; once unmounted, the process rebuilds the
backing directory from the durable state alone (contents from the copies,
entries from the per-directory maps) and exits with a JSON summary of what
it dropped.  ``mount()`` again serves what survived.  A clean
``unmount()`` keeps everything (as a clean shutdown would).

Not modelled: durability of modes, owners and times (the live values are
kept), extended attributes, mmap writes.  A directory renamed into another
one and fsynced on both sides appears once (in the first place found).

Run as ``python -m tests.support.powerfs BACKING MOUNTPOINT CONTROL`` (what
PowerFS does); needs /dev/fuse, fusermount3 and mfusepy (libfuse3 or 2).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

FILE, DIR, LINK, SPECIAL = "f", "d", "l", "s"


def available() -> str | None:
    """None when a PowerFS can be mounted here, else why not (a skip reason)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE is not available on this machine)"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "no fusermount3 (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:  # OSError/EnvironmentError: libfuse not found
        return f"the FUSE binding mfusepy cannot be loaded: {e}"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible to this user"
    return None


# ---------------------------------------------------------------------------
# the file system (runs in its own process)


@dataclass(eq=False)
class Node:
    id: int
    kind: str
    mode: int
    children: dict[str, int] = field(default_factory=dict)  # DIR: live entries
    durable_children: dict[str, int] = field(default_factory=dict)  # DIR: entries at the last fsync
    synced: bool = False  # FILE: the shadow copy holds durable contents
    shared: bool = False  # FILE: the shadow is a hard link to the live file (unchanged since mount)
    dirty: bool = False  # FILE: changed since the last sync
    links: int = 0  # FILE: live names
    target: str = ""  # LINK


class Model:
    """The live tree and the durable one, and the backing directory ops."""

    def __init__(self, backing: str):
        self.backing = os.path.abspath(backing)
        self.shadow = self.backing + ".shadow"
        self.lock = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self.next_id = 1
        self.fhs: dict[int, int] = {}  # open fd (file or directory) -> node id
        self.cut_armed = False
        self.stats = {"fsyncs": 0, "dir_fsyncs": 0}
        shutil.rmtree(self.shadow, ignore_errors=True)
        os.mkdir(self.shadow, 0o700)
        self.root = self._scan(self.backing)

    # -- set-up: everything present is durable
    def _new(self, kind: str, mode: int) -> Node:
        n = Node(self.next_id, kind, mode)
        self.next_id += 1
        self.nodes[n.id] = n
        return n

    def _scan(self, path: str) -> Node:
        st = os.lstat(path)
        d = self._new(DIR, stat.S_IMODE(st.st_mode))
        by_ino: dict[int, Node] = {}
        stack = [(d, path)]
        while stack:
            node, p = stack.pop()
            for name in os.listdir(p):
                cp = os.path.join(p, name)
                cst = os.lstat(cp)
                if stat.S_ISDIR(cst.st_mode):
                    c = self._new(DIR, stat.S_IMODE(cst.st_mode))
                    stack.append((c, cp))
                elif stat.S_ISLNK(cst.st_mode):
                    c = self._new(LINK, 0o777)
                    c.target = os.readlink(cp)
                elif stat.S_ISREG(cst.st_mode):
                    c = by_ino.get(cst.st_ino)
                    if c is None:
                        c = self._new(FILE, stat.S_IMODE(cst.st_mode))
                        os.link(cp, self._shadow_path(c))
                        c.synced = c.shared = True
                        by_ino[cst.st_ino] = c
                    c.links += 1
                else:  # sockets, FIFOs: served; a cut drops them
                    c = self._new(SPECIAL, stat.S_IMODE(cst.st_mode))
                node.children[name] = c.id
            node.durable_children = dict(node.children)
        return d

    def _shadow_path(self, node: Node) -> str:
        return os.path.join(self.shadow, str(node.id))

    def real(self, path: str) -> str:
        return self.backing + path if path != "/" else self.backing

    def lookup(self, path: str) -> Node:
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if node.kind != DIR or part not in node.children:
                raise OSError(errno.ENOENT, "no such file", path)
            node = self.nodes[node.children[part]]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, name = path.rsplit("/", 1)
        return self.lookup(head or "/"), name

    def node_of(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self.fhs:
            return self.nodes[self.fhs[fh]]
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        return self.lookup(path)

    # -- contents
    def unshare(self, node: Node) -> None:
        """Before the first change to a file present at mount: its durable
        contents move to a copy of their own (lock held)."""
        if node.shared:
            sp = self._shadow_path(node)
            tmp = sp + ".cow"
            shutil.copyfile(sp, tmp)
            os.rename(tmp, sp)
            node.shared = False

    def snapshot(self, node: Node, fd: int) -> None:
        """fsync/fdatasync: the file's contents now are its durable ones."""
        sp = self._shadow_path(node)
        tmp = sp + ".new"
        # the handle may be write-only, and the file unlinked (hard_remove):
        # read it through /proc
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            with open(tmp, "wb") as out:
                off = 0
                while True:
                    b = os.pread(rfd, 1 << 20, off)
                    if not b:
                        break
                    out.write(b)
                    off += len(b)
        finally:
            os.close(rfd)
        os.rename(tmp, sp)
        node.synced, node.shared, node.dirty = True, False, False

    # -- the cut
    def rebuild(self) -> dict:
        """Replace the backing directory by its durable state; return counts."""
        out = self.backing + ".cut"
        shutil.rmtree(out, ignore_errors=True)
        placed: dict[int, str] = {}
        summary = {"files": 0, "dirs": 0, "empty_never_synced": 0, "reverted": 0, "names_dropped": 0,
                   "names_restored": 0, "dirs_emptied": 0, "duplicate_dirs": 0}
        live_seen: set[int] = set()

        def count_live(n: Node) -> None:
            live_seen.add(n.id)
            for cid in n.children.values():
                c = self.nodes[cid]
                if c.kind == DIR and cid not in live_seen:
                    count_live(c)
        count_live(self.root)

        def place_dir(n: Node, path: str) -> None:
            os.mkdir(path, n.mode or 0o700)
            summary["dirs"] += 1
            summary["names_dropped"] += len(n.children.keys() - n.durable_children.keys())
            for name, cid in n.durable_children.items():
                if n.children.get(name) != cid:
                    summary["names_restored"] += 1
                c = self.nodes[cid]
                p = os.path.join(path, name)
                if c.kind == DIR:
                    if cid in placed:
                        summary["duplicate_dirs"] += 1
                        continue
                    placed[cid] = p
                    if c.children and not c.durable_children:
                        summary["dirs_emptied"] += 1
                    place_dir(c, p)
                elif c.kind == LINK:
                    os.symlink(c.target, p)
                elif c.kind == SPECIAL:
                    summary["names_dropped"] += 1
                elif cid in placed:
                    os.link(placed[cid], p)
                else:
                    placed[cid] = p
                    summary["files"] += 1
                    if c.synced:
                        os.rename(self._shadow_path(c), p)
                        if c.dirty:
                            summary["reverted"] += 1
                    else:
                        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, c.mode or 0o600)
                        os.close(fd)
                        summary["empty_never_synced"] += 1
                    os.chmod(p, c.mode)

        place_dir(self.root, out)
        old = self.backing + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.backing, old)
        os.rename(out, self.backing)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.shadow, ignore_errors=True)
        return summary


def make_operations(model: Model):
    import mfusepy as fuse

    class Ops(fuse.Operations):
        use_ns = True
        flag_nopath = True
        flag_nullpath_ok = True

        def __init__(self) -> None:
            self.m = model

        # -- attributes
        def getattr(self, path, fh=None):
            m = self.m
            with m.lock:
                node = m.node_of(path, fh)
                st = os.fstat(fh) if fh is not None and fh in m.fhs else os.lstat(m.real(path))
                nlink = node.links if node.kind == FILE else st.st_nlink
            return {
                "st_ino": node.id, "st_mode": st.st_mode, "st_nlink": max(nlink, 0),
                "st_uid": st.st_uid, "st_gid": st.st_gid,
                "st_size": st.st_size, "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns, "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
            }

        def statfs(self, path):
            sv = os.statvfs(self.m.backing)
            return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        def access(self, path, amode):
            return 0

        def chmod(self, path, mode):
            m = self.m
            with m.lock:
                node = m.lookup(path)
                os.chmod(m.real(path), mode, follow_symlinks=False)
                node.mode = stat.S_IMODE(mode)
            return 0

        def chown(self, path, uid, gid):
            os.lchown(self.m.real(path), uid, gid)
            return 0

        def utimens(self, path, times=None):
            if times is None:
                os.utime(self.m.real(path), follow_symlinks=False)
            else:
                os.utime(self.m.real(path), ns=times, follow_symlinks=False)
            return 0

        def readlink(self, path):
            return os.readlink(self.m.real(path))

        # -- directories
        def opendir(self, path):
            m = self.m
            with m.lock:
                node = m.lookup(path)
                if node.kind != DIR:
                    raise OSError(errno.ENOTDIR, "not a directory")
                fd = os.open(m.real(path), os.O_RDONLY | os.O_DIRECTORY)
                m.fhs[fd] = node.id
            return fd

        def readdir(self, path, fh):
            m = self.m
            with m.lock:
                node = m.node_of(path, fh)
                # with use_ino an entry needs its inode number (0 is skipped)
                kinds = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, LINK: stat.S_IFLNK, SPECIAL: 0}
                return [(".", {"st_ino": node.id, "st_mode": stat.S_IFDIR}, 0),
                        ("..", {"st_ino": 1, "st_mode": stat.S_IFDIR}, 0)] + [
                    (name, {"st_ino": cid, "st_mode": kinds[m.nodes[cid].kind]}, 0)
                    for name, cid in node.children.items()]

        def releasedir(self, path, fh):
            with self.m.lock:
                self.m.fhs.pop(fh, None)
            os.close(fh)
            return 0

        def fsyncdir(self, path, datasync, fh):
            m = self.m
            with m.lock:
                node = m.node_of(path, fh)
                node.durable_children = dict(node.children)
                m.stats["dir_fsyncs"] += 1
            return 0

        def mkdir(self, path, mode):
            m = self.m
            with m.lock:
                parent, name = m.parent(path)
                os.mkdir(m.real(path), mode)
                node = m._new(DIR, stat.S_IMODE(mode))
                parent.children[name] = node.id
            return 0

        def rmdir(self, path):
            m = self.m
            with m.lock:
                parent, name = m.parent(path)
                os.rmdir(m.real(path))
                parent.children.pop(name, None)
            return 0

        # -- names
        def _drop_link(self, parent: Node, name: str) -> None:
            old = parent.children.pop(name, None)
            if old is not None and self.m.nodes[old].kind == FILE:
                self.m.nodes[old].links -= 1

        def unlink(self, path):
            m = self.m
            with m.lock:
                parent, name = m.parent(path)
                os.unlink(m.real(path))
                self._drop_link(parent, name)
            return 0

        def rename(self, old, new):
            m = self.m
            with m.lock:
                sp, sname = m.parent(old)
                dp, dname = m.parent(new)
                if sname not in sp.children:
                    raise OSError(errno.ENOENT, "no such file", old)
                os.rename(m.real(old), m.real(new))
                nid = sp.children.pop(sname)
                if dp.children.get(dname) != nid:
                    self._drop_link(dp, dname)
                    dp.children[dname] = nid
                else:  # rename onto another name of the same file: POSIX does nothing
                    sp.children[sname] = nid
            return 0

        def link(self, target, source):
            m = self.m
            with m.lock:
                node = m.lookup(source)
                dp, dname = m.parent(target)
                os.link(m.real(source), m.real(target))
                dp.children[dname] = node.id
                node.links += 1
            return 0

        def symlink(self, target, source):
            m = self.m
            with m.lock:
                dp, dname = m.parent(target)
                os.symlink(source, m.real(target))
                node = m._new(LINK, 0o777)
                node.target = source
                dp.children[dname] = node.id
            return 0

        def mknod(self, path, mode, dev):
            """Sockets and FIFOs (the relay's control socket): served, but
            like a reboot a cut does not keep them."""
            m = self.m
            with m.lock:
                dp, dname = m.parent(path)
                os.mknod(m.real(path), mode, dev)
                node = m._new(SPECIAL, stat.S_IMODE(mode))
                dp.children[dname] = node.id
            return 0

        # -- files
        def create(self, path, mode, fi=None):
            m = self.m
            flags = fi if isinstance(fi, int) else os.O_WRONLY
            with m.lock:
                parent, name = m.parent(path)
                existing = parent.children.get(name)
                if existing is not None and flags & os.O_TRUNC:
                    m.unshare(m.nodes[existing])
                fd = os.open(m.real(path), flags | os.O_CREAT, mode)
                if existing is None:
                    node = m._new(FILE, stat.S_IMODE(mode))
                    node.links = 1
                    parent.children[name] = node.id
                else:
                    node = m.nodes[existing]
                if flags & os.O_TRUNC:
                    node.dirty = True
                m.fhs[fd] = node.id
            return fd

        def open(self, path, flags):
            m = self.m
            with m.lock:
                node = m.lookup(path)
                if flags & os.O_TRUNC:
                    m.unshare(node)
                    node.dirty = True
                fd = os.open(m.real(path), flags & ~os.O_CREAT)
                m.fhs[fd] = node.id
            return fd

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            m = self.m
            node = m.nodes[m.fhs[fh]]
            if node.shared or not node.dirty:
                with m.lock:
                    m.unshare(node)
                    node.dirty = True
            return os.pwrite(fh, data, offset)

        def truncate(self, path, length, fh=None):
            m = self.m
            with m.lock:
                node = m.node_of(path, fh)
                m.unshare(node)
                node.dirty = True
                if fh is not None and fh in m.fhs:
                    os.ftruncate(fh, length)
                else:
                    os.truncate(m.real(path), length)
            return 0

        def flush(self, path, fh):
            return 0

        def release(self, path, fh):
            with self.m.lock:
                self.m.fhs.pop(fh, None)
            os.close(fh)
            return 0

        def fsync(self, path, datasync, fh):
            m = self.m
            with m.lock:
                node = m.nodes[m.fhs[fh]]
                m.snapshot(node, fh)
                m.stats["fsyncs"] += 1
            return 0

    class Fuse(fuse.FUSE):
        """Two fixes to mfusepy's glue: ftruncate gets its handle (with
        nopath the path is None), and rename refuses flags it cannot honour
        (RENAME_NOREPLACE, RENAME_EXCHANGE) instead of ignoring them."""

        def truncate_fuse_3(self, path, length, fip):
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(), length, fh)

        def rename_fuse_3(self, old, new, flags):
            if flags:
                return -errno.EINVAL
            return self.rename_fuse_2(old, new)

    return Ops(), Fuse


def serve(backing: str, mountpoint: str, control: str) -> int:
    """The file system process: serve until unmounted; then, if the control
    file says "cut", rebuild the backing directory from the durable state."""
    model = Model(backing)
    ops, fuse_cls = make_operations(model)
    fuse_cls(ops, mountpoint, foreground=True, nothreads=False, fsname="powerfs", subtype="powerfs",
             hard_remove=True, nopath=True, use_ino=True, auto_unmount=True, attr_timeout=1.0, entry_timeout=1.0,
             negative_timeout=0)
    try:
        with open(control) as f:
            cmd = f.read().strip()
    except FileNotFoundError:
        cmd = ""
    result = {"cut": cmd == "cut", **model.stats}
    if cmd == "cut":
        result.update(model.rebuild())
    else:
        shutil.rmtree(model.shadow, ignore_errors=True)
    with open(control + ".result", "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------
# the test side


class PowerFS:
    """A PowerFS over ``<root>/backing`` mounted at ``<root>/mnt``.

    ``mount()``, then use ``mnt``; ``cut()`` = power loss (SIGKILL whatever
    uses the mount first); ``mount()`` again serves what survived;
    ``unmount()`` is a clean stop.  Use as a context manager so it is
    unmounted even when a test fails.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.backing = os.path.join(self.root, "backing")
        self.mnt = os.path.join(self.root, "mnt")
        self.control = os.path.join(self.root, "powerfs.control")
        self.log_path = os.path.join(self.root, "powerfs.log")
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.cuts: list[dict] = []

    def __enter__(self) -> "PowerFS":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()

    def mount(self, timeout: float = 30.0) -> "PowerFS":
        for p in (self.control, self.control + ".result"):
            if os.path.exists(p):
                os.unlink(p)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.powerfs", self.backing, self.mnt, self.control],
            cwd=here, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"powerfs exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self._stop_process()
                raise RuntimeError(f"powerfs did not mount within {timeout}s; see {self.log_path}")
            time.sleep(0.02)
        return self

    def cut(self, timeout: float = 60.0) -> dict:
        """Power loss: everything not durable is gone; returns the summary."""
        with open(self.control, "w") as f:
            f.write("cut")
        result = self._unmount(timeout)
        self.cuts.append(result)
        return result

    def unmount(self, timeout: float = 60.0) -> dict:
        """A clean stop (everything kept).  Safe to call when not mounted."""
        if self.proc is None:
            return {}
        return self._unmount(timeout)

    def _unmount(self, timeout: float) -> dict:
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        deadline = time.monotonic() + timeout
        # the kernel releases a killed process's files on its own time: a
        # busy mount is tried again, then detached lazily
        while os.path.ismount(self.mnt):
            r = subprocess.run([tool, "-u", "-q", self.mnt], capture_output=True)
            if r.returncode == 0 or not os.path.ismount(self.mnt):
                break
            if time.monotonic() > deadline:
                subprocess.run([tool, "-u", "-z", "-q", self.mnt], capture_output=True)
                break
            time.sleep(0.05)
        try:
            self.proc.wait(max(5.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._stop_process()
            raise RuntimeError(f"powerfs did not exit after the unmount; see {self.log_path}")
        rc, self.proc = self.proc.returncode, None
        try:
            with open(self.control + ".result") as f:
                result = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"powerfs exited with {rc} without a result; see {self.log_path}")
        return result

    def _stop_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        if os.path.ismount(self.mnt):
            subprocess.run([tool, "-u", "-z", "-q", self.mnt], capture_output=True)
        self.proc = None


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1], sys.argv[2], sys.argv[3]))
