"""DKIM signing at intake: the part that the intake signs trusted mail with.

``Signer`` holds the configured keys (loaded by relay.runtime.parts) and
the header set and canonicalization of [dkim]; ``Signer.job()`` gives the
callable that ``IncomingMessage.finish`` runs in the disk pool, in the same
job as the commit, so a signature costs no extra round trip before the 250.
The job never raises for what a message holds: a message that cannot be
signed (no From, several, malformed, no key for its domain, headers too
big, or an unexpected error) is stored unsigned and the job keeps the
reason for the intake to log.  What is signed is the message as the client
sent it: the DKIM-Signature goes first, above our Received header, which it
does not cover (Received is not in the default dkim.headers).

``lookup`` and ``check_keys`` look up each selector's TXT record (dnspython,
blocking: the DNS pool at start, relayctl in its own process) and judge it
with relay.intake.dkimkeys.check_record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Sequence

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from relay.intake.dkim import DEFAULT_CANONICALIZATION, DEFAULT_HEADERS, Choice, SigningKey, sign_open
from relay.intake.dkimkeys import Check, check_record, record_name

DNS_LIFETIME = 10.0  # seconds per TXT look-up


@dataclass
class SignJob:
    """One message's signing, run once in the disk pool; the outcome stays for the log."""

    keys: dict[str, list[SigningKey]]
    headers: tuple[str, ...]
    canonicalization: str
    choice: Choice | None = None
    error: str = ""
    signatures: list[bytes] = field(default_factory=list)

    def __call__(self, f: BinaryIO, offset: int) -> bytes:
        try:
            self.choice, self.signatures = sign_open(f, offset, self.keys, headers=self.headers,
                                                     canonicalization=self.canonicalization)
        except Exception as e:  # noqa: BLE001 - never refuse or lose a message over its signature
            self.error = f"{type(e).__name__}: {e}"
            self.signatures = []
        # the last key's signature on top (each prepended in turn); none covers another
        return b"".join(reversed(self.signatures))

    def outcome(self) -> tuple[bool, str]:
        """(signed, what to log): 'd=... s=...' or the reason it is not signed."""
        c = self.choice
        if c is not None and self.signatures:
            return True, ", ".join(f"d={k.domain} s={k.selector} a={k.algorithm}" for k in c.keys)
        if self.error:
            return False, f"signing failed ({self.error})"
        if c is None or c.reason is None:
            return False, "not signed"
        return False, c.reason + (f" ({c.detail})" if c.detail and c.detail != c.domain else
                                  f" ({c.domain})" if c.domain else "")


class Signer:
    """The signing keys and settings of [dkim]; reconfigure() at a reload."""

    def __init__(self, keys: Sequence[SigningKey] = (), *, headers: Sequence[str] = DEFAULT_HEADERS,
                 canonicalization: str = DEFAULT_CANONICALIZATION):
        self.reconfigure(keys, headers=headers, canonicalization=canonicalization)

    def reconfigure(self, keys: Sequence[SigningKey], *, headers: Sequence[str] = DEFAULT_HEADERS,
                    canonicalization: str = DEFAULT_CANONICALIZATION) -> None:
        by_domain: dict[str, list[SigningKey]] = {}
        for k in keys:
            by_domain.setdefault(k.domain, []).append(k)
        self.keys = tuple(keys)
        self._by_domain = by_domain
        self.headers = tuple(headers)
        self.canonicalization = canonicalization

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def job(self) -> SignJob:
        """A job with the keys of now (a reload meanwhile does not change it)."""
        return SignJob(self._by_domain, self.headers, self.canonicalization)


# ---------------------------------------------------------------- the published records

def make_resolver(nameservers: Iterable = ()) -> dns.resolver.Resolver:
    """A resolver of the given HostPort-like nameservers (``.host``, ``.port``), else the system's."""
    servers = [dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in nameservers]
    if servers:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = servers
        return r
    return dns.resolver.Resolver()


def lookup(resolver: dns.resolver.Resolver, name: str,
           lifetime: float = DNS_LIFETIME) -> list[list[bytes]] | None:
    """The TXT records at name (each as its strings); [] for none; None when DNS did not answer."""
    try:
        answer = resolver.resolve(dns.name.from_text(name), "TXT", search=False, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [list(r.strings) for r in answer]


@dataclass(frozen=True)
class KeyCheck:
    key: SigningKey
    check: Check | None  # None: DNS did not answer
    name: str

    @property
    def text(self) -> str:
        if self.check is None:
            return f"{self.name}: no answer from DNS (timeout or server failure); try again later"
        return self.check.message


def check_keys(keys: Sequence[SigningKey], resolver: dns.resolver.Resolver,
               lifetime: float = DNS_LIFETIME) -> list[KeyCheck]:
    """Each key's published record, judged (blocking)."""
    out = []
    for k in keys:
        name = record_name(k.domain, k.selector)
        found = lookup(resolver, name, lifetime)
        out.append(KeyCheck(k, None if found is None else check_record(k, found, name=name), name))
    return out


def record_warnings(keys: Sequence[SigningKey], nameservers: Iterable = (),
                    lifetime: float = DNS_LIFETIME) -> list[str]:
    """What the relay logs at start: a line per selector whose record is not
    as it should be (blocking: run it in the DNS pool; mail is signed anyway)."""
    if not keys:
        return []
    resolver = make_resolver(nameservers)
    return [f"dkim: selector {c.key.selector} of {c.key.domain}: {c.text} (mail is still signed)"
            for c in check_keys(keys, resolver, lifetime) if c.check is None or not c.check.ok]
