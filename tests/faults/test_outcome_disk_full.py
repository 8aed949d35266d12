"""A delivered recipient is recorded even when the disk is full at that moment.

The relay is a real process whose spool is on a small tmpfs
(tests.support.smallfs); its state-file writes pass a gate the test holds
(tests.support.gate), so the disk is filled exactly between the next hop's
250 and the write that records it.  That write fails (ENOSPC); once space is
back the relay must write the same outcome (it was kept, not dropped), so
after a crash and restart the delivered recipient never gets a second copy.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import tempfile

from twisted.trial import unittest

from tests.support.gate import GatedRelayProcess
from tests.support.relay import free_port, in_thread
from tests.support.sink import Sink
from tests.support.smallfs import SmallFS
from tests.support.wait import apoll
from tests.test_control import run_ctl


class OutcomeOnAFullDisk(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-outfull-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.fs = SmallFS(os.path.join(self.tmp, "spoolfs"), size="4m").mount()
        self.addCleanup(self.fs.umount)
        self.sink = Sink("127.0.0.2", rcpt_replies={"b@sink.test": "451 4.2.0 busy"}).start()
        self.addCleanup(self.sink.stop)
        self.port = free_port()
        self.spool = os.path.join(self.fs.path, "spool")
        self.proc = GatedRelayProcess(self.tmp, {
            "hostname": "relay.test",
            "spool": self.spool,
            "workers": 1,
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]},
            "pop3": {"listen": []},
            "local": {"domains": ["local.test"], "mailboxes": os.path.join(self.tmp, "mail"),
                      "users": os.path.join(self.tmp, "users")},
            "relay": {"routes": {"sink.test": f"127.0.0.2:{self.sink.port}"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5},
        })
        self.addCleanup(self.proc.stop)
        self.addCleanup(self.fs.free)
        self.addCleanup(self.proc.gate.open)

    def start(self):
        return in_thread(self.proc.start, ("127.0.0.1", self.port))

    def send(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt("a@sink.test")
                s.rcpt("b@sink.test")
                code, resp = s.data(b"Subject: full\r\nMessage-ID: <full@client.test>\r\n\r\nbody\r\n")
                assert code == 250
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    def recorded(self, qid: str) -> dict:
        try:
            with open(os.path.join(self.spool, "queue", qid + ".state"), "rb") as f:
                d = json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return {}
        return {r["a"]: r["s"] for r in d["rcpt"]}

    async def test_the_outcome_is_written_once_space_is_back(self):
        await self.start()
        self.proc.gate.close()
        qid = await self.send()
        await apoll(lambda: qid in self.proc.gate.waiting(), timeout=20, what="the outcome's write at the gate")
        self.assertEqual(self.sink.delivered_to(), ["a@sink.test"])
        self.fs.fill()
        self.proc.gate.open()
        await apoll(lambda: f"{qid}: cannot record the outcome" in self.proc.log(), timeout=20,
                    what="the failed write")
        self.fs.free()
        # the write is made again (after relay.queue.manager.FINALIZE_RETRY) with the outcome kept in memory
        await apoll(lambda: self.recorded(qid).get("a@sink.test") == "delivered", timeout=40,
                    what="a@ recorded as delivered")
        self.assertEqual(self.recorded(qid)["b@sink.test"], "deferred")
        # a crash, a restart, the next hop takes b@ now: a@ is not sent again
        await in_thread(self.proc.kill)
        self.sink.b.rcpt_replies = {}
        await self.start()
        r = await in_thread(run_ctl, self.proc.config_path, "queue", "retry", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        await apoll(lambda: "b@sink.test" in self.sink.delivered_to(), timeout=20, what="b@ delivered")
        await apoll(lambda: not os.path.exists(os.path.join(self.spool, "queue", qid)), what="the removal")
        self.assertEqual(sorted(self.sink.delivered_to()), ["a@sink.test", "b@sink.test"])
