"""Listening services from endpoint descriptions, for the running relay.

An endpoint is either bound here (``server_endpoint``: Twisted's endpoint
string, with a larger listen backlog, and an ``ssl:`` endpoint without its
own key listening as plain TCP wrapped in the relay's certificate) or
inherited from the master of ``workers = N`` (``AdoptedListener``: a socket
every worker accepts on).  ``CurrentTLS`` reads the relay's certificate at
each handshake, so a reload that renews it reaches implicit TLS listeners.
"""

from __future__ import annotations

import os
import socket as socketmod
from typing import Any, Callable

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from relay.common import endpoints as epmod
from relay.common.tls import ServerTLS

LISTEN_BACKLOG = 1024  # for tcp/ssl listeners that do not say (Twisted's default is 50)


def server_endpoint(reactor: Any, description: str, *, plain: bool = False) -> tuple[Any, bool]:
    """(endpoint, wrap) for a listener description: wrap is True for an
    ssl: endpoint without its own privateKey=, which listens as plain TCP and
    must be wrapped in TLS with the relay's certificate by the caller
    (``tls_factory``).  ``plain``: every ssl: endpoint listens as plain TCP
    (wrap True), its own key too: a PROXY header comes before TLS
    (relay.runtime.proxied).  (The endpoint is an IStreamServerEndpoint:
    typed Any, as mypy reads a zope interface's methods without self.)"""
    spec = epmod.parse(description)
    if spec.kind in ("tcp", "tcp6", "ssl") and "backlog" not in spec.kwargs:
        # Twisted's default listen backlog is 50: a burst of clients would
        # overflow it and, SMTP being server-speaks-first, wait forever
        spec = epmod.EndpointSpec("", spec.kind, spec.args, {**spec.kwargs, "backlog": str(LISTEN_BACKLOG)})
        spec = epmod.EndpointSpec(epmod.unparse(spec), spec.kind, spec.args, spec.kwargs)
    if spec.implicit_tls and (plain or not spec.own_certificate):
        tcp = epmod.EndpointSpec("", "tcp", spec.args, {k: v for k, v in spec.kwargs.items()
                                                        if k in ("interface", "backlog")})
        return endpoints.serverFromString(reactor, epmod.unparse(tcp)), True
    return endpoints.serverFromString(reactor, spec.description), False


@implementer(IOpenSSLServerConnectionCreator)
class CurrentTLS:
    """The relay's current certificate (``tls()`` at each handshake), so that
    a reload (a renewed certificate) reaches implicit TLS endpoints too."""

    def __init__(self, tls: Callable[[], ServerTLS | None]):
        self.tls = tls

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        current = self.tls()
        assert current is not None  # a reload refuses to drop a certificate such a listener needs
        return SSL.Connection(current.options.getContext(), None)


def with_current_tls(factory: Any, tls: Callable[[], ServerTLS | None]) -> TLSMemoryBIOFactory:
    """``factory`` behind TLS with the relay's current certificate."""
    # CurrentTLS provides IOpenSSLServerConnectionCreator through zope's
    # @implementer, which mypy does not read as a base class
    return TLSMemoryBIOFactory(CurrentTLS(tls), False, factory)  # type: ignore[arg-type]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tls_factory(factory: Any, description: str, tls: Callable[[], ServerTLS | None]) -> Any:
    """``factory`` behind the TLS an ssl: endpoint listening as plain TCP
    needs: its own privateKey=/certKey=, else the relay's current certificate."""
    spec = epmod.parse(description)
    if spec.own_certificate:
        key = spec.kwargs["privateKey"]
        cert = spec.kwargs.get("certKey", key)
        opts = tssl.PrivateCertificate.loadPEM(_read(cert) + b"\n" + _read(key)).options()
        return TLSMemoryBIOFactory(opts, False, factory)
    return with_current_tls(factory, tls)


def adopted_listener(reactor: Any, fd: int, description: str, factory: Any,
                     tls: Callable[[], ServerTLS | None],
                     outer: Callable[[Any], Any] | None = None) -> AdoptedListener:
    """A listening socket bound by the master process (relay.runtime.master);
    ``outer`` wraps the factory around its TLS (the PROXY header reader)."""
    spec = epmod.parse(description)
    if spec.implicit_tls:
        factory = tls_factory(factory, description, tls)
    if outer is not None:
        factory = outer(factory)
    factory.noisy = False
    probe = socketmod.socket(fileno=os.dup(fd))
    family = probe.family
    probe.setblocking(False)  # shared by several processes: accept() must never block
    probe.close()
    return AdoptedListener(reactor, fd, family, factory)


class AdoptedListener(service.Service):
    """Accept connections on a socket some other process bound (the master):
    every worker waits on the same listening socket and the kernel hands
    each new connection to one of them."""

    def __init__(self, reactor: Any, fd: int, family: socketmod.AddressFamily, factory: Any):
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: Any = None
        self._waitingForPort: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        self._waitingForPort = defer.succeed(self.port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
