"""POP3 as the relay runs it (relay.runtime.service builds the factories), over real
sockets on loopback: which thread pool checks passwords, and the per-IP
connection limit (pop3.max_connections_per_ip), shared by all POP3 listeners.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import tempfile
import threading

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay import config as configmod
from relay.mailbox import users as usersmod
from tests.support.relay import InProcessRelay, base_config, deep_merge, in_thread, toml_dumps
from tests.support.wait import apoll

LISTEN = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=64"]


class POP3RelayCase(unittest.TestCase):
    pop3: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-pop3svc-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        # a real scrypt hash (relay.mailbox.users' default cost), as in production
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice-pw")
        self.relay = InProcessRelay(self.tmp, {"pop3": {"listen": LISTEN, **self.pop3}}, deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.pops = [self.relay.ports[f"pop3 {d}"] for d in LISTEN]


def pop3_exchange(addr, lines: list[bytes], timeout: float = 30.0, source: str | None = None) -> list[bytes]:
    """Connect, read the greeting, send each line and read its one-line reply."""
    with socket.create_connection(addr, timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        f = s.makefile("rb")
        out = [f.readline()]
        for ln in lines:
            s.sendall(ln + b"\r\n")
            out.append(f.readline())
        f.close()
        return out


class PasswordChecksOffTheDiskPool(POP3RelayCase):
    async def test_failing_logins_never_use_the_disk_pool_and_smtp_commits_meanwhile(self):
        svc = self.relay.service
        ran_in: list[str] = []
        lock = threading.Lock()
        real_check = svc.users.check
        started = threading.Event()

        def check(user, password):
            with lock:
                ran_in.append(threading.current_thread().name)
            started.set()
            return real_check(user, password)

        svc.users.check = check  # the one UserDB the service hands to POP3 and AUTH
        disk_jobs: list[str] = []
        real_run = svc.disk.pool.callInThreadWithCallback

        def run(on_result, fn, *a, **kw):
            disk_jobs.append(getattr(fn, "__qualname__", repr(fn)))
            return real_run(on_result, fn, *a, **kw)

        svc.disk.pool.callInThreadWithCallback = run
        n = 24

        def logins():
            """n failing logins at once, half of them for an unknown user (from
            several source addresses: 20 from one is the per-IP limit)."""
            results: list[list[bytes]] = [[] for _ in range(n)]

            def one(i):
                user = b"alice@local.test" if i % 2 else b"nobody%d@local.test" % i
                results[i] = pop3_exchange(self.pops[i % 2], [b"USER " + user, b"PASS wrong"],
                                           source=f"127.0.1.{i % 4 + 1}")

            ths = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
            for t in ths:
                t.start()
            return ths, results

        def smtp_message():
            started.wait(30)  # while the password checks are under way
            with smtplib.SMTP(*self.relay.smtp, timeout=30) as c:
                return c.sendmail("a@client.test", ["alice@local.test"], b"Subject: x\r\n\r\nx\r\n")

        ths, results = await in_thread(logins)
        refused = await in_thread(smtp_message)
        self.assertEqual(refused, {})
        for t in ths:
            await in_thread(t.join, 60)
        for r in results:
            self.assertEqual(r[1], b"+OK Send your password\r\n")
            self.assertTrue(r[2].startswith(b"-ERR [AUTH] Authentication failed"), r)
        self.assertEqual(len(ran_in), n)
        self.assertEqual({name.rsplit("-", 1)[0] for name in ran_in}, {"relay-auth"}, ran_in)
        self.assertNotIn("check", " ".join(disk_jobs))
        self.assertEqual(len(svc.spool.queue_ids()), 1)

    async def test_a_good_login_still_opens_the_mailbox(self):
        r = await in_thread(pop3_exchange, self.pops[0], [b"USER alice@local.test", b"PASS alice-pw",
                                                          b"STAT", b"QUIT"])
        self.assertTrue(r[2].startswith(b"+OK Logged in, 0 messages"), r)
        self.assertEqual(r[3], b"+OK 0 0\r\n")


class PerIPLimit(POP3RelayCase):
    pop3 = {"max_connections_per_ip": 2}

    async def test_third_connection_from_one_address_refused_across_listeners(self):
        def fn():
            a = socket.create_connection(self.pops[0], timeout=10)
            b = socket.create_connection(self.pops[1], timeout=10)
            ga, gb = a.makefile("rb").readline(), b.makefile("rb").readline()
            c = socket.create_connection(self.pops[0], timeout=10)
            fc = c.makefile("rb")
            gc = fc.readline()
            after = fc.read()  # the relay closes it
            for x in (a, b, c):
                x.close()
            return ga, gb, gc, after

        ga, gb, gc, after = await in_thread(fn)
        self.assertTrue(ga.startswith(b"+OK ") and gb.startswith(b"+OK "), (ga, gb))
        self.assertEqual(gc, b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n")
        self.assertEqual(after, b"")
        counter = self.relay.service.connection_counter("pop3")
        await apoll(lambda: not counter.counts(), 10, what="the POP3 connection count to go back to zero")
        # and once they are gone, the address is served again
        r = await in_thread(pop3_exchange, self.pops[1], [b"QUIT"])
        self.assertTrue(r[0].startswith(b"+OK "), r)

    async def test_other_addresses_are_not_limited(self):
        def fn():
            socks = [socket.create_connection(self.pops[0], timeout=10) for _ in range(2)]
            for s in socks:
                s.makefile("rb").readline()
            other = socket.socket()
            other.bind(("127.0.0.2", 0))
            other.settimeout(10)
            other.connect(self.pops[0])
            g = other.makefile("rb").readline()
            for s in [*socks, other]:
                s.close()
            return g

        self.assertTrue((await in_thread(fn)).startswith(b"+OK "))


class ReloadAndWarnings(unittest.TestCase):
    """The service makes its POP3 factories with relay.mailbox.pop3.factory_from_config,
    reloads them with apply_config and logs startup_warnings (issue 13: one way)."""

    async def start(self, pop3: dict, **changes):
        self.tmp = tempfile.mkdtemp(prefix="relay-pop3reload-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice-pw")
        self.data = deep_merge(base_config(self.tmp), {"pop3": pop3, **changes})
        self.path = os.path.join(self.tmp, "relay.toml")
        with open(self.path, "w") as f:
            f.write(toml_dumps(self.data))
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relay = InProcessRelay(self.tmp, {})
        self.relay.config = configmod.load(self.path)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        return self.relay.service

    async def test_reload_reaches_every_factory_and_new_connections(self):
        svc = await self.start({"listen": LISTEN, "max_connections_per_ip": 5})
        self.assertEqual(len(svc.pop3_factories), 2)
        for f in svc.pop3_factories:
            self.assertEqual((f.hostname, f.max_connections_per_ip), ("relay.test", 5))
            self.assertIs(f.limiter, svc.connection_counter("pop3"))
            self.assertIs(f.auth_pool, svc.auth_pool.pool)
            self.assertIs(f.threadpool, svc.disk.pool)
        self.data = deep_merge(self.data, {"hostname": "new.relay.test", "pop3": {"max_connections_per_ip": 7},
                                           "local": {"domains": ["local.test", "other.test"]}})
        with open(self.path, "w") as f:
            f.write(toml_dumps(self.data))
        r = svc.reload()
        self.assertTrue(r["ok"], r)
        for f in svc.pop3_factories:
            self.assertEqual((f.hostname, f.max_connections_per_ip, f.local_domains),
                             ("new.relay.test", 7, ("local.test", "other.test")))
            self.assertIs(f.userdb, svc.users)
        port = self.relay.ports[f"pop3 {LISTEN[1]}"]
        greeting = (await in_thread(pop3_exchange, port, [b"QUIT"]))[0]
        self.assertEqual(greeting, b"+OK new.relay.test POP3 server ready\r\n")

    async def test_plaintext_warning_at_start_keeps_the_line_it_always_logged(self):
        await self.start({"listen": ["tcp:0:interface=0.0.0.0", "tcp:0:interface=127.0.0.1"]})
        texts = [formatEvent(e) for e in self.events if e.get("log_format") == "{warning}"]
        self.assertEqual(len(texts), 1, texts)  # the loopback listener is not named
        self.assertIn("no TLS certificate configured: passwords cross tcp:0:interface=0.0.0.0 in plaintext",
                      texts[0])
        ev = next(e for e in self.events if e.get("log_format") == "{warning}")
        self.assertEqual(ev["endpoint"], "tcp:0:interface=0.0.0.0")
