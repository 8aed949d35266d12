"""limits.redis: the per-IP connection limits and the [limits] rates shared by a
fleet, in a real redis-server (tests/support/redis.py), and what a relay does
when that Redis stops, hangs and comes back."""

from __future__ import annotations

import shutil
import socket
import tempfile

import pytest
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay import config as configmod
from relay.common import redislimits
from relay.common.ratelimit import RateTable, Want
from relay.common.redisurl import RedisTarget, parse_redis_url
from tests.support import redis as redissupport
from tests.support.relay import InProcessRelay, in_thread
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll

CLIENT = "127.0.0.9"  # the client, from its own address (so that limits per IP apply to it alone)
SKIP = redissupport.available()

# --------------------------------------------------------------------------- the URL and the config


def test_urls():
    assert parse_redis_url("redis://127.0.0.1:6380/2") == RedisTarget("127.0.0.1", 6380, 2, None, None)
    assert parse_redis_url("redis://:s%40cret@redis.example:6379") == RedisTarget("redis.example", 6379, 0,
                                                                                 "s@cret", None)
    assert parse_redis_url("redis://relay:pw@[::1]/0") == RedisTarget("::1", 6379, 0, "pw", "relay")
    t = parse_redis_url("unix:/run/redis/redis.sock?db=3")
    assert (t.path, t.db, t.password) == ("/run/redis/redis.sock", 3, None)
    assert str(parse_redis_url("redis://:pw@h:1/0")) == "h:1/0"  # logs never show the password


@pytest.mark.parametrize("value", ["localhost:6379", "http://h/0", "redis://h:99999/0", "redis:///0",
                                   "redis://h/zero", "redis://h/0?x=1", "unix:relative.sock",
                                   "unix:/s.sock?db=x", "unix:/s.sock?tls=1", 6379])
def test_bad_urls_are_refused_naming_the_key(value):
    with pytest.raises(configmod.ConfigError, match=r"limits\.redis"):
        configmod.load(None, data={"limits": {"redis": value}})


def test_defaults_and_other_keys():
    cfg = configmod.load(None, data={})
    assert (cfg.limits.redis, cfg.limits.redis_prefix, cfg.limits.redis_timeout) == ("", "relay:", 0.5)
    with pytest.raises(configmod.ConfigError, match=r"limits\.redis_prefix"):
        configmod.load(None, data={"limits": {"redis_prefix": "a b"}})
    with pytest.raises(configmod.ConfigError, match=r"limits\.redis_timeout"):
        configmod.load(None, data={"limits": {"redis_timeout": 0}})


# --------------------------------------------------------------------------- two relays, one Redis


def _pop3_greeting(addr: tuple[str, int]) -> bytes:
    with socket.create_connection(addr, timeout=10, source_address=(CLIENT, 0)) as s:
        return s.makefile("rb").readline()


