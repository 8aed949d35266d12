"""One delivery attempt: a message's recipients for one destination.

The queue manager decides what to try and when; this module only carries
out an attempt and turns whatever happens into one Outcome per recipient:
delivered, deferred or bounced, with the status, the reply and the host
that gave it.  Remote destinations go through relay.delivery.mx (next hops) and
relay.outbound.client; local ones through relay.delivery.local in the disk thread pool.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from relay.config import Config
from relay.delivery import dsnout, routing, tlspolicy
from relay.delivery import local as localmod
from relay.delivery.mx import DNSFailure, Hop, Resolver, TlsaAnswer
from relay.delivery.stspolicy import StsPolicy, StsSource
from relay.outbound import client
from relay.outbound.conncache import ConnectionCache
from relay.outbound.hostlimit import HostLimit
from relay.outbound.replies import DeliveryReport
from relay.outbound.request import DANE_MODES, MessageFile, Observer, Outbound, Timeouts, TLSPolicy

log = Logger(namespace="relay.delivery")


@dataclass(frozen=True)
class Outcome:
    address: str
    kind: str  # delivered | deferred | bounced
    status: str  # enhanced status code
    reply: str  # the remote reply or our reason
    relay: str = "none"  # "host[ip]:port", "local", or "none"
    remote_mta: str | None = None  # for DSNs: the host that answered
    remote: bool = False  # the reply came from a remote server
    suspended: bool = False  # not tried: the destination is marked dead for a moment
    dsn_carried: bool = False  # accepted by a next hop that offers DSN (relay.delivery.dsnout)


# What an attempt uses of the parts it is given (the spool, the disk pool,
# the users file, our listeners) and of the queue's message.
class MessagePaths(Protocol):
    def message_path(self, qid: str) -> str: ...


class DiskRunner(Protocol):
    """relay.queue.diskio.DiskPool: blocking work off the reactor."""

    @property
    def pool(self) -> Any: ...  # its thread pool (the 8-bit scan runs there)

    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]: ...


class UserLookup(Protocol):
    def exists(self, address: str) -> bool: ...


class SelfCheck(Protocol):
    def is_self(self, ip: str, port: int) -> bool: ...


class Sender(Protocol):
    sender: str


class QueuedMessage(Protocol):
    """relay.queue.manager.Message, as far as an attempt reads it."""

    @property
    def qid(self) -> str: ...
    @property
    def env(self) -> Sender: ...
    @property
    def size(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def eight_bit(self) -> bool | None: ...
    @property
    def data(self) -> bytes | None: ...


def _all(recipients: list[str], kind: str, status: str, reply: str, relay: str = "none") -> list[Outcome]:
    return [Outcome(r, kind, status, reply, relay) for r in recipients]


def read_password(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        pw = f.readline()
    return pw[:-1] if pw.endswith("\n") else pw


class Deliverer:
    """Carries out attempts; holds the resolver and what the client needs.

    A reload calls ``reconfigure(config, users)``; a changed
    ``delivery.nameservers`` wants ``set_resolver`` with a new Resolver.
    ``trust_root`` (for smarthost "verify": tests inject their CA) and
    ``timeouts`` (relay.outbound.request.Timeouts, None for the RFC values) may
    be replaced between attempts.  ``sts``: where MTA-STS policies come from
    (relay.delivery.stspolicy.StsSource; None: no MTA-STS); the TLS each
    destination requires is relay.delivery.tlspolicy.decide's.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Resolver,
        *,
        spool: MessagePaths,
        disk: DiskRunner,
        users: UserLookup,
        listeners: SelfCheck,
        config: Config,
        trust_root: Any = None,
        timeouts: Timeouts | None = None,
        sts: StsSource | None = None,
    ):
        self.reactor = reactor
        self.sts = sts  # the MTA-STS source (relay.delivery.stspolicy.StsSource), or None
        self.resolver = resolver
        self.spool = spool
        self.disk = disk
        self.users = users
        self.listeners = listeners
        self.config = config
        self.trust_root = trust_root
        self.timeouts = timeouts
        # sessions kept open for a moment for the next message to the same host
        self.cache = ConnectionCache(reactor)
        # at most max_per_destination connections to one host, whatever the domains
        self.host_limit = HostLimit(lambda: self.config.delivery.max_per_destination)
        self.sessions = 0  # remote attempts that reached a server (metrics)
        self.tls_sessions = 0  # ... of which over TLS (metrics)
        # hops that failed a required TLS policy, by reason (tlspolicy.REASONS; metrics)
        self.tls_policy_failures: Counter[str] = Counter()

    def reconfigure(self, config: Config, users: UserLookup) -> None:
        """A reload: the new config and users file for the next attempts."""
        self.config = config
        self.users = users

    def set_resolver(self, resolver: Resolver) -> None:
        """New next-hop look-ups (a reload changed ``delivery.nameservers``)."""
        self.resolver = resolver

    def attempt(
        self, msg: QueuedMessage, dest: routing.Destination, recipients: list[str]
    ) -> defer.Deferred[list[Outcome]]:
        if dest.kind == routing.LOCAL:
            return defer.ensureDeferred(self._local(msg, recipients))
        return defer.ensureDeferred(self._remote(msg, dest, recipients))

    async def _local(self, msg: QueuedMessage, recipients: list[str]) -> list[Outcome]:
        cfg = self.config
        path = self.spool.message_path(msg.qid)
        out = []
        for r in recipients:
            try:
                res = await self.disk.run(
                    localmod.deliver, root=cfg.local.mailboxes, address=r, sender=msg.env.sender,
                    message_path=path, offset=msg.offset, user_exists=self.users.exists,
                )
            except Exception as e:  # noqa: BLE001 - a failed attempt is a deferral, never a crash
                log.failure("{queue_id}: local delivery to {rcpt} failed", queue_id=msg.qid, rcpt=r)
                res = localmod.LocalResult("deferred", "4.3.0", f"451 4.3.0 local delivery failed: {e}")
            out.append(Outcome(r, res.kind, res.status, res.text, "local", None, False))
        return out

    async def _remote(self, msg: QueuedMessage, dest: routing.Destination, recipients: list[str]) -> list[Outcome]:
        """A remote attempt: credentials (the password read in the disk pool at
        each attempt), the hops, the client."""
        if dest.kind == routing.UPSTREAM and self.config.relay.upstream(dest.upstream) is None:
            # routed before a reload removed it: the next activation routes afresh
            return _all(recipients, "deferred", "4.3.5", f"upstream {dest.upstream} is no longer configured")
        login = self._login(dest)
        auth = None
        if login is not None:
            key, username, path = login
            try:
                pw = await self.disk.run(read_password, path)
            except OSError as e:
                return _all(recipients, "deferred", "4.3.5", f"cannot read {key} {path}: {e.strerror or e}")
            auth = (username, pw)
        try:
            hops = await self._hops(dest)
        except DNSFailure as e:
            kind = "deferred" if e.temporary else "bounced"
            return _all(recipients, kind, e.status, e.reason)
        req = await self.tls_requirement(dest)
        if req.sts is not None:
            mx_hosts = list(dict.fromkeys(h.host for h in hops))
            hops = self._sts_hops(req, hops)
            if not hops:
                return _all(recipients, "deferred", "4.7.0", tlspolicy.no_allowed_mx(req, mx_hosts))
        out = self._outbound(msg, dest, recipients, auth, req)
        if dest.kind in (routing.MX, routing.ROUTE) and (
                out.tls.mode in DANE_MODES or (req.sts_enforce and self.config.delivery.tls in DANE_MODES)):
            # DANE, and over an MTA-STS policy for hosts with TLSA records (RFC 8461 section 2)
            out = replace(out, tls=await self._with_tlsa(out.tls, hops, dest))
            blocked = _dane_blocked(out.tls, hops)
            if blocked:
                return _all(recipients, "deferred", "4.7.5", blocked)
        report = await client.deliver(
            self.reactor, hops, out,
            threadpool=self.disk.pool, cache=self.cache, host_limit=self.host_limit,
        )
        self.sessions += report.hop is not None
        self.tls_sessions += bool(report.tls)
        return _outcomes(msg.qid, recipients, report)

    def _login(self, dest: routing.Destination) -> tuple[str, str, str] | None:
        """(the password file's key, username, password file) of the one
        route that may log in: the smarthost's, or the destination's own
        upstream's.  Credentials never cross routes: nothing else logs in."""
        rc = self.config.relay
        if dest.kind == routing.SMARTHOST and rc.smarthost_username:
            return "relay.smarthost_password_file", rc.smarthost_username, rc.smarthost_password_file
        if dest.kind == routing.UPSTREAM:
            up = rc.upstream(dest.upstream)
            if up is not None and up.username:
                return f"relay.upstreams.{up.name}.password_file", up.username, up.password_file
        return None

    def _hosts(self, dest: routing.Destination) -> list[tuple[str, int]]:
        """The fail-over list of a smarthost or upstream, else the one host."""
        return tlspolicy.hosts_of(self.config, dest)

    async def _hops(self, dest: routing.Destination) -> list[Hop]:
        """The next hops: by MX for a domain, else the hosts' addresses in
        order (a host that does not resolve is skipped while another does)."""
        if dest.kind == routing.MX:
            hops: list[Hop] = await self.resolver.mx_hops(dest.domain, dest.port, hostname=self.config.hostname,
                                                          is_self=self.listeners.is_self)
            return hops
        out: list[Hop] = []
        failure: DNSFailure | None = None
        for host, port in self._hosts(dest):
            try:
                out.extend(await self.resolver.host_hops(host, port))
            except DNSFailure as e:
                failure = failure if failure is not None and failure.temporary else e
        if not out and failure is not None:
            raise failure
        return out

    async def tls_requirement(self, dest: routing.Destination) -> tlspolicy.TLSRequirement:
        """The TLS this destination requires now (MTA-STS asked only for MX
        delivery without a delivery.tls_policy entry)."""
        policy: StsPolicy | None = None
        if self.sts is not None and tlspolicy.wants_sts(self.config, dest):
            try:
                policy = await self.sts.policy(dest.domain)
            except Exception:  # noqa: BLE001 - the source must not raise; if it does, no policy
                log.failure("MTA-STS policy look-up for {domain} failed", domain=dest.domain)
        return tlspolicy.decide(self.config, dest, sts=policy, trust_root=self.trust_root)

    def _sts_hops(self, req: tlspolicy.TLSRequirement, hops: list[Hop]) -> list[Hop]:
        """The MX hops the MTA-STS policy allows ("enforce"; "testing"
        keeps them all); each one it does not allow is reported."""
        assert req.sts is not None
        allowed = []
        for h in hops:
            if req.sts.matches(h.host):
                allowed.append(h)
                continue
            failure = f"MX host {h.host} does not match the policy's mx patterns ({', '.join(req.sts.mx)})"
            self._observer(req)(h.host, "mx_not_allowed", failure, req.sts_enforce)
        return allowed if req.sts_enforce else hops

    def _observer(self, req: tlspolicy.TLSRequirement) -> Observer:
        """What hears of a hop failing the policy: the metric (a required
        policy) and the MTA-STS report (a policy in force or in test)."""
        sts, policy = self.sts, req.sts

        def observe(host: str, reason: str, failure: str, enforced: bool) -> None:
            if enforced:  # the hop was refused for it (not a "testing" report)
                self.tls_policy_failures[reason] += 1
            if sts is not None and policy is not None:
                sts.report(policy, host, failure)

        return observe

    async def _with_tlsa(self, tls: TLSPolicy, hops: list[Hop], dest: routing.Destination) -> TLSPolicy:
        """DANE: the TLSA records of each MX host (in the DNS pool, all at
        once) put in the policy; insecure answers leave a host without
        records, failed look-ups are kept as that host's error.  Only hosts
        reached by DNSSEC-validated MX and address records are looked up
        (RFC 7672 section 2.2: otherwise DANE does not apply to them)."""
        hosts = list(dict.fromkeys(h.host for h in hops if h.secure))
        found = await defer.DeferredList(
            [defer.maybeDeferred(self.resolver.tlsa, h, dest.port) for h in hosts], consumeErrors=True)
        tlsa: dict[str, tuple] = {}
        errors: dict[str, str] = {}
        for host, (ok, result) in zip(hosts, found):
            if not ok:
                e = result.value
                errors[host] = e.reason if isinstance(e, DNSFailure) else f"DANE: TLSA lookup for {host} failed: {e}"
            elif isinstance(result, TlsaAnswer) and result.usable:
                tlsa[host] = result.usable
        return replace(tls, tlsa=tlsa, tlsa_errors=errors, dane_names=(dest.domain.rstrip(".").lower(),))

    def _outbound(self, msg: QueuedMessage, dest: routing.Destination, recipients: list[str],
                  auth: tuple[str, str] | None, req: tlspolicy.TLSRequirement | None = None) -> Outbound:
        """What relay.outbound.client.deliver is to send, and how (``req``:
        the TLS requirement; None: decided without MTA-STS)."""
        cfg = self.config
        if req is None:
            req = tlspolicy.decide(cfg, dest, trust_root=self.trust_root)
        tls = req.policy(self._observer(req) if req.required or req.sts is not None else None)
        stop_on_5xx = dest.kind == routing.UPSTREAM or len(self._hosts(dest)) > 1
        return Outbound(
            sender=msg.env.sender,
            recipients=tuple(recipients),
            message=MessageFile(self.spool.message_path(msg.qid), msg.size, msg.offset, msg.data, msg.eight_bit),
            helo=cfg.hostname,
            tls=tls,
            auth=auth,
            connect_timeout=cfg.delivery.connect_timeout,
            timeouts=self.timeouts or Timeouts(),
            queue_id=msg.qid,
            auth_scope=dest.key if auth else "",
            stop_on_5xx=stop_on_5xx,
            dsn=dsnout.carried(msg.env, recipients),
            smtputf8=bool(getattr(msg.env, "smtputf8", False)),
        )


