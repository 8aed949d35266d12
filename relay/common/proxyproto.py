"""The PROXY protocol header, v1 and v2 (HAProxy's proxy-protocol.txt): a pure parser.

A load balancer in front of the relay opens its own connection to us, so
the socket's peer is the balancer; it tells us who its client is with one
header before the client's first byte.  Everything the relay decides by the
client's address (relay.networks, the per-IP connection limit, [limits],
logs, Received headers) must use that address, so the header is parsed
here, strictly, without Twisted (``relay/runtime/proxied`` does the I/O).

``parse(data)`` looks at the bytes received so far and returns ``None``
while a valid header may still be arriving, a ``ProxyHeader`` (whose
``length`` is how many bytes it took: the rest is the client's) or raises
``ProxyError`` with a short ``reason`` for the metrics.  It never raises
anything else, and never looks past the header's own length (the bytes
after it belong to the client and may be anything).

What the spec leaves to the receiver, decided here:

* v1 ``UNKNOWN`` and v2 ``LOCAL`` (health checks) and v2 ``AF_UNSPEC``:
  valid, without a client address (``source is None``): the connection's own
  addresses are used, as the spec says.
* v2 ``AF_UNIX``: valid, its paths are returned but there is no IP address
  to decide by, so the caller treats it as the case above.
* v2 over ``DGRAM``, other version or command nibbles: refused.
* v2 TLVs are checked for shape (each fits in the header) and skipped;
  a header longer than ``MAX_V2`` bytes is refused ("oversize") so a
  balancer cannot make us hold 64 KiB per connection.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's bound)
MAX_V2 = 16 + 2048  # addresses (216 bytes at most) and a generous room for TLVs

_V2_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_FAMILIES = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}


class ProxyError(Exception):
    """Not a valid PROXY header; ``reason`` is one metric label word."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ProxyHeader:
    """What the header says.  ``source``/``destination`` are (ip, port) for
    TCP4/TCP6, a path (str) for UNIX, None when the header carries no
    client (v1 UNKNOWN, v2 LOCAL or UNSPEC)."""

    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNIX", "UNSPEC" (v2) or "UNKNOWN" (v1)
    source: tuple[str, int] | str | None
    destination: tuple[str, int] | str | None
    length: int  # bytes of the stream the header took
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client_ip(self) -> str | None:
        """The client's IP address, when the header names one."""
        if isinstance(self.source, tuple):
            return self.source[0]
        return None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None: not complete yet."""
    data = bytes(data[:MAX_V2 + 1])  # never more than a header can take
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data)
    raise ProxyError("garbage", "no PROXY signature")


# --------------------------------------------------------------------------- v1

def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("oversize", f"v1 line longer than {V1_MAX} bytes")
        if b"\n" in data[:V1_MAX] or b"\r" in data[:-1]:
            raise ProxyError("bad_v1", "line not ended by CRLF")
        return None
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("bad_v1", "not ASCII")
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyError("bad_v1", "no protocol")
    proto = parts[1]
    if proto == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, end + 2)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyError("bad_v1", "unknown protocol")
    if len(parts) != 6:
        raise ProxyError("bad_v1", "expected 4 fields after the protocol")
    version = 4 if proto == "TCP4" else 6
    src = _v1_ip(parts[2], version)
    dst = _v1_ip(parts[3], version)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, "PROXY", proto, (src, sport), (dst, dport), end + 2)


def _v1_ip(text: str, version: int) -> str:
    if "%" in text:  # ipaddress takes a scope ("fe80::1%eth0"): no address on the wire has one
        raise ProxyError("bad_v1", "bad address")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("bad_v1", "bad address")
    if ip.version != version:
        raise ProxyError("bad_v1", "address of the wrong family")
    return str(ip)


def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyError("bad_v1", "bad port")
    port = int(text)
    if port > 65535:
        raise ProxyError("bad_v1", "bad port")
    return port


# --------------------------------------------------------------------------- v2

def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None  # a prefix of the signature (checked by parse) and of the fixed part
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyError("bad_v2", "version is not 2")
    command = {0x0: "LOCAL", 0x1: "PROXY"}.get(ver_cmd & 0xF)
    if command is None:
        raise ProxyError("bad_v2", "unknown command")
    (size,) = struct.unpack("!H", data[14:16])
    total = 16 + size
    if total > MAX_V2:
        raise ProxyError("oversize", f"v2 header of {total} bytes")
    if len(data) < total:
        return None
    block = data[16:total]
    if command == "LOCAL":  # the balancer's own connection: the block is discarded
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, total)
    af, transport = fam >> 4, fam & 0xF
    if af not in _FAMILIES or transport not in (0x0, 0x1) or (af == 0) != (transport == 0):
        raise ProxyError("bad_v2", "unsupported address family or transport")
    if af == 0:
        return ProxyHeader(2, "PROXY", "UNSPEC", None, None, total)
    need = _V2_ADDR_LEN[af]
    if size < need:
        raise ProxyError("bad_v2", "address block too short")
    src: tuple[str, int] | str
    dst: tuple[str, int] | str
    if af == 0x3:
        src, dst = _unix_path(block[:108]), _unix_path(block[108:216])
    else:
        n = 4 if af == 0x1 else 16
        sport, dport = struct.unpack("!HH", block[2 * n:2 * n + 4])
        src = (str(ipaddress.ip_address(block[:n])), sport)
        dst = (str(ipaddress.ip_address(block[n:2 * n])), dport)
    return ProxyHeader(2, "PROXY", _FAMILIES[af], src, dst, total, _tlvs(block[need:]))


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    i = 0
    while i < len(raw):
        if len(raw) - i < 3:
            raise ProxyError("bad_v2", "truncated TLV")
        kind = raw[i]
        (n,) = struct.unpack("!H", raw[i + 1:i + 3])
        if i + 3 + n > len(raw):
            raise ProxyError("bad_v2", "TLV longer than the header")
        out.append((kind, raw[i + 3:i + 3 + n]))
        i += 3 + n
    return tuple(out)
