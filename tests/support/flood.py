"""Clients that misbehave in bulk, for flood tests (blocking; plain sockets).

``open_many`` opens many connections at once from several 127.x source
addresses (so a per-address connection limit does not stop them) and reads
each banner; ``stream`` pours bytes into one connection as fast as the
server takes them, from a thread, while the test does something else.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Flood:
    socks: list[socket.socket]
    banners: dict[int, bytes]  # index -> first 3 bytes of the banner, or b"" when closed without one
    seconds: float

    def codes(self) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for v in self.banners.values():
            out[v] = out.get(v, 0) + 1
        return out

    def close(self) -> None:
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def open_many(host: str, port: int, n: int, per_source: int = 20, source_prefix: str = "127.0.1.",
              timeout: float = 60.0) -> Flood:
    """n connections, per_source from each of source_prefix+1, +2, ...; wait for every banner."""
    t0 = time.monotonic()
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.bind((f"{source_prefix}{i // per_source + 1}", 0))
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks.append(s)
        bufs[i] = bytearray()
        sel.register(s, selectors.EVENT_READ, i)
    banners: dict[int, bytes] = {}
    deadline = t0 + timeout
    while len(banners) < n and time.monotonic() < deadline:
        for key, _ev in sel.select(0.5):
            i = key.data
            try:
                data = key.fileobj.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                banners[i] = b""
                sel.unregister(key.fileobj)
                continue
            bufs[i] += data
            if b"\r\n" in bufs[i]:
                banners[i] = bytes(bufs[i][:3])
                sel.unregister(key.fileobj)
    sel.close()
    for i in range(n):
        banners.setdefault(i, b"none")  # no banner within the timeout
    return Flood(socks, banners, time.monotonic() - t0)


@dataclass
class Stream:
    """Bytes poured into one connection by a thread; replies collected."""

    sock: socket.socket
    sent: int = 0
    replies: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def stream(host: str, port: int, prologue: bytes, chunks, epilogue: bytes = b"") -> Stream:
    """Connect, then in a thread send prologue, every chunk of the iterable
    chunks, and epilogue, without waiting for replies (they go to ``.replies``)."""
    sock = socket.create_connection((host, port), timeout=60)
    st = Stream(sock)

    def reader():
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                st.replies += data
        except OSError:
            return

    def run():
        try:
            sock.sendall(prologue)
            for chunk in chunks:
                sock.sendall(chunk)
                st.sent += len(chunk)
            sock.sendall(epilogue)
        except OSError as e:
            st.error = e
        finally:
            st.done.set()

    threading.Thread(target=reader, daemon=True).start()
    st.thread = threading.Thread(target=run, daemon=True)
    st.thread.start()
    return st


def reply_lines(data: bytes) -> list[bytes]:
    return [ln for ln in data.split(b"\r\n") if ln]


@dataclass
class Unread:
    """What ``pour_unread`` managed to send; the socket stays open, never read."""

    sock: socket.socket
    sent: int
    stalled: bool  # the server stopped taking data (its reading paused)


def pour_unread(host: str, port: int, data: bytes, chunk: int = 65536, stall: float = 3.0,
                deadline: float = 60.0, rcvbuf: int = 4096) -> Unread:
    """Connect with a small receive buffer and send data as fast as the
    server takes it, never reading a byte of the replies.  Stops when all is
    sent, or when the socket has not been writable for ``stall`` seconds (the
    server stopped reading), or at ``deadline``."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.connect((host, port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_WRITE)
    sent = 0
    stalled = False
    end = time.monotonic() + deadline
    view = memoryview(data)
    try:
        while sent < len(data) and time.monotonic() < end:
            if not sel.select(stall):
                stalled = True
                break
            try:
                sent += sock.send(view[sent:sent + chunk])
            except BlockingIOError:
                continue
            except OSError:
                break
    finally:
        sel.close()
    return Unread(sock, sent, stalled)
