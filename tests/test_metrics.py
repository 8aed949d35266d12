"""The metrics endpoint, scraped over HTTP from a running relay and parsed
with prometheus_client's own parser.

The relay runs in-process (trial); the traffic is real: SMTP in over
STARTTLS, delivery by route to a real SMTP server with STARTTLS (TLS out),
a deferral, a local delivery, rejections, an open POP3 session.
"""

from __future__ import annotations

import gzip
import os
import shutil
import smtplib
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from relay import config as configmod
from relay.mailbox import users as usersmod
from relay.runtime.service import RelayService, StartupError
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll


def scrape(host: str, port: int, path: str = "/metrics", headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


class MetricsEndpoint(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-metrics-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.cert = cert_files("localhost", "127.0.0.1")
        self.sink = Sink("127.0.0.2", starttls="ok", cert=cert_files("127.0.0.2", "sink.test"),
                         rcpt_replies={"later@remote.example": "451 4.3.0 try later"}).start()
        self.addCleanup(self.sink.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.relay = InProcessRelay(self.tmp, {
            "tls": {"certificate": self.cert.cert_pem, "key": self.cert.key_pem},
            "relay": {"routes": {"remote.example": f"127.0.0.2:{self.sink.port}"}},
            "delivery": {"retry_min": "1h", "retry_max": "1h", "tls": "may"},
            "pop3": {"listen": ["tcp:0:interface=127.0.0.1"]},
            "metrics": {"listen": ["tcp:0:interface=127.0.0.1"]},
        })
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def traffic(self):
        ctx = ssl.create_default_context(cafile=self.cert.ca_pem)
        with smtplib.SMTP(*self.relay.smtp) as s:
            s.starttls(context=ctx)
            s.sendmail("a@client.example", ["ok@remote.example", "later@remote.example"],
                       b"Subject: out\r\n\r\nx\r\n")
        with smtplib.SMTP(*self.relay.smtp) as s:
            s.sendmail("a@client.example", ["alice@local.test"], b"Subject: in\r\n\r\nx\r\n")
            s.ehlo("x")
            s.mail("a@client.example")
            assert s.rcpt("nobody@local.test")[0] == 550
            s.rset()
            assert s.mail("a@client.example", ["SIZE=999999999999"])[0] == 552

    async def test_scrape_after_traffic(self):
        await in_thread(self.traffic)
        q = self.relay.service.queue
        await apoll(lambda: q.counters.delivered == 2 and q.counters.deferred == 1 and not q.busy(), 20,
                    what="the deliveries")
        # one SMTP and one POP3 session open while scraping
        smtp_open = socket.create_connection(self.relay.smtp)
        self.addCleanup(smtp_open.close)
        pop_open = socket.create_connection(self.relay.ports["pop3"])
        self.addCleanup(pop_open.close)
        await in_thread(smtp_open.recv, 100)
        await in_thread(pop_open.recv, 100)
        host, port = self.relay.ports["metrics"]
        status, headers, body = await in_thread(scrape, host, port)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        m = samples(body.decode())
        assert value(m, "relay_messages_received_total", source="smtp") == 2
        assert value(m, "relay_messages_received_total", source="sendmail") == 0
        assert value(m, "relay_messages_delivered_total") == 2
        assert value(m, "relay_messages_deferred_total") == 1
        assert value(m, "relay_messages_bounced_total") == 0
        assert value(m, "relay_messages_removed_total") == 1
        assert value(m, "relay_messages_rejected_total", reason="unknown_user") == 1
        assert value(m, "relay_messages_rejected_total", reason="size") == 1
        assert value(m, "relay_queue_messages", state="deferred") == 1
        assert value(m, "relay_queue_messages", state="active") == 0
        assert value(m, "relay_queue_messages", state="hold") == 0
        # the deferred message is the only one queued: the age is its own
        [deferred] = q.messages.values()
        age = value(m, "relay_queue_oldest_message_age_seconds")
        assert 0 < age <= time.time() - deferred.env.arrival + 1, (age, deferred.env.arrival)
        assert value(m, "relay_sessions_open", protocol="smtp") == 1
        assert value(m, "relay_sessions_open", protocol="pop3") == 1
        assert value(m, "relay_sessions_total", protocol="smtp") == 3
        assert value(m, "relay_tls_sessions_total", direction="in") == 1
        assert value(m, "relay_tls_sessions_total", direction="out") == 1
        assert value(m, "relay_smtp_client_sessions_total") == 1
        assert value(m, "relay_delivery_attempts_total") == 2
        assert value(m, "relay_delivery_attempt_duration_seconds_count", destination="remote") == 1
        assert value(m, "relay_delivery_attempt_duration_seconds_count", destination="local") == 1
        assert value(m, "relay_delivery_attempt_duration_seconds_bucket", destination="local", le="+Inf") == 1
        assert value(m, "relay_delivery_attempt_duration_seconds_sum", destination="remote") > 0
        assert value(m, "relay_build_info", version="0.1.0") == 1
        # the age grows with the reactor's time
        oldest = min(x.env.arrival for x in q.messages.values())
        assert value(m, "relay_queue_oldest_message_age_seconds") <= self.relay.service.reactor.seconds() - oldest

    async def test_openmetrics_gzip_and_other_paths(self):
        host, port = self.relay.ports["metrics"]
        status, headers, body = await in_thread(
            scrape, host, port, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0",
                                             "Accept-Encoding": "gzip"})
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        text = gzip.decompress(body).decode()
        assert text.endswith("# EOF\n") and "relay_queue_messages" in text
        status, _, body = await in_thread(scrape, host, port, "/metrics?name[]=relay_queue_messages")
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert names == {"relay_queue_messages"}
        status, _, body = await in_thread(scrape, host, port, "/")
        assert status == 200 and b"/metrics" in body
        status, _, _ = await in_thread(scrape, host, port, "/nope")
        assert status == 404

    async def test_two_relays_in_one_process_keep_their_own_numbers(self):
        other_dir = tempfile.mkdtemp(prefix="relay-metrics2-")
        self.addCleanup(shutil.rmtree, other_dir, True)
        other = InProcessRelay(other_dir, {"metrics": {"listen": ["tcp:0:interface=127.0.0.1"]}})
        await other.start()
        self.addCleanup(other.stop)

        def send():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.sendmail("a@client.example", ["alice@local.test"], b"Subject: in\r\n\r\nx\r\n")

        await in_thread(send)
        a = samples((await in_thread(scrape, *self.relay.ports["metrics"]))[2].decode())
        b = samples((await in_thread(scrape, *other.ports["metrics"]))[2].decode())
        assert value(a, "relay_messages_received_total", source="smtp") == 1
        assert value(b, "relay_messages_received_total", source="smtp") == 0


class Config(unittest.TestCase):
    def test_metrics_off_by_default(self):
        tmp = tempfile.mkdtemp(prefix="relay-metrics3-")
        self.addCleanup(shutil.rmtree, tmp, True)
        r = InProcessRelay(tmp)
        assert r.config.metrics.listen == ()
        svc = RelayService(r.config, deliver=False)
        assert not any(s.name.startswith("metrics") for s in svc.listener_services)
        assert b"relay_queue_messages" in svc.metrics.render()

    def test_ssl_endpoint_without_certificate_is_refused(self):
        tmp = tempfile.mkdtemp(prefix="relay-metrics4-")
        self.addCleanup(shutil.rmtree, tmp, True)
        cfg = configmod.load(None, data={"spool": os.path.join(tmp, "spool"), "pop3": {"listen": []},
                                         "local": {"users": os.path.join(tmp, "users")},
                                         "metrics": {"listen": ["ssl:0:interface=127.0.0.1"]}})
        with self.assertRaises(StartupError) as e:
            RelayService(cfg, deliver=False)
        assert "metrics.listen" in str(e.exception) and "tls.certificate" in str(e.exception)


def test_merge_expositions_sums_counters_and_keeps_extremes():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from relay.runtime.metrics import _Families, merge_expositions

    a = """# HELP relay_messages_received_total Messages
# TYPE relay_messages_received_total counter
relay_messages_received_total{source="smtp"} 3.0
# HELP relay_start_time_seconds When
# TYPE relay_start_time_seconds gauge
relay_start_time_seconds 100.0
# HELP relay_queue_oldest_message_age_seconds Age
# TYPE relay_queue_oldest_message_age_seconds gauge
relay_queue_oldest_message_age_seconds 5.0
# HELP relay_build_info v
# TYPE relay_build_info gauge
relay_build_info{version="1"} 1.0
# HELP lat d
# TYPE lat histogram
lat_bucket{le="1.0"} 1.0
lat_bucket{le="+Inf"} 2.0
lat_count 2.0
lat_sum 3.5
# HELP lat_created d
# TYPE lat_created gauge
lat_created 50.0
"""
    b = (a.replace('{source="smtp"} 3.0', '{source="smtp"} 4.0').replace("seconds 100.0", "seconds 90.0")
         .replace("age_seconds 5.0", "age_seconds 7.0").replace("lat_created 50.0", "lat_created 60.0"))
    fams = merge_expositions([a, b])
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(fams))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    assert got[("relay_messages_received_total", (("source", "smtp"),))] == 7
    assert got[("relay_start_time_seconds", ())] == 90
    assert got[("relay_queue_oldest_message_age_seconds", ())] == 7
    assert got[("relay_build_info", (("version", "1"),))] == 1
    assert got[("lat_bucket", (("le", "+Inf"),))] == 4 and got[("lat_sum", ())] == 7
    assert got[("lat_created", ())] == 50
