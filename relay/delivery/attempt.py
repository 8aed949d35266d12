"""One delivery attempt: a message's recipients for one destination.

The queue manager decides what to try and when; this module only carries
out an attempt and turns whatever happens into one Outcome per recipient:
delivered, deferred or bounced, with the status, the reply and the host
that gave it.  Remote destinations go through relay.delivery.mx (next hops) and
relay.outbound.client; local ones through relay.delivery.local in the disk thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from relay.config import Config
from relay.delivery import dsnout, routing
from relay.delivery import local as localmod
from relay.delivery.mx import DNSFailure, Hop, Resolver
from relay.outbound import client
from relay.outbound.conncache import ConnectionCache
from relay.outbound.hostlimit import HostLimit
from relay.outbound.replies import DeliveryReport
from relay.outbound.request import MessageFile, Outbound, Timeouts, TLSPolicy

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
    be replaced between attempts.
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
    ):
        self.reactor = reactor
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
        cfg = self.config
        auth = None
        if dest.kind == routing.SMARTHOST and cfg.relay.smarthost_username:
            try:
                pw = await self.disk.run(read_password, cfg.relay.smarthost_password_file)
            except OSError as e:
                return _all(recipients, "deferred", "4.3.5",
                            f"cannot read relay.smarthost_password_file "
                            f"{cfg.relay.smarthost_password_file}: {e.strerror or e}")
            auth = (cfg.relay.smarthost_username, pw)
        try:
            hops = await self._hops(dest)
        except DNSFailure as e:
            kind = "deferred" if e.temporary else "bounced"
            return _all(recipients, kind, e.status, e.reason)
        report = await client.deliver(
            self.reactor, hops, self._outbound(msg, dest, recipients, auth),
            threadpool=self.disk.pool, cache=self.cache, host_limit=self.host_limit,
        )
        self.sessions += report.hop is not None
        self.tls_sessions += bool(report.tls)
        return _outcomes(msg.qid, recipients, report)

    async def _hops(self, dest: routing.Destination) -> list[Hop]:
        """The next hops: by MX for a domain, else the host's addresses."""
        if dest.kind == routing.MX:
            hops: list[Hop] = await self.resolver.mx_hops(dest.domain, dest.port, hostname=self.config.hostname,
                                                          is_self=self.listeners.is_self)
            return hops
        return await self.resolver.host_hops(dest.host, dest.port)

    def _outbound(self, msg: QueuedMessage, dest: routing.Destination, recipients: list[str],
                  auth: tuple[str, str] | None) -> Outbound:
        """What relay.outbound.client.deliver is to send, and how."""
        cfg = self.config
        if dest.kind == routing.SMARTHOST:
            tls = TLSPolicy(cfg.relay.smarthost_tls, dest.host,
                            self.trust_root or (cfg.relay.smarthost_ca_file or None))
        else:
            tls = TLSPolicy(cfg.delivery.tls, None, self.trust_root or None)
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
            dsn=dsnout.carried(msg.env, recipients),
        )


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
