"""The spool layout made at the first start (or by relay-sendmail before
it) is durable: every directory made is fsynced, and so is the directory
it was made in, after it was made.  Seen from outside with strace(1):
the system calls of a real process, in order."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, base_config, toml_dumps

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace(1) is not installed (Debian package strace)")

_CALL = re.compile(r'^(?:\d+ +)?(\w+)\((.*)\) += (-?\d+)')


def traced(tmp_path, argv: list[str], data: bytes = b"") -> list[tuple[str, str, int]]:
    out = tmp_path / "strace.out"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RELAY_CONFIG", None)
    r = subprocess.run([STRACE, "-f", "-qq", "-o", str(out), "-e", "trace=mkdir,mkdirat,openat,open,fsync,fdatasync,"
                        "close,syncfs", *argv], input=data, capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    calls = []
    for line in out.read_text().splitlines():
        m = _CALL.match(line)
        if m:
            calls.append((m.group(1), m.group(2), int(m.group(3))))
    return calls


def synced_after_made(calls, dirs: list[str]) -> dict[str, list[str]]:
    """For each directory: 'made' when it was made, then 'synced' for each
    fsync of an fd opened on it after that."""
    fds: dict[int, str] = {}
    seen: dict[str, list[str]] = {d: [] for d in dirs}
    for name, args, ret in calls:
        if name in ("mkdir", "mkdirat") and ret == 0:
            path = args.split('"')[1]
            if path in seen:
                seen[path].append("made")
        elif name in ("openat", "open") and ret >= 0:
            path = args.split('"')[1]
            fds[ret] = path
        elif name == "close":
            fds.pop(int(args), None)
        elif name in ("fsync", "fdatasync") and ret == 0:
            path = fds.get(int(args))
            if path in seen and seen[path]:
                seen[path].append("synced")
    return seen


def layout(root: str) -> list[str]:
    sp = spoolmod.Spool(root)
    return [sp.root, sp.incoming_dir, sp.queue_dir, sp.quarantine_dir, sp.drop_dir]


@pytest.mark.parametrize("how", ["relay start", "relay-sendmail"])
def test_the_new_spool_layout_is_fsynced_with_its_parent(tmp_path, how):
    data = base_config(str(tmp_path))
    root = data["spool"]
    if how == "relay start":  # what RelayService._open_spool does first
        argv = [sys.executable, "-c", f"from relay.queue.spool import Spool; Spool({root!r}).lock()"]
    else:
        cfg = tmp_path / "relay.toml"
        cfg.write_text(toml_dumps(data))
        argv = [sys.executable, "-m", "relay.intake.sendmail", "-C", str(cfg), "x@example.org"]
    calls = traced(tmp_path, argv, b"Subject: x\n\nx\n")
    dirs = layout(root)
    seen = synced_after_made(calls, [*dirs, str(tmp_path)])
    for d in dirs:
        assert seen[d][:2] == ["made", "synced"], (d, seen[d])
    # the spool's parent, after the spool was made; the spool, after its subdirectories were
    order = [(n, a.split('"')[1] if '"' in a else a) for n, a, r in calls if n in ("mkdir", "mkdirat")]
    assert [p for _, p in order if p in dirs] == dirs
    fds: dict[int, str] = {}
    synced_at: dict[str, list[int]] = {}
    made_at: dict[str, int] = {}
    for i, (name, args, ret) in enumerate(calls):
        if name in ("mkdir", "mkdirat") and ret == 0:
            made_at[args.split('"')[1]] = i
        elif name in ("openat", "open") and ret >= 0:
            fds[ret] = args.split('"')[1]
        elif name in ("fsync", "fdatasync") and ret == 0 and int(args) in fds:
            synced_at.setdefault(fds[int(args)], []).append(i)
    assert any(i > made_at[root] for i in synced_at.get(str(tmp_path), [])), "the spool's parent is not fsynced"
    last_sub = max(made_at[d] for d in dirs[1:])
    assert any(i > last_sub for i in synced_at.get(root, [])), "the spool is not fsynced after its subdirectories"
