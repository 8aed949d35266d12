"""The CA files of outbound TLS (a delivery.tls_policy entry's ca_file,
relay.upstreams.NAME.ca_file, relay.smarthost_ca_file) are checked at start
and at a reload, as delivery.mta_sts_ca_file is: a missing, unreadable or
empty one refuses the start (or the reload) with a line naming the key and
the file, instead of a traceback and a deferred recipient at delivery."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

from twisted.trial import unittest as trial

from relay import config as configmod
from relay.common.errors import StartupError
from relay.runtime import parts
from relay.runtime.service import RelayService
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, base_config, deep_merge, toml_dumps

POLICY_KEY = 'delivery.tls_policy."bank.example".ca_file'
UPSTREAM_KEY = "relay.upstreams.office.ca_file"
SMARTHOST_KEY = "relay.smarthost_ca_file"


class CAFiles(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-cafiles-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.good = cert_files("mx.bank.example").ca_pem
        self.missing = os.path.join(self.tmp, "missing.pem")
        self.empty = os.path.join(self.tmp, "empty.pem")
        with open(self.empty, "w") as f:
            f.write("not a certificate\n")
        self.unreadable = os.path.join(self.tmp, "a-directory.pem")  # root reads any mode: a directory fails
        os.mkdir(self.unreadable)

    def data(self, policy: str, upstream: str, smarthost: str) -> dict:
        return deep_merge(base_config(self.tmp), {
            "delivery": {"tls_policy": {"bank.example": {"level": "verify", "ca_file": policy}}},
            "relay": {"smarthost": "smtp.example.net:587", "smarthost_tls": "verify", "smarthost_ca_file": smarthost,
                      "upstreams": {"office": {"hosts": "smtp1.example.net:587", "ca_file": upstream}}}})

    def config(self, policy: str, upstream: str, smarthost: str) -> configmod.Config:
        return configmod.load(None, data=self.data(policy, upstream, smarthost))

    def test_good_files_pass(self):
        cfg = self.config(self.good, self.good, self.good)
        self.assertEqual(parts.delivery_ca_problems(cfg), [])
        parts.check_delivery_ca_files(cfg)
        files, problems = parts.load_files(cfg)
        self.assertEqual(problems, [])
        self.assertIsNotNone(files)

    def test_each_bad_file_is_named_with_its_key(self):
        cfg = self.config(self.missing, self.empty, self.unreadable)
        problems = parts.delivery_ca_problems(cfg)
        self.assertEqual(len(problems), 3, problems)
        self.assertIn(f"{POLICY_KEY}: {self.missing}: No such file or directory", problems[0])
        self.assertIn(f"{UPSTREAM_KEY}: {self.empty}: no PEM certificate in it", problems[1])
        self.assertIn(f"{SMARTHOST_KEY}: {self.unreadable}: Is a directory", problems[2])
        for p in problems:
            self.assertNotIn("Traceback", p)
        with self.assertRaises(parts.PartError) as e:
            parts.check_delivery_ca_files(cfg)
        for p in problems:
            self.assertIn(p, str(e.exception))

    def test_unset_files_are_not_checked(self):
        cfg = configmod.load(None, data=base_config(self.tmp))
        self.assertEqual(parts.delivery_ca_files(cfg), [])
        self.assertEqual(parts.delivery_ca_problems(cfg), [])

    def test_start_is_refused_naming_the_key_and_the_file(self):
        for policy, upstream, smarthost, key, path in (
                (self.missing, self.good, self.good, POLICY_KEY, self.missing),
                (self.good, self.empty, self.good, UPSTREAM_KEY, self.empty),
                (self.good, self.good, self.unreadable, SMARTHOST_KEY, self.unreadable)):
            with self.assertRaises(StartupError) as cm:
                RelayService(self.config(policy, upstream, smarthost), deliver=False)
            self.assertIn(f"{key}: {path}", str(cm.exception))


class CAFilesReload(trial.TestCase):
    async def test_reload_is_refused_naming_the_key_and_the_file(self):
        tmp = tempfile.mkdtemp(prefix="relay-cafiles-reload-")
        self.addCleanup(shutil.rmtree, tmp, True)
        good = cert_files("smtp1.example.net").ca_pem
        empty = os.path.join(tmp, "empty.pem")
        with open(empty, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\n")
        data = deep_merge(base_config(tmp), {
            "relay": {"upstreams": {"office": {"hosts": "smtp1.example.net:587", "ca_file": good}}}})
        path = os.path.join(tmp, "relay.toml")
        with open(path, "w") as f:
            f.write(toml_dumps(data))
        relay = InProcessRelay(tmp, {})
        relay.config = configmod.load(path)
        await relay.start()
        self.addCleanup(relay.stop)
        svc = relay.service
        with open(path, "w") as f:
            f.write(toml_dumps(deep_merge(data, {"relay": {"upstreams": {"office": {"ca_file": empty}}}})))
        r = svc.reload()
        self.assertFalse(r["ok"], r)
        self.assertTrue(any(f"{UPSTREAM_KEY}: {empty}: no PEM certificate" in m for m in r["messages"]), r)
        self.assertEqual(svc.config.relay.upstreams[0].ca_file, good)  # the running config is kept
        with open(path, "w") as f:
            f.write(toml_dumps(data))
        self.assertTrue(svc.reload()["ok"])
