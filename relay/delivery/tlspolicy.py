"""Which TLS a destination requires: delivery.tls_policy, MTA-STS, the defaults (pure).

One decision, made once per delivery attempt (relay.delivery.attempt) and
shown by ``relayctl route`` (relay.control.route), so that both say the
same.  Precedence, most explicit first (as Postfix's smtp_tls_policy_maps,
and RFC 8461 for MTA-STS):

1. a ``delivery.tls_policy`` entry: "[host]" for a route's, an upstream's
   (its first host) or the smarthost's host; for a recipient domain (MX delivery and routes) the
   domain itself, then ".parent" entries, the nearest first;
2. for MX delivery, an MTA-STS policy in mode "enforce" (verify, each MX
   host for its own name, only MX hosts its patterns allow); "testing"
   keeps the default and reports what enforce would have refused;
3. ``relay.upstreams.NAME.tls`` for an upstream, ``relay.smarthost_tls`` for
   the smarthost, ``delivery.tls`` otherwise.

DANE (RFC 7672) takes precedence over MTA-STS for an MX host with usable
TLSA records: that is decided per host during the handshake
(relay.outbound.handshake.hop_tls, where the DANE verification plugs
in), so the value here carries the MTA-STS policy and the level on.
No Twisted, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config import Config
from relay.config.tlsvalues import TLSPolicyEntry
from relay.delivery import routing
from relay.delivery.stspolicy import StsPolicy
from relay.outbound.request import Observer, TLSPolicy

# the levels under which no TLS (or no verified TLS) means no delivery
REQUIRED = frozenset({"encrypt", "verify", "dane-only"})

GLOBAL_SOURCE = "the global default delivery.tls"
SMARTHOST_SOURCE = "relay.smarthost_tls"

# the reasons the metric relay_tls_policy_failures_total counts (label "reason")
REASONS = ("starttls_not_offered", "starttls_refused", "handshake", "certificate_untrusted",
           "certificate_name", "mx_not_allowed")


@dataclass(frozen=True)
class TLSRequirement:
    """What one destination gets: the ``level``, the certificate names
    allowed under "verify" (``match``; empty: the MX host name, or
    ``hostname`` for a route or the smarthost), the ``trust_root`` (None:
    the system CAs), where it came from (``source``), whose policy it is
    (``domain``, or "[host]"), the MTA-STS policy in force or in test
    (``sts``) and whether it was set explicitly (a table entry or MTA-STS:
    its failures say so in the new wording)."""

    level: str
    source: str
    domain: str = ""
    match: tuple[str, ...] = ()
    hostname: str | None = None
    trust_root: Any = None
    sts: StsPolicy | None = None
    explicit: bool = False

    @property
    def required(self) -> bool:
        return self.level in REQUIRED

    @property
    def sts_enforce(self) -> bool:
        return self.sts is not None and self.sts.mode == "enforce" and self.level == "verify" and self.explicit

    @property
    def sts_testing(self) -> bool:
        return self.sts is not None and self.sts.mode == "testing"

    def label(self) -> str:
        """The policy as a deferral names it: "mta-sts enforce", or the entry."""
        if self.sts_enforce:
            return "mta-sts enforce"
        return f"{self.source}: {self.level}"

    def required_by(self) -> str | None:
        """The head of a failure's reason, for an explicit required policy."""
        if not (self.explicit and self.required):
            return None
        return f"TLS is required by the policy for {self.domain} ({self.label()})"

    def describe(self) -> str:
        """One line for ``relayctl route`` and logs."""
        extra = f", certificate names {', '.join(self.match)}" if self.match else ""
        tested = f"; {self.sts.describe()}: failures reported only" if self.sts_testing and self.sts else ""
        return f"{self.level} ({self.source}{extra}{tested})"

    def policy(self, observe: Observer | None = None) -> TLSPolicy:
        """The relay.outbound.request.TLSPolicy the client is given."""
        return TLSPolicy(self.level, self.hostname, self.trust_root, match=self.match,
                         required_by=self.required_by(), would_verify=self.sts_testing, observe=observe)


def _table(config: Config) -> dict[str, TLSPolicyEntry]:
    return dict(config.delivery.tls_policy)


def domain_entry(config: Config, domain: str) -> tuple[str, TLSPolicyEntry] | None:
    """The table entry for a recipient domain: exact, then ".parent", nearest first."""
    table = _table(config)
    d = domain.rstrip(".").lower()
    if d in table:
        return d, table[d]
    labels = d.split(".")
    for i in range(1, len(labels)):
        key = "." + ".".join(labels[i:])
        if key in table:
            return key, table[key]
    return None


