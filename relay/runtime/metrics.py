"""Prometheus metrics: ``[metrics] listen = ["tcp:9025:interface=127.0.0.1"]``.

The numbers are the relay's own: a custom collector reads, at scrape
time, the counters the SMTP server, the queue runner, the deliverer, the
pickup and the POP3 factories keep anyway (no second bookkeeping that could
drift).  Only the delivery latency histogram is kept here, fed by the queue
runner's ``on_attempt`` hook, because nothing else records durations.

Each service has its own CollectorRegistry (never prometheus_client's
global one), so several relays in one process (tests) do not clash.

The page is rendered on the reactor thread on purpose: the collector reads
dicts and sets the reactor mutates (queue, sessions); prometheus_client's
own Twisted resource would collect in a thread pool and race with them.
A scrape walks the queue once (O(messages), ~1 ms per 10 000).
"""

from __future__ import annotations

import gzip
from typing import Iterable
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.web import http, pages, resource, server

import relay
from relay.control.amp import Metrics, QuietAMP
from relay.delivery.tlspolicy import REASONS as TLS_POLICY_REASONS

log = Logger(namespace="relay.metrics")

# delivery attempts last from milliseconds (local) to minutes (slow MX, timeouts)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)


FETCH_RESULTS = ("ok", "dns_error", "connect_error", "tls_error", "timeout", "redirect", "http_error",
                 "bad_media_type", "too_large", "malformed")  # relay.delivery.mtasts.FetchError.result


