"""[limits]: the rate table, the config, and the SMTP session's 450 4.7.1 (task.Clock drives the windows)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from twisted.logger import globalLogPublisher

from relay import config as configmod
from relay.common.ratelimit import CAPACITY, RateTable, Want
from relay.smtp.limits import client_network
from tests.test_smtp_protocol import Harness

# --------------------------------------------------------------------------- the table


def test_limit_reached_and_released_as_the_window_moves():
    t = RateTable.local()
    w = Want("limits.messages_per_ip", "10.0.0.1", 3, 60.0)
    assert [t.take([w], 0.0) for _ in range(3)] == [None, None, None]
    r = t.take([w], 1.0)
    assert r is not None and r.first and r.count == 3
    assert t.take([w], 2.0) is not None and not t.take([w], 2.0).first  # logged once per window
    # sliding: half-way through the next window half of the previous one still counts
    assert t.take([w], 90.0) is None  # 3 * 0.5 + 0 = 1.5 -> one more fits
    assert t.take([w], 90.0) is not None  # 1.5 + 1 = 2.5, + 1 > 3
    r = t.take([w], 95.0)
    assert r is not None and r.first is False  # same window as the refusal at 90
    assert t.take([w], 240.0) is None  # two windows later: all released
    assert t.count(w, 240.0) == 1


def test_a_refusal_counts_nothing_and_all_or_none():
    t = RateTable.local()
    a = Want("limits.messages_per_ip", "10.0.0.1", 10, 60.0)
    b = Want("limits.messages_per_user", "bob", 1, 60.0)
    assert t.take([a, b], 0.0) is None
    r = t.take([a, b], 1.0)
    assert r is not None and r.want == b
    assert t.count(a, 1.0) == 1  # the refused MAIL did not count for the IP


def test_memory_is_bounded_under_many_keys():
    t = RateTable.local(capacity=1024)
    size = len(t.mm)
    victim = Want("limits.messages_per_user", "bob", 5, 3600.0)
    for _ in range(5):
        t.take([victim], 0.0)
    for i in range(20000):  # an attacker with many addresses
        t.take([Want("limits.messages_per_ip", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 5, 3600.0)], 1.0)
    assert len(t.mm) == size
    # the busiest key is the last to be forgotten: bob still at his limit
    assert t.take([victim], 2.0) is not None
    assert CAPACITY * 128 <= 2 * 1024 * 1024


def test_usage_lists_who_is_near_a_limit():
    t = RateTable.local()
    near = Want("limits.recipients_per_user", "bob", 10, 60.0)
    far = Want("limits.recipients_per_user", "carol", 10, 60.0)
    for _ in range(8):
        t.take([near], 0.0)
    t.take([far], 0.0)
    u = t.usage(1.0)
    assert [(x.limit, x.key, x.count, x.max, x.window) for x in u] == [
        ("limits.recipients_per_user", "bob", 8, 10, 60.0)]
    assert t.usage(200.0) == []


def test_shared_table_counts_across_processes():
    t = RateTable.create_shared(capacity=1024)
    w = Want("limits.messages_per_ip", "10.0.0.1", 1000, 3600.0)
    code = textwrap.dedent(f"""
        import sys
        from relay.common.ratelimit import RateTable, Want
        t = RateTable.attach({t.fd})
        w = Want("limits.messages_per_ip", "10.0.0.1", 1000, 3600.0)
        print(sum(t.take([w], 10.0) is None for _ in range(700)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], pass_fds=(t.fd,), stdout=subprocess.PIPE,
                              cwd=os.getcwd()) for _ in range(2)]
    admitted = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(admitted) == 1000  # exactly the limit, whatever the interleaving
    assert t.count(w, 10.0) == 1000
    t.close()