def host_entry(config: Config, host: str) -> tuple[str, TLSPolicyEntry] | None:
    """The "[host]" entry for a route's or the smarthost's host."""
    key = f"[{host.rstrip('.').lower()}]"
    entry = _table(config).get(key)
    return (key, entry) if entry is not None else None


def hosts_of(config: Config, dest: routing.Destination) -> list[tuple[str, int]]:
    """The fail-over list of a smarthost or upstream, else the one host."""
    rc = config.relay
    if dest.kind == routing.UPSTREAM:
        up = rc.upstream(dest.upstream)
        if up is not None:
            return [(h.host, h.port) for h in up.hosts]
    if dest.kind == routing.SMARTHOST and rc.smarthost_hosts:
        return [(h.host, h.port) for h in rc.smarthost_hosts]
    return [(dest.host, dest.port)]


def wants_sts(config: Config, dest: routing.Destination) -> bool:
    """Whether MTA-STS is asked at all: MX delivery without a table entry."""
    return dest.kind == routing.MX and domain_entry(config, dest.domain) is None


def _from_entry(key: str, entry: TLSPolicyEntry, owner: str, hostname: str | None,
                trust_root: Any) -> TLSRequirement:
    return TLSRequirement(entry.level, f'table entry "{key}"', owner, entry.match, hostname,
                          trust_root or entry.ca_file or None, explicit=True)


def decide(config: Config, dest: routing.Destination, *, sts: StsPolicy | None = None,
           trust_root: Any = None) -> TLSRequirement:
    """The TLS requirement for a remote destination (see the module
    docstring for the order).  ``sts``: the domain's MTA-STS policy (MX
    delivery only), ``trust_root``: one that wins over every CA setting
    (the Deliverer's, which tests inject)."""
    if dest.kind in (routing.ROUTE, routing.SMARTHOST, routing.UPSTREAM):
        hit = host_entry(config, dest.host)
        # with several hosts (fail-over) each is checked against its own name
        own = dest.host if len(hosts_of(config, dest)) == 1 else None
        if hit is not None:
            return _from_entry(hit[0], hit[1], hit[0], own, trust_root)
        if dest.kind == routing.UPSTREAM:
            up = config.relay.upstream(dest.upstream)
            assert up is not None, dest.upstream
            return TLSRequirement(up.tls, f"relay.upstreams.{dest.upstream}.tls", f"[{dest.host}]", hostname=own,
                                  trust_root=trust_root or (up.ca_file or None))
        if dest.kind == routing.SMARTHOST:
            r = config.relay
            return TLSRequirement(r.smarthost_tls, SMARTHOST_SOURCE, f"[{dest.host}]", hostname=own,
                                  trust_root=trust_root or (r.smarthost_ca_file or None))
        hit = domain_entry(config, dest.domain)
        if hit is not None:
            return _from_entry(hit[0], hit[1], dest.domain, dest.host, trust_root)
        return TLSRequirement(config.delivery.tls, GLOBAL_SOURCE, dest.domain, trust_root=trust_root or None)
    hit = domain_entry(config, dest.domain)
    if hit is not None:
        return _from_entry(hit[0], hit[1], dest.domain, None, trust_root)
    if sts is not None and sts.mode == "enforce":
        # the CAs trusted under MTA-STS (delivery.mta_sts_ca_file; default the system's)
        return TLSRequirement("verify", sts.describe(), dest.domain,
                              trust_root=trust_root or (config.delivery.mta_sts_ca_file or None), sts=sts,
                              explicit=True)
    return TLSRequirement(config.delivery.tls, GLOBAL_SOURCE, dest.domain, trust_root=trust_root or None,
                          sts=sts if sts is not None and sts.mode == "testing" else None)


def no_allowed_mx(req: TLSRequirement, hosts: list[str]) -> str:
    """The deferral reason when an enforce policy allows none of the MX hosts."""
    assert req.sts is not None
    head = req.required_by() or f"TLS is required by the policy for {req.domain} (mta-sts enforce)"
    return (f"{head}: no MX host matches the policy's mx patterns ({', '.join(req.sts.mx) or 'none'}; "
            f"MX hosts: {', '.join(hosts) or 'none'})")
