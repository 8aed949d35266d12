"""Processes the benchmark starts, and what they cost.

Every child runs in its own session (so its own process group): one
``killpg`` stops it and everything it forked (Postfix's master and its
daemons, Dovecot and its login processes), and the registry stops them all
on the way out, after an error or Ctrl-C too.  CPU and memory come from
/proc, so no extra package is needed: a process tree's CPU is the sum over
its live members of user+system time plus the time of the children they
have already reaped (cutime/cstime), which is how Postfix's short-lived
smtpd/cleanup/smtp processes stay counted after they exit.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not be measured (the message says why)."""


# -- starting and stopping ---------------------------------------------------------


class Registry:
    """Every process started, so that all of them are stopped at the end."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, **kw)
        self._procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        """SIGTERM to the leader (a graceful stop), then SIGKILL to the whole group."""
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_group(p.pid)
        if p.poll() is None:
            p.wait(10)
        self._procs = [(n, q) for n, q in self._procs if q is not p]

    def stop_all(self) -> None:
        for _name, p in reversed(list(self._procs)):
            try:
                self.stop(p, timeout=10)
            except Exception:  # noqa: BLE001 - keep stopping the others
                kill_group(p.pid)


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group (members may outlive the leader)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def raise_nofile(limit: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for us and the children we start (1000 idle sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc ---------------------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # fields after "pid (comm) ": index 0 is field 3 (state) of proc(5)
    return data[data.rindex(b")") + 2:].split()


def ppid_map() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = int(st[1])
    return out


def descendants(root: int, pmap: dict[int, int] | None = None) -> list[int]:
    pmap = ppid_map() if pmap is None else pmap
    children: dict[int, list[int]] = {}
    for pid, ppid in pmap.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@dataclass
class TreeCPU:
    seconds: float  # user+system of the tree, reaped children included
    processes: int  # live processes in the tree (root included)


def tree_cpu(root: int) -> TreeCPU:
    """CPU seconds of a process and all its descendants, live and reaped.

    Live members count utime+stime (all their threads); each member's
    cutime+cstime holds the children it has already waited for.
    """
    total = 0
    n = 0
    for pid in [root, *descendants(root)]:
        st = _stat(pid)
        if st is None:
            continue
        n += 1
        total += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return TreeCPU(total / CLK_TCK, n)


def proc_cpu(pid: int) -> float:
    """CPU seconds of one process (all threads), its reaped children included."""
    st = _stat(pid)
    if st is None:
        return 0.0
    return (int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])) / CLK_TCK


def system_busy() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu() -> float:
    """CPU seconds of the children this process has reaped (smtp-source runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def status_kb(pid: int, field: str) -> int:
    """A kB figure from /proc/PID/status: VmRSS, VmHWM..."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/{pid}/status")


def threads(pid: int) -> int:
    return status_kb(pid, "Threads")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, needs the right to write clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def wait_idle(pid_cpu, *, window: float = 0.5, threshold: float = 0.01, timeout: float = 120.0) -> float:
    """Wait until a process tree uses less than threshold CPU seconds in window;
    returns the seconds waited.  ``pid_cpu`` is a callable giving CPU seconds."""
    t0 = time.monotonic()
    last = pid_cpu()
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = pid_cpu()
        if now - last < threshold:
            return time.monotonic() - t0
        last = now
    raise BenchError(f"the relay did not become idle within {timeout:.0f}s")


def meminfo_kb(field: str) -> int:
    """A kB figure from /proc/meminfo (Cached, MemFree...)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/meminfo")


def drop_caches() -> int:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: the page cache, dentries and
    inodes of the whole machine are dropped, so that what is read next comes
    from the disk.  Returns the kernel's Cached figure (kB) right after.
    Raises BenchError when this machine does not allow it (not root, a
    read-only /proc in a container): a "cold" figure must not be a warm one."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches): {e}")
    return meminfo_kb("Cached")