def test_attach_refuses_another_descriptor(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(ValueError):
            RateTable.attach(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [
    ("messages_per_ip", "soon"), ("messages_per_ip", "-5/1h"), ("messages_per_user", "5/0s"),
    ("recipients_per_sender", "0/1h"), ("recipients_per_ip", 300), ("messages_per_sender", "5/soon"),
])
def test_bad_rates_are_refused_naming_the_key(key, value):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(None, data={"limits": {key: value}})
    assert f"limits.{key}: expected a rate" in str(e.value)


def test_bad_overrides_are_refused_naming_the_key():
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(None, data={"limits": {"submission": {"messages_per_usr": "5/1h"}}})
    assert "limits.submission: expected" in str(e.value) and "messages_per_usr" in str(e.value)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(None, data={"limits": {"mx": {"messages_per_ip": "soon"}}})
    assert "limits.mx: expected messages_per_ip = a rate" in str(e.value)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(None, data={"delivery": {"pacing": {"gmail.com": "20/0s"}}})
    assert "delivery.pacing: expected gmail.com = a rate" in str(e.value)


def test_defaults_and_overrides():
    cfg = configmod.load(None)
    assert cfg.limits.messages_per_user.count == 300 and cfg.limits.messages_per_user.window == 3600
    cfg = configmod.load(None, data={"limits": {"messages_per_ip": "off", "submission": {
        "messages_per_user": "10/5m"}}, "delivery": {"pacing": {"Gmail.com": "20/1m", "*": "off"}}})
    assert cfg.limits.messages_per_ip is None
    assert cfg.limits.rate("messages_per_user", True)[0] == "limits.submission.messages_per_user"
    assert cfg.limits.rate("messages_per_user", True)[1].window == 300
    assert cfg.limits.rate("messages_per_user", False)[0] == "limits.messages_per_user"
    assert [(k, r.count, r.window) for k, r in cfg.delivery.pacing] == [("mx:gmail.com", 20, 60.0)]


def test_client_networks():
    cfg = configmod.load(None, data={"limits": {"ipv4_prefix": 24}})
    assert client_network("10.1.2.3", cfg) == "10.1.2.0/24"
    assert client_network("2001:db8:1:2::5", cfg) == "2001:db8:1:2::/64"
    assert client_network("::ffff:10.1.2.3", cfg) == "10.1.2.0/24"
    assert client_network("127.0.0.9", configmod.load(None)) == "127.0.0.9"


# --------------------------------------------------------------------------- the SMTP session


class Limits(Harness):
    limits: dict = {}

    def setUp(self):
        super().setUp()
        self.cfg = configmod.load(None, data={
            "hostname": "relay.test", "spool": self.tmp + "/spool", "smtp": {"timeout": 7200},
            "local": {"domains": ["local.test"], "users": self.tmp + "/users"}, "limits": self.limits})
        self.ctx.config = self.cfg
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def session(self, ip="127.0.0.9", user=None):
        p, t = self.connect(ip)
        p.dataReceived(b"EHLO client.test\r\n")
        if user:
            p.auth_user = user  # as a successful AUTH leaves it (AUTH itself: tests/test_smtp_server.py)
        self.take(t)
        return p, t

    def say(self, p, t, line: str) -> str:
        p.dataReceived(line.encode() + b"\r\n")
        return self.take(t).decode()

    def rejects(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("reason") == "rate_limit"]


class MessagesPerIP(Limits):
    limits = {"messages_per_ip": "2/1m"}

    def test_reached_refused_at_mail_and_released(self):
        p, t = self.session()
        for _ in range(2):
            self.assertEqual(self.say(p, t, "MAIL FROM:<a@x.test>"), "250 2.1.0 Ok\r\n")
            self.say(p, t, "RSET")
        self.assertEqual(self.say(p, t, "MAIL FROM:<a@x.test>"),
                         "450 4.7.1 too many messages from 127.0.0.9: limit 2 per 1m (limits.messages_per_ip)\r\n")
        self.say(p, t, "MAIL FROM:<a@x.test>")
        self.assertEqual(len(self.rejects()), 1)  # logged once per window
        self.assertEqual(self.ctx.counters.rate_limited, {"limits.messages_per_ip": 2})
        # another client is not affected
        p2, t2 = self.session("127.0.0.10")
        self.assertEqual(self.say(p2, t2, "MAIL FROM:<a@x.test>"), "250 2.1.0 Ok\r\n")
        self.clock.advance(120)
        self.assertEqual(self.say(p, t, "MAIL FROM:<a@x.test>"), "250 2.1.0 Ok\r\n")
        self.assertFalse(t.disconnecting)

    def test_trusted_networks_exempt_when_configured(self):
        self.cfg = configmod.load(None, data={"spool": self.tmp + "/spool", "smtp": {"timeout": 7200}, "limits": {
            "messages_per_ip": "1/1m", "networks": False}})
        self.ctx.config = self.cfg
        p, t = self.session("127.0.0.9")
        for _ in range(3):
            self.assertEqual(self.say(p, t, "MAIL FROM:<a@x.test>"), "250 2.1.0 Ok\r\n")
            self.say(p, t, "RSET")
        p, t = self.session("192.0.2.1")  # not in relay.networks: limited
        self.assertEqual(self.say(p, t, "MAIL FROM:<a@x.test>"), "250 2.1.0 Ok\r\n")
        self.say(p, t, "RSET")
        self.assertTrue(self.say(p, t, "MAIL FROM:<a@x.test>").startswith("450 4.7.1 "))


class RecipientsPerSender(Limits):
    limits = {"recipients_per_sender": "3/1h"}

    def test_refused_at_rcpt_the_accepted_ones_kept(self):
        p, t = self.session()
        self.say(p, t, "MAIL FROM:<Bulk@X.test>")
        for i in range(3):
            self.assertEqual(self.say(p, t, f"RCPT TO:<r{i}@remote.test>"), "250 2.1.5 Ok\r\n")
        self.assertEqual(self.say(p, t, "RCPT TO:<r1@remote.test>"), "250 2.1.5 Ok\r\n")  # a duplicate: free
        for i in range(25):  # more refusals than the error limit: the session goes on
            self.assertEqual(self.say(p, t, f"RCPT TO:<s{i}@remote.test>"),
                             "450 4.7.1 too many recipients from sender bulk@x.test: limit 3 per 1h "
                             "(limits.recipients_per_sender)\r\n")
        self.assertEqual(len(p.recipients), 3)
        self.assertFalse(t.disconnecting)
        self.assertEqual(len(self.rejects()), 1)
        self.assertTrue(self.say(p, t, "DATA").startswith("354"))

    def test_null_sender_not_counted(self):
        p, t = self.session()
        self.say(p, t, "MAIL FROM:<>")
        for i in range(5):
            self.assertEqual(self.say(p, t, f"RCPT TO:<r{i}@remote.test>"), "250 2.1.5 Ok\r\n")


class PerUserOnSubmission(Limits):
    limits = {"messages_per_user": "5/1h", "submission": {"messages_per_user": "1/10m"},
              "mx": {"messages_per_ip": "off"}}

    def test_submission_override(self):
        p = self.connect()[0]
        p.submission = True
        t = p.transport
        p.dataReceived(b"EHLO c\r\n")
        p.auth_user = "bob@local.test"
        self.take(t)
        self.assertEqual(self.say(p, t, "MAIL FROM:<bob@local.test>"), "250 2.1.0 Ok\r\n")
        self.say(p, t, "RSET")
        self.assertEqual(self.say(p, t, "MAIL FROM:<bob@local.test>"),
                         "450 4.7.1 too many messages from user bob@local.test: limit 1 per 10m "
                         "(limits.submission.messages_per_user)\r\n")
        # on the MX port bob has the general limit, counted apart
        p2, t2 = self.session(user="bob@local.test")
        self.assertEqual(self.say(p2, t2, "MAIL FROM:<bob@local.test>"), "250 2.1.0 Ok\r\n")
        self.clock.advance(1200)
        self.assertEqual(self.say(p, t, "MAIL FROM:<bob@local.test>"), "250 2.1.0 Ok\r\n")


def test_refusals_in_the_metrics(tmp_path):
    from relay.runtime.service import RelayService

    cfg = configmod.load(None, data={"spool": str(tmp_path / "spool"), "pop3": {"listen": []},
                                     "local": {"users": str(tmp_path / "users")},
                                     "smtp": {"listen": []}})
    svc = RelayService(cfg, deliver=False)
    svc.smtp_ctx.counters.rate_limit("limits.messages_per_ip")
    svc.smtp_ctx.counters.rate_limit("limits.messages_per_ip")
    page = svc.metrics.render().decode()
    assert 'relay_rate_limited_total{limit="limits.messages_per_ip"} 2.0' in page
    assert 'relay_messages_rejected_total{reason="rate_limit"} 2.0' in page
    # status: who is near a limit, from the service's table
    for _ in range(9):
        svc.rate_table.take([Want("limits.messages_per_user", "bob", 10, 3600.0)], svc.reactor.seconds())
    u = svc.rate_table.usage(svc.reactor.seconds())
    assert [(x.key, x.count) for x in u] == [("bob", 9)]