class RelayCollector:
    """Reads the running relay's counters at scrape time.

    It is given the parts that keep them: the SMTP server context (counters,
    open sessions), the queue runner (None: none), the pickup (None: another
    worker takes the drop directory), the POP3 factories, and the reactor for
    the time.
    """

    def __init__(self, reactor, *, smtp, queue, pickup, pop3_factories: list, started_at: float, sts=None,
                 proxy=None):
        self.reactor = reactor
        self.proxy = proxy  # relay.runtime.proxied.ProxyGate (None: no PROXY listeners)
        self.sts = sts  # relay.delivery.mtasts.MtaSts (None: no delivery here)
        self.smtp = smtp
        self.queue = queue
        self.pickup = pickup
        self.pop3_factories = pop3_factories
        self.started_at = started_at

    def describe(self) -> Iterable[Metric]:
        # the names, for the registry (duplicate checks, ?name[]= filters)
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily("relay_build", "twisted-relay version",
                               value={"version": getattr(relay, "__version__", "unknown")})
        g = GaugeMetricFamily("relay_start_time_seconds", "When the relay started (Unix time)")
        g.add_metric([], self.started_at)
        yield g
        yield from self._messages()
        yield from self._queue_state()
        yield from self._sessions()
        yield from self._mta_sts()
        yield from self._proxy()
        yield from self._limits_redis()

    def _proxy(self) -> Iterable[Metric]:
        """PROXY protocol listeners: headers accepted by version, connections refused by reason."""
        gate = self.proxy
        c = CounterMetricFamily("relay_proxy_headers", "PROXY protocol headers accepted on [proxy] listeners, "
                                "by version", labels=["version"])
        for version, n in sorted((gate.accepted if gate is not None else {"v1": 0, "v2": 0}).items()):
            c.add_metric([version], n)
        yield c
        c = CounterMetricFamily("relay_proxy_refused", "Connections refused by a [proxy] listener, by reason "
                                "(untrusted: not from proxy.trusted; timeout, garbage, oversize, bad_v1, bad_v2, "
                                "closed: no valid header)", labels=["reason"])
        for reason, n in sorted((gate.refused if gate is not None else {}).items()):
            c.add_metric([reason], n)
        yield c

    def _limits_redis(self) -> Iterable[Metric]:
        """limits.redis (relay.common.redislimits): whether the fleet's limits answer."""
        link = getattr(self.smtp.rates, "link", None)
        if link is None:
            return
        g = GaugeMetricFamily("relay_limits_redis_up", "1 while limits.redis answers (limits shared by the "
                              "fleet), 0 while the relay counts with its local limits")
        g.add_metric([], 1 if link.up else 0)
        yield g
        c = CounterMetricFamily("relay_limits_redis_errors", "Limit checks answered with the local limits "
                                "because limits.redis erred, was slow or not connected")
        c.add_metric([], link.errors)
        yield c

    def _mta_sts(self) -> Iterable[Metric]:
        """MTA-STS: policy fetches by outcome, and the failures a policy reported, by mode."""
        sts = self.sts
        c = CounterMetricFamily("relay_mta_sts_fetches", "MTA-STS policy look-ups that fetched (ok) or "
                                "failed, by result", labels=["result"])
        fetches = dict(sts.fetches) if sts is not None else {}
        for result in sorted(set(FETCH_RESULTS) | set(fetches)):
            c.add_metric([result], fetches.get(result, 0))
        yield c
        c = CounterMetricFamily("relay_mta_sts_failures", "MX hosts or TLS sessions an MTA-STS policy "
                                "rejected (testing: only reported), by mode", labels=["mode"])
        modes = sts.failures_by_mode() if sts is not None else {}
        for mode in ("enforce", "testing", "none"):
            c.add_metric([mode], modes.get(mode, 0))
        yield c

    def _messages(self) -> Iterable[Metric]:
        """Messages in, refused, and what became of each recipient."""
        smtp = self.smtp.counters
        qc = self.queue.counters if self.queue is not None else None
        pickup = self.pickup

        c = CounterMetricFamily("relay_messages_received", "Messages accepted into the queue",
                                labels=["source"])
        c.add_metric(["smtp"], smtp.received)
        c.add_metric(["sendmail"], pickup.received if pickup is not None else 0)
        c.add_metric(["dsn"], qc.dsn_sent if qc else 0)
        yield c

        c = CounterMetricFamily("relay_messages_rejected",
                                "SMTP transactions, commands and connections refused, by reason",
                                labels=["reason"])
        for reason, n in sorted(smtp.rejected.items()):
            c.add_metric([reason], n)
        yield c

        c = CounterMetricFamily("relay_rate_limited", "MAIL and RCPT commands refused by a [limits] rate limit",
                                labels=["limit"])
        for limit, n in sorted(smtp.rate_limited.items()):
            c.add_metric([limit], n)
        yield c

        for name, attr, text in (
            ("relay_messages_delivered", "delivered", "Recipients delivered (one per recipient, "
                                                       "as Postfix's status=sent lines)"),
            ("relay_messages_deferred", "deferred", "Delivery attempts deferred, per recipient "
                                                     "(status=deferred lines)"),
            ("relay_messages_bounced", "bounced", "Recipients bounced (failed for good or expired), "
                                                   "per recipient"),
            ("relay_messages_expired", "expired", "Recipients bounced because they stayed too long in "
                                                   "the queue (delivery.max_lifetime)"),
            ("relay_messages_removed", "removed", "Messages removed from the queue (all recipients final, "
                                                   "or deleted)"),
            ("relay_delivery_notifications", "dsn_sent", "Delivery status notifications (bounces and "
                                                          "delay warnings) generated"),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], getattr(qc, attr) if qc else 0)
            yield c

        c = CounterMetricFamily("relay_pickup_quarantined",
                                "Files from relay-sendmail's drop directory moved to quarantine")
        c.add_metric([], pickup.quarantined if pickup is not None else 0)
        yield c

    def _queue_state(self) -> Iterable[Metric]:
        queue = self.queue
        counts = queue.counts() if queue is not None else {"active": 0, "deferred": 0, "hold": 0}
        g = GaugeMetricFamily("relay_queue_messages", "Messages in the queue by state", labels=["state"])
        for state in ("active", "deferred", "hold"):
            g.add_metric([state], counts.get(state, 0))
        yield g
        g = GaugeMetricFamily("relay_queue_oldest_message_age_seconds",
                              "Age of the oldest message in the queue (0 when empty)")
        g.add_metric([], self._oldest_age(queue))
        yield g

    def _sessions(self) -> Iterable[Metric]:
        """Sessions in (SMTP, POP3) and out (delivery attempts)."""
        smtp = self.smtp.counters
        queue = self.queue
        qc = queue.counters if queue is not None else None
        g = GaugeMetricFamily("relay_sessions_open", "Client sessions open now", labels=["protocol"])
        g.add_metric(["smtp"], len(self.smtp.open_sessions))
        g.add_metric(["pop3"], sum(getattr(f, "open_sessions", 0) for f in self.pop3_factories))
        yield g
        c = CounterMetricFamily("relay_sessions", "Inbound SMTP sessions accepted (after the connection limit)",
                                labels=["protocol"])
        c.add_metric(["smtp"], smtp.sessions)
        yield c

        deliverer = getattr(queue, "deliverer", None) if queue is not None else None
        c = CounterMetricFamily("relay_tls_sessions",
                                "SMTP sessions over TLS: in = inbound sessions that completed a TLS handshake "
                                "(STARTTLS or implicit TLS), out = remote delivery attempts that used TLS",
                                labels=["direction"])
        c.add_metric(["in"], smtp.tls)
        c.add_metric(["out"], getattr(deliverer, "tls_sessions", 0))
        yield c
        c = CounterMetricFamily("relay_tls_policy_failures",
                                "Next hops that failed a required TLS policy (delivery.tls_policy, MTA-STS enforce, "
                                "delivery.tls or relay.smarthost_tls encrypt/verify), by reason",
                                labels=["reason"])
        failures = getattr(deliverer, "tls_policy_failures", {})
        for reason in sorted(set(TLS_POLICY_REASONS) | set(failures)):
            c.add_metric([reason], failures.get(reason, 0))
        yield c
        c = CounterMetricFamily("relay_smtp_client_sessions",
                                "Remote delivery attempts that reached an SMTP server (TLS or not)")
        c.add_metric([], getattr(deliverer, "sessions", 0))
        yield c
        c = CounterMetricFamily("relay_delivery_attempts", "Delivery attempts started (one per destination "
                                "per activation of a message)")
        c.add_metric([], qc.attempts if qc else 0)
        yield c

    def _oldest_age(self, queue) -> float:
        if queue is None or not queue.messages:
            return 0.0
        oldest = min(m.env.arrival for m in queue.messages.values())
        return max(0.0, self.reactor.seconds() - oldest)