class Fleet(unittest.TestCase):
    """Two in-process relays on 127.0.0.2 and 127.0.0.3 sharing one Redis on 127.0.0.4."""

    skip = SKIP
    limits = {"messages_per_ip": "3/1h", "recipients_per_ip": "off", "messages_per_sender": "off",
              "recipients_per_sender": "off"}

    async def setUp(self):
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.redis = redissupport.RedisServer("127.0.0.4")
        await in_thread(self.redis.start)
        self.addCleanup(self.redis.close)
        self.relays = []
        for ip in ("127.0.0.2", "127.0.0.3"):
            tmp = tempfile.mkdtemp(prefix="relay-fleet-")
            self.addCleanup(shutil.rmtree, tmp, True)
            r = InProcessRelay(tmp, {"limits": {**self.limits, "redis": self.redis.url, "redis_prefix": "t1:"},
                                     "smtp": {"max_connections_per_ip": 2},
                                     "pop3": {"listen": [f"tcp:0:interface={ip}"], "max_connections_per_ip": 1},
                                     "relay": {"networks": [f"{CLIENT}/32"]}}, ip=ip, deliver=False)
            await r.start()
            self.addCleanup(r.stop)
            self.relays.append(r)
        for r in self.relays:
            await apoll(lambda r=r: r.service.limits_redis.up, what="the relay's Redis link up")

    def _mail(self, relay: InProcessRelay, n: int = 1, source: str = CLIENT) -> list[str]:
        """n MAIL commands from source (RSET between): their replies."""
        out = []
        with RawSMTP(*relay.smtp, source=source) as c:
            assert c.reply().code == 220
            c.cmd("EHLO client.test")
            for _ in range(n):
                r = c.cmd("MAIL FROM:<a@client.test>")
                out.append(f"{r.code} {r.text}")
                c.cmd("RSET")
        return out

    def _logged(self, text: str) -> list[str]:
        return [m for m in (formatEvent(e) for e in self.events) if text in m]

    def _sample(self, relay: InProcessRelay, name: str) -> float | None:
        return relay.service.metrics.registry.get_sample_value(name)

    async def test_messages_counted_together(self):
        a, b = self.relays
        assert [s[:3] for s in await in_thread(self._mail, a, 2)] == ["250", "250"]
        got = await in_thread(self._mail, b, 2)
        assert got[0].startswith("250")
        assert got[1].startswith("450 4.7.1 too many messages from 127.0.0.9: limit 3 per 1h "
                                 "(limits.messages_per_ip)"), got
        assert (await in_thread(self._mail, a))[0].startswith("450 4.7.1")  # the first node knows too
        # the fleet logs the client's first refusal of the window once
        assert len(self._logged("reject: MAIL from client.test[127.0.0.9]: 450 4.7.1")) == 1
        assert self._sample(a, "relay_limits_redis_up") == 1
        assert self._sample(b, "relay_limits_redis_errors_total") == 0

    async def test_pipelined_commands_wait_for_the_answer_in_order(self):
        a, _b = self.relays

        def session():
            with RawSMTP(*a.smtp, source=CLIENT) as c:
                assert c.reply().code == 220
                c.cmd("EHLO client.test")
                c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<x@example.net>\r\nRCPT TO:<y@example.net>\r\n"
                       b"RCPT TO:<x@example.net>\r\nDATA\r\n")
                codes = [c.reply().code for _ in range(5)]
                c.send(b"Subject: fleet\r\n\r\nhello\r\n.\r\n")
                return codes + [c.reply().code]

        assert await in_thread(session) == [250, 250, 250, 250, 354, 250]

    async def test_connection_limit_across_both(self):
        a, b = self.relays

        def scenario():
            first, second = RawSMTP(*a.smtp, source=CLIENT), RawSMTP(*b.smtp, source=CLIENT)
            try:
                assert first.reply().code == 220 and second.reply().code == 220
                with RawSMTP(*b.smtp, source=CLIENT) as third:
                    r = third.reply()
                    assert (r.code, r.text) == (421, "4.7.0 Too many connections from your address, try "
                                                     "again later")
                    assert third.closed()
                with RawSMTP(*a.smtp, source=CLIENT) as third:
                    assert third.reply().code == 421
            finally:
                first.close()
            # one left: a new connection fits again (once node a's release reached Redis)
            for _ in range(200):
                with RawSMTP(*b.smtp, source=CLIENT) as again:
                    if again.reply().code == 220:
                        break
            else:
                raise AssertionError("the released connection was never freed in Redis")
            second.close()

        await in_thread(scenario)
        # POP3: one connection per address across the fleet
        pa, pb = a.ports[next(k for k in a.ports if k.startswith("pop3 "))], \
            b.ports[next(k for k in b.ports if k.startswith("pop3 "))]

        def pop3():
            with socket.create_connection(pa, timeout=10, source_address=(CLIENT, 0)) as s:
                assert s.makefile("rb").readline().startswith(b"+OK")
                assert _pop3_greeting(pb).startswith(b"-ERR [SYS/TEMP] Too many connections")

        await in_thread(pop3)

    async def test_connections_closed_at_once_leave_no_count(self):
        """Clients that hang up before the greeting, while their count is on its way to
        Redis, or at once after it: every count comes back to zero, on both nodes."""
        a, b = self.relays

        def churn():
            for i in range(40):
                s = socket.create_connection((a, b)[i % 2].smtp, timeout=10, source_address=(CLIENT, 0))
                if i % 3 == 0:
                    s.recv(100)  # after the greeting
                s.close()

        await in_thread(churn)
        key = f"t1:conn:smtp:{CLIENT}"
        await apoll(lambda: self.redis.command("EXISTS", key) == b":0" and all(
            r.service.connection_counter("smtp").count(CLIENT) == 0 for r in self.relays), what="no count left")
        for r in self.relays:
            c = r.service.connection_counter("smtp")
            assert not (c._held or c._pending or c._gone or c._uncounted), vars(c)

    async def test_releases_lost_in_an_outage_are_written_when_redis_is_back(self):
        a, b = self.relays
        counter = a.service.connection_counter("smtp")

        def open_two():
            conns = [RawSMTP(*a.smtp, source=CLIENT) for _ in range(2)]
            assert [c.reply().code for c in conns] == [220, 220]
            return conns

        conns = await in_thread(open_two)
        assert not counter._dirty
        # Redis holds every client's commands for 4 s: the releases below get no answer, the
        # relay gives that connection up, and Redis drops what was sent on it
        assert self.redis.command("CLIENT", "PAUSE", "4000", "ALL") == b"+OK"
        for c in conns:
            c.close()
        await apoll(lambda: counter.count(CLIENT) == 0 and CLIENT in counter._dirty, what="releases lost")
        await apoll(lambda: not a.service.limits_redis.up, what="the outage noticed")
        await apoll(lambda: a.service.limits_redis.up, what="the link back")
        await apoll(lambda: not counter._dirty, what="the true counts written")

        def two_on_b():
            conns = [RawSMTP(*b.smtp, source=CLIENT) for _ in range(2)]
            try:
                return [c.reply().code for c in conns]
            finally:
                for c in conns:
                    c.close()

        assert await in_thread(two_on_b) == [220, 220]  # node a's two are not counted any more

    async def test_redis_stopped_then_started_again(self):
        a, b = self.relays
        await in_thread(self.redis.stop)
        # mail goes on with the local limits: 3 per node now
        assert [s[:3] for s in await in_thread(self._mail, a, 4)] == ["250", "250", "250", "450"]
        assert [s[:3] for s in await in_thread(self._mail, b, 2)] == ["250", "250"]
        down = self._logged("unavailable")
        assert len([m for m in down if "127.0.0.4" in m]) == 2, down  # once per relay, not per command
        assert "each node counts with its local limits" in down[0]
        assert self._sample(a, "relay_limits_redis_up") == 0
        assert self._sample(a, "relay_limits_redis_errors_total") >= 4
        await in_thread(self.redis.start)
        for r in self.relays:
            await apoll(lambda r=r: r.service.limits_redis.up, what="the relay's Redis link back up")
        assert len(self._logged("is back: limits are shared by the fleet again")) == 2
        assert not self._logged("Scheduling retry")  # no line per reconnection attempt
        # shared again (a fresh Redis: the count starts over for the fleet)
        other = "127.0.0.10"
        assert [s[:3] for s in await in_thread(self._mail, a, 2, other)] == ["250", "250"]
        assert [s[:3] for s in await in_thread(self._mail, b, 2, other)] == ["250", "450"]
        assert self._sample(b, "relay_limits_redis_up") == 1

    async def test_redis_that_hangs_does_not_hold_mail(self):
        a, _b = self.relays
        self.redis.pause()
        self.addCleanup(self.redis.resume)
        got = await in_thread(self._mail, a, 1)  # waits at most limits.redis_timeout, then local
        assert got[0].startswith("250"), got
        assert self._logged("no answer within the time limit")
        self.redis.resume()
        await apoll(lambda: a.service.limits_redis.up, what="the link back after the pause")


