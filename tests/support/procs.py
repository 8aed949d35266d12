"""Relay processes with resource limits, and what /proc says about them.

``LimitedRelayProcess`` is tests.support.relay.RelayProcess started with
``setrlimit`` applied in the child (RLIMIT_FSIZE for "file too large",
RLIMIT_NOFILE for connection floods).  ``memory(pid)`` reads VmRSS and
VmHWM (peak RSS) in bytes, ``open_fds(pid)`` counts descriptors.
"""

from __future__ import annotations

import os
import resource

from tests.support.relay import RelayProcess


class LimitedRelayProcess(RelayProcess):
    def __init__(self, tmpdir: str, data: dict, name: str = "relay", limits: dict[int, int] | None = None):
        super().__init__(tmpdir, data, name)
        self.limits = dict(limits or {})

    def _preexec(self) -> None:
        for res, soft in self.limits.items():
            _old, hard = resource.getrlimit(res)
            if hard != resource.RLIM_INFINITY and soft > hard:
                soft = hard
            resource.setrlimit(res, (soft, hard))


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_paths(pid: int) -> list[str]:
    """What a process's descriptors point to now (one closed between the
    listing and its readlink is left out: the process is running)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def nofile_limit(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of a running process."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
    raise RuntimeError("no Max open files line")


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards want; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