class RelayMetrics:
    """The registry of one relay: its collector and the latency histogram
    (the arguments are RelayCollector's)."""

    def __init__(self, reactor, *, smtp, queue, pickup, pop3_factories: list, started_at: float, sts=None,
                 proxy=None):
        self.registry = CollectorRegistry()
        self.collector = RelayCollector(reactor, smtp=smtp, queue=queue, pickup=pickup,
                                        pop3_factories=pop3_factories, started_at=started_at, sts=sts,
                                        proxy=proxy)
        self.registry.register(self.collector)
        self.latency = Histogram(
            "relay_delivery_attempt_duration_seconds",
            "Duration of one delivery attempt (one destination, its recipients)",
            labelnames=["destination"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        # present from the start, at zero; kept, as .labels() is not cheap per attempt
        self._local = self.latency.labels(destination="local")
        self._remote = self.latency.labels(destination="remote")

    def observe_attempt(self, local: bool, seconds: float) -> None:
        (self._local if local else self._remote).observe(max(0.0, seconds))

    def site(self) -> server.Site:
        root = _Root(self.registry)
        site = MetricsSite(root)
        site.noisy = False
        return site

    def render(self, accept: str | None = None) -> bytes:
        encoder, _ = choose_encoder(accept or "")
        return encoder(self.registry)


class _MetricsPage(resource.Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry | None, source: "WorkersMetrics | None" = None):
        super().__init__()
        self.registry = registry
        self.source = source  # a master: the registry is made at each scrape

    def render_GET(self, request) -> bytes | int:  # the page, or NOT_DONE_YET (a master's, later)
        if self.source is None:
            return self._page(request, self.registry)
        d = self.source.registry()

        def send(registry):
            if not request._disconnected:
                request.write(self._page(request, registry))
                request.finish()

        def failed(f):
            log.failure("metrics: gathering the workers' metrics failed", f)
            if not request._disconnected:
                request.setResponseCode(500)
                request.write(b"gathering the workers' metrics failed\n")
                request.finish()

        d.addCallback(send).addErrback(failed)
        return server.NOT_DONE_YET

    def _page(self, request, registry) -> bytes:
        accept = (request.getHeader("accept") or "")
        encoder, content_type = choose_encoder(accept)
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        if "name[]" in query:
            registry = registry.restricted_registry(query["name[]"])
        output = encoder(registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        if gzip_accepted(request.getHeader("accept-encoding") or ""):
            output = gzip.compress(output)
            request.setHeader(b"content-encoding", b"gzip")
        return output


class _Root(resource.Resource):
    def __init__(self, registry: CollectorRegistry | None, source: "WorkersMetrics | None" = None):
        super().__init__()
        # Resource provides IResource through zope's @implementer, which mypy does not read as a base class
        self.putChild(b"metrics", _MetricsPage(registry, source))  # type: ignore[arg-type]

    def getChild(self, path, request):
        if path == b"":
            return self
        return pages.notFound("Not found", "The metrics are at /metrics.")

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"twisted-relay: Prometheus metrics at /metrics\n"


class _OneRequestChannel(http.HTTPChannel):
    """One request per connection (the response says Connection: close).

    Twisted's HTTPChannel answers pipelined requests one after another
    without waiting for the client to read: its pause of the transport is
    skipped while a request is being handled, which is always the case
    here (the page is written at once), so a client that pipelines GETs and
    never reads made the relay hold every response (20,000 requests, 0.6
    MB: 140 MB).  A scraper makes one request per scrape; one per
    connection costs it a connect and bounds what a connection can hold to
    one page."""

    def checkPersistence(self, request, version) -> bool:
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.persistent = False
        return False


class MetricsSite(server.Site):
    """No access log: a scrape every 15 s would drown the mail log.

    One request per connection (_OneRequestChannel), and a connection idle
    for a minute is closed (twisted.web's default is 12 hours)."""

    # typed as a factory of _GenericHTTPChannelProtocol, the wrapper HTTPFactory makes by
    # default; an HTTPChannel serves its connections as well (twisted.web accepts both)
    protocol = _OneRequestChannel  # type: ignore[assignment]

    def __init__(self, resource, *args, timeout: float = 60.0, **kwargs):
        super().__init__(resource, *args, timeout=timeout, **kwargs)

    def log(self, request) -> None:
        pass


# -- a relay with workers: the master sums the workers' metrics -----------------

# gauges that are not additive across workers
_MERGE_MIN = ("relay_start_time_seconds", "relay_limits_redis_up")  # up: every worker's Redis answers
_MERGE_MAX = ("relay_queue_oldest_message_age_seconds", "relay_build_info")


def _merge_rule(sample_name: str):
    if sample_name in _MERGE_MIN or sample_name.endswith("_created"):
        return min
    if sample_name in _MERGE_MAX:
        return max
    return None  # a sum


def merge_expositions(texts: Iterable[str]) -> list[Metric]:
    """Sum several relays' text expositions (the workers of one relay) into
    one set of metric families: counters, histograms, queue sizes and open
    sessions add up; start time and creation stamps take the earliest; the
    oldest message age and the build info the largest."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    labels_of: dict[tuple, dict] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                labels_of[key] = s.labels
                if key not in acc:
                    acc[key] = s.value
                else:
                    rule = _merge_rule(s.name)
                    acc[key] = rule(acc[key], s.value) if rule else acc[key] + s.value
    out = []
    for name, fam in families.items():
        for (sname, lkey), v in values[name].items():
            fam.add_sample(sname, labels_of[(sname, lkey)], v)
        out.append(fam)
    return out


class _Families:
    """A collector over a fixed list of families (one scrape's merge)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def describe(self) -> Iterable[Metric]:  # the names, for ?name[]= filters
        return list(self.families)

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


class WorkersMetrics:
    """The /metrics page of a relay master (workers > 1).

    At each scrape the master asks every worker for its exposition over the
    worker's control socket (the ``Metrics`` AMP command, relay.control.proto) and
    serves the sum, plus ``relay_workers{state="configured"|"answering"}``.
    A worker that does not answer within ``timeout`` (being restarted) is
    left out of that scrape, and the answering count says so.
    """

    def __init__(self, reactor, sockets: list[str], timeout: float = 5.0):
        self.reactor = reactor
        self.sockets = sockets
        self.timeout = timeout

    def _ask(self, path: str):
        ep = endpoints.UNIXClientEndpoint(self.reactor, path, timeout=self.timeout)
        d = endpoints.connectProtocol(ep, QuietAMP())

        def call(proto):
            c = proto.callRemote(Metrics)
            c.addTimeout(self.timeout, self.reactor)

            def done(result):
                proto.transport.loseConnection()
                return result

            return c.addBoth(done)

        return d.addCallback(call).addCallback(lambda r: r["text"].decode("utf-8"))

    def registry(self):
        """A Deferred: a registry holding this scrape's merged families."""
        ds = [self._ask(p) for p in self.sockets]
        d = defer.DeferredList(ds, consumeErrors=True)

        def merge(results):
            texts = [r for ok, r in results if ok]
            fams = merge_expositions(texts)
            g = GaugeMetricFamily("relay_workers", "Worker processes of this relay: configured, and "
                                  "answering this scrape (their metrics are summed here)", labels=["state"])
            g.add_metric(["configured"], len(self.sockets))
            g.add_metric(["answering"], len(texts))
            fams.append(g)
            reg = CollectorRegistry(auto_describe=False)
            reg.register(_Families(fams))
            return reg

        return d.addCallback(merge)

    def site(self) -> server.Site:
        site = MetricsSite(_Root(None, self))
        site.noisy = False
        return site
