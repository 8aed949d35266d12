"""Builds the running relay from a config: a MultiService of listeners,
the spool, the queue runner, the control socket and the file watchers.

Start-up order matters for durability: the spool is locked (one relay per
spool) and half-received files from a crash are removed *before* anything
listens; the queue is then scanned in a thread while new mail is already
accepted.  Listeners bind in privilegedStartService, so with ``twistd -u/-g``
ports below 1024 are bound as root before privileges are dropped.

What it is built from comes from relay.runtime.parts (the users, aliases and
certificate the config names, the policy, our listeners: the same parts at
start, at a reload and for relayctl's offline route); each running part
(SMTP context, listeners, POP3, queue, pickup, metrics, control socket) is
made in its own ``_build_*`` method.  A reload applies what
relay.runtime.reconfig says may change live.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Any, Callable

from twisted.application import internet, service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import threadable

from relay import config as configmod
from relay.common import connlimit
from relay.common import endpoints as epmod
from relay.common.errors import StartupError
from relay.common.ratelimit import RateTable
from relay.common.tls import ServerTLS
from relay.config import Config
from relay.control import route as routecheck
from relay.control.server import ControlContext, ControlService, ReloadUnsupported, status_of
from relay.delivery import mtasts
from relay.delivery.attempt import Deliverer
from relay.delivery.mx import Resolver
from relay.intake import aliases as aliasesmod
from relay.intake import policy as policymod
from relay.intake import signing
from relay.intake.accept import Intake
from relay.intake.pickup import Pickup
from relay.mailbox import pop3
from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.queue.manager import QueueManager
from relay.runtime import parts, reconfig
from relay.runtime.listen import adopted_listener, server_endpoint, tls_factory
from relay.runtime.metrics import RelayMetrics
from relay.runtime.process import exit_on_second_signal, raise_fd_limit
from relay.runtime.proxied import ProxyGate
from relay.smtp.context import ServerContext
from relay.smtp.server import SMTPFactory

__all__ = ["RelayService", "StartupError", "make_service"]

log = Logger(namespace="relay.service")

REFRESH_INTERVAL = 2.0  # seconds between checks of the users and aliases files
LOCK_WAIT = 10.0  # seconds to wait at start for a relayctl holding the spool lock
SMTP_GRACE = 10.0  # seconds an SMTP transaction may take to finish at shutdown
STOP_BOUND = 28.0  # seconds: the whole shutdown, within systemd's/our 30 s promise


class RelayService(service.MultiService):
    def __init__(self, config: Config, reactor: Any = None, *, deliver: bool = True,
                 adopted: dict[str, int] | None = None, worker: tuple[int, int] | None = None,
                 conn_table: connlimit.SharedTable | None = None,
                 rate_table: RateTable | None = None,
                 load_config: Callable[[str | None], Config] = configmod.load):
        super().__init__()
        # how a reload reads the config file (a worker: as its own config, relay.runtime.worker)
        self.load_config = load_config
        # listening sockets inherited from a master process (workers > 1):
        # endpoint description -> file descriptor
        self.adopted = dict(adopted or {})
        self.worker = worker  # (index, count) when this is one of several workers
        # relay.common.connlimit.SharedTable the master made (workers > 1): per-IP
        # limits count the connections of every worker
        self.conn_table = conn_table
        # the [limits] counts (relay.common.ratelimit): the master's shared table
        # with workers > 1, else one of this process
        self.rate_table = rate_table if rate_table is not None else RateTable.local()
        self._counters: dict[str, object] = {}
        from twisted.internet import reactor as default_reactor

        self.config = config
        # Any: the reactor's interfaces are zope interfaces, whose methods mypy reads without self
        self.reactor: Any = reactor or default_reactor
        self.limits_redis = parts.limits_link(config, self.reactor, self)  # limits.redis: the fleet's limits
        self.started_at = time.time()
        self.spool = spoolmod.Spool(config.spool)
        self.disk = DiskPool(self.reactor)
        # DNS look-ups block a thread for up to their lifetime: their own pool,
        # so a dead DNS server never starves fsyncs (or the reverse).
        # Each look-up holds a thread up to its lifetime: many silent domains at
        # once must not leave none for the others (threads grow on demand).
        self.dns_pool = DiskPool(self.reactor, minthreads=1, maxthreads=64, name="relay-dns")
        # Password checks (scrypt: ~40 ms of CPU and 16 MiB each) in a small pool
        # of their own: a burst of AUTH attempts neither delays the fsyncs
        # behind every 250 nor takes unbounded memory.
        self.auth_pool = DiskPool(self.reactor, minthreads=1, maxthreads=4, name="relay-auth")
        self.aspool = AsyncSpool(self.spool, self.disk)
        self.listeners = parts.own_listeners(config)  # the addresses and ports that are ours
        self._lock_fd: int | None = None
        self.queue: QueueManager | None = None  # set up in _build_queue
        self.deliverer: Deliverer | None = None  # the queue's, kept for the reload
        self.sts: mtasts.MtaSts | None = None  # MTA-STS policies (the deliverer's), in <spool>/mta-sts
        self.pop3_factories: list = []
        self.listener_services: list = []
        self.proxy = ProxyGate(self.reactor, config.proxy)  # listeners behind a load balancer
        self.scanned: defer.Deferred = defer.Deferred()  # fires when the start-up scan is done
        self.exit_on_error = False  # set by the twistd plugin: a start-up error exits the process
        self.handle_signals = False  # set by the twistd plugin: SIGHUP reloads, 2nd SIGTERM exits
        self.stopping = False

        try:
            self.users = parts.load_users(config)
            self.aliases = parts.load_aliases(config)
            self.tls: ServerTLS | None = parts.load_tls(config)
            self.signer = parts.make_signer(config, parts.load_dkim_keys(config))
            self.sts_trust = parts.load_sts_trust(config)
            parts.check_delivery_ca_files(config)
        except parts.PartError as e:
            raise StartupError(str(e))
        self.checker = usersmod.make_checker(self.users, self.auth_pool.pool, self.reactor)
        self.expander = aliasesmod.Expander(local_domains=config.local.domains, aliases=self.aliases,
                                            users=self.users)
        self.intake = Intake(spool=self.aspool, expand=self.expander.expand, queued=self._queued,
                             clock=self.reactor, signer=self.signer)
        self._build_smtp(config)
        self._build_listeners(config)
        if deliver:
            self._build_queue(config)
        self._build_pickup(config)  # relay-sendmail's drop directory (relay/intake/pickup.py)
        self._build_metrics(config)  # [metrics] (relay/runtime/metrics.py)
        self._build_control()  # relayctl's control socket (relay/control/server.py)
        self._refresher = task.LoopingCall(self._refresh_files)
        self._refresher.clock = self.reactor

    # -- construction ------------------------------------------------------
    def _build_smtp(self, config: Config) -> None:
        """The SMTP server context every SMTP and submission listener shares."""
        self.smtp_ctx = ServerContext(
            config=config,
            policy=self._make_policy(config),
            intake=self.intake,
            checker=self.checker,
            tls=self.tls,
            reactor=self.reactor,
            limiter=self.connection_counter("smtp"),
            rates=parts.fleet_rates(self.rate_table, self.limits_redis),
        )

    def connection_counter(self, protocol: str):
        """The per-IP connection counter of one protocol ("smtp", "pop3"):
        one object for all its listeners, counting across every worker of
        the relay when there are several (relay.common.connlimit)."""
        counter = self._counters.get(protocol)
        if counter is None:
            if self.conn_table is not None and self.worker is not None:
                counter = self.conn_table.counter(protocol, self.worker[0])
            else:
                counter = connlimit.LocalCounter()
            counter = parts.fleet_counter(counter, protocol, self.limits_redis)
            self._counters[protocol] = counter
        return counter

    def _make_policy(self, config: Config) -> policymod.Policy:
        return parts.make_policy(config, user_exists=self._user_exists,
                                 alias_exists=lambda a: self.aliases.map.has(a), our_ips=self.listeners.has_ip)

    def _user_exists(self, address: str) -> bool:
        """A user known now, or after a fresh look at the users and aliases files.

        `relayctl user add` followed at once by a test message must not get
        550 for the new user while the 2-second poll has not run yet: a miss
        costs two stat() calls (cheap, and only for unknown recipients).
        """
        if self.users.exists(address):
            return True
        if not threadable.isInIOThread():
            return False  # e.g. relayctl route, answered in a thread: the reactor's poll refreshes
        self._refresh_files()
        return self.users.exists(address)

    def _listen(self, description: str, factory, name: str) -> None:
        if description in self.adopted:
            svc: Any = adopted_listener(self.reactor, self.adopted[description], description, factory,
                                        lambda: self.tls, outer=lambda f: self.proxy.wrap(description, f))
        else:
            ep, wrap = server_endpoint(self.reactor, description, plain=self.proxy.expects(description))
            if wrap:
                factory = tls_factory(factory, description, lambda: self.tls)
            factory = self.proxy.wrap(description, factory)  # the PROXY header comes before TLS
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
                factory = SMTPFactory(self.smtp_ctx, submission=(kind == "submission"),
                                      implicit_tls=spec.implicit_tls)
                self._listen(desc, factory, f"{kind} {desc}")
        self._build_pop3(config)

    def _build_pop3(self, config: Config) -> None:
        for desc in config.pop3.listen:
            factory = pop3.factory_from_config(
                config, userdb=self.users, tls_options=self.tls.options if self.tls else None,
                reactor=self.reactor,
                threadpool=self.disk.pool,  # the Maildirs
                auth_pool=self.auth_pool.pool,  # password checks: never the disk pool
                limiter=self.connection_counter("pop3"),  # one count for all POP3 listeners
            )
            self.pop3_factories.append(factory)
            self._listen(desc, factory, f"pop3 {desc}")

    def _build_queue(self, config: Config) -> None:
        resolver = self._resolver(config)
        self.sts = parts.make_mta_sts(config, self.reactor, resolver, self.disk,
                                      os.path.join(self.spool.root, "mta-sts"), self.sts_trust)
        self.deliverer = Deliverer(self.reactor, resolver, spool=self.spool, disk=self.disk,
                                   users=self.users, listeners=self.listeners, config=config, sts=self.sts)
        self.queue = QueueManager(self.reactor, self.aspool, self.deliverer, config,
                                  parked=self.deliverer.cache, disk_stopped=lambda: self.disk.stopped,
                                  rates=self.rate_table)

    def _resolver(self, config: Config) -> Resolver:
        """The deliverer's resolver: the configured nameservers, in the DNS pool."""
        return Resolver(nameservers=config.delivery.nameservers, lifetime=10.0, reactor=self.reactor,
                        threadpool=self.dns_pool.pool)

    def _build_pickup(self, config: Config) -> None:
        """A child service: it starts before the queue is loaded (see Pickup.startService)."""
        if self.worker is not None:
            if self.worker[0] != 0:
                self.pickup = None  # one worker takes relay-sendmail's drop directory
                return
            # the drop directory is the one relay-sendmail knows: the top spool's
            self.spool.drop_dir = os.path.join(os.path.dirname(self.spool.root), "drop")

        self.pickup = Pickup(reactor=self.reactor, spool=self.spool, disk=self.disk, intake=self.intake,
                             config=config)
        self.pickup.setServiceParent(self)

    def _build_metrics(self, config: Config) -> None:
        """This relay's metrics registry, fed by the queue's attempt hook, and
        served over HTTP on each metrics.listen endpoint."""
        self.metrics = RelayMetrics(self.reactor, smtp=self.smtp_ctx, queue=self.queue, pickup=self.pickup,
                                    pop3_factories=self.pop3_factories, started_at=self.started_at, sts=self.sts,
                                    proxy=self.proxy)
        if self.queue is not None:
            self.queue.on_attempt = self.metrics.observe_attempt
        for desc in config.metrics.listen:
            spec = epmod.parse(desc)
            if spec.implicit_tls and not spec.own_certificate and self.tls is None:
                raise StartupError(f"{config.source}: metrics.listen: {desc!r} is an ssl: endpoint without "
                                   "privateKey=, so it needs tls.certificate and tls.key")
            self._listen(desc, self.metrics.site(), f"metrics {desc}")

    def _build_control(self) -> None:
        """The control socket relayctl talks to (relay.control.server)."""
        ctx = ControlContext(reactor=self.reactor, spool=self.aspool, queue=self.queue, status=self.status,
                             route_context=self.route_context, dns=self.dns_pool,
                             metrics=self.metrics.render, reload=self._reload_for_control)
        cc = self.config.control
        self.control = ControlService(ctx, self.config.control_socket, source=self.config.source,
                                      tcp=cc.tcp_listen, secret_file=cc.secret_file, tls=lambda: self.tls)
        self.control.setServiceParent(self)

    def status(self) -> defer.Deferred:
        """Fires with the ``relayctl status`` data (relay.control.server.status_of)."""
        return self.listening().addCallback(lambda ls: status_of(
            config=self.config, spool_root=self.spool.root, started_at=self.started_at, queue=self.queue,
            smtp=self.smtp_ctx, pop3_factories=self.pop3_factories, listeners=ls))

    def route_context(self) -> routecheck.RouteContext:
        """What ``relayctl route`` decides with: the running config, policy,
        aliases and users, and the deliverer's resolver."""
        q = self.queue
        r = getattr(getattr(q, "deliverer", None), "resolver", None)
        if r is None or not hasattr(r, "resolve_mx"):
            r = parts.route_resolver(self.config)
        # the explanation runs in a thread: the MTA-STS source asked through the reactor
        sts = routecheck.sts_lookup(self.reactor, self.sts) if self.sts is not None else None
        return routecheck.RouteContext(
            config=self.config, policy=self.smtp_ctx.policy, expand=self.expander.expand,
            user_exists=self.users.exists, resolver=r, is_self=self.listeners.is_self, sts=sts,
        )

    def _reload_for_control(self) -> dict:
        """relayctl reload: the service's ``reload`` at the time of the call
        (None in a relay without reload support)."""
        if self.reload is None:
            raise ReloadUnsupported()
        return self.reload()

    # -- start / stop ----------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Bind the listeners (as root when started as root; twistd -u/-g
        drops privileges after this).  Everything that touches the spool
        happens in startService, as the user the relay runs as, so that the
        files it creates are that user's."""
        raise_fd_limit()
        super().privilegedStartService()

    def startService(self) -> None:
        # Long-lived objects (config, modules, the loaded queue) need no
        # cyclic collection; new garbage is collected less often (each
        # message makes a few thousand short-lived objects).
        gc.freeze()
        gc.set_threshold(20000, 20, 20)
        try:
            self._open_spool()
        except StartupError as e:
            if self.exit_on_error:
                raise SystemExit(f"twisted-relay: not starting: {e}")
            raise
        self.disk.start()
        self.dns_pool.start()
        self.auth_pool.start()
        try:
            super().startService()  # the children: listeners, the pickup, the control socket
        except StartupError as e:
            if self.exit_on_error:  # under twistd: a clear message, no traceback
                raise SystemExit(f"twisted-relay: not starting: {e}")
            raise
        cfg = self.config
        log.info("twisted-relay starting: config {source}, spool {spool}, hostname {hostname}, uid {uid}",
                 source=cfg.source, spool=self.spool.root, hostname=cfg.hostname, uid=os.geteuid())
        if cfg.workers_note:
            log.info("{note}", note=cfg.workers_note)
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
        self._check_dkim()
        self._install_signals()
        self._refresher.start(REFRESH_INTERVAL, now=False)
        if self.sts is not None:
            self.sts.begin()  # the cache loaded from the spool, then the background refresh
        if self.queue is not None:
            d = self.queue.start()
        else:
            d = self.disk.run(self._scan_only)
        d.addErrback(lambda f: log.failure("spool scan failed", f))
        d.addBoth(lambda _: self.scanned.callback(None) if not self.scanned.called else None)

    def _open_spool(self) -> None:
        """Create and lock the spool, then remove half-received mail.

        Runs before the reactor does, so no session can have started a new
        file in incoming/ yet.  An offline relayctl holds the lock only
        briefly: wait a few seconds for it.
        """
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                self._lock_fd = self.spool.lock()
                break
            except spoolmod.SpoolLocked as e:
                if time.monotonic() > deadline:
                    raise StartupError(f"{e} (lock {self.spool.root}/lock)")
                time.sleep(0.1)
            except PermissionError:
                raise StartupError(
                    f"spool {self.spool.root} is not writable by uid {os.geteuid()}: create it owned by "
                    f"the user the relay runs as (install -d -m 0700 -o USER {self.spool.root})")
            except OSError as e:
                raise StartupError(f"spool {self.spool.root}: {e.strerror}")
        if self.worker is None:  # one process on a spool that had workers: their queues are now its own
            from relay.runtime.queuemoves import adopt_worker_queues

            try:
                adopt_worker_queues(self.spool, lambda fmt, **kw: log.info(fmt, **kw))
            except OSError as e:
                raise StartupError(f"spool {self.spool.root}: cannot take the workers' queues: {e}")
        try:
            self.spool.clean_incoming(log=lambda fmt, **kw: log.info(fmt, **kw))
        except OSError as e:
            raise StartupError(f"spool {self.spool.root}: cannot clean incoming/: {e.strerror}")

    def _install_signals(self) -> None:
        """SIGHUP reloads the config (twistd leaves SIGHUP alone)."""
        if threading.current_thread() is not threading.main_thread() or not self.handle_signals:
            return

        def on_hup(signum, frame):
            self.reactor.callFromThread(self.reload)

        try:
            signal.signal(signal.SIGHUP, on_hup)
        except (ValueError, OSError):
            pass

    def _scan_only(self) -> None:
        n = 0
        for _ in self.spool.recover(log=lambda fmt, **kw: log.info(fmt, **kw)):
            n += 1
        log.info("spool scanned: {count} messages queued", count=n)

    def _warn_plaintext_logins(self) -> None:
        for endpoint, text in pop3.startup_warnings(self.config):
            log.warn("{warning}", warning=text, endpoint=endpoint)
        for desc in [] if self.tls is not None else parts.public_submissions(self.config):
            log.warn("no TLS certificate configured: passwords cross {endpoint} in plaintext", endpoint=desc)

    def _check_dkim(self) -> None:
        """Short keys now; each selector's DNS record in the DNS pool (start goes on meanwhile)."""
        for k in self.signer.keys:
            for w in k.warnings:
                log.warn("dkim: {warning}", warning=w)
        d = self.dns_pool.run(signing.record_warnings, self.signer.keys, self.config.delivery.nameservers)
        d.addCallback(parts.warn_each)
        d.addErrback(lambda f: log.failure("dkim: checking the DNS records failed", f))

    @defer.inlineCallbacks
    def stopService(self):
        """Graceful stop (SIGTERM): no new connections; SMTP transactions in
        progress get SMTP_GRACE seconds, then 421 4.3.2; deliveries in flight
        finish or, past the bound, are simply retried after the restart (their
        recipients are still recorded as not delivered).  Everything that was
        acknowledged is already durable, so a second SIGTERM exits at once."""
        self.stopping = True
        t0 = self.reactor.seconds()
        self.smtp_ctx.accepting = False
        self._arm_second_sigterm()
        if self._refresher.running:
            self._refresher.stop()
        if self.sts is not None:
            self.sts.stop()
        # 1. stop listening (existing connections stay)
        yield defer.DeferredList([defer.maybeDeferred(svc.stopService) for svc in self.listener_services
                                  if svc.running], consumeErrors=True)
        # 2. SMTP sessions: idle ones close now, busy ones after their transaction
        yield self._drain_smtp(SMTP_GRACE)
        # 3. deliveries in flight
        if self.queue is not None:
            left = max(1.0, STOP_BOUND - (self.reactor.seconds() - t0))
            yield self.queue.stop(grace=left)
        yield defer.DeferredList([defer.maybeDeferred(c.stopService) for c in reversed(list(self))
                                  if c.running], consumeErrors=True)
        service.Service.stopService(self)
        for f in self.pop3_factories:
            close = getattr(f, "close_sessions", None)
            if close is not None:
                close()
        self.aspool.stock.close()
        self.disk.stop()
        self.dns_pool.stop()
        self.auth_pool.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("twisted-relay stopped in {secs:.1f}s", secs=self.reactor.seconds() - t0)

    def _drain_smtp(self, grace: float) -> defer.Deferred:
        sessions = list(self.smtp_ctx.open_sessions)
        for p in sessions:
            p.begin_shutdown()
        if not self.smtp_ctx.open_sessions:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        deadline = self.reactor.seconds() + grace

        def check():
            if not self.smtp_ctx.open_sessions:
                d.callback(None)
                return
            if self.reactor.seconds() >= deadline:
                for p in list(self.smtp_ctx.open_sessions):
                    p.force_shutdown()
                # give the 421s a moment to go out; never wait on a dead peer
                self.reactor.callLater(0.2, lambda: d.called or d.callback(None))
                return
            self.reactor.callLater(0.05, check)

        check()
        return d

    def _arm_second_sigterm(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        # acknowledged mail is already fsynced; state files are replaced
        # atomically: stopping here loses nothing acknowledged
        exit_on_second_signal()

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

    # -- reload ---------------------------------------------------------------------
    def reload(self) -> dict:
        """Re-read the config file (SIGHUP, relayctl reload).

        All or nothing: a config that does not load, a certificate, users or
        aliases file that cannot be read refuses the whole reload and keeps
        the running config.  Listeners, the spool and the number of workers
        are not changed live (relay.runtime.reconfig.RESTART_KEYS): such
        changes are reported as needing a restart.
        """
        old = self.config
        try:
            new = self.load_config(old.path)
        except configmod.ConfigError as e:
            log.error("reload refused, keeping the running config: {problems}", problems="; ".join(e.problems))
            return {"ok": False, "messages": ["reload refused, the running config is kept:"] + e.problems,
                    "restart_needed": []}
        files, problems = parts.load_files(new)
        problems = reconfig.certificate_still_needed(old, new, self.tls) + problems
        if files is None or problems:
            for p in problems:
                log.error("reload refused, keeping the running config: {problem}", problem=p)
            return {"ok": False, "messages": ["reload refused, the running config is kept:"] + problems,
                    "restart_needed": []}
        restart = reconfig.restart_needed(old, new)
        new = reconfig.keep_running(old, new)
        self._apply(new, files)
        if new.dkim != old.dkim:
            self._check_dkim()  # the new keys' records, as at start
        msgs = reconfig.reload_messages(old, new, self.tls, restart)
        for m in msgs:
            log.info("{message}", message=m)
        return {"ok": True, "messages": msgs, "restart_needed": restart}

    def _apply(self, new: Config, files: parts.Files) -> None:
        """Every part that reads the config or the files takes the new ones."""
        old = self.config
        self.config = new
        self.users = files.users
        self.aliases = files.aliases
        self.tls = files.tls
        self.signer.reconfigure(files.dkim, headers=new.dkim.headers, canonicalization=new.dkim.canonicalization)
        self.checker = usersmod.make_checker(self.users, self.auth_pool.pool, self.reactor)
        self.expander.reconfigure(local_domains=new.local.domains, aliases=self.aliases, users=self.users)
        self.smtp_ctx.reconfigure(config=new, policy=self._make_policy(new), checker=self.checker, tls=self.tls)
        if self.pickup is not None:
            self.pickup.reconfigure(new)
        tls_options = self.tls.options if self.tls else None
        for f in self.pop3_factories:
            pop3.apply_config(f, new, userdb=self.users, tls_options=tls_options)
        if self.deliverer is not None:
            # the deliverer first: the queue's reconfigure may start attempts at once
            self.deliverer.reconfigure(new, self.users)
            if new.delivery.nameservers != old.delivery.nameservers:
                self.deliverer.set_resolver(self._resolver(new))
                if self.sts is not None:
                    self.sts.set_resolver(self.deliverer.resolver)
        self.sts_trust = files.sts_trust
        self.proxy.reconfigure(new.proxy)
        if self.sts is not None:
            parts.reconfigure_mta_sts(self.sts, new, files.sts_trust)
        if self.queue is not None:
            self.queue.reconfigure(new)

    # -- runtime -------------------------------------------------------------------
    def _queued(self, entry: spoolmod.QueueEntry) -> None:
        if self.queue is not None:
            self.queue.add(entry)

    def _refresh_files(self) -> None:
        parts.refresh_files(self.users, self.aliases)


def make_service(config: Config, reactor=None) -> RelayService:
    return RelayService(config, reactor=reactor)
