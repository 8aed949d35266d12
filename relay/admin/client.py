"""relayctl's side of the control socket: a blocking AMP client without Twisted.

Why not Twisted's own AMP client: relayctl is a short-lived command, and
importing Twisted's AMP and a reactor costs about 0.4 s before any work, a
large part of the "10,000 messages listed in under a second" budget.  AMP's
wire format is small and fixed (see twisted.protocols.amp): a box is a
sequence of (2-byte length, key), (2-byte length, value) pairs ended by an
empty key; a request carries ``_command`` and ``_ask``, the answer
``_answer`` or ``_error`` with ``_error_code`` and ``_error_description``.
The commands, their arguments and the encoding of each argument type are
declared once, in relay.control.proto (which imports no Twisted either); this
module frames boxes and carries them.  Tests drive both ends over a real
UNIX socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Any

from relay.common import privdrop
from relay.control.proto import LOGIN, MAX_VALUE, Command


class ControlError(Exception):
    """Talking to the relay failed; str() says why, for the administrator."""


class NotListening(ControlError):
    """Nothing accepts connections on the socket path (no relay, or a stale file)."""

    def __init__(self, path: str, err: OSError):
        self.path = path
        self.errno = err.errno
        super().__init__(f"{path}: {err.strerror or err}")


class PermissionDenied(ControlError):
    pass


class NoAnswer(ControlError):
    """Connected, but no (complete) answer in time, or the connection was lost."""


class RemoteError(ControlError):
    """The relay answered with an AMP error box."""

    def __init__(self, code: str, description: str):
        self.code = code
        self.description = description
        super().__init__(description)


def encode_box(box: dict[bytes, bytes]) -> bytes:
    out = []
    for k, v in box.items():
        if len(k) > 255 or len(v) > MAX_VALUE:
            raise ValueError(f"AMP value too long for key {k!r} ({len(v)} bytes)")
        out.append(struct.pack("!H", len(k)))
        out.append(k)
        out.append(struct.pack("!H", len(v)))
        out.append(v)
    out.append(b"\x00\x00")
    return b"".join(out)


class _BoxReader:
    """Incremental parser of AMP boxes from a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.box: dict[bytes, bytes] = {}
        self.key: bytes | None = None

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        self.buf += data
        boxes = []
        buf = self.buf
        pos = self.pos
        while len(buf) - pos >= 2:
            (n,) = struct.unpack_from("!H", buf, pos)
            if len(buf) - pos - 2 < n:
                break
            item = bytes(buf[pos + 2 : pos + 2 + n])
            pos += 2 + n
            if self.key is None:
                if n == 0:
                    boxes.append(self.box)
                    self.box = {}
                else:
                    self.key = item
            else:
                self.box[self.key] = item
                self.key = None
        if pos > 1 << 20 or pos == len(buf):
            del buf[:pos]
            pos = 0
        self.pos = pos
        return boxes


class Client:
    """One connection to the relay's control socket; calls may be pipelined."""

    def __init__(self, sock: socket.socket, path: str, timeout: float):
        self.sock = sock
        self.path = path
        self.timeout = timeout
        self._tag = 0
        self._reader = _BoxReader()
        self._answers: dict[bytes, dict[bytes, bytes]] = {}
        self._commands: dict[bytes, Command] = {}  # tag -> what it asked (to decode its answer)

    @classmethod
    def connect(cls, path: str, timeout: float) -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            # as root: connect as the user who controls the socket's directory (the relay's),
            # so a link planted there to another service's socket reaches it without root's
            # credentials (SO_PEERCRED is taken at connect)
            with privdrop.as_controller(os.path.dirname(os.path.abspath(path))):
                s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            s.close()
            raise NotListening(path, e)
        except PermissionError as e:
            s.close()
            raise PermissionDenied(f"cannot open the control socket {path}: {e.strerror}")
        except OSError as e:
            s.close()
            if e.errno in (errno.ENOTSOCK, errno.EPROTOTYPE):
                raise NotListening(path, e)
            if isinstance(e, socket.timeout):
                raise NoAnswer(f"the relay does not accept connections on {path} "
                               f"(no answer within {timeout:g}s)")
            raise ControlError(f"cannot connect to the control socket {path}: {e.strerror or e}")
        return cls(s, path, timeout)

    @classmethod
    def connect_tls(cls, host: str, port: int, timeout: float, *, secret: str | None, ca_file: str | None = None,
                    server_name: str | None = None) -> "Client":
        """A relay's TCP control endpoint (control.tcp_listen): TLS, the
        certificate verified (``ca_file``, else the system's CAs) for
        ``server_name`` (else ``host``), then Login with the fleet's shared
        secret (None: not sent; the relay then refuses every command)."""
        import ssl  # only here: 20 ms of imports no other verb needs

        where = f"{host}:{port}"
        try:
            ctx = ssl.create_default_context(cafile=ca_file or None)
        except (OSError, ssl.SSLError) as e:
            raise ControlError(f"control.fleet_ca_file: {ca_file}: {getattr(e, 'strerror', None) or e}")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except socket.timeout:
            raise NoAnswer(f"the relay does not accept connections on {where} (no answer within {timeout:g}s)")
        except OSError as e:
            raise NotListening(where, e)
        try:
            s = ctx.wrap_socket(raw, server_hostname=server_name or host)
        except (OSError, ssl.SSLError) as e:
            raw.close()
            raise ControlError(f"TLS to the control endpoint {where} failed: {getattr(e, 'reason', None) or e}")
        client = cls(s, where, timeout)
        if secret is not None:
            try:
                client.call(LOGIN, secret=secret)
            except BaseException:
                client.close()
                raise
        return client

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, command: Command, **args: Any) -> bytes:
        """Send one request; return its tag (for ``result``)."""
        self._tag += 1
        tag = b"%x" % self._tag
        box = {b"_command": command.name.encode("ascii"), b"_ask": tag, **command.request(**args)}
        self._commands[tag] = command
        try:
            self.sock.sendall(encode_box(box))
        except socket.timeout:
            raise NoAnswer(f"the relay does not read its control socket {self.path} "
                           f"(nothing accepted within {self.timeout:g}s)")
        except OSError as e:
            raise NoAnswer(f"the connection to the relay on {self.path} was lost: {e.strerror or e}")
        return tag

    def result(self, tag: bytes, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the answer to ``tag``, decoded; raise RemoteError for an error box."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while tag not in self._answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoAnswer(f"the relay does not answer on its control socket {self.path} "
                               f"(no reply within {limit:g}s)")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as e:
                raise NoAnswer(f"the connection to the relay on {self.path} was lost: {e.strerror or e}")
            if not data:
                raise NoAnswer(f"the relay closed the control connection on {self.path} without answering")
            for box in self._reader.feed(data):
                key = box.get(b"_answer") or box.get(b"_error")
                if key is not None:
                    self._answers[key] = box
        box = self._answers.pop(tag)
        command = self._commands.pop(tag)
        if b"_error" in box:
            raise RemoteError(box.get(b"_error_code", b"UNKNOWN").decode("ascii", "replace"),
                              box.get(b"_error_description", b"").decode("utf-8", "replace"))
        return command.answer(box)

    def call(self, command: Command, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        return self.result(self.send(command, **args), timeout)
