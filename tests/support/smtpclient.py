"""A raw SMTP test client over a real socket (blocking; run it in a thread
when the relay runs on the test's reactor)."""

from __future__ import annotations

import socket
import ssl


class Reply:
    def __init__(self, code: int, lines: list[str]):
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class RawSMTP:
    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _readline(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._readline()
            code = int(line[:3])
            lines.append(line[4:].decode("latin-1"))
            if line[3:4] != b"-":
                return Reply(code, lines)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (after any pending data)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def starttls(self, cafile: str, server_hostname: str = "localhost") -> None:
        ctx = ssl.create_default_context(cafile=cafile)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        self.buf = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def send_session(host: str, port: int, items: list[tuple[str, bytes]], sender: str = "s@client.test") -> list[str]:
    """[(recipient, message)] in one session (blocking); the queue ids.
    Each message is sent as given (CRLF lines, already dot-stuffed)."""
    out = []
    with RawSMTP(host, port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        for rcpt, msg in items:
            assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
            assert c.cmd(f"RCPT TO:<{rcpt}>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(msg + b".\r\n")
            r = c.reply()
            assert r.code == 250, r
            out.append(r.lines[0].rsplit(" ", 1)[1])
    return out
