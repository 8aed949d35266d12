"""Builds the running relay from a config: a MultiService of listeners,
the spool, the queue runner, the control socket and the file watchers.

Start-up order matters for durability: the spool is locked (one relay per
spool) and half-received files from a crash are removed *before* anything
listens; the queue is then scanned in a thread while new mail is already
accepted.  Listeners bind in privilegedStartService, so with ``twistd -u/-g``
ports below 1024 are bound as root before privileges are dropped.
"""

from __future__ import annotations

import os
import time

from twisted.application import internet, service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay import aliases as aliasesmod
from relay import endpoints as epmod
from relay import policy as policymod
from relay import spool as spoolmod
from relay import users as usersmod
from relay.config import Config
from relay.diskio import AsyncSpool, DiskPool
from relay.netutil import Listeners
from relay.smtp.server import ServerContext, SMTPFactory

log = Logger(namespace="relay.service")

REFRESH_INTERVAL = 2.0  # seconds between checks of the users and aliases files
LOCK_WAIT = 10.0  # seconds to wait for the spool lock (relayctl holds it briefly when we are down)


class StartupError(Exception):
    pass


class RelayService(service.MultiService):
    def __init__(self, config: Config, reactor=None, *, deliver: bool = True):
        super().__init__()
        from twisted.internet import reactor as default_reactor

        self.config = config
        self.reactor = reactor or default_reactor
        self.started_at = time.time()
        self.spool = spoolmod.Spool(config.spool)
        self.disk = DiskPool(self.reactor)
        # DNS look-ups block a thread for up to their lifetime: their own pool,
        # so a dead DNS server never starves fsyncs (or the reverse).
        self.dns_pool = DiskPool(self.reactor, minthreads=1, maxthreads=20, name="relay-dns")
        self.aspool = AsyncSpool(self.spool, self.disk)
        self.listeners = Listeners()
        self._lock_fd: int | None = None
        self.queue = None  # relay.queue.QueueManager, set up in _build_queue
        self.pop3_factories: list = []
        self.listener_services: list = []
        self.scanned: defer.Deferred = defer.Deferred()  # fires when the start-up scan is done

        try:
            self.users = usersmod.UserDB(config.local.users)
        except usersmod.UsersFileError as e:
            raise StartupError(str(e))
        try:
            self.aliases = aliasesmod.AliasFile(config.local.aliases, config.local.domains)
        except aliasesmod.AliasesFileError as e:
            raise StartupError(str(e))
        self.tls = self._load_tls(config)
        self.checker = usersmod.make_checker(self.users, self.disk.pool, self.reactor)
        self.smtp_ctx = ServerContext(
            config=config,
            policy=self._make_policy(config),
            spool=self.aspool,
            expand=self.expand,
            checker=self.checker,
            tls=self.tls,
            on_queued=self._queued,
            reactor=self.reactor,
        )
        self._build_listeners(config)
        if deliver:
            self._build_queue(config)
        self._build_control()
        self._refresher = task.LoopingCall(self._refresh_files)
        self._refresher.clock = self.reactor

    # -- construction ------------------------------------------------------
    @staticmethod
    def _load_tls(config: Config):
        if not config.tls.enabled:
            return None
        from relay.tls import TLSConfigError, load_server_tls

        try:
            return load_server_tls(config.tls.certificate, config.tls.key)
        except TLSConfigError as e:
            raise StartupError(f"{config.source}: {e}")

    def _make_policy(self, config: Config) -> policymod.Policy:
        return policymod.Policy(
            local_domains=config.local.domains,
            relay_domains=config.relay.domains,
            networks=config.relay.networks,
            user_exists=self.users.exists,
            alias_exists=lambda a: self.aliases.map.has(a),
            our_ips=self.listeners.has_ip,
        )

    def expand(self, address: str) -> list[tuple[str, str | None]]:
        """Final recipients of an accepted recipient (alias expansion)."""
        domain = address.rpartition("@")[2]
        if domain not in self.config.local.domains:
            return [(address, address)]
        exp = aliasesmod.expand(
            address,
            self.aliases.map,
            is_local_domain=lambda d: d in self.config.local.domains,
            user_exists=self.users.exists,
            first_user_in=self.users.first_user_in,
        )
        return [(e.address, e.original) for e in exp] or [(address, address)]

    def _endpoint(self, description: str):
        spec = epmod.parse(description)
        if spec.implicit_tls and not spec.own_certificate:
            tcp = epmod.EndpointSpec("", "tcp", spec.args, {k: v for k, v in spec.kwargs.items()
                                                            if k in ("interface", "backlog")})
            return endpoints.serverFromString(self.reactor, epmod.unparse(tcp)), True
        return endpoints.serverFromString(self.reactor, description), False

    def _listen(self, description: str, factory, name: str) -> None:
        ep, wrap = self._endpoint(description)
        if wrap:
            factory = TLSMemoryBIOFactory(self.tls.options, False, factory)
        factory.noisy = False
        svc = internet.StreamServerEndpointService(ep, factory)
        svc._raiseSynchronously = True
        svc.setName(name)
        svc.setServiceParent(self)
        self.listener_services.append(svc)

    def _build_listeners(self, config: Config) -> None:
        for kind, descs in (("smtp", config.smtp.listen), ("submission", config.smtp.submission)):
            for desc in descs:
                spec = epmod.parse(desc)
                if spec.port is not None:
                    self.listeners.add(spec.interface, spec.port)
                factory = SMTPFactory(self.smtp_ctx, submission=(kind == "submission"),
                                      implicit_tls=spec.implicit_tls)
                self._listen(desc, factory, f"{kind} {desc}")
        self._build_pop3(config)

    def _build_pop3(self, config: Config) -> None:
        try:
            from relay import pop3
        except ImportError:
            if config.pop3.listen:
                log.warn("POP3 is not available in this build; pop3.listen ignored")
            return
        for desc in config.pop3.listen:
            spec = epmod.parse(desc)
            factory = pop3.POP3Factory(
                hostname=config.hostname,
                mailbox_root=config.local.mailboxes,
                local_domains=config.local.domains,
                userdb=self.users,
                tls_options=self.tls.options if self.tls else None,
                auth_requires_tls=config.tls.auth_requires_tls,
                reactor=self.reactor,
                threadpool=self.disk.pool,
            )
            self.pop3_factories.append(factory)
            self._listen(desc, factory, f"pop3 {desc}")

    def _build_queue(self, config: Config) -> None:
        from relay.queue import QueueManager

        self.queue = QueueManager(self, config)

    def _build_control(self) -> None:
        """The control socket relayctl talks to (relay.control)."""
        from relay.control import ControlService

        self.control = ControlService(self, self.config.control_socket, self.reactor)
        self.control.setServiceParent(self)

    # -- start / stop ----------------------------------------------------------
    def _lock_spool(self) -> int:
        """The spool lock; an offline relayctl may hold it for a moment."""
        deadline = time.monotonic() + LOCK_WAIT
        waited = False
        while True:
            try:
                return self.spool.lock()
            except spoolmod.SpoolLocked:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    log.info("spool {spool} is locked (by relayctl?): waiting up to {secs:g}s",
                             spool=self.spool.root, secs=LOCK_WAIT)
                    waited = True
                time.sleep(0.1)

    def privilegedStartService(self) -> None:
        try:
            self._lock_fd = self._lock_spool()
        except spoolmod.SpoolLocked as e:
            raise StartupError(str(e))
        except OSError as e:
            raise StartupError(f"spool {self.spool.root}: {e.strerror}")
        self.spool.clean_incoming(log=lambda fmt, **kw: log.info(fmt, **kw))
        super().privilegedStartService()

    def startService(self) -> None:
        if self._lock_fd is None:
            try:
                self._lock_fd = self._lock_spool()
            except spoolmod.SpoolLocked as e:
                raise StartupError(str(e))
            self.spool.clean_incoming(log=lambda fmt, **kw: log.info(fmt, **kw))
        self.disk.start()
        self.dns_pool.start()
        super().startService()
        cfg = self.config
        log.info("twisted-relay starting: config {source}, spool {spool}, hostname {hostname}",
                 source=cfg.source, spool=self.spool.root, hostname=cfg.hostname)
        for desc in cfg.smtp.listen:
            log.info("SMTP listening on {endpoint}", endpoint=desc)
        for desc in cfg.smtp.submission:
            log.info("SMTP submission (AUTH required) listening on {endpoint}", endpoint=desc)
        for desc in cfg.pop3.listen if self.pop3_factories else ():
            log.info("POP3 listening on {endpoint}", endpoint=desc)
        log.info("local domains: {domains}; relaying for networks {networks}",
                 domains=", ".join(cfg.local.domains) or "none",
                 networks=", ".join(str(n) for n in cfg.relay.networks) or "none")
        self._warn_plaintext_logins()
        self._refresher.start(REFRESH_INTERVAL, now=False)
        if self.queue is not None:
            d = self.queue.start()
        else:
            d = self.disk.run(self._scan_only)
        d.addErrback(lambda f: log.failure("spool scan failed", f))
        d.addBoth(lambda _: self.scanned.callback(None) if not self.scanned.called else None)

    def _scan_only(self) -> None:
        n = 0
        for _ in self.spool.recover(log=lambda fmt, **kw: log.info(fmt, **kw)):
            n += 1
        log.info("spool scanned: {count} messages queued", count=n)

    def _warn_plaintext_logins(self) -> None:
        if self.tls is not None:
            return
        for desc in list(self.config.pop3.listen) + list(self.config.smtp.submission):
            spec = epmod.parse(desc)
            iface = spec.interface
            if spec.kind in ("tcp", "tcp6") and not (iface.startswith("127.") or iface == "::1"):
                log.warn("no TLS certificate configured: passwords cross {endpoint} in plaintext",
                         endpoint=desc)

    @defer.inlineCallbacks
    def stopService(self):
        self.smtp_ctx.accepting = False
        if self._refresher.running:
            self._refresher.stop()
        if self.queue is not None:
            yield self.queue.stop()
        yield defer.maybeDeferred(super().stopService)
        self.disk.stop()
        self.dns_pool.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def listening(self) -> defer.Deferred:
        """Fires with [(name, host, port)] for every listener once bound."""

        def collect(ports):
            out = []
            for svc, (ok, port) in zip(self.listener_services, ports):
                if ok:
                    a = port.getHost()
                    out.append((svc.name, getattr(a, "host", ""), getattr(a, "port", 0)))
            return out

        ds = [svc._waitingForPort for svc in self.listener_services if svc._waitingForPort]
        return defer.DeferredList(ds, consumeErrors=True).addCallback(collect)

    # -- runtime -------------------------------------------------------------------
    def _queued(self, entry: spoolmod.QueueEntry) -> None:
        if self.queue is not None:
            self.queue.add(entry)

    def _refresh_files(self) -> None:
        try:
            if self.users.refresh():
                log.info("users file {path} reloaded: {count} users", path=self.users.path,
                         count=len(self.users))
        except usersmod.UsersFileError as e:
            log.error("users file not reloaded, keeping the previous users: {error}", error=str(e))
        try:
            if self.aliases.refresh():
                log.info("aliases file {path} reloaded: {count} aliases", path=self.aliases.path,
                         count=len(self.aliases.map))
        except aliasesmod.AliasesFileError as e:
            log.error("aliases file not reloaded, keeping the previous aliases: {error}", error=str(e))


def make_service(config: Config, reactor=None) -> RelayService:
    return RelayService(config, reactor=reactor)
