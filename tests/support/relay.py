"""Real relay instances for tests: in-process (trial) and as twistd processes.

In-process relays run on the test's reactor; blocking clients (smtplib,
raw sockets) must then run in a thread (``in_thread``) so the reactor keeps
serving.  Process relays are real ``twistd -n relay`` processes, for crash
(SIGKILL) and whole-system tests.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import threads

from relay import config as configmod
from tests.support.wait import poll

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_thread(fn, *args, **kw):
    return threads.deferToThread(fn, *args, **kw)


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def base_config(tmpdir: str, ip: str = "127.0.0.1") -> dict:
    return {
        "hostname": "relay.test",
        "spool": os.path.join(tmpdir, "spool"),
        "workers": 1,  # one process (the default is one per core: a master and workers, <spool>/w<i>/)
        "smtp": {"listen": [f"tcp:0:interface={ip}"]},
        "local": {
            "domains": ["local.test"],
            "mailboxes": os.path.join(tmpdir, "mail"),
            "users": os.path.join(tmpdir, "users"),
        },
        "pop3": {"listen": []},
    }


def toml_dumps(d: dict, prefix: str = "") -> str:
    """A tiny TOML writer for test configs (tables, strings, numbers, lists)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{val(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines = []
    tables = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("routes",):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {val(v)}")
    for k, v in tables:
        lines.append(f"\n[{prefix}{k}]")
        for kk, vv in v.items():
            lines.append(f"{kk} = {val(vv)}")
    return "\n".join(lines) + "\n"


class InProcessRelay:
    """A RelayService on the test reactor."""

    def __init__(self, tmpdir: str, overrides: dict | None = None, ip: str = "127.0.0.1", reactor=None,
                 deliver: bool = True):
        self.deliver = deliver
        self.tmpdir = tmpdir
        self.data = deep_merge(base_config(tmpdir, ip), overrides or {})
        self.config = configmod.load(None, data=self.data)
        self.reactor = reactor
        self.service = None
        self.ports: dict[str, tuple[str, int]] = {}

    async def start(self):
        from relay.runtime.service import RelayService

        self.service = RelayService(self.config, reactor=self.reactor, deliver=self.deliver)
        self.service.smtp_ctx.auth_failure_delay = 0.05
        self.service.privilegedStartService()
        self.service.startService()
        for name, host, port in await self.service.listening():
            self.ports.setdefault(name.split(" ")[0], (host, port))
            self.ports[name] = (host, port)
        await self.service.scanned
        return self

    @property
    def smtp(self) -> tuple[str, int]:
        return self.ports["smtp"]

    async def stop(self):
        if self.service is not None and self.service.running:
            await self.service.stopService()
            q = self.service.queue
            if q is not None and q.busy():
                busy = [(m.qid, m.active, m.busy) for m in q.messages.values() if m.active or m.busy]
                raise AssertionError(f"relay stopped while busy: {busy} inflight={q._inflight}")


class RelayProcess:
    """``twistd -n relay --config FILE`` as a child process."""

    def __init__(self, tmpdir: str, data: dict, name: str = "relay"):
        self.tmpdir = tmpdir
        self.data = data
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.config_path = os.path.join(tmpdir, f"{name}.toml")
        self.log_path = os.path.join(tmpdir, f"{name}.log")
        with open(self.config_path, "w") as f:
            f.write(toml_dumps(data))

    _preexec = None  # a subclass may set limits in the child (tests.support.procs)
    launch = "from twisted.scripts.twistd import run; run()"  # a subclass may install test hooks first
    env: dict | None = None  # extra environment of the child

    def start(self, wait_for: tuple[str, int] | None = None, timeout: float = 20.0) -> "RelayProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.launch,
             "-n", "--pidfile=", "--logfile", "-", "relay", "--config", self.config_path],
            cwd=self.tmpdir, env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=self._preexec,
        )
        if wait_for:
            host, port = wait_for
            poll(lambda: self._connectable(host, port) or self._died(), timeout,
                 what=f"{self.name} listening on {host}:{port}")
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @staticmethod
    def _connectable(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.settimeout(2)
                s.recv(100)
            return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def free_port(ips: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A TCP port currently free on every one of ips."""
    for _ in range(200):
        s = socket.socket()
        s.bind((ips[0], 0))
        port = s.getsockname()[1]
        s.close()
        ok = True
        for ip in ips:
            t = socket.socket()
            try:
                t.bind((ip, port))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return port
    raise RuntimeError("no free port")


def wait_time(deadline_s: float) -> float:
    return time.monotonic() + deadline_s
