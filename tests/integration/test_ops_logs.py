"""The story of a message in the log: ``twistd relay`` as a real process,
with ``[log] format = "json"`` (one JSON object per line) and the default
text lines, for the same traffic: received over STARTTLS, delivered by a
route to a real SMTP server, one recipient bounced (a DSN), one deferred,
one rejected at RCPT, and the message removed."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys

from twisted.trial import unittest

from tests.support.certs import cert_files
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll, poll


class LogStory(unittest.TestCase):
    fmt = "text"

    async def setUp(self):
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="relay-logs-")
        self.sink = Sink("127.0.0.2", rcpt_replies={"bad@remote.example": "550 5.1.1 no such user",
                                                     "later@remote.example": "451 4.3.0 try later"}).start()
        self.addCleanup(self.sink.stop)
        cert = cert_files("localhost", "127.0.0.1")
        self.ca = cert.ca_pem
        self.port = free_port()
        dest = f"127.0.0.2:{self.sink.port}"
        data = deep_merge(base_config(self.tmp), {
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]},
            "tls": {"certificate": cert.cert_pem, "key": cert.key_pem},
            "relay": {"routes": {"remote.example": dest, "client.example": dest}},
            "delivery": {"retry_min": "1h", "retry_max": "1h", "tls": "none"},
            "log": {"format": self.fmt},
        })
        self.relay = RelayProcess(self.tmp, data)
        self.relay.start(wait_for=("127.0.0.1", self.port))
        # in a thread: the sink runs on this reactor and must keep answering
        # the deliveries in flight while the relay stops
        self.addCleanup(lambda: in_thread(self.relay.stop))

    def send(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.ehlo("client.example")
                s.starttls(context=ssl.create_default_context(cafile=self.ca))
                s.ehlo("client.example")
                s.mail("sender@client.example")
                for r in ("ok@remote.example", "bad@remote.example", "later@remote.example"):
                    assert s.rcpt(r)[0] == 250
                assert s.rcpt("nobody@local.test")[0] == 550
                code, resp = s.data(b"Subject: story\r\n\r\nhello\r\n")
                assert code == 250, resp
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    async def story(self):
        qid = await self.send()
        await apoll(lambda: "later@remote.example" in self.relay.log() and "notification" in self.relay.log(),
                    20, what="the delivery attempts in the log")
        return qid


class JSONLines(LogStory):
    fmt = "json"

    async def test_every_line_is_json_and_carries_the_fields(self):
        qid = await self.story()
        await apoll(lambda: self.sink.delivered_to().count("sender@client.example") == 1, 20,
                    what="the DSN delivered")
        lines = self.relay.log().splitlines()
        events = [json.loads(ln) for ln in lines]  # every line parses
        for e in events:
            assert {"timestamp", "level", "namespace", "text"} <= set(e), e
        mine = [e for e in events if e.get("queue_id") == qid]
        received = [e for e in mine if "client_ip" in e and "size" in e]
        assert len(received) == 1, mine
        r = received[0]
        assert r["client_ip"] == "127.0.0.1" and r["helo"] == "client.example"
        assert r["sender"] == "sender@client.example" and r["nrcpt"] == 3 and r["size"] > 0
        assert r["tls"].startswith("TLSv1") and r["proto"] == "ESMTPS"
        assert r["text"].startswith(f"{qid}: client=client.example[127.0.0.1], from=<sender@client.example>")
        attempts = {e["to"]: e for e in mine if "status" in e and "to" in e}
        assert set(attempts) == {"ok@remote.example", "bad@remote.example", "later@remote.example"}
        relay = f"127.0.0.2[127.0.0.2]:{self.sink.port}"
        for to, status, reply in (("ok@remote.example", "sent", "250"), ("bad@remote.example", "bounced", "550"),
                                  ("later@remote.example", "deferred", "451")):
            a = attempts[to]
            assert a["relay"] == relay and a["status"] == status and f" said: {reply} " in a["reply"], a
            assert isinstance(a["delay"], float) and a["level"] == "info" and a["namespace"] == "relay.queue"
        dsn = [e for e in mine if "dsn_id" in e]
        assert len(dsn) == 1 and dsn[0]["kind"] == "non-delivery"
        dsn_story = [e for e in events if e.get("queue_id") == dsn[0]["dsn_id"]]
        assert any(e.get("sender") == "" and e.get("orig") == qid for e in dsn_story)
        reject = [e for e in events if e.get("reason") == "unknown_user"]
        assert len(reject) == 1 and reject[0]["client_ip"] == "127.0.0.1"
        assert reject[0]["rcpt"] == "nobody@local.test" and reject[0]["text"].startswith("reject: RCPT from")

    async def test_removed_is_logged(self):
        def run():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                return s.sendmail("sender@client.example", ["ok@remote.example"], b"Subject: x\r\n\r\ny\r\n")

        await in_thread(run)
        await apoll(lambda: "removed" in self.relay.log(), 20, what="the removal")
        events = [json.loads(ln) for ln in self.relay.log().splitlines()]
        (removed,) = [e for e in events if e.get("why") == "all recipients final"]
        story = [e for e in events if e.get("queue_id") == removed["queue_id"]]
        assert [e.get("status") for e in story if "status" in e] == ["sent"]
        assert "client_ip" in story[0] and story[-1] is removed


class TextLines(LogStory):
    fmt = "text"

    async def test_the_same_story_in_text(self):
        qid = await self.story()
        text = self.relay.log()
        with self.assertRaises(ValueError):
            json.loads(text.splitlines()[0])
        relay = f"127.0.0.2[127.0.0.2]:{self.sink.port}"
        mine = [ln for ln in text.splitlines() if qid in ln]
        assert any(f"{qid}: client=client.example[127.0.0.1], from=<sender@client.example>, size=" in ln
                   and "nrcpt=3, tls=TLSv1" in ln for ln in mine), mine
        said = "host 127.0.0.2[127.0.0.2] said:"
        assert any(f"to=<ok@remote.example>, relay={relay}, delay=" in ln and f"status=sent ({said} 250" in ln
                   for ln in mine)
        assert any("to=<bad@remote.example>" in ln and f"status=bounced ({said} 550" in ln for ln in mine)
        assert any("to=<later@remote.example>" in ln and f"status=deferred ({said} 451" in ln for ln in mine)
        assert any("sender non-delivery notification" in ln for ln in mine)
        assert any("reject: RCPT from client.example[127.0.0.1]: 550" in ln and "to=<nobody@local.test>" in ln
                   for ln in text.splitlines())


def test_twistd_daemon_with_logfile_writes_json(tmp_path):
    """``twistd relay`` (daemon, twistd.log in the working directory), no extra flags."""
    port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
                                                   "log": {"format": "json"}})
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml_dumps(data))
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                        "relay", "--config", str(cfg)], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    pidfile = tmp_path / "twistd.pid"
    poll(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, what="twistd.pid")
    pid = int(pidfile.read_text())
    try:
        poll(lambda: RelayProcess._connectable("127.0.0.1", port), 20, what="the daemon listening")
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@b.example", ["postmaster@local.test"], b"Subject: daemon\r\n\r\nx\r\n")
        log = tmp_path / "twistd.log"
        poll(lambda: "removed" in log.read_text(), 20, what="delivery in twistd.log")
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        poll(lambda: not _alive(pid), 30, what="the daemon to exit")
    events = [json.loads(ln) for ln in (tmp_path / "twistd.log").read_text().splitlines()]
    assert any(e.get("text", "").startswith("twisted-relay starting") for e in events)
    received = [e for e in events if e.get("client_ip") == "127.0.0.1" and "size" in e]
    assert len(received) == 1
    qid = received[0]["queue_id"]
    assert [e["status"] for e in events if e.get("queue_id") == qid and "status" in e] == ["sent"]
    assert any(e.get("queue_id") == qid and e.get("why") == "all recipients final" for e in events)
    assert events[-1]["text"] == "Server Shut Down."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
