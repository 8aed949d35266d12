"""``relayctl --fleet``: three relays (127.0.0.1, .3, .4), one of them stopped, seen as one.

Each node is an in-process relay with its own spool and control socket; its
mail for dead.test waits (the next hop is a closed port).  relayctl reads a
config whose control.fleet names the three sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import tempfile

from twisted.trial import unittest

from relay import config as configmod
from relay.admin import client as cc
from relay.control import proto as ctlproto
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, free_port, in_thread, toml_dumps
from tests.support.wait import apoll
from tests.test_control import json_lines, run_ctl


class Fleet(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-fleet-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.nodes = {}
        dead = free_port(("127.0.0.2",))
        for name, ip in (("n1", "127.0.0.1"), ("n2", "127.0.0.3"), ("n3", "127.0.0.4")):
            d = os.path.join(self.tmp, name)
            os.makedirs(d)
            r = InProcessRelay(d, {"hostname": f"{name}.test", "relay": {"routes": {"dead.test": f"127.0.0.2:{dead}"}},
                                   "delivery": {"retry_min": "1h", "retry_max": "2h"}}, ip=ip)
            await r.start()
            self.addCleanup(r.stop)
            self.nodes[name] = r
        self.cfg = os.path.join(self.tmp, "fleet.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps({"spool": os.path.join(self.tmp, "nospool"),
                                "control": {"fleet": {n: r.config.control_socket for n, r in self.nodes.items()}}}))

    def send(self, node: str, rcpt: str):
        def run() -> str:
            with smtplib.SMTP(*self.nodes[node].smtp) as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt(rcpt)
                code, resp = s.data(b"Subject: fleet\r\n\r\nbody\r\n")
                assert code == 250, resp
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    def ctl(self, *args):
        return in_thread(run_ctl, self.cfg, *args)

    async def test_merged_queue_and_status_with_a_node_down(self):
        q1 = await self.send("n1", "a@dead.test")
        q2 = await self.send("n2", "b@dead.test")
        for name, qid in (("n1", q1), ("n2", q2)):
            q = self.nodes[name].service.queue
            await apoll(lambda q=q, qid=qid: qid in q.messages and q.messages[qid].state.recipients[0].attempts,
                        what="attempted")
        r = await self.ctl("--fleet", "status")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Fleet:      3 of 3 nodes up", r.stdout)
        await self.nodes["n3"].stop()

        r = await self.ctl("--fleet", "queue", "--json")
        self.assertEqual(r.returncode, 1)
        recs = {d["queue_id"]: d for d in json_lines(r.stdout)}
        self.assertEqual({q: d["node"] for q, d in recs.items()}, {q1: "n1", q2: "n2"})
        self.assertIn("node n3: down", r.stderr)

        r = await self.ctl("--fleet", "queue")
        self.assertEqual(r.returncode, 1)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].startswith("Node -Queue ID-"), r.stdout)
        self.assertTrue(any(ln.startswith(f"n1   {q1}") for ln in lines), r.stdout)
        self.assertTrue(any(ln.startswith(f"n2   {q2}") for ln in lines), r.stdout)
        self.assertTrue(any(ln.strip() == "a@dead.test  (deferred, 1 attempt, next " + ln.split("next ")[-1]
                            for ln in lines if "a@dead.test" in ln), r.stdout)
        self.assertIn("in 2 messages", lines[-1])

        r = await self.ctl("--fleet", "status")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Node:       n3 (down:", r.stdout)
        self.assertIn("Node:       n1 (up)\nRelay:      running", r.stdout)
        self.assertIn("Fleet:      2 of 3 nodes up; down: n3", r.stdout)
        r = await self.ctl("--fleet", "status", "--json")
        self.assertEqual(r.returncode, 1)
        s = json.loads(r.stdout)
        self.assertEqual(s["down"], ["n3"])
        self.assertEqual([n["node"] for n in s["nodes"]], ["n1", "n2", "n3"])
        self.assertEqual(s["nodes"][1]["status"]["queue"]["total"], 1)
        self.assertEqual(s["nodes"][1]["status"]["hostname"], "n2.test")

    async def test_without_nodes_and_actions(self):
        with open(self.cfg, "w") as f:
            f.write(toml_dumps({"spool": os.path.join(self.tmp, "nospool")}))
        r = await self.ctl("--fleet", "status")
        self.assertEqual(r.returncode, 2)
        self.assertIn("set control.fleet", r.stderr)
        r = await self.ctl("--fleet", "queue", "delete", "--all")
        self.assertEqual(r.returncode, 2)
        self.assertIn("only the listing", r.stderr)


class FleetOverTCP(unittest.TestCase):
    """A node reached by its authenticated TCP control endpoint (control.tcp_listen on
    127.0.0.5: TLS with a test CA's certificate, the shared secret first), next to one
    reached by its UNIX socket."""

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-fleettcp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.certs = cert_files("127.0.0.5")
        self.secret = os.path.join(self.tmp, "fleet.secret")
        with open(self.secret, "w") as f:
            f.write("a-long-enough-fleet-secret\n")
        os.chmod(self.secret, 0o600)
        self.port = free_port(("127.0.0.5",))
        d = os.path.join(self.tmp, "n1")
        os.makedirs(d)
        self.relay = InProcessRelay(d, {
            "hostname": "n1.test", "tls": {"certificate": self.certs.cert_pem, "key": self.certs.key_pem},
            "control": {"tcp_listen": f"127.0.0.5:{self.port}", "secret_file": self.secret}}, ip="127.0.0.5")
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        d2 = os.path.join(self.tmp, "n2")
        os.makedirs(d2)
        self.other = InProcessRelay(d2, {"hostname": "n2.test"}, ip="127.0.0.3")
        await self.other.start()
        self.addCleanup(self.other.stop)

    def write_cfg(self, secret_file: str) -> str:
        path = os.path.join(self.tmp, "fleet.toml")
        with open(path, "w") as f:
            f.write(toml_dumps({"spool": os.path.join(self.tmp, "nospool"), "control": {
                "fleet": {"n1": f"tls:127.0.0.5:{self.port}", "n2": self.other.config.control_socket},
                "secret_file": secret_file, "fleet_ca_file": self.certs.ca_pem}}))
        return path

    async def test_status_over_tls_with_the_secret(self):
        r = await in_thread(run_ctl, self.write_cfg(self.secret), "--fleet", "status", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)
        self.assertEqual(s["down"], [])
        self.assertEqual(s["nodes"][0]["status"]["hostname"], "n1.test")
        r = await in_thread(run_ctl, self.write_cfg(self.secret), "--fleet", "queue")
        self.assertEqual((r.returncode, r.stdout), (0, "Mail queue is empty\n"), r.stderr)

    async def test_wrong_secret_no_secret_and_plaintext_are_refused(self):
        wrong = os.path.join(self.tmp, "wrong.secret")
        with open(wrong, "w") as f:
            f.write("not-the-fleet-secret-at-all\n")
        r = await in_thread(run_ctl, self.write_cfg(wrong), "--fleet", "status")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Node:       n1 (down: wrong secret)", r.stdout)
        self.assertIn("Node:       n2 (up)", r.stdout)

        def without_login():
            c = cc.Client.connect_tls("127.0.0.5", self.port, 10, secret=None, ca_file=self.certs.ca_pem)
            try:
                c.call(ctlproto.STATUS)
            finally:
                c.close()

        e = await self.assertFailure(in_thread(without_login), cc.RemoteError)
        self.assertEqual(e.code, "NOT_AUTHENTICATED")

        def plaintext():
            s = socket.create_connection(("127.0.0.5", self.port), timeout=5)
            c = cc.Client(s, "plain", 3)
            try:
                c.call(ctlproto.HELLO)
            finally:
                c.close()

        await self.assertFailure(in_thread(plaintext), cc.ControlError)

        def unverified():
            cc.Client.connect_tls("127.0.0.5", self.port, 10, secret="x", ca_file=None)

        e2 = await self.assertFailure(in_thread(unverified), cc.ControlError)
        self.assertIn("TLS to the control endpoint", str(e2))

    def test_config_refuses_plaintext_and_missing_parts(self):
        with self.assertRaises(configmod.ConfigError) as ctx:
            configmod.load(None, data={"control": {"tcp_listen": "127.0.0.1:9026"}})
        text = str(ctx.exception)
        self.assertIn("control.tcp_listen: needs tls.certificate and tls.key", text)
        self.assertIn("control.tcp_listen: needs control.secret_file", text)
        with self.assertRaises(configmod.ConfigError) as ctx:
            configmod.load(None, data={"control": {"fleet": {"n1": "tcp:10.0.0.1:9026"}}})
        self.assertIn("control.fleet", str(ctx.exception))
