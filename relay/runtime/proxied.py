"""Listeners behind a load balancer: the PROXY protocol header read before the session.

``[proxy] listeners`` names SMTP, submission and POP3 listeners that a load
balancer (haproxy's ``send-proxy`` / ``send-proxy-v2``) connects to.  On
such a listener:

* a connection from an address outside ``proxy.trusted`` is closed at once
  (nobody else may claim a client address);
* the balancer's header (relay.common.proxyproto) must arrive complete within
  ``proxy.header_timeout`` and be valid, else the connection is closed: a
  client that sends nothing does not hold a slot;
* only then is the session built (``factory.buildProtocol`` with the client's
  address) and connected to a transport whose ``getPeer()`` is the client:
  the per-IP connection limit, relay.networks, [limits], the logs and the
  Received header all see the client, never the balancer.

The header comes before TLS, so this wrapper is the outermost layer: for an
``ssl:`` listener the session factory it wraps is already the TLS one
(relay.runtime.listen.tls_factory), and STARTTLS/STLS is the TCP
transport's own ``startTLS`` (the wrapper passes it on and forwards the
handshake notice).  A header on a listener not named in ``proxy.listeners``
is not read here: the session sees it as a bad command.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import address, interfaces
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from relay.common import proxyproto
from relay.config import ProxyConfig

log = Logger(namespace="relay.proxy")

REASONS = ("untrusted", "timeout", "garbage", "oversize", "bad_v1", "bad_v2", "closed")


class ProxyGate:
    """The relay's PROXY settings and counters, shared by its proxied listeners
    (a reload changes ``trusted`` and the timeout; which listeners are proxied
    needs a restart)."""

    def __init__(self, reactor: Any, cfg: ProxyConfig):
        self.reactor = reactor
        self.listeners = frozenset(cfg.listeners)
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.accepted: dict[str, int] = {"v1": 0, "v2": 0}
        self.reconfigure(cfg)

    def reconfigure(self, cfg: ProxyConfig) -> None:
        self.trusted = tuple(cfg.trusted)
        self.timeout = cfg.header_timeout

    def expects(self, description: str) -> bool:
        return description in self.listeners

    def is_trusted(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's view of IPv4
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)

    def wrap(self, description: str, factory: Any) -> Any:
        """``factory`` itself, or behind the PROXY header for a proxied listener."""
        return ProxyFactory(self, factory) if self.expects(description) else factory

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class ProxyFactory(ServerFactory):
    """Admits connections from the balancers only, each a ProxyReader."""

    noisy = False

    def __init__(self, gate: ProxyGate, wrapped: Any):
        self.gate = gate
        self.wrapped = wrapped
        wrapped.noisy = False  # as the relay's other listeners' factories

    def logPrefix(self) -> str:
        inner = getattr(self.wrapped, "logPrefix", None)
        return f"{inner() if inner else type(self.wrapped).__name__} (PROXY)"

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Protocol | None:
        host = getattr(addr, "host", "?")
        if not self.gate.is_trusted(host):
            self.gate.refuse("untrusted")
            log.info("proxy: refused [{balancer}]: not a configured load balancer (proxy.trusted)",
                     balancer=host, reason="untrusted")
            return None  # the listening port closes the socket at once
        return ProxyReader(self, addr)


@implementer(interfaces.IHandshakeListener)
class ProxyReader(Protocol):
    """One balancer connection: reads the header, then is the session's
    transport (getPeer/getHost from the header; the rest is the socket's)."""

    def __init__(self, factory: ProxyFactory, addr: Any):
        self.pfactory = factory
        self.balancer = addr
        self.buf = b""
        self.inner: Any = None
        self.peer: Any = addr
        self.host: Any = None
        self._timer: Any = None
        self._done = False  # the header is read, or the connection refused

    # -- before the header -----------------------------------------------------
    def connectionMade(self) -> None:
        gate = self.pfactory.gate
        self.host = self._sock.getHost()
        self._timer = gate.reactor.callLater(gate.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self._done:
            return
        self.buf += data
        try:
            header = proxyproto.parse(self.buf)
        except proxyproto.ProxyError as e:
            self._refuse(e.reason, e.detail)
            return
        if header is not None:
            self._begin(header)

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse("timeout", f"no complete header in {self.pfactory.gate.timeout:g}s")

    def _refuse(self, reason: str, detail: str) -> None:
        self._done = True
        self._cancel()
        self.pfactory.gate.refuse(reason)
        log.info("proxy: refused connection via [{balancer}]: {error}", balancer=self.balancer.host,
                 error=f"bad PROXY header ({reason}: {detail})" if reason != "timeout" else detail, reason=reason)
        self._sock.abortConnection()

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _begin(self, header: proxyproto.ProxyHeader) -> None:
        """The header is complete: build the session for the client it names."""
        self._done = True
        self._cancel()
        gate = self.pfactory.gate
        rest, self.buf = self.buf[header.length:], b""
        gate.accepted[f"v{header.version}"] += 1
        if header.client_ip is not None:
            self.peer = _address(header.source)
            if isinstance(header.destination, tuple):
                self.host = _address(header.destination)
            log.info("proxy: connect from [{client_ip}]:{port} via [{balancer}] (PROXY v{version} {family})",
                     client_ip=header.client_ip, port=self.peer.port, balancer=self.balancer.host,
                     version=header.version, family=header.family)
        else:  # LOCAL, UNKNOWN, UNSPEC, UNIX: the connection's own addresses (the spec's rule)
            log.info("proxy: connect from [{balancer}] (PROXY v{version} {command} {family} {client}: "
                     "the balancer's own address is used)", balancer=self.balancer.host, version=header.version,
                     command=header.command, family=header.family,
                     client=header.source if isinstance(header.source, str) else "-")
        inner = self.pfactory.wrapped.buildProtocol(self.peer)
        if inner is None:
            self._sock.loseConnection()
            return
        self.inner = inner
        inner.makeConnection(self)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel()
        if self.inner is not None:
            inner, self.inner = self.inner, None
            inner.connectionLost(reason)
        elif not self._done:
            self._done = True
            self.pfactory.gate.refuse("closed")

    def handshakeCompleted(self) -> None:
        """STARTTLS/STLS on the socket: the session is told, as without us."""
        if self.inner is not None and interfaces.IHandshakeListener.providedBy(self.inner):
            self.inner.handshakeCompleted()

    # -- the session's transport -------------------------------------------------
    @property
    def _sock(self) -> Any:
        """The balancer's TCP connection (typed Any: mypy reads zope interfaces' methods without self)."""
        return self.__dict__["transport"]

    @property
    def connected(self) -> int:  # the socket's (Protocol's own flag never goes back to 0)
        t = self.__dict__.get("transport")
        return int(getattr(t, "connected", 0)) if t is not None else 0

    @connected.setter
    def connected(self, value: int) -> None:
        pass  # Protocol.makeConnection sets it: the socket's flag is the truth

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.host

    def write(self, data: bytes) -> None:
        self._sock.write(data)

    def writeSequence(self, data: Any) -> None:
        self._sock.writeSequence(data)

    def loseConnection(self) -> None:
        self._sock.loseConnection()

    def abortConnection(self) -> None:
        self._sock.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._sock.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._sock.unregisterProducer()

    def pauseProducing(self) -> None:
        self._sock.pauseProducing()

    def resumeProducing(self) -> None:
        self._sock.resumeProducing()

    def stopProducing(self) -> None:
        self._sock.stopProducing()

    def startTLS(self, contextFactory: Any) -> None:
        self._sock.startTLS(contextFactory)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._sock.setTcpNoDelay(enabled)

    def __getattr__(self, name: str) -> Any:
        # connected, disconnecting, getHandle, getPeerCertificate...: the socket's
        if name.startswith("__") or name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)


def _address(hostport: Any) -> address.IPv4Address | address.IPv6Address:
    ip, port = hostport
    if ":" in ip:
        return address.IPv6Address("TCP", ip, port)
    return address.IPv4Address("TCP", ip, port)
