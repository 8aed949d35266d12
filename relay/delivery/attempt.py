"""One delivery attempt: a message's recipients for one destination.

The queue manager decides what to try and when; this module only carries
out an attempt and turns whatever happens into one Outcome per recipient:
delivered, deferred or bounced, with the status, the reply and the host
that gave it.  Remote destinations go through relay.delivery.mx (next hops) and
relay.smtp.client; local ones through relay.delivery.local in the disk thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from relay.delivery import local as localmod
from relay.delivery import routing
from relay.delivery.mx import DNSFailure

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


def _all(recipients, kind, status, reply, relay="none") -> list[Outcome]:
    return [Outcome(r, kind, status, reply, relay) for r in recipients]


def read_password(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        pw = f.readline()
    return pw[:-1] if pw.endswith("\n") else pw


class Deliverer:
    """Carries out attempts; holds the resolver and what the client needs."""

    def __init__(self, service, resolver, *, trust_root=None, timeouts=None):
        self.svc = service
        self.resolver = resolver
        self.trust_root = trust_root  # for smarthost "verify" (tests inject their CA)
        self.timeouts = timeouts  # relay.smtp.client.Timeouts or None for RFC values
        from relay.delivery.hostlimit import HostLimit
        from relay.smtp.client import ConnectionCache

        # sessions kept open for a moment for the next message to the same host
        self.cache = ConnectionCache(service.reactor)
        # at most max_per_destination connections to one host, whatever the domains
        self.host_limit = HostLimit(lambda: self.config.delivery.max_per_destination)
        self.sessions = 0  # remote attempts that reached a server (metrics)
        self.tls_sessions = 0  # ... of which over TLS (metrics)

    @property
    def config(self):
        return self.svc.config

    def attempt(self, msg, dest: routing.Destination, recipients: list[str]) -> defer.Deferred:
        if dest.kind == routing.LOCAL:
            return defer.ensureDeferred(self._local(msg, recipients))
        return defer.ensureDeferred(self._remote(msg, dest, recipients))

    async def _local(self, msg, recipients: list[str]) -> list[Outcome]:
        cfg = self.config
        path = self.svc.spool.message_path(msg.qid)
        out = []
        for r in recipients:
            try:
                res = await self.svc.disk.run(
                    localmod.deliver, root=cfg.local.mailboxes, address=r, sender=msg.env.sender,
                    message_path=path, offset=msg.offset, user_exists=self.svc.users.exists,
                )
            except Exception as e:  # noqa: BLE001 - a failed attempt is a deferral, never a crash
                log.failure("{queue_id}: local delivery to {rcpt} failed", queue_id=msg.qid, rcpt=r)
                res = localmod.LocalResult("deferred", "4.3.0", f"451 4.3.0 local delivery failed: {e}")
            out.append(Outcome(r, res.kind, res.status, res.text, "local", None, False))
        return out

    async def _remote(self, msg, dest: routing.Destination, recipients: list[str]) -> list[Outcome]:
        from relay.smtp import client

        cfg = self.config
        auth = None
        tls_mode = cfg.delivery.tls
        tls_hostname = None
        if dest.kind == routing.SMARTHOST:
            tls_mode = cfg.relay.smarthost_tls
            tls_hostname = dest.host
            if cfg.relay.smarthost_username:
                try:
                    pw = await self.svc.disk.run(read_password, cfg.relay.smarthost_password_file)
                except OSError as e:
                    return _all(recipients, "deferred", "4.3.5",
                                f"cannot read relay.smarthost_password_file "
                                f"{cfg.relay.smarthost_password_file}: {e.strerror or e}")
                auth = (cfg.relay.smarthost_username, pw)
        try:
            if dest.kind == routing.MX:
                hops = await self.resolver.mx_hops(dest.domain, dest.port, hostname=cfg.hostname,
                                                   is_self=self.svc.listeners.is_self)
            else:
                hops = await self.resolver.host_hops(dest.host, dest.port)
        except DNSFailure as e:
            kind = "deferred" if e.temporary else "bounced"
            return _all(recipients, kind, e.status, e.reason)
        report = await client.deliver(
            self.svc.reactor, hops, sender=msg.env.sender, recipients=recipients,
            message_path=self.svc.spool.message_path(msg.qid), message_offset=msg.offset,
            message_size=msg.size, helo=cfg.hostname, tls_mode=tls_mode, tls_hostname=tls_hostname,
            trust_root=self.trust_root or (cfg.relay.smarthost_ca_file or None if dest.kind == routing.SMARTHOST
                                           else None), auth=auth, connect_timeout=cfg.delivery.connect_timeout,
            timeouts=self.timeouts, threadpool=self.svc.disk.pool, queue_id=msg.qid,
            cache=self.cache, host_limit=self.host_limit, body_8bit=getattr(msg, "eight_bit", None),
            message_data=getattr(msg, "data", None),
        )
        self.sessions += report.hop is not None
        self.tls_sessions += bool(report.tls)
        out = []
        for r in recipients:
            res = report.results.get(r)
            if res is None:
                out.append(Outcome(r, "deferred", "4.0.0", "no result for this recipient"))
                continue
            hop = res.hop or report.hop
            relay = f"{hop.host}[{hop.address}]:{hop.port}" if hop else "none"
            out.append(Outcome(r, res.kind, res.status, res.describe() if res.remote else res.text, relay,
                               hop.host if (hop and res.remote) else None, res.remote))
        if report.tls:
            log.info("{queue_id}: TLS to {relay}: {version} {cipher} {verified}", queue_id=msg.qid,
                     relay=str(report.hop) if report.hop else "?", version=report.tls.get("version"),
                     cipher=report.tls.get("cipher"),
                     verified="verified" if report.tls.get("verified") else "not verified")
        return out
