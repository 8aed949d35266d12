"""What the benchmark needs on the machine, and what the machine is.

On a fresh Debian-like machine (as root) it installs Debian's postfix (for
smtp-source, smtp-sink and Postfix itself) and dovecot-pop3d with apt-get.
Postfix is preseeded "No configuration", so the package writes no main.cf
and starts nothing: the system's port 25 and /etc/postfix stay untouched
(the benchmark runs its own instance from a private config directory).  A
temporary policy-rc.d keeps the packages' services from starting during the
install, and Dovecot's service, if we installed it, is disabled afterwards so
that it does not start at the next boot either.  Our relay is installed from
this checkout into a venv (bench/.venv), re-installed when the code changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time

from mta import Env, which
from procs import BenchError

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
VENV = os.path.join(BENCH, ".venv")
POLICY_RC = "/usr/sbin/policy-rc.d"


def _run(argv: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-2000:]}")
    return r


def _missing_packages() -> list[str]:
    pkgs = []
    if not (which("smtp-source", "/usr/sbin/smtp-source") and which("smtp-sink", "/usr/sbin/smtp-sink")
            and which("postfix", "/usr/sbin/postfix")):
        pkgs.append("postfix")
    if not (which("dovecot", "/usr/sbin/dovecot") and os.path.exists("/usr/lib/dovecot/pop3")):
        pkgs.append("dovecot-pop3d")
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        pkgs.append("python3-venv")
    return pkgs


def install_packages(say) -> list[str]:
    """apt-get install what is missing; returns the packages installed."""
    pkgs = _missing_packages()
    if not pkgs:
        return []
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"missing: {', '.join(pkgs)}; run as root on a Debian-like system so that "
                         f"bench/run.py can apt-get install them, or install them yourself")
    say(f"installing {' '.join(pkgs)} with apt-get (postfix: 'No configuration', services not started)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if shutil.which("debconf-set-selections"):
        subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
                       text=True, check=False)
    made_policy = False
    if not os.path.exists(POLICY_RC):
        with open(POLICY_RC, "w") as f:
            f.write("#!/bin/sh\n# bench/run.py: no service starts while it installs packages\nexit 101\n")
        os.chmod(POLICY_RC, 0o755)
        made_policy = True
    try:
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]
        if _run(cmd, env=env, check=False).returncode != 0:
            _run(["apt-get", "update", "-q"], env=env)
            _run(cmd, env=env)
    finally:
        if made_policy:
            os.unlink(POLICY_RC)
    if "dovecot-pop3d" in pkgs and shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
        for unit in ("dovecot.socket", "dovecot.service"):  # the socket unit may not exist
            _run(["systemctl", "disable", "--now", unit], check=False)
    still = _missing_packages()
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")
    return pkgs


def _source_hash() -> str:
    h = hashlib.sha256()
    paths = ["setup.cfg", "pyproject.toml", "twisted/plugins/relay_plugin.py"]
    for dirpath, dirnames, files in os.walk(os.path.join(ROOT, "relay")):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in sorted(files) if f.endswith(".py")]
    for rel in paths:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def ensure_venv(say) -> str:
    """bench/.venv with this checkout installed (pip install .); returns its python."""
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        say(f"creating {VENV} and installing twisted-relay from {ROOT}")
        _run([sys.executable, "-m", "venv", VENV])
        _run([py, "-m", "pip", "install", "-q", ROOT])
        fresh = True
    else:
        fresh = False
    stamp = os.path.join(VENV, "relay-source.sha256")
    want = _source_hash()
    have = open(stamp).read().strip() if os.path.exists(stamp) else ""
    if fresh:
        have = want
        with open(stamp, "w") as f:
            f.write(want + "\n")
    if have != want:
        say("installing this checkout of twisted-relay into the bench venv")
        _run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", ROOT])
        with open(stamp, "w") as f:
            f.write(want + "\n")
    return py


def make_env(python: str) -> Env:
    def need(name: str) -> str:
        path = which(name, f"/usr/sbin/{name}", f"/usr/bin/{name}")
        if not path:
            raise BenchError(f"{name} not found")
        return path

    return Env(root=ROOT, venv=VENV, python=python, twistd=os.path.join(VENV, "bin", "twistd"),
               relayctl=os.path.join(VENV, "bin", "relayctl"), smtp_source=need("smtp-source"),
               smtp_sink=need("smtp-sink"), postfix=need("postfix"), postconf=need("postconf"),
               dovecot=which("dovecot", "/usr/sbin/dovecot"))


# -- what the machine is -------------------------------------------------------------------


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _out(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def disk_of(path: str) -> str:
    """Device, filesystem, mount options and (where the kernel says) the disk model of path."""
    info = _out(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", path])
    if not info:
        info = _out(["df", "-T", path]).splitlines()[-1] if _out(["df", "-T", path]) else "?"
    dev = info.split()[0] if info else ""
    extra = ""
    name = os.path.basename(dev)
    for cand in (name, name.rstrip("0123456789"), name.rstrip("0123456789").rstrip("p")):
        base = f"/sys/block/{cand}"
        if cand and os.path.isdir(base):
            rot = open(f"{base}/queue/rotational").read().strip() if os.path.exists(f"{base}/queue/rotational") else "?"
            model = ""
            if os.path.exists(f"{base}/device/model"):
                model = open(f"{base}/device/model").read().strip()
            extra = f"; {cand}: {'rotational' if rot == '1' else 'non-rotational' if rot == '0' else '?'}" + \
                    (f", model {model}" if model else "")
            break
    return " ".join(info.split()) + extra


def machine(work: str) -> dict:
    mem_kb = int(_first("/proc/meminfo", "MemTotal").split()[0]) if _first("/proc/meminfo", "MemTotal") != "?" else 0
    return {
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "os": os_release(),
        "disk": disk_of(work),
        "virtualization": _out(["systemd-detect-virt"]) or "?",
    }


def os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "?"


def versions(env: Env) -> dict:
    from mta import postfix_version

    code = "import sys, twisted; print(sys.version.split()[0], twisted.__version__)"
    py, tw = (_out([env.python, "-c", code]).split() + ["?", "?"])[:2]
    dv = _out([env.dovecot, "--version"]).split() if env.dovecot else []
    code = ["relay", "twisted", "setup.cfg", "pyproject.toml"]
    commit = _out(["git", "-C", ROOT, "log", "-1", "--format=%h", "--", *code]) or "?"  # the relay code's commit
    dirty = _out(["git", "-C", ROOT, "status", "--porcelain", "--", *code])
    head = _out(["git", "-C", ROOT, "rev-parse", "--short=10", "HEAD"]) or "?"  # the whole checkout, bench/ too
    head_dirty = _out(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    return {"python": py, "twisted": tw, "postfix": postfix_version(env), "dovecot": dv[0] if dv else "-",
            "twisted-relay": commit + (" (with uncommitted changes)" if dirty else ""),
            "checkout": head + (" (with uncommitted changes)" if head_dirty else "")}


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(max_load: float, max_wait: float, say) -> tuple[float, float, float]:
    """Wait (up to max_wait seconds) for a 1-minute load average below max_load."""
    t0 = time.monotonic()
    while True:
        la = os.getloadavg()
        if la[0] < max_load or time.monotonic() - t0 >= max_wait:
            if la[0] >= max_load:
                say(f"load average still {la[0]:.2f} after {max_wait:.0f}s: running anyway (recorded)")
            return la
        say(f"load average {la[0]:.2f} >= {max_load}: waiting")
        time.sleep(min(30.0, max(1.0, max_wait - (time.monotonic() - t0))))