def _dane_blocked(tls: TLSPolicy, hops: list[Hop]) -> str | None:
    """The reason to defer without connecting, when DANE forbids every hop
    (each TLSA look-up failed, or "dane-only" and no host has records)."""
    reasons = []
    for host in dict.fromkeys(h.host for h in hops):
        if host in tls.tlsa_errors:
            reasons.append(tls.tlsa_errors[host])
        elif not tls.tlsa.get(host) and tls.mode == "dane-only":
            why = "" if any(h.secure for h in hops if h.host == host) else \
                " (its MX or address records are not DNSSEC-validated)"
            reasons.append(f"DANE is required (dane-only), but {host} has no usable DNSSEC-validated TLSA records{why}")
        else:
            return None
    return "; ".join(reasons) or None


def _outcomes(qid: str, recipients: list[str], report: DeliveryReport) -> list[Outcome]:
    """One Outcome per recipient from the client's report (and its TLS log line)."""
    out = []
    for r in recipients:
        res = report.results.get(r)
        if res is None:
            out.append(Outcome(r, "deferred", "4.0.0", "no result for this recipient"))
            continue
        hop = res.hop or report.hop
        relay = f"{hop.host}[{hop.address}]:{hop.port}" if hop else "none"
        out.append(Outcome(r, res.kind, res.status, res.describe() if res.remote else res.text, relay,
                           hop.host if (hop and res.remote) else None, res.remote,
                           dsn_carried=res.dsn_carried))
    if report.tls:
        log.info("{queue_id}: TLS to {relay}: {version} {cipher} {verified}", queue_id=qid,
                 relay=str(report.hop) if report.hop else "?", version=report.tls.get("version"),
                 cipher=report.tls.get("cipher"),
                 verified="verified" if report.tls.get("verified") else "not verified")
    return out
