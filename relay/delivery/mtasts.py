"""MTA-STS policies found, fetched, cached and refreshed (RFC 8461): ``MtaSts``.

Why this module: MTA-STS only protects mail when the policy is known before
the attacker is on the path, so what matters is the cache: a policy fetched
once is kept in the spool (``<spool>/mta-sts/<domain>.json``, written
durably in the disk pool) until its max_age runs out, survives a restart,
and is used when the TXT look-up or the HTTPS fetch fails (section 5.1,
10.2).  Policies used recently are refreshed in the background before they
expire, so a delivery rarely waits for a fetch.

The fetch (section 3.3): ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
on port 443, the host name resolved with the relay's own resolver, the
certificate verified for that name (the system CAs or
``delivery.mta_sts_ca_file``), no redirects, only 200 text/plain, the body
streamed and cut at 64 KiB, connect and total time limits.  It uses
twisted.web.client.Agent with an endpoint factory of our own: the address
comes from our resolver (never the system's), and TLS is verified for the
policy host whatever the address.  Concurrent requests for one domain share
one fetch.  Nothing here blocks the reactor: DNS runs in the DNS pool, files
in the disk pool.  Untrusted text (what a server or DNS answered) goes to
the log only in the fields relay.common.logsafe neutralises (``reason``,
``error``, ``name``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict
from typing import Any

from twisted.internet import defer, endpoints, error, protocol, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, http_headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay.common import fileio
from relay.delivery import stsparse
from relay.delivery.mx import DNSFailure
from relay.delivery.stspolicy import StsPolicy

log = Logger(namespace="relay.delivery.mtasts")

MAX_BODY = 64 * 1024  # RFC 8461 section 3.3: at most 64 KiB
PATH = "/.well-known/mta-sts.txt"
_DOMAIN = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))+")
REFRESH_EVERY = 3600.0  # seconds between background refresh rounds
RECENT = 7 * 86400.0  # a policy used within this long is refreshed before it expires
FAILED_FOR = 300.0  # seconds a failed fetch without a cached policy is remembered (the negative cache)


class FetchError(Exception):
    """A policy fetch that gave no policy: ``result`` is the metric label, the text says why."""

    def __init__(self, result: str, reason: str):
        super().__init__(reason)
        self.result = result
        self.reason = reason


class _Discard(protocol.Protocol):
    """The body of an answer that is refused: not read, the connection closed."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()


class _Body(protocol.Protocol):
    """Collects a response body up to ``limit`` bytes; more is a failure."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(FetchError("too_large", f"the policy is larger than {self.limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(client.ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(FetchError("connect_error", f"the policy body was cut off: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TCP to the address our resolver gave, TLS verified for the policy host."""

    def __init__(self, reactor: Any, address: str, host: str, trust: Any, timeout: float):
        self.reactor, self.address, self.host, self.trust, self.timeout = reactor, address, host, trust, timeout

    def endpointForURI(self, uri: Any) -> Any:
        tcp: Any = (endpoints.TCP6ClientEndpoint if ":" in self.address else endpoints.TCP4ClientEndpoint)(
            self.reactor, self.address, uri.port, timeout=self.timeout)
        creator = ssl.optionsForClientTLS(self.host, trustRoot=self.trust)
        return endpoints.wrapClientTLS(creator, tcp)


