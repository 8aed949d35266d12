"""An MTA-STS policy as delivery uses it (RFC 8461), and the source of them (pure).

This is the one value that passes between the MTA-STS fetcher and cache
(relay.delivery.mtasts, which finds, fetches, parses, stores and refreshes
policies) and the TLS decision of a delivery attempt (relay.delivery.attempt
with relay.delivery.tlspolicy), so that neither has to know how the other
works.  No Twisted, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MODES = ("enforce", "testing", "none")


@dataclass(frozen=True)
class StsPolicy:
    """One domain's policy: ``mode`` (enforce | testing | none), the ``mx``
    patterns ("mx1.example.com" or "*.example.com": a wildcard stands for
    exactly one leftmost label, RFC 8461 section 4.1), ``max_age`` in
    seconds, the policy ``id`` from the TXT record, and ``expires`` (the
    reactor time after which the cached policy must not be used)."""

    domain: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str
    expires: float

    def matches(self, host: str) -> bool:
        """Whether the MX host name ``host`` is allowed by the ``mx`` patterns
        (case-insensitive, a trailing dot ignored)."""
        name = host.rstrip(".").lower()
        for pattern in self.mx:
            p = pattern.rstrip(".").lower()
            if p.startswith("*."):
                head, dot, rest = name.partition(".")
                if head and dot and rest == p[2:]:
                    return True
            elif name == p:
                return True
        return False

    def describe(self) -> str:
        """How a log line or ``relayctl route`` names it."""
        return f"mta-sts {self.mode} (policy id {self.id})"


class StsSource(Protocol):
    """What delivery asks of MTA-STS (implemented by relay.delivery.mtasts)."""

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to MX delivery for ``domain`` now, or None (the
        domain has no policy, or none could be found and none is cached).
        Never raises: a lookup or fetch failure falls back to the cached,
        unexpired policy, or None."""
        ...

    def report(self, policy: StsPolicy, host: str, failure: str) -> None:
        """A failure that ``policy`` says something about (an MX host not
        matching, a certificate not verified): logged and counted; for
        "testing" this is the only effect."""
        ...