def resident_fraction(paths: list[str]) -> float | None:
    """The fraction of these files' pages in the page cache (util-linux fincore),
    None when fincore is missing or fails: how cold a "cold" start really was."""
    exe = shutil.which("fincore")
    if not exe or not paths:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    res = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            res += int(parts[0])
            size += -(-int(parts[1]) // page) * page  # fincore counts whole pages
    return res / size if size else None


def _label(pid: int) -> str:
    """A short name for a process: its command and script or module."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    words = [os.path.basename(argv[0])]
    rest = argv[1:]
    if words[0].startswith("python"):
        words = ["python"]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        words += rest[:2] if rest[:1] == ["-m"] else rest[:1]
    return " ".join(words)[:60]


def _task_cpu() -> float:
    """user+nice+system CPU seconds of the whole machine (what processes' utime
    and stime add up to; interrupts and softirq, e.g. loopback traffic, are
    left out)."""
    with open("/proc/stat") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return (user + nice + system) / CLK_TCK


class OthersMonitor:
    """What else runs on the machine while the benchmark does.

    Per benchmark section: the machine's process CPU (user+nice+system) less
    this benchmark's own (this process, the children it reaped, and every
    live descendant with the children they reaped), i.e. what other users'
    tests and benchmarks took.  Every interval seconds it also samples which
    other processes used CPU (utime+stime of those alive at two samples in a
    row: short-lived ones are missed there, so these names are a lower bound).
    """

    def __init__(self, interval: float = 5.0):
        import threading

        self.interval = interval
        self.section = "start"
        self.by_section: dict[str, list[float]] = {}  # section -> [others' CPU s, wall s]
        self.by_label: dict[str, float] = {}
        self.benchmarks: set[str] = set()  # other bench/run.py, crash_harness... command lines
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last: dict[int, int] = {}
        self._t = time.monotonic()
        self._machine = self._ours = 0.0

    def start(self) -> "OthersMonitor":
        self._last, self._ours = self._sample()
        self._machine = _task_cpu()
        self._t = time.monotonic()
        self._thread.start()
        return self

    def mark(self, section: str) -> None:
        """From now on, others' CPU counts towards this section."""
        self._tick()
        with self._lock:
            self.section = section

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._tick()

    def _sample(self) -> tuple[dict[int, int], float]:
        pmap = ppid_map()
        me = os.getpid()
        ours = set(descendants(me, pmap))
        ru_self = resource.getrusage(resource.RUSAGE_SELF)
        ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours_cpu = ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime
        others = {}
        for pid in pmap:
            if pid == me:
                continue
            st = _stat(pid)
            if st is None:
                continue
            if pid in ours:
                ours_cpu += (int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])) / CLK_TCK
            else:
                others[pid] = int(st[11]) + int(st[12])
        return others, ours_cpu

    def _tick(self) -> None:
        with self._lock:
            now_t = time.monotonic()
            machine = _task_cpu()
            cur, ours = self._sample()
            for pid, ticks in cur.items():
                d = ticks - self._last.get(pid, ticks)
                if d > 0:
                    label = _label(pid)
                    self.by_label[label] = self.by_label.get(label, 0.0) + d / CLK_TCK
                    if "bench/" in label or "crash_harness" in label:
                        self.benchmarks.add(label)
            sec = self.by_section.setdefault(self.section, [0.0, 0.0])
            sec[0] += max(0.0, (machine - self._machine) - (ours - self._ours))
            sec[1] += now_t - self._t
            self._last, self._t, self._machine, self._ours = cur, now_t, machine, ours

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except OSError:
                pass

    def summary(self, cores: int) -> dict:
        with self._lock:
            cpu = sum(v[0] for v in self.by_section.values())
            wall = sum(v[1] for v in self.by_section.values())
            return {
                "cpu_seconds": cpu, "wall_seconds": wall, "cores": cores,
                "share": cpu / wall / cores if wall else 0.0,
                "sections": {k: {"share": v[0] / v[1] / cores if v[1] else 0.0, "cpu_seconds": v[0]}
                             for k, v in self.by_section.items() if v[1] > 0},
                "top": sorted(self.by_label.items(), key=lambda kv: -kv[1])[:6],
                "benchmarks": sorted(self.benchmarks),
            }


# -- cgroups: an exact CPU total for a server and every process it ever forked ------------


class CpuCgroup:
    """A cgroup of our own holding one server (cgroup v2's cpu.stat, else v1's
    cpuacct).  Processes are put in it by a shell wrapper before the server's
    exec, so nothing it forks escapes; the kernel sums their CPU even after
    they exit.  ``create`` returns None where cgroups are not writable."""

    def __init__(self, path: str, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, name: str) -> "CpuCgroup | None":
        for mount, version in _cgroup_mounts():
            path = os.path.join(mount, f"relaybench-{os.getpid()}-{name}")
            try:
                os.mkdir(path)
                cg = cls(path, version)
                cg.usage()
                return cg
            except OSError:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        return None

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this cgroup: the shell joins it, then execs the server."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv]

    def usage(self) -> float:
        """CPU seconds of every process that has been in the cgroup."""
        if self.version == 2:
            with open(os.path.join(self.path, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
            raise OSError("no usage_usec in cpu.stat")
        with open(os.path.join(self.path, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9

    def remove(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                time.sleep(0.1)


def remove_our_cgroups() -> None:
    """Remove every cgroup this run made (after an error left some behind)."""
    for mount, version in _cgroup_mounts():
        try:
            names = os.listdir(mount)
        except OSError:
            continue
        for name in names:
            if name.startswith(f"relaybench-{os.getpid()}-"):
                CpuCgroup(os.path.join(mount, name), version).remove()


def _cgroup_mounts() -> list[tuple[str, int]]:
    v2, v1 = [], []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if parts[2] == "cgroup2":
                    v2.append((parts[1], 2))
                elif parts[2] == "cgroup" and "cpuacct" in parts[3].split(","):
                    v1.append((parts[1], 1))
    except OSError:
        pass
    return v2 + v1


# -- sockets ---------------------------------------------------------------------------


def free_port(addr: str) -> int:
    """A port nobody listens on at addr now (bound and released)."""
    s = socket.socket()
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def read_banner(addr: str, port: int, timeout: float = 10.0, source: str | None = None) -> float:
    """Seconds from connect() to a complete 220 banner line."""
    t0 = time.perf_counter()
    with socket.create_connection((addr, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        buf = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise BenchError(f"{addr}:{port} closed the connection before its banner")
            buf += chunk
            if any(not line.startswith(b"220-") for line in buf.split(b"\n")[:-1]):
                break  # the last line of a (possibly multi-line) greeting
        dt = time.perf_counter() - t0
        if not buf.startswith(b"220"):
            raise BenchError(f"{addr}:{port} greeted with {buf[:80]!r}")
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
    return dt


def wait_banner(addr: str, port: int, proc: subprocess.Popen, timeout: float = 60.0, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on {addr}:{port}")
        try:
            read_banner(addr, port, timeout=5)
            return
        except (OSError, BenchError) as e:
            last = e
            time.sleep(0.05)
    raise BenchError(f"{what}: no SMTP banner on {addr}:{port} after {timeout:.0f}s ({last})")
