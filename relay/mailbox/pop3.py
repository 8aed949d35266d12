"""The POP3 server as the relay runs it: the factory, built from the config.

The one way the service makes and updates its POP3 listeners' factories:
``factory_from_config`` (at start), ``apply_config`` (at a reload: the
settings a reload may change reach connections already open, which read
them from their factory when they need them) and ``startup_warnings``
(the endpoints where passwords could cross the network in plaintext).
The connection itself is relay.mailbox.pop3protocol.POP3Server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay.common import endpoints
from relay.common.connlimit import LocalCounter
from relay.config import Config
from relay.mailbox.pop3protocol import POP3Server
from relay.mailbox.pop3session import ConnectionCounter
from relay.mailbox.users import UserDB


class POP3Factory(ServerFactory):
    """Builds POP3Server protocols for one listening endpoint.

    Every setting is a plain attribute read at the moment it is needed, so
    a config reload may reassign them (``apply_config``); sessions already
    logged in keep their mailbox.

    ``run_blocking(f, *args)`` returns a Deferred for f run in the thread
    pool (``threadpool``: the disk pool); ``run_auth`` the same for password
    checks, in ``auth_pool`` (the relay's AUTH pool), or through
    run_blocking when there is none; unit tests driving a task.Clock replace
    run_blocking with a synchronous one.
    ``open_sessions`` counts connections, ``logged_in`` the logged-in ones,
    ``limiter`` counts the connections per client address (a relay.common.connlimit
    counter the relay shares between factories and workers; ``connections``
    shows this process's counts).
    """

    # (not the Twisted protocol type: see buildProtocol)
    protocol: type[POP3Server] = POP3Server  # type: ignore[assignment]

    def __init__(
        self,
        *,
        hostname: str,
        mailbox_root: str,
        local_domains: Iterable[str],
        userdb: UserDB,
        tls_options: Any = None,
        auth_requires_tls: bool = True,
        reactor: Any = None,
        threadpool: Any = None,
        login_failure_delay: float = 2.0,
        idle_timeout: float = 600.0,
        max_login_failures: int = 3,
        max_bad_commands: int = 20,
        auth_pool: Any = None,
        max_connections_per_ip: int = 20,
        limiter: ConnectionCounter | None = None,
        close_grace: float = 30.0,
    ):
        if reactor is None:
            # the global reactor only when none is given: importing it installs the default one
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.hostname = hostname
        self.mailbox_root = mailbox_root
        self.local_domains = tuple(local_domains)
        self.userdb = userdb
        self.tls_options = tls_options
        self.auth_requires_tls = auth_requires_tls
        self.reactor = reactor
        self.threadpool = threadpool
        self.login_failure_delay = login_failure_delay
        self.idle_timeout = idle_timeout
        self.max_login_failures = max_login_failures
        self.max_bad_commands = max_bad_commands
        self.auth_pool = auth_pool
        self.close_grace = close_grace  # seconds a closed session waits for its last reply to drain
        self.max_connections_per_ip = max_connections_per_ip
        self.limiter: ConnectionCounter = LocalCounter() if limiter is None else limiter
        self.open_sessions = 0
        self.logged_in = 0

    @property
    def connections(self) -> dict[str, int]:
        """This process's counted sessions per client address."""
        return self.limiter.counts()

    def run_blocking(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        pool = self.threadpool or self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, f, *args, **kwargs)

    def run_auth(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if self.auth_pool is None:
            return self.run_blocking(f, *args, **kwargs)
        return deferToThreadPool(self.reactor, self.auth_pool, f, *args, **kwargs)

    # POP3Server.factory is a FactoryView, not the Factory[Self] Twisted's annotation asks for
    def buildProtocol(self, addr: Any) -> POP3Server:  # type: ignore[override]
        return self.protocol(self)


def wrap_implicit_tls(factory: POP3Factory, tls_options: Any) -> TLSMemoryBIOFactory:
    """The factory to listen with on a plain TCP port for an implicit TLS
    ("ssl:995") endpoint that uses the [tls] certificate.  (An ssl: endpoint
    with its own key can listen with `factory` directly.)  The protocol sees
    an ISSLTransport, so logins are allowed and STLS is not offered.
    """
    # ServerFactory provides IProtocolFactory through zope's @implementer, which mypy does not read
    return TLSMemoryBIOFactory(tls_options, False, factory)  # type: ignore[arg-type]


def factory_from_config(
    config: Config,
    *,
    userdb: UserDB,
    tls_options: Any,
    reactor: Any = None,
    threadpool: Any = None,
    auth_pool: Any = None,
    limiter: ConnectionCounter | None = None,
    **tuning: Any,
) -> POP3Factory:
    """A POP3Factory from a relay.config.Config.

    userdb: the users (relay.mailbox.users.UserDB); tls_options: the [tls]
    certificate's context factory, or None; reactor; threadpool: the disk
    pool (the Maildirs); auth_pool: the pool password checks run in, never
    the disk pool; limiter: the per-address counter all POP3 listeners
    share.  tuning: the POP3Factory settings no config key sets
    (login_failure_delay, idle_timeout, ...: tests).
    """
    return POP3Factory(
        hostname=config.hostname,
        mailbox_root=config.local.mailboxes,
        local_domains=config.local.domains,
        userdb=userdb,
        tls_options=tls_options,
        auth_requires_tls=config.tls.auth_requires_tls,
        max_connections_per_ip=config.pop3.max_connections_per_ip,
        reactor=reactor,
        threadpool=threadpool,
        auth_pool=auth_pool,
        limiter=limiter,
        **tuning,
    )


def apply_config(factory: POP3Factory, config: Config, *, userdb: UserDB, tls_options: Any) -> None:
    """Point an existing factory at a (re)loaded relay.config.Config: what
    factory_from_config took from the config, and the new users and TLS."""
    factory.hostname = config.hostname
    factory.mailbox_root = config.local.mailboxes
    factory.local_domains = tuple(config.local.domains)
    factory.userdb = userdb
    factory.tls_options = tls_options
    factory.auth_requires_tls = config.tls.auth_requires_tls
    factory.max_connections_per_ip = config.pop3.max_connections_per_ip


def _is_loopback_interface(spec: endpoints.EndpointSpec) -> bool:
    iface = spec.interface
    if not iface:
        return False  # all interfaces
    try:
        return ipaddress.ip_address(iface.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_login_warnings(
    listen: Iterable[str], *, tls_configured: bool, auth_requires_tls: bool = True
) -> list[str]:
    """Start-up warnings for POP3 endpoints where passwords can cross a
    non-loopback network in plaintext: no certificate configured (or
    tls.auth_requires_tls false), and an endpoint that is neither ssl: nor
    bound to a loopback address nor a UNIX socket.

    Without a certificate, a warning begins with the line the relay has
    always logged for such an endpoint ("no TLS certificate configured:
    passwords cross <endpoint> in plaintext").
    """
    return [text for _, text in _plaintext_endpoints(listen, tls_configured, auth_requires_tls)]


def startup_warnings(config: Config) -> list[tuple[str, str]]:
    """(endpoint, warning) for each plaintext_login_warnings of a
    relay.config.Config: what the service logs at start for its POP3
    listeners (the endpoint as a field of its own in the log event)."""
    return _plaintext_endpoints(config.pop3.listen, config.tls.enabled, config.tls.auth_requires_tls)


def _plaintext_endpoints(listen: Iterable[str], tls_configured: bool,
                         auth_requires_tls: bool) -> list[tuple[str, str]]:
    if tls_configured and auth_requires_tls:
        return []
    out = []
    for desc in listen:
        try:
            spec = endpoints.parse(desc)
        except ValueError:
            continue  # the config check reports it
        if spec.implicit_tls or spec.kind == "unix":
            continue
        if spec.kind in ("tcp", "tcp6") and _is_loopback_interface(spec):
            continue
        where = ("is not bound to a loopback address" if spec.kind in ("tcp", "tcp6")
                 else "may not be loopback-only")
        if not tls_configured:
            text = (f"no TLS certificate configured: passwords cross {desc} in plaintext "
                    f"(pop3.listen: {desc} {where}; tls.certificate and tls.key are not set)")
        else:
            text = (f"pop3.listen: {desc} {where} and tls.auth_requires_tls is false: POP3 passwords "
                    f"and mail can cross the network in plaintext")
        out.append((desc, text))
    return out


__all__ = [
    "POP3Factory",
    "POP3Server",
    "apply_config",
    "factory_from_config",
    "plaintext_login_warnings",
    "startup_warnings",
    "wrap_implicit_tls",
]