def load_trust(ca_file: str) -> Any:
    """The trust root for policy fetches: the CAs in ``ca_file`` (PEM), or the system's.
    Raises OSError or ValueError (the caller names the key and the file)."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        data = f.read()
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
    if not pems:
        raise ValueError("no PEM certificate in it")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])


class MtaSts:
    """The StsSource of relay.delivery.stspolicy: policies by domain.

    ``resolver``: relay.delivery.mx.Resolver (``txt`` and ``host_hops``, in
    the DNS pool); ``disk``: runs blocking file work (``run``); ``cache_dir``:
    the spool's mta-sts directory (None: no cache on disk).  Time is the
    reactor's (``seconds``): tests drive it with task.Clock.
    """

    def __init__(self, reactor: Any, resolver: Any, disk: Any, cache_dir: str | None, *, enabled: bool = True,
                 trust: Any = None, connect_timeout: float = 30.0, fetch_timeout: float = 60.0,
                 port: int = 443, max_body: int = MAX_BODY, refresh_every: float = REFRESH_EVERY,
                 clock: Any = None):
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor  # the time of expiry and refresh (task.Clock in tests)
        self.resolver = resolver
        self.disk = disk
        self.cache_dir = cache_dir
        self.port = port
        self.max_body = max_body
        self.refresh_every = refresh_every
        self.configure(enabled=enabled, trust=trust, connect_timeout=connect_timeout, fetch_timeout=fetch_timeout)
        self.cache: dict[str, StsPolicy] = {}
        self.used: dict[str, float] = {}  # domain -> reactor time of its last policy() call
        self._inflight: dict[str, defer.Deferred] = {}
        self.failures: Counter[tuple[str, str]] = Counter()  # (domain, mode) -> report() calls
        self.fetches: Counter[str] = Counter()  # result -> fetches
        self._refresher: Any = None

    def configure(self, *, enabled: bool, trust: Any, connect_timeout: float, fetch_timeout: float) -> None:
        """The settings a reload may change (the cache is kept)."""
        self.enabled = enabled
        self.trust = trust if trust is not None else ssl.platformTrust()
        self.connect_timeout = connect_timeout
        self.fetch_timeout = fetch_timeout
        # domain -> (TXT id, reactor time until when): a fetch that failed with
        # no cached policy; forgotten at a reload (the new trust may fix it)
        self.failed: dict[str, tuple[str, float]] = {}

    def set_resolver(self, resolver: Any) -> None:
        self.resolver = resolver

    # -------------------------------------------------------------- the cache

    def _path(self, domain: str) -> str | None:
        return None if self.cache_dir is None else os.path.join(self.cache_dir, domain + ".json")

    def load(self) -> defer.Deferred[int]:
        """Read the cached policies from the spool (in the disk pool): how many."""
        if self.cache_dir is None:
            return defer.succeed(0)

        def loaded(found: list[StsPolicy]) -> int:
            for p in found:
                self.cache.setdefault(p.domain, p)
                self.used.setdefault(p.domain, self.clock.seconds())
            return len(found)

        return self.disk.run(_read_all, self.cache_dir).addCallback(loaded)

    def _store(self, p: StsPolicy) -> None:
        self.cache[p.domain] = p
        path = self._path(p.domain)
        if path is None:
            return
        data = json.dumps(asdict(p), sort_keys=True).encode()
        d = self.disk.run(_write, path, data)
        d.addErrback(lambda f: log.warn("mta-sts: cannot write the cached policy {path}: {error}",
                                        path=path, error=f.getErrorMessage()))

    def _cached(self, domain: str) -> StsPolicy | None:
        p = self.cache.get(domain)
        if p is not None and p.expires > self.clock.seconds():
            return p
        return None

    # ------------------------------------------------------------- the source

    async def policy(self, domain: str) -> StsPolicy | None:
        """See StsSource.policy: never raises."""
        name = domain.strip().rstrip(".").lower()
        if not self.enabled or not _DOMAIN.fullmatch(name):
            return None
        self.used[name] = self.clock.seconds()
        try:
            return await self._policy(name)
        except Exception as e:  # never raise into delivery
            log.error("mta-sts: policy of {domain} failed: {error}", domain=name, error=str(e))
            return self._cached(name)

    async def _policy(self, domain: str, *, refresh: bool = False) -> StsPolicy | None:
        cached = self._cached(domain)
        try:
            texts = await self.resolver.txt("_mta-sts." + domain)
        except DNSFailure as e:
            self.fetches["dns_error"] += 1
            log.info("mta-sts: TXT look-up for {domain} failed ({reason}): {using}", domain=domain,
                     reason=e.reason, using=_using(cached))
            return cached
        record = stsparse.parse_record(texts)
        if isinstance(record, str):
            if cached is not None or texts:
                log.info("mta-sts: {domain}: {reason}: {using}", domain=domain, reason=record, using=_using(cached))
            return cached
        if cached is not None and cached.id == record.id and not refresh:
            return cached
        if cached is None and self._failed_recently(domain, record.id):
            return None
        return await self._shared_fetch(domain, record.id, cached)

    def _failed_recently(self, domain: str, ident: str) -> bool:
        """The negative cache: the fetch of this TXT id failed less than
        FAILED_FOR ago with no cached policy, so no policy applies (RFC 8461
        section 3.3) and this delivery does not wait up to the fetch timeout
        again.  A new TXT id, or the end of FAILED_FOR, fetches again."""
        failed = self.failed.get(domain)
        if failed is None:
            return False
        if failed[0] == ident and self.clock.seconds() < failed[1]:
            log.debug("mta-sts: {domain}: the policy fetch failed recently: no cached policy, none applies",
                      domain=domain)
            return True
        del self.failed[domain]
        return False

    def _remember_failure(self, domain: str, ident: str) -> None:
        now = self.clock.seconds()
        for d, (_, until) in list(self.failed.items()):  # expired ones go: the dict stays small
            if until <= now:
                del self.failed[d]
        self.failed[domain] = (ident, now + FAILED_FOR)

    async def _shared_fetch(self, domain: str, ident: str, cached: StsPolicy | None) -> StsPolicy | None:
        d = self._inflight.get(domain)
        if d is None:
            d = self._inflight[domain] = defer.Deferred.fromCoroutine(self._fetch_and_store(domain, ident, cached))
            d.addBoth(self._done, domain)
        waiter: defer.Deferred = defer.Deferred()  # each caller its own, d's result kept for the others
        _follow(d, waiter)
        return await waiter

    def _done(self, result: Any, domain: str) -> Any:
        self._inflight.pop(domain, None)
        return result

    async def _fetch_and_store(self, domain: str, ident: str, cached: StsPolicy | None) -> StsPolicy | None:
        try:
            parsed = await self.fetch(domain)
        except FetchError as e:
            self.fetches[e.result] += 1
            log.warn("mta-sts: policy fetch for {domain} failed: {reason}: {using}", domain=domain,
                     reason=e.reason, using=_using(cached))
            if cached is None:
                self._remember_failure(domain, ident)
            return cached
        self.fetches["ok"] += 1
        self.failed.pop(domain, None)
        p = StsPolicy(domain, parsed.mode, parsed.mx, parsed.max_age, ident,
                      self.clock.seconds() + parsed.max_age)
        log.info("mta-sts: policy of {domain} fetched: {mode}, id {id}, max_age {max_age}", domain=domain,
                 mode=p.mode, id=p.id, max_age=p.max_age)
        self._store(p)
        return p

    def report(self, policy: StsPolicy, host: str, failure: str) -> None:
        """See StsSource.report: a log line and a counter."""
        self.failures[(policy.domain, policy.mode)] += 1
        log.warn("mta-sts {mode} policy of {domain} (id {id}): MX {name}: {reason}", mode=policy.mode,
                 domain=policy.domain, id=policy.id, name=host, reason=failure)

    def failures_by_mode(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, mode), n in self.failures.items():
            out[mode] += n
        return dict(out)

    # ------------------------------------------------------------- the fetch

    async def fetch(self, domain: str) -> stsparse.Parsed:
        """The policy file of ``domain``, parsed; raises FetchError."""
        d = defer.Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self.fetch_timeout, self.reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise FetchError("timeout", f"no complete answer within {self.fetch_timeout:g}s") from None

    async def _fetch(self, domain: str) -> stsparse.Parsed:
        host = "mta-sts." + domain
        try:
            hops = await self.resolver.host_hops(host, self.port, permanent_nxdomain=True)
        except DNSFailure as e:
            raise FetchError("dns_error", e.reason)
        last: FetchError | None = None
        for hop in hops:
            try:
                return await self._fetch_from(host, hop.address)
            except FetchError as e:
                if e.result not in ("connect_error",):
                    raise
                last = e
        assert last is not None
        raise last

    async def _fetch_from(self, host: str, address: str) -> stsparse.Parsed:
        agent = client.Agent.usingEndpointFactory(
            self.reactor, _Endpoints(self.reactor, address, host, self.trust, self.connect_timeout),
            pool=client.HTTPConnectionPool(self.reactor, persistent=False))
        url = f"https://{host}:{self.port}{PATH}".encode() if self.port != 443 else f"https://{host}{PATH}".encode()
        headers = http_headers.Headers({b"User-Agent": [b"twisted-relay"], b"Accept": [b"text/plain"]})
        try:
            response = await agent.request(b"GET", url, headers)
        except defer.CancelledError:
            raise
        except Exception as e:
            if any(r.check(defer.CancelledError) for r in getattr(e, "reasons", ())):
                raise defer.CancelledError() from None  # the time limit: fetch() says so
            raise _classify(e, host, address) from None
        if response.code != 200:
            response.deliverBody(_Discard())  # discard; closes the connection
            kind = "redirect" if 300 <= response.code < 400 else "http_error"
            raise FetchError(kind, f"https://{host}{PATH} answered HTTP {response.code} (only 200 is accepted)")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise FetchError("bad_media_type", f"the policy's media type is {ctype.decode('latin-1')!r}, "
                             "not text/plain")
        if response.length is not client.UNKNOWN_LENGTH and response.length > self.max_body:
            response.deliverBody(_Discard())
            raise FetchError("too_large", f"the policy is larger than {self.max_body} bytes")
        body = _Body(self.max_body)
        response.deliverBody(body)
        data = await body.done
        try:
            return stsparse.parse_policy(data)
        except stsparse.PolicyError as e:
            raise FetchError("malformed", str(e)) from None

    # ------------------------------------------------------------- refreshing

    def begin(self) -> defer.Deferred:
        """At start: the cache loaded from the spool, then the refresh started."""
        d = self.load()
        d.addCallback(lambda n: log.info("mta-sts: {count} cached policies loaded", count=n) if n else None)
        d.addErrback(lambda f: log.warn("mta-sts: cache not loaded: {error}", error=f.getErrorMessage()))
        d.addBoth(lambda _: self.start())
        return d

    def start(self) -> None:
        """Refresh recently used policies in the background (every refresh_every)."""
        from twisted.internet import task

        if self._refresher is None:
            self._refresher = task.LoopingCall(self.refresh)
            self._refresher.clock = self.clock
            self._refresher.start(self.refresh_every, now=False)

    def stop(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None

    def refresh(self) -> defer.Deferred:
        """One round (section 5.1): each policy used within RECENT that expires
        within the next two rounds or has lived half its max_age is looked up
        again and fetched anew (a new id or not), so a delivery finds it fresh."""
        now = self.clock.seconds()
        due = []
        for domain, p in list(self.cache.items()):
            if now - self.used.get(domain, 0.0) > RECENT:
                continue
            left = p.expires - now
            if left < 2 * self.refresh_every or left < p.max_age / 2:
                due.append(domain)
        ds = [defer.Deferred.fromCoroutine(self._refresh_one(d)) for d in due]
        return defer.DeferredList(ds, consumeErrors=True) if ds else defer.succeed([])

    async def _refresh_one(self, domain: str) -> None:
        try:
            await self._policy(domain, refresh=True)
        except Exception as e:
            log.error("mta-sts: refresh of {domain} failed: {error}", domain=domain, error=str(e))


def _follow(source: defer.Deferred, target: defer.Deferred) -> None:
    """target fires with source's result; source's result stays for others."""

    def both(result: Any) -> Any:
        if isinstance(result, Failure):
            target.errback(result)
        else:
            target.callback(result)
        return result

    source.addBoth(both)


def _using(cached: StsPolicy | None) -> str:
    return f"using the cached policy id {cached.id} ({cached.mode})" if cached else "no cached policy, none applies"


def _classify(e: Exception, host: str, address: str) -> FetchError:
    from OpenSSL import SSL
    from service_identity import VerificationError

    text = str(e)
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = reasons[0].value
        if isinstance(inner, (SSL.Error, VerificationError)):
            return FetchError("tls_error", f"the certificate of {host} ({address}) did not verify: "
                              f"{inner}")
        text = f"{type(inner).__name__}: {inner}"
    if isinstance(e, (error.ConnectError, error.TimeoutError)):
        return FetchError("connect_error", f"cannot connect to {host} ({address}): {e}")
    return FetchError("connect_error", f"fetch from {host} ({address}) failed: {text}")


def _write(path: str, data: bytes) -> None:
    """Blocking: the cache file, durably (fileio.write_atomic: nothing followed)."""
    d = os.path.dirname(path)
    fileio.makedirs_durable(d)
    if os.path.islink(d):  # the spool's own directory, never somewhere a link points
        raise OSError(f"{d} is a symbolic link")
    fileio.write_atomic(path, data, mode=0o600)


def _read_all(cache_dir: str) -> list[StsPolicy]:
    """Blocking: every valid cache file in cache_dir (others skipped)."""
    out: list[StsPolicy] = []
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json") or n.startswith("."):
            continue
        try:
            fd = os.open(os.path.join(cache_dir, n), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_BODY)
            p = _from_json(data)
        except (OSError, ValueError):
            continue
        if p is not None and p.domain + ".json" == n:
            out.append(p)
    return out


def _from_json(data: bytes) -> StsPolicy | None:
    j = json.loads(data)
    if not isinstance(j, dict):
        return None
    p = StsPolicy(str(j["domain"]), str(j["mode"]), tuple(str(m) for m in j["mx"]), int(j["max_age"]),
                  str(j["id"]), float(j["expires"]))
    if p.mode not in ("enforce", "testing", "none") or not _DOMAIN.fullmatch(p.domain):
        return None
    return p
