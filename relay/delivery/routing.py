"""Where a recipient goes: local, a route, an upstream, the smarthost, or MX (pure).

The order is the contract of issues 3 and 16: a local domain is delivered
locally (nothing overrides local delivery: a sender route must not carry
our own users' mail away); then the envelope sender's relay.sender_routes
entry (Postfix's sender_dependent_relayhost_maps); then the recipient
domain's relay.routes entry (a host:port, or an upstream's name); then
relay.smarthost (its hosts, or an upstream's name); otherwise the domain's
MX hosts on delivery.port.  The Destination's ``key`` groups recipients
that can share one SMTP transaction and is what the concurrency limits (and
the outbound pacing) count ("one destination"): ``upstream:NAME`` for an
upstream, whichever rule chose it.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Config

LOCAL = "local"
ROUTE = "route"
SMARTHOST = "smarthost"
UPSTREAM = "upstream"
MX = "mx"

# why a Destination was chosen (``Destination.via``)
VIA_LOCAL = "local domain"
VIA_SENDER = "sender route"
VIA_RECIPIENT = "recipient route"
VIA_SMARTHOST = "smarthost"
VIA_MX = "MX"


@dataclass(frozen=True)
class Destination:
    kind: str  # local | route | smarthost | upstream | mx
    key: str  # what concurrency is counted on and transactions are grouped by
    domain: str  # the recipient domain (for MX) or ""
    host: str = ""  # route / smarthost host (an upstream's first host)
    port: int = 0  # route / smarthost port, or delivery.port for MX
    upstream: str = ""  # the relay.upstreams name (kind "upstream")
    via: str = ""  # which rule chose it: VIA_*
    rule: str = ""  # the entry that matched (a sender_routes key, a routes domain)

    @property
    def remote(self) -> bool:
        return self.kind != LOCAL

    def describe(self) -> str:
        if self.kind == LOCAL:
            return f"local delivery ({self.domain})"
        if self.kind == MX:
            return f"MX delivery for {self.domain} on port {self.port}"
        if self.kind == UPSTREAM:
            return f"upstream {self.upstream} ({self.via})"
        return f"{self.kind} {self.host}:{self.port}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _upstream(config: Config, name: str, domain: str, via: str, rule: str) -> Destination:
    up = config.relay.upstream(name)
    assert up is not None, name  # the config refuses a name that is not defined
    first = up.hosts[0]
    return Destination(UPSTREAM, "upstream:" + name, domain, first.host, first.port, name, via, rule)


def route(config: Config, address: str, sender: str | None = None) -> Destination:
    """The destination of one recipient of mail from ``sender`` (the
    envelope sender; "" or None: the null sender, no sender route)."""
    domain = domain_of(address)
    if domain in config.local.domains:
        return Destination(LOCAL, "local:" + domain, domain, via=VIA_LOCAL)
    rc = config.relay
    by_sender = rc.sender_route_for(sender) if sender else None
    if by_sender is not None:
        return _upstream(config, by_sender[0], domain, VIA_SENDER, by_sender[1])
    name = rc.upstream_route_for(domain)
    if name is not None:
        return _upstream(config, name, domain, VIA_RECIPIENT, domain)
    hp = rc.route_for(domain)
    if hp is not None:
        return Destination(ROUTE, f"route:{hp.host}:{hp.port}", domain, hp.host, hp.port, via=VIA_RECIPIENT,
                           rule=domain)
    if rc.smarthost_upstream:
        return _upstream(config, rc.smarthost_upstream, domain, VIA_SMARTHOST, "relay.smarthost")
    sh = rc.smarthost
    if sh is not None:
        return Destination(SMARTHOST, f"smarthost:{sh.host}:{sh.port}", domain, sh.host, sh.port,
                           via=VIA_SMARTHOST)
    return Destination(MX, "mx:" + domain, domain, "", config.delivery.port, via=VIA_MX)
