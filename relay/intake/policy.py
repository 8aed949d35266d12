"""Who may send what where: pure decisions, no I/O (no open relay, ever).

The SMTP server asks ``recipient()`` for every RCPT and ``sender()`` for
every MAIL; the answer is a Decision carrying the SMTP reply to give.  Rules
(issue 2 and 5; Postfix's smtpd_recipient_restrictions with
permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination and
allow_untrusted_routing=no are the model):

* local domain: a user, an alias or postmaster, else 550 5.1.1;
* relay.domains (backup MX): from anyone, but sender-specified routing
  (%, !, @ in the local part) only from trusted clients;
* any other domain: only from relay.networks or an authenticated client,
  else 554 5.7.1;
* address literals are ours (then local) or refused.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable

from relay.common.address import Address
from relay.mailbox.users import check_safe_local_part


@dataclass(frozen=True)
class Decision:
    ok: bool
    code: int
    status: str
    text: str
    kind: str = ""  # "local" | "relay" | "" (refused)
    address: str = ""  # the canonical recipient to queue

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True)
class Client:
    ip: str
    authenticated: str | None = None  # the user name after AUTH


@functools.lru_cache(maxsize=4096)
def _client_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address to match against networks (parsing it is not free; a
    client sends many commands, and clients come back)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr


def in_networks(ip: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = _client_ip(ip)
    if addr is None:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


@dataclass
class Policy:
    local_domains: tuple[str, ...]
    relay_domains: tuple[str, ...]
    networks: tuple
    user_exists: Callable[[str], bool]
    alias_exists: Callable[[str], bool]
    our_ips: Callable[[str], bool] = lambda ip: False

    def trusted(self, client: Client) -> bool:
        return bool(client.authenticated) or in_networks(client.ip, self.networks)

    def recipient(self, client: Client, addr: Address) -> Decision:
        domain = addr.domain
        if addr.literal:
            ip = addr.literal_ip or ""
            if self.our_ips(ip) and self.local_domains:
                domain = self.local_domains[0]
                addr = Address(addr.local, domain)
            else:
                return Decision(False, 550, "5.7.1", f"<{addr}>: Recipient address rejected: "
                                "address literals are only accepted for this host")
        if domain in self.local_domains:
            return self._local(addr)
        if addr.has_routing and not self.trusted(client):
            return Decision(False, 554, "5.7.1", f"<{addr}>: Relay access denied "
                            "(sender-specified routing is not allowed)")
        if domain in self.relay_domains:
            return Decision(True, 250, "2.1.5", "Ok", "relay", str(addr))
        if self.trusted(client):
            return Decision(True, 250, "2.1.5", "Ok", "relay", str(addr))
        return Decision(False, 554, "5.7.1", f"<{addr}>: Relay access denied")

    def _local(self, addr: Address) -> Decision:
        key = addr.lower()
        unknown = Decision(False, 550, "5.1.1", f"<{addr}>: Recipient address rejected: "
                           "User unknown in local recipient table")
        if addr.has_routing:
            return unknown
        try:
            check_safe_local_part(addr.local)
        except ValueError:
            return unknown
        if addr.local.lower() == "postmaster" or self.user_exists(key) or self.alias_exists(key):
            return Decision(True, 250, "2.1.5", "Ok", "local", key)
        return unknown

    def sender(self, client: Client, addr: Address | None) -> Decision:
        """MAIL FROM: an authenticated user may only use their own addresses.

        Own addresses: the login itself, or an address in the user's domain
        that is not another user's (Postfix's reject_sender_login_mismatch,
        relaxed to the domain).  The null sender is always allowed.
        """
        ok = Decision(True, 250, "2.1.0", "Ok")
        if addr is None or not client.authenticated:
            return ok
        login = client.authenticated.lower()
        key = addr.lower()
        if key == login:
            return ok
        if addr.domain == login.rpartition("@")[2] and not self.user_exists(key):
            return ok
        return Decision(False, 553, "5.7.1", f"<{addr}>: Sender address rejected: "
                        f"not owned by user {client.authenticated}")
