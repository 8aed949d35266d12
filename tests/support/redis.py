"""A private redis-server for tests (Debian's /usr/bin/redis-server).

Started on a loopback address and a free port, with its own directory and
no persistence (``--save "" --appendonly no``), never the system's service.
``stop()`` and ``start()`` again on the same port make an outage; ``pause()``
(SIGSTOP) makes a Redis that accepts and never answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from tests.support.relay import free_port
from tests.support.wait import poll

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def available() -> str | None:
    """None, or why the tests that need Redis are skipped."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"no redis-server ({REDIS_SERVER}): apt-get install redis-server"
    return None


class RedisServer:
    def __init__(self, ip: str = "127.0.0.4", *, password: str | None = None):
        self.ip = ip
        self.port = free_port((ip,))
        self.dir = tempfile.mkdtemp(prefix="relay-redis-")
        self.socket = os.path.join(self.dir, "redis.sock")  # also listening there
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.ip}:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", self.ip, "--port", str(self.port), "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log"),
             "--unixsocket", self.socket, "--unixsocketperm", "700"]
            + (["--requirepass", self.password] if self.password else []),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll(self._answers, timeout=20, what=f"redis-server on {self.ip}:{self.port}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited ({self.proc.returncode}): {self.log()}")
        try:
            return self.command("PING") in (b"+PONG", b"-NOAUTH Authentication required.")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command over a fresh connection; the first line of the reply."""
        with socket.create_connection((self.ip, self.port), timeout=5) as s:
            req = f"*{len(args)}\r\n".encode() + b"".join(
                f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
            s.sendall(req)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.split(b"\r\n", 1)[0]

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, True)
