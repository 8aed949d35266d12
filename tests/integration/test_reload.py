"""Reload without a restart: each reloadable setting takes effect, a bad
config is refused as a whole, listener changes are reported (issue 7).

The relay runs in-process from a real config file; each test edits the file
and calls service.reload() (what SIGHUP and ``relayctl reload`` do; both are
also exercised against real processes in test_operations.py and
test_relayctl_queue.py), then checks the effect over real sockets.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from relay import config as configmod
from relay.mailbox import users as usersmod
from tests.support.relay import InProcessRelay, base_config, deep_merge, free_port, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll


class Reload(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-reload-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.port = free_port(("127.0.0.2", "127.0.0.3"))
        self.sinks = {ip: Sink(ip, port=self.port).start() for ip in ("127.0.0.2", "127.0.0.3")}
        for s in self.sinks.values():
            self.addCleanup(s.stop)
        self.data = deep_merge(base_config(self.tmp), {
            "relay": {"networks": ["10.9.0.0/16"], "smarthost": f"127.0.0.2:{self.port}"},
            "delivery": {"retry_min": 1, "retry_max": 1},
        })
        self.path = os.path.join(self.tmp, "relay.toml")
        self.write()
        self.relay = InProcessRelay(self.tmp, {})
        self.relay.config = configmod.load(self.path)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.svc = self.relay.service

    def write(self, **changes):
        self.data = deep_merge(self.data, changes)
        with open(self.path, "w") as f:
            f.write(toml_dumps(self.data))

    def reload(self, **changes):
        self.write(**changes)
        r = self.svc.reload()
        self.assertTrue(r["ok"], r)
        return r

    def session(self, fn):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("x")
                return fn(s)

        return in_thread(run)

    async def rcpt(self, addr, sender="a@b.example"):
        def fn(s):
            s.mail(sender)
            return s.rcpt(addr)[0]

        return await self.session(fn)

    async def test_networks_domains_users_aliases(self):
        self.assertEqual(await self.rcpt("x@far.example"), 554)
        self.assertEqual(await self.rcpt("x@backup.example"), 554)
        self.assertEqual(await self.rcpt("bob@new.test"), 554)
        newusers = os.path.join(self.tmp, "users2")
        usersmod.add_user(newusers, "bob@new.test", "pw")
        aliases = os.path.join(self.tmp, "aliases")
        with open(aliases, "w") as f:
            f.write("sales: bob@new.test\n")
        r = self.reload(relay={"networks": ["127.0.0.0/8"], "domains": ["backup.example"]},
                        local={"domains": ["local.test", "new.test"], "users": newusers, "aliases": aliases})
        self.assertIn("relay", r["messages"][0])
        self.assertEqual(await self.rcpt("x@far.example"), 250)
        self.assertEqual(await self.rcpt("x@backup.example"), 250)
        self.assertEqual(await self.rcpt("bob@new.test"), 250)
        self.assertEqual(await self.rcpt("sales@new.test"), 250)
        self.assertEqual(await self.rcpt("alice@local.test"), 550)  # not in the new users file

    async def test_limits(self):
        def ehlo_size(s):
            return s.esmtp_features.get("size")

        self.assertEqual(await self.session(ehlo_size), "36700160")
        self.reload(smtp={"max_message_size": 5000, "max_recipients": 2, "timeout": "1m"})
        self.assertEqual(await self.session(ehlo_size), "5000")

        def many(s):
            s.mail("a@b.example")
            return [s.rcpt("alice@local.test")[0], s.rcpt("postmaster@local.test")[0],
                    s.rcpt("x@local.test")[0]]

        self.assertEqual(await self.session(many), [250, 250, 452])
        self.assertEqual(self.svc.smtp_ctx.config.smtp.timeout, 60)

    async def test_smarthost_routes_and_delivery_settings(self):
        def send(rcpt):
            def fn(s):
                return s.sendmail("me@local.test", [rcpt], b"Subject: r\r\n\r\nx\r\n")

            return self.session(fn)

        self.reload(relay={"networks": ["127.0.0.0/8"]})
        await send("a@one.example")
        await apoll(lambda: self.sinks["127.0.0.2"].transactions, what="delivery to the first smarthost")
        self.reload(relay={"smarthost": f"127.0.0.3:{self.port}",
                           "routes": {"routed.example": f"127.0.0.2:{self.port}"}},
                    delivery={"max_concurrency": 7, "max_per_destination": 3, "retry_min": 2, "retry_max": 4})
        await send("b@two.example")
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, what="delivery to the new smarthost")
        await send("c@routed.example")
        await apoll(lambda: len(self.sinks["127.0.0.2"].transactions) == 2, what="delivery by the new route")
        q = self.svc.queue
        self.assertEqual((q.remote.limit, q.remote.per_dest), (7, 3))
        self.assertEqual(q.config.delivery.retry_min, 2)

    async def test_bad_config_refused_whole_and_listeners_reported(self):
        before = self.svc.config
        self.write(delivery={"retry_min": "soon"})
        r = self.svc.reload()
        self.assertFalse(r["ok"])
        self.assertTrue(any("delivery.retry_min" in m for m in r["messages"]))
        self.assertIs(self.svc.config, before)
        # a users file that cannot be read refuses the reload too
        bad_users = os.path.join(self.tmp, "users-bad")
        with open(bad_users, "w") as f:
            f.write("not a users line\n")
        self.write(local={"users": bad_users}, delivery={"retry_min": 1})
        r = self.svc.reload()
        self.assertFalse(r["ok"])
        self.assertIs(self.svc.config, before)
        # a listener change is accepted but needs a restart
        self.write(local={"users": os.path.join(self.tmp, "users")},
                   smtp={"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]})
        r = self.svc.reload()
        self.assertTrue(r["ok"])
        self.assertEqual(r["restart_needed"], ["smtp.listen"])
        self.assertEqual(self.svc.config.smtp.listen, before.smtp.listen)

    async def test_workers_change_needs_a_restart(self):
        # the number of processes is fixed at start: reported, kept as it runs
        r = self.reload(workers=2)
        self.assertEqual(r["restart_needed"], ["workers"])
        self.assertIn("workers changed: takes effect after a restart", r["messages"])
        self.assertEqual(self.svc.config.workers, 1)
