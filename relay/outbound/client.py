"""The outbound ESMTP client: one message, one destination, a list of hops.

Why not twisted.mail.smtp.ESMTPClient / ESMTPSender / sendmail: on Twisted
26.10 they miss dot-stuffing for a "." at the very start of the message and at
their 16 KiB chunk boundaries (an outbound smuggling hole), turn CRLF into
CR CR LF, have no default timeout, abort on a 454 to STARTTLS even when TLS is
optional, never pipeline RCPTs, and believe replies buffered before the TLS
handshake.  The client is written on ``twisted.internet.protocol.Protocol``
instead; each of those cases has a test in tests/test_smtp_client*.py.

Its modules, one job each: relay.outbound.request (what to deliver: the
``Outbound`` parameter object), relay.outbound.replies (replies and results),
relay.outbound.clientproto (reply parsing and waiting, pipelined groups),
relay.outbound.msgproducer (the message streamed, dot-stuffed), relay.outbound.tls
(the TLS context and certificate check), relay.outbound.conversation (a command
and its reply, the failures), relay.outbound.handshake (greeting, EHLO, STARTTLS,
AUTH), relay.outbound.transactions (MAIL, RCPT, DATA), relay.outbound.conncache (idle
sessions kept for reuse).  This module is the entry point, ``deliver()``: the
hops in order, and each session's life (a parked session or a connection
within the host's limit, the session time cap, then park, QUIT or close).
Use it with ``defer.ensureDeferred``.  It never raises for a delivery
problem: every recipient gets a ``RcptResult`` (delivered / deferred /
bounced) in the returned ``DeliveryReport``.

Failure classification (Postfix is the reference): connection refused or
timed out, a 4xx/5xx greeting, a failed EHLO and HELO, a 421 or a lost
connection before any recipient was accepted, missing or failed TLS when TLS
is required, failed AUTH: this hop failed, try the next one.  For the hosts of
an upstream or a smarthost list (``Outbound.stop_on_5xx``, issue 16) a 5xx
greeting, EHLO or HELO is the answer for this message: it bounces without
the next host being tried.  If every hop
fails, all recipients are deferred with the last reason.  Once a hop has
accepted a recipient, its answers are final for this attempt: 2xx delivered,
4xx deferred, 5xx bounced; a lost connection or timeout before the reply to
the final "." defers the recipients of that transaction.

SMTPUTF8 (relay.outbound.smtputf8): recipients of a message that needs it
are not sent to a hop that does not offer it; the next hops are tried for
them (Postfix does the same).  They bounce with 5.6.7 when every hop that
was tried either said no SMTPUTF8 or took the other recipients; when a
hop failed for another reason (unreachable, 4xx), they are deferred: the
next attempt may reach one that offers it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from relay.outbound.clientproto import ClientProtocol
from relay.outbound.conncache import CacheKey, ConnectionCache, Parked
from relay.outbound.conversation import Down, HopFailed, NeedsUtf8, quit_session, where
from relay.outbound.handshake import open_session
from relay.outbound.hostlimit import HostLimit
from relay.outbound.replies import ConversationError, DeliveryReport, RcptResult
from relay.outbound.request import Hop, Outbound
from relay.outbound.tls import client_context
from relay.outbound.transactions import Results, Transactions

log = Logger(namespace="relay.smtp.client")


async def deliver(
    reactor: Any,
    hops: Iterable[Hop],
    out: Outbound,
    *,
    threadpool: Any = None,
    cache: ConnectionCache | None = None,
    host_limit: HostLimit | None = None,
) -> DeliveryReport:
    """Deliver one queued message to one destination; never raises for a
    delivery problem (see the module docstring).

    ``hops``: from relay.delivery.mx, in order.  ``out``: the message, its
    envelope and how to send it (relay.outbound.request.Outbound).
    ``threadpool``: where the 8-bit scan of the file runs (None: the
    reactor's).  ``cache``: a ConnectionCache for reuse; ``host_limit``: a
    relay.outbound.hostlimit.HostLimit (connections per host).
    """
    return await _Delivery(reactor, hops, out, threadpool=threadpool, cache=cache, host_limit=host_limit).run()


def _bad_path(addr: str) -> bool:
    return any(c in addr for c in "\r\n\0<>") or any(ord(c) < 32 for c in addr)


def _auth_identity(out: Outbound) -> str | None:
    """Who a session is logged in as, for the connection cache: the route
    the credentials belong to, the user name and a digest of the password
    (a session logged in for upstream X never serves upstream Y, nor a
    route without AUTH, nor the same user after a password change)."""
    if out.auth is None:
        return None
    digest = hashlib.sha256(out.auth[1].encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{out.auth_scope}\0{out.auth[0]}\0{digest}"


def _temporary(status: str) -> str:
    return status if status.startswith("4") else "4" + status[1:] if status[:1] in "25" else "4.0.0"


class _Delivery:
    """One call of deliver(): the hops in order, a session on each."""

    def __init__(
        self,
        reactor: Any,
        hops: Iterable[Hop],
        out: Outbound,
        *,
        threadpool: Any,
        cache: ConnectionCache | None,
        host_limit: HostLimit | None,
    ):
        self.reactor = reactor
        self.hops = list(hops)
        self.out = out
        self.recipients = list(dict.fromkeys(out.recipients))
        self.t = out.timeouts
        self.cache = cache
        self.host_limit = host_limit
        self.txns = Transactions(reactor, out, threadpool)
        self.report = DeliveryReport(results={})
        self._pending_rcpts: list[str] = []
        if out.tls.mode != "none":
            client_context(out.tls.trust_root)  # a bad trust_root is the caller's error: raise now

    # ------------------------------------------------------------ top level
    async def run(self) -> DeliveryReport:
        pending = self._valid_recipients()
        if not pending:
            return self.report
        self._pending_rcpts = pending
        last: HopFailed | None = None
        other_failure = False  # a hop failed for a reason other than SMTPUTF8 (5.6.7)
        if not self.hops:
            last = HopFailed("4.4.4", "no next hop to deliver to", stage="connect")
        for hop in self.hops:
            failed = await self._try_hop(hop, pending)
            if failed is None:
                # recipients refused here for want of SMTPUTF8: the next hops may offer it
                pending = [r for r in pending if r not in self.report.results]
                if not pending:
                    return self.report
                self._pending_rcpts = pending
                continue
            last = failed
            other_failure = other_failure or not isinstance(failed, NeedsUtf8)
            if self._final(failed):
                self._bounce_all(pending, failed)
                return self.report
        refused = self.txns.utf8_refused
        if not other_failure:
            # every hop reached said no SMTPUTF8 (RFC 6531 3.2: 5.6.7 bounce)
            for r in [r for r in pending if r in refused]:
                self.report.results[r] = refused[r]
            pending = [r for r in pending if r not in refused]
        if not pending:
            return self.report
        if last is None:
            last = HopFailed("4.4.4", "no next hop to deliver to", stage="connect")
        failed_hop = self.report.attempts[-1][0] if self.report.attempts else None
        for r in pending:
            self.report.results[r] = RcptResult(
                "deferred",
                _temporary(last.status),
                last.reason,
                code=last.reply.code if last.reply else None,
                hop=failed_hop,
                stage=last.stage,
            )
        return self.report

    def _final(self, failed: HopFailed) -> bool:
        """A relay host's 5xx greeting, EHLO or HELO ends the attempt when
        the caller says so (an upstream: its next host is a fail-over for
        the same service, not another chance for a refused message); MX
        hosts and a single smarthost go on as before."""
        return (self.out.stop_on_5xx and failed.reply is not None and failed.reply.code // 100 == 5
                and failed.stage in ("greeting", "EHLO", "HELO"))

    def _bounce_all(self, pending: list[str], failed: HopFailed) -> None:
        hop = self.report.attempts[-1][0] if self.report.attempts else None
        for r in pending:
            self.report.results[r] = RcptResult(
                "bounced", failed.status if failed.status.startswith("5") else "5.0.0", failed.reason,
                code=failed.reply.code if failed.reply else None, hop=hop, stage=failed.stage)

    def _valid_recipients(self) -> list[str]:
        """The recipients to send to; bad addresses bounce at once."""
        results = self.report.results
        sender = self.out.sender
        if _bad_path(sender):
            for r in self.recipients:
                results[r] = RcptResult("bounced", "5.1.7", f"bad sender address syntax: {sender!r}", stage="MAIL FROM")
            return []
        pending = []
        for r in self.recipients:
            if _bad_path(r) or not r:
                results[r] = RcptResult("bounced", "5.1.3", f"bad recipient address syntax: {r!r}", stage="RCPT TO")
            else:
                pending.append(r)
        return pending

    async def _try_hop(self, hop: Hop, pending: list[str]) -> HopFailed | None:
        """A session on this hop (again in plaintext when TLS failed under
        "may"): None when it decided the recipients, else why it failed."""
        plaintext_only = self.out.tls.mode == "none"
        while True:
            try:
                try:
                    outcome = await self._session(hop, pending, plaintext_only)
                except (HopFailed, defer.CancelledError):
                    raise
                except Exception as e:  # noqa: BLE001 - a bug must not lose the recipients: defer them
                    log.failure("{queue_id}: {hop}: unexpected error", queue_id=self.out.log_id, hop=str(hop))
                    raise HopFailed("4.3.0", f"local error while delivering to {where(hop)}: {e!r}", stage="local")
            except HopFailed as f:
                self.report.attempts.append((hop, f.reason))
                log.info("{queue_id}: {hop}: {reason}", queue_id=self.out.log_id, hop=str(hop), reason=f.reason)
                if f.plaintext_retry and not plaintext_only:
                    plaintext_only = True
                    continue
                return f
            else:
                self.report.hop = hop
                self.report.results.update(outcome)
                return None

    # ------------------------------------------------------------- session
    async def _connect(self, hop: Hop) -> ClientProtocol:
        cls = TCP6ClientEndpoint if ":" in hop.address else TCP4ClientEndpoint
        ep = cls(self.reactor, hop.address, hop.port, timeout=self.out.connect_timeout)
        factory = Factory.forProtocol(lambda: ClientProtocol(self.reactor))
        factory.noisy = False
        where_to = f"connect to {where(hop)}:{hop.port}"
        try:
            proto: ClientProtocol = await ep.connect(factory)  # type: ignore[arg-type]  # zope: Factory is an IProtocolFactory
            return proto
        except error.ConnectionRefusedError:
            raise HopFailed("4.4.1", f"{where_to}: Connection refused", stage="connect")
        except error.TimeoutError:
            raise HopFailed("4.4.1", f"{where_to}: Connection timed out", stage="connect")
        except (error.ConnectError, OSError) as e:
            msg = getattr(e, "osError", None) or e
            raise HopFailed("4.4.1", f"{where_to}: {msg}", stage="connect")

    def _cache_key(self, hop: Hop, plaintext_only: bool) -> CacheKey:
        out = self.out
        # a session verified for some names or CAs is reused only under the same ones
        mode = out.tls.mode if not out.tls.match and out.tls.mode != "verify" else \
            f"{out.tls.mode}|{','.join(out.tls.match)}|{out.tls.trust_root!r}"
        trust = out.tls.trust_root if isinstance(out.tls.trust_root, str) else None
        # the hop's TLSA records (as hop_tls finds them): a session parked
        # without DANE is not reused once the host has records (nor the reverse)
        tlsa = tuple(out.tls.tlsa.get(hop.host.rstrip(".").lower(), ()))
        return (hop.address, hop.port, hop.host, mode, plaintext_only, out.tls.hostname,
                _auth_identity(out), out.helo, trust, tlsa)

    async def _session(self, hop: Hop, rcpts: list[str], plaintext_only: bool) -> Results:
        self.report.tls = None
        key = self._cache_key(hop, plaintext_only)
        if self.cache is not None:
            parked = self.cache.take(key)
            if parked is not None:
                try:
                    return await self._run_session(parked.proto, hop, key, parked=parked)
                except NeedsUtf8:
                    raise  # the host's EHLO said it: a new connection would say the same
                except HopFailed as f:
                    # the cached session went away before anything was decided:
                    # that says nothing about the host, try a fresh connection
                    log.debug("{queue_id}: cached session to {hop} failed ({reason}); reconnecting",
                              queue_id=self.out.log_id, hop=str(hop), reason=f.reason)
                    self.report.tls = None
        proto = await self._connect_within_limit(hop)
        return await self._run_session(proto, hop, key, plaintext_only=plaintext_only)

    async def _connect_within_limit(self, hop: Hop) -> ClientProtocol:
        """Connect, holding one of the host's connection slots (HostLimit)
        for as long as the socket lives."""
        limit = self.host_limit
        if limit is None:
            return await self._connect(hop)
        slot = (hop.address, hop.port)
        d = limit.acquire(slot)
        if not d.called and self.cache is not None:
            # idle sessions to that host hold slots: let them go first
            self.cache.evict(to=slot)
        await d
        try:
            proto = await self._connect(hop)
        except BaseException:
            limit.release(slot)
            raise

        def release(r: object) -> object:
            limit.release(slot)
            return r

        proto.closed.addBoth(release)
        return proto

    async def _converse(self, proto: ClientProtocol, hop: Hop, parked: Parked | None,
                        plaintext_only: bool) -> tuple[Results, dict[str, str] | None]:
        """The session's conversation: (results, the extensions when it may
        be parked)."""
        if parked is None:
            ext = await open_session(proto, hop, self.out, self.report, plaintext_only)
        else:
            self.report.tls = parked.tls
            ext = parked.ext
        try:
            results, parkable = await self.txns.deliver_on(
                proto, hop, self._pending_rcpts, ext, may_park=self.cache is not None)
        except Down as d:
            if parked is None:
                raise
            raise d.hop_failed()
        return results, ext if parkable else None

    async def _run_session(self, proto: ClientProtocol, hop: Hop, key: CacheKey, *, parked: Parked | None = None,
                           plaintext_only: bool = False) -> Results:
        cap = self.reactor.callLater(
            self.t.session, proto.fail, ConversationError("timeout", "session", f"session exceeded {self.t.session:g}s")
        )
        graceful = False
        park_ext: dict[str, str] | None = None
        try:
            result, park_ext = await self._converse(proto, hop, parked, plaintext_only)
            graceful = True
            return result
        finally:
            if cap.active():
                cap.cancel()
            await self._end_session(proto, hop, key, parked, park_ext if graceful else None, graceful)

    async def _end_session(self, proto: ClientProtocol, hop: Hop, key: CacheKey, parked: Parked | None,
                           park_ext: dict[str, str] | None, graceful: bool) -> None:
        """Park the session for the next message, or QUIT and close it."""
        # another attempt waiting for this host's slot: QUIT, do not park
        wanted = self.host_limit is not None and bool(self.host_limit.waiting.get((hop.address, hop.port)))
        if park_ext is not None and proto.lost is None and not wanted:
            assert self.cache is not None  # park_ext only when there is a cache
            since = parked.since if parked else self.reactor.seconds()
            uses = (parked.uses if parked else 0) + 1
            if self.cache.park(key, Parked(proto, hop, park_ext, self.report.tls, since, uses)):
                return
        if park_ext is not None and proto.lost is None:
            await quit_session(proto, hop, self.t.quit)
        await self._close(proto, graceful)

    async def _close(self, proto: ClientProtocol, graceful: bool) -> None:
        """Close and wait until the socket is gone (no connection outlives
        deliver()); abort if a graceful close takes too long."""
        if proto.lost is None:
            if graceful:
                proto.tcp.loseConnection()
            else:
                proto.fail(ConversationError("local", "close"))
        guard = self.reactor.callLater(10, proto.fail, ConversationError("timeout", "close"))
        give_up: defer.Deferred[None] = defer.Deferred()
        last = self.reactor.callLater(20, give_up.callback, None)
        await defer.DeferredList([proto.closed, give_up], fireOnOneCallback=True, consumeErrors=True)
        for call in (guard, last):
            if call.active():
                call.cancel()
