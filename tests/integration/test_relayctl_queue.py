"""relayctl against ``twistd relay`` processes: the whole story of a queue.

The relay is a real process; the next hop is a scripted sink in the test
process (trial reactor), relayctl a subprocess run in a thread.  One flow
goes through what an administrator meets: a deferred message seen in the
table, the JSON and ``show`` (which agrees with the relay's log), a hung
relay (SIGSTOP) reported plainly, a crashed relay (SIGKILL) whose queue is
then handled offline and whose stale socket does not stop the restart, and
the retry that finally delivers.  Another checks that a relay started while
an offline relayctl holds the spool lock waits for it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import smtplib
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.relay import RelayProcess, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll, poll
from tests.test_control import json_lines, run_ctl


class RelayctlProcess(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-ctlp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.sink = Sink("127.0.0.2", rcpt_replies={"b@sink.test": "451 4.2.0 mailbox busy"}).start()
        self.addCleanup(lambda: self.sink.stop())
        self.port = free_port()
        data = {
            "hostname": "relay.test",
            "spool": os.path.join(self.tmp, "spool"),
            "workers": 1,
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]},
            "pop3": {"listen": []},
            "local": {"domains": ["local.test"], "mailboxes": os.path.join(self.tmp, "mail"),
                      "users": os.path.join(self.tmp, "users")},
            "relay": {"routes": {"sink.test": f"127.0.0.2:{self.sink.port}"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5},
        }
        self.proc = RelayProcess(self.tmp, data)
        self.addCleanup(self.proc.stop)

    def start(self):
        return in_thread(self.proc.start, ("127.0.0.1", self.port))

    def ctl(self, *args, env=None):
        return in_thread(run_ctl, self.proc.config_path, *args, env=env)

    def send(self, rcpt: str):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt(rcpt)
                code, resp = s.data(b"Subject: process test\r\n\r\nbody\r\n")
                assert code == 250
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    async def records(self) -> dict:
        r = await self.ctl("queue", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        return {d["queue_id"]: d for d in json_lines(r.stdout)}

    async def test_a_queue_through_hang_crash_and_restart(self):
        await self.start()
        qid = await self.send("b@sink.test")

        async def deferred():
            recs = await self.records()
            return qid in recs and recs[qid]["queue_name"] == "deferred"

        await apoll(lambda: defer.ensureDeferred(deferred()), what="the deferral")
        r = await self.ctl("queue")
        self.assertIn(qid, r.stdout)
        self.assertIn("451 4.2.0 mailbox busy", r.stdout)

        # `queue show` and the log tell the same story
        r = await self.ctl("queue", "show", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        logged = [ln for ln in self.proc.log().splitlines() if f"{qid}: to=<b@sink.test>" in ln]
        self.assertEqual(len(logged), 1, self.proc.log())
        m = re.search(r"(to=<b@sink\.test>, relay=\S+, delay=[\d.]+, status=deferred \(.*\))$", logged[0])
        self.assertIsNotNone(m, logged[0])
        self.assertIn(m.group(1), r.stdout)

        r = await self.ctl("status", "--json")
        st = json.loads(r.stdout)
        self.assertEqual((st["running"], st["pid"]), (True, self.proc.proc.pid))
        self.assertEqual(st["queue"]["deferred"], 1)
        self.assertEqual(st["counters"]["received"], 1)

        # a relay that hangs is reported plainly
        self.proc.proc.send_signal(signal.SIGSTOP)
        try:
            r = await self.ctl("queue", env={"RELAYCTL_TIMEOUT": "1"})
        finally:
            self.proc.proc.send_signal(signal.SIGCONT)
        self.assertEqual(r.returncode, 1)
        self.assertIn("the relay does not answer on its control socket", r.stderr)
        self.assertEqual(r.stdout, "")

        # crash: the socket file stays, nothing listens; relayctl works on the spool
        self.proc.kill()
        sock = os.path.join(self.tmp, "spool", "control.sock")
        self.assertTrue(os.path.exists(sock))
        r = await self.ctl("status")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Relay:      not running", r.stdout)
        self.assertIn("1 message (0 active, 1 deferred, 0 on hold)", r.stdout)
        r = await self.ctl("queue", "hold", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: on hold\n"))
        self.assertEqual((await self.records())[qid]["queue_name"], "hold")

        # restart over the stale socket: the hold survived, the relay answers again
        await self.start()
        self.assertIn("removed stale control socket", self.proc.log())
        self.assertEqual((await self.records())[qid]["queue_name"], "hold")
        self.sink.b.rcpt_replies = {}
        r = await self.ctl("queue", "release", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = await self.ctl("queue", "retry", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        await apoll(lambda: self.sink.delivered_to() == ["b@sink.test"], timeout=30, what="delivery")
        await apoll(lambda: in_thread(lambda: run_ctl(self.proc.config_path, "queue").stdout
                                      == "Mail queue is empty\n"), what="an empty queue")
        show = await self.ctl("queue", "show", qid)
        self.assertEqual(show.returncode, 1)
        self.assertIn(f"{qid}: no such message in the queue", show.stderr)

        # a clean stop removes the socket
        await in_thread(self.proc.stop)
        self.assertFalse(os.path.exists(sock))

    async def test_reload(self):
        await self.start()
        path = self.proc.config_path
        with open(path) as f:
            good = f.read()
        # a reloadable change: takes effect, said by relayctl
        with open(path, "w") as f:
            f.write(good.replace('retry_min = "1h"', 'retry_min = "30m"'))
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"config reloaded from {path}; changed: delivery", r.stderr)
        # a listener change needs a restart: said, and exit 0
        with open(path, "w") as f:
            f.write(good.replace(f"tcp:{self.port}:", f"tcp:{self.port + 1}:"))
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("smtp.listen changed: takes effect after a restart", r.stderr)
        # a bad config is refused as a whole, with the reason; the relay keeps running
        with open(path, "w") as f:
            f.write(good.replace('retry_min = "1h"', 'retry_min = "soon"'))
        r = await self.ctl("reload")
        self.assertEqual(r.returncode, 1)
        self.assertIn("reload refused, the running config is kept", r.stderr)
        self.assertIn("delivery.retry_min", r.stderr)
        with open(path, "w") as f:
            f.write(good)
        r = await self.ctl("status")
        self.assertEqual(r.returncode, 0, r.stderr)

    async def test_relay_start_waits_for_an_offline_relayctl(self):
        spool = os.path.join(self.tmp, "spool")
        os.makedirs(spool, mode=0o700)
        fd = os.open(os.path.join(spool, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # what relayctl holds while it changes the spool
        try:
            self.proc.start()
            # its listeners are bound (privilegedStartService); then it takes the spool lock
            await in_thread(poll, lambda: "SMTPFactory starting on" in self.proc.log(), 20,
                            what="the relay to bind its listeners")
            self.assertIsNone(self.proc.proc.poll())
            self.assertNotIn("twisted-relay starting", self.proc.log())
            self.assertFalse(os.path.exists(os.path.join(spool, "control.sock")))
        finally:
            os.close(fd)
        await in_thread(poll, lambda: RelayProcess._connectable("127.0.0.1", self.port), 20,
                        what="the relay to start")
        r = await self.ctl("status")
        self.assertEqual(r.returncode, 0, r.stderr)
