"""Which addresses are ours: for address literals and MX loop detection."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

WILDCARDS = ("", "0.0.0.0", "::")


@lru_cache(maxsize=1024)
def is_local_address(ip: str) -> bool:
    """True if ip is an address of this machine (we could bind to it)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if addr.is_unspecified or addr.is_multicast:
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((str(addr), 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Listeners:
    """The (interface, port) pairs we listen on for SMTP."""

    def __init__(self, pairs: list[tuple[str, int]] | None = None):
        self.pairs: list[tuple[str, int]] = list(pairs or [])

    def add(self, interface: str, port: int) -> None:
        self.pairs.append((interface, port))

    def is_self(self, ip: str, port: int) -> bool:
        """Would a connection to ip:port reach one of our listeners?"""
        addr = _ip(ip)
        return addr is not None and any(
            p == port and _listens_on(iface, addr, v4_wildcard_is_v4_only=True) for iface, p in self.pairs)

    def has_ip(self, ip: str) -> bool:
        """Is ip one of the addresses we accept mail on (any port)?"""
        addr = _ip(ip)
        return addr is not None and any(
            _listens_on(iface, addr, v4_wildcard_is_v4_only=False) for iface, _ in self.pairs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _listens_on(iface: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, *,
                v4_wildcard_is_v4_only: bool) -> bool:
    """Does a listener on ``iface`` take connections to ``addr``?  A wildcard
    takes every local address (0.0.0.0 only IPv4 ones when asked so)."""
    if iface in WILDCARDS:
        if v4_wildcard_is_v4_only and iface == "0.0.0.0" and addr.version != 4:
            return False
        return is_local_address(str(addr))
    try:
        return ipaddress.ip_address(iface) == addr
    except ValueError:
        return False
