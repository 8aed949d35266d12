"""Where a recipient goes: local, a route, the smarthost, or MX (pure).

The order is the contract of issue 3: a local domain is delivered locally;
then a domain in relay.routes goes to its host:port; then, when
relay.smarthost is set, every other domain goes there; otherwise the
domain's MX hosts on delivery.port.  The Destination's ``key`` groups
recipients that can share one SMTP transaction and is what the concurrency
limits count ("one destination").
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Config

LOCAL = "local"
ROUTE = "route"
SMARTHOST = "smarthost"
MX = "mx"


@dataclass(frozen=True)
class Destination:
    kind: str  # local | route | smarthost | mx
    key: str  # what concurrency is counted on and transactions are grouped by
    domain: str  # the recipient domain (for MX) or ""
    host: str = ""  # route / smarthost host
    port: int = 0  # route / smarthost port, or delivery.port for MX

    @property
    def remote(self) -> bool:
        return self.kind != LOCAL

    def describe(self) -> str:
        if self.kind == LOCAL:
            return f"local delivery ({self.domain})"
        if self.kind == MX:
            return f"MX delivery for {self.domain} on port {self.port}"
        return f"{self.kind} {self.host}:{self.port}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def route(config: Config, address: str) -> Destination:
    domain = domain_of(address)
    if domain in config.local.domains:
        return Destination(LOCAL, "local:" + domain, domain)
    hp = config.relay.route_for(domain)
    if hp is not None:
        return Destination(ROUTE, f"route:{hp.host}:{hp.port}", domain, hp.host, hp.port)
    sh = config.relay.smarthost
    if sh is not None:
        return Destination(SMARTHOST, f"smarthost:{sh.host}:{sh.port}", domain, sh.host, sh.port)
    return Destination(MX, "mx:" + domain, domain, "", config.delivery.port)
