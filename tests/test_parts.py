"""relay.runtime.parts: the parts made from a config, the same for the
running relay (start and reload) and for relayctl's offline ``route``."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from relay import config as configmod
from relay.control import route as routecheck
from relay.intake import aliases as aliasesmod
from relay.mailbox import users as usersmod
from relay.runtime import parts
from tests.support.relay import base_config, deep_merge


class Parts(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-parts-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.aliases = os.path.join(self.tmp, "aliases")
        with open(self.aliases, "w") as f:
            f.write("team: alice, bob@far.example\n")

    def config(self, **changes) -> configmod.Config:
        data = deep_merge(base_config(self.tmp), {"local": {"aliases": self.aliases},
                                                  "smtp": {"listen": ["tcp:2525:interface=127.0.0.9"],
                                                           "submission": ["tcp:2587:interface=127.0.0.9"]}})
        return configmod.load(None, data=deep_merge(data, changes))

    def test_files_load(self):
        files, problems = parts.load_files(self.config())
        self.assertEqual(problems, [])
        self.assertTrue(files.users.exists("alice@local.test"))
        self.assertTrue(files.aliases.map.has("team@local.test"))
        self.assertIsNone(files.tls)

    def test_every_problem_at_once(self):
        bad = os.path.join(self.tmp, "users-bad")
        with open(bad, "w") as f:
            f.write("not a users line\n")
        bad_aliases = os.path.join(self.tmp, "aliases-bad")
        with open(bad_aliases, "w") as f:
            f.write("no colon here\n")
        cfg = self.config(local={"users": bad, "aliases": bad_aliases})
        files, problems = parts.load_files(cfg)
        self.assertIsNone(files)
        self.assertEqual(len(problems), 2)
        with self.assertRaises(parts.PartError) as e:
            parts.load_users(cfg)
        self.assertEqual(str(e.exception), problems[0])  # the users file first, then the aliases
        self.assertIn("aliases-bad", problems[1])

    def test_own_listeners(self):
        ls = parts.own_listeners(self.config())
        self.assertEqual(ls.pairs, [("127.0.0.9", 2525), ("127.0.0.9", 2587)])
        self.assertTrue(ls.is_self("127.0.0.9", 2587))

    def test_expand(self):
        """The expander the running relay and the offline route both use."""
        cfg = self.config()
        files, _ = parts.load_files(cfg)
        ex = aliasesmod.Expander(local_domains=cfg.local.domains, aliases=files.aliases, users=files.users)
        self.assertEqual(ex.expand("x@far.example"), [("x@far.example", "x@far.example")])
        self.assertEqual(sorted(a for a, _ in ex.expand("team@local.test")), ["alice@local.test", "bob@far.example"])

    def test_offline_route_context(self):
        ctx = parts.offline_route_context(self.config())
        r = routecheck.explain(ctx, "alice@local.test")
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["deliveries"][0]["kind"], "local")
        r = routecheck.explain(ctx, "nobody@local.test")
        self.assertFalse(r["accepted"])
        self.assertTrue(ctx.is_self("127.0.0.9", 2525))