class DeadNode(unittest.TestCase):
    """A node that dies (no heartbeat, no goodbye) leaves no connection count behind."""

    skip = SKIP

    async def setUp(self):
        self.redis = redissupport.RedisServer("127.0.0.4")
        await in_thread(self.redis.start)
        self.addCleanup(self.redis.close)
        target = parse_redis_url(self.redis.url)
        self.links = [redislimits.RedisLink(target, prefix="t2:", timeout=2.0, reactor=reactor, node_ttl=2.0)
                      for _ in range(2)]
        for link in self.links:
            link.startService()
            self.addCleanup(link.stopService)
            await apoll(lambda link=link: link.up, what="link up")

    async def test_counts_of_a_dead_node_expire(self):
        from relay.common.connlimit import LocalCounter

        dying, living = (redislimits.FleetCounter(LocalCounter(), "smtp", link) for link in self.links)
        assert dying.acquire("10.0.0.1", 1) == (True, 0)
        assert await dying.confirm("10.0.0.1", 1) == (True, 0)
        assert living.acquire("10.0.0.1", 1) == (True, 0)  # locally: nothing here
        assert await living.confirm("10.0.0.1", 1) == (False, 1)  # the fleet: the other node's
        living.release("10.0.0.1")
        # the first node dies: its heartbeat stops, it never says goodbye
        self.links[0]._beat.stop()
        self.links[0]._handler._factory.disconnect()

        async def free():
            ok = living.acquire("10.0.0.1", 1)[0] and (await living.confirm("10.0.0.1", 1))[0]
            if not ok:
                living.release("10.0.0.1")
            return ok

        await apoll(lambda: defer.ensureDeferred(free()), timeout=20, interval=0.5,
                    what="the dead node's count expired")


class OneLink(unittest.TestCase):
    """FleetRates against RateTable, over a UNIX socket; a Redis that refuses us."""

    skip = SKIP

    async def setUp(self):
        self.redis = redissupport.RedisServer("127.0.0.4", password="s3cret")
        await in_thread(self.redis.start)
        self.addCleanup(self.redis.close)

    async def _link(self, url: str, up: bool = True) -> redislimits.RedisLink:
        link = redislimits.RedisLink(parse_redis_url(url), prefix="t3:", timeout=2.0, reactor=reactor)
        link.startService()
        self.addCleanup(link.stopService)
        if up:
            await apoll(lambda: link.up, what="link up")
        return link

    async def test_the_same_windows_as_the_local_table(self):
        link = await self._link(f"unix:{self.redis.socket}?password=s3cret&db=1")
        fleet, alone = redislimits.FleetRates(RateTable.local(), link), RateTable.local()
        w = Want("limits.messages_per_ip", "10.0.0.1", 3, 60.0)
        base = 1_700_000_040.0  # a window start, as the reactor's wall clock gives
        for t in (0.0, 0.0, 0.0, 1.0, 2.0, 90.0, 90.0, 95.0, 240.0, 240.0):
            got, expected = await fleet.check([w], base + t), alone.take([w], base + t)
            assert (t, got) == (t, expected)
        assert fleet.count(w, base + 240.0) == alone.count(w, base + 240.0) == 2  # counted here too
        # all or none: a refusal by the second want counts nothing for the first
        a, b = Want("limits.messages_per_ip", "10.0.0.2", 10, 60.0), Want("limits.messages_per_user", "bob", 1, 60.0)
        assert await fleet.check([a, b], base) is None
        r = await fleet.check([a, b], base + 1)
        assert r is not None and r.want == b and r.first
        assert self.redis.command("AUTH", "s3cret") == b"+OK"

    async def test_a_redis_that_refuses_us_is_an_outage(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        link = await self._link(f"redis://:not-the-password@127.0.0.4:{self.redis.port}/0", up=False)
        fleet = redislimits.FleetRates(RateTable.local(), link)
        w = Want("limits.messages_per_ip", "10.0.0.1", 2, 60.0)
        await apoll(lambda: link.up is False, what="the outage noticed")
        answers = [fleet.check([w], 0.0) for _ in range(3)]  # at once, from the local table
        assert [a if a is None else a.count for a in answers] == [None, None, 2]
        down = [formatEvent(e) for e in events if "unavailable" in formatEvent(e)]
        assert len(down) == 1 and "127.0.0.4" in down[0] and "not-the-password" not in down[0], down
