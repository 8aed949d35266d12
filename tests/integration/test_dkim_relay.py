"""DKIM signing through the whole relay: a client -> the relay (in process,
real sockets) -> a sink, and what the sink received verified by dkimpy
(its dnsfunc answering the published record) and by OpenDKIM
(tests/support/opendkim.py) where it can run.

Trusted sources are signed (a client in relay.networks, an authenticated
client, relay-sendmail's pickup); mail from the internet (backup MX
relaying) is not; retries send the same bytes; bad key files stop the
start and refuse a reload.
"""

from __future__ import annotations

import io
import os
import shutil
import smtplib
import tempfile

import dkim as dkimpy
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay.common.errors import StartupError
from relay.intake import dkim, sendmail
from relay.intake.dkimkeys import generate_key, public_record, txt_strings, write_key
from relay.mailbox import users as usersmod
from tests.support import opendkim
from tests.support.dns import DNSServer, Zone
from tests.support.relay import InProcessRelay, RelayProcess, base_config, deep_merge, free_port, in_thread, toml_dumps
from tests.support.sink import Sink
from tests.support.wait import apoll, poll

SINK_IP = "127.0.0.2"
BASE = (b"From: Alerts <alerts@example.org>\r\nTo: a@dest.example\r\nSubject: test\r\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n")


def make_keys(tmp: str) -> dict[str, tuple[str, object]]:
    out = {}
    for sel, alg in (("r1", dkim.RSA_SHA256), ("e1", dkim.ED25519_SHA256)):
        key = generate_key(alg)
        path = os.path.join(tmp, f"{sel}.pem")
        write_key(path, key)
        out[sel] = (path, key)
    return out


def key_config(keys, domain="example.org") -> list[dict]:
    return [{"domain": domain, "selector": sel, "key": path,
             "algorithm": dkim.RSA_SHA256 if sel.startswith("r") else dkim.ED25519_SHA256}
            for sel, (path, _) in keys.items()]


def records(keys, domain="example.org") -> dict[str, list[str]]:
    return {f"{sel}._domainkey.{domain}": txt_strings(public_record(key)) for sel, (_, key) in keys.items()}


def dkimpy_ok(message: bytes, recs: dict[str, list[str]], idx: int) -> bool:
    table = {name + ".": "".join(parts).encode() for name, parts in recs.items()}

    def dnsfunc(name, timeout=5):
        return table.get((name.decode() if isinstance(name, bytes) else name).lower())
    try:
        return bool(dkimpy.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
    except dkimpy.DKIMException:
        return False


class SigningCase(unittest.TestCase):
    networks = ["127.0.0.0/8"]

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-dkim-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.keys = make_keys(self.tmp)
        self.zone = Zone()
        self.dns = DNSServer(self.zone).start()
        self.addCleanup(self.dns.stop)
        r1 = "r1._domainkey.example.org"
        self.zone.txt(r1, *records(self.keys)[r1])  # e1's record is not published
        self.port = free_port((SINK_IP,))
        self.sink = Sink(SINK_IP, port=self.port).start()
        self.addCleanup(self.sink.stop)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        route = f"{SINK_IP}:{self.port}"
        self.data = {
            "relay": {"networks": self.networks, "domains": ["backup.example"],
                      "routes": {"dest.example": route, "backup.example": route}},
            "delivery": {"retry_min": 1, "retry_max": 1, "connect_timeout": 5, "tls": "none",
                         "nameservers": [self.dns.address]},
            "dkim": {"keys": key_config(self.keys)},
        }
        self.relay = InProcessRelay(self.tmp, self.data)
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def send(self, body: bytes, rcpts=("a@dest.example",), sender="alerts@example.org", login=None):
        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                if login:
                    s.login(*login)
                return s.sendmail(sender, list(rcpts), body)
        return in_thread(run)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    async def delivered(self, n: int = 1) -> bytes:
        await apoll(lambda: len(self.sink.transactions) >= n, timeout=20, what=f"{n} deliveries")
        return self.sink.transactions[n - 1].data

    def assert_signed(self, data: bytes, *, opendkim_too: bool = True) -> None:
        self.assertTrue(data.startswith(b"DKIM-Signature:"), data[:200])
        self.assertEqual(data.count(b"\r\nDKIM-Signature:") + 1, 2, "one signature per selector")
        # ours first, then our Received: the signature does not cover it
        first_received = data.index(b"\r\nReceived: from client.example")
        self.assertGreater(first_received, data.rindex(b"DKIM-Signature:"))
        recs = records(self.keys)
        self.assertTrue(dkimpy_ok(data, recs, 0), "dkimpy: first signature")
        self.assertTrue(dkimpy_ok(data, recs, 1), "dkimpy: second signature")
        if opendkim_too and opendkim.unavailable() is None:
            rc, out = opendkim.verify(data, recs)
            self.assertEqual(rc, 0, out)


class Trusted(SigningCase):
    async def test_plain(self):
        await self.send(BASE + b"\r\nhello\r\n")
        self.assert_signed(await self.delivered())

    async def test_8bit_long_and_folded_headers(self):
        body = (BASE.replace(b"Subject: test", b"Subject: " + b"long words " * 80)
                + b"References: <a@x>\r\n <b@x>\r\n\t<c@x>\r\nX-Folded: one\r\n  two\r\n"
                + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                + "Grüße, ça va? \u2603\r\n".encode() + b"trailing  \t \r\n\r\n\r\n")
        await self.send(body)
        self.assert_signed(await self.delivered())

    async def test_10mb_attachment(self):
        line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
        body = (BASE + b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + line * (10 * 1024 * 1024 // len(line)))
        await self.send(body)
        data = await self.delivered()
        self.assertGreater(len(data), 10 * 1024 * 1024)
        self.assertTrue(data.endswith(line))
        self.assert_signed(data)

    async def test_authenticated_client_from_outside_the_networks_is_signed(self):
        # (here a client in the networks that logs in: the signing is the same)
        await self.send(BASE + b"\r\nauth\r\n", sender="alice@local.test", login=("alice@local.test", "pw"))
        self.assert_signed(await self.delivered())

    async def test_retry_sends_the_same_bytes(self):
        self.sink.b.rcpt_replies = {"a@dest.example": ["451 4.7.1 later", "250 2.1.5 ok"]}
        await self.send(BASE + b"\r\nretried\r\n", rcpts=("a@dest.example", "b@dest.example"))
        first = await self.delivered(1)
        for p in list(self.sink.protocols):  # the next attempt cannot reuse this connection
            p.transport.abortConnection()
        second = await self.delivered(2)
        self.assertEqual(self.sink.transactions[1].rcpts, ["a@dest.example"])
        self.assertEqual(first, second)
        self.assert_signed(second)
        self.assertGreater(len(self.sink.sessions), 1, "the retry came over a new connection")

    async def test_relay_sendmail_is_signed(self):
        cfg = os.path.join(self.tmp, "relay.toml")
        with open(cfg, "w") as f:
            f.write(toml_dumps(self.relay.data))

        def run():
            return sendmail.main(["-C", cfg, "-f", "alerts@example.org", "a@dest.example"],
                                 stdin=io.BytesIO(BASE.replace(b"\r\n", b"\n") + b"\nfrom cron\n"))
        self.assertEqual(await in_thread(run), 0)
        self.relay.service.pickup.kick()
        data = await self.delivered()
        self.assertIn(b"(twisted-relay, from userid", data)
        self.assertTrue(data.startswith(b"DKIM-Signature:"))
        recs = records(self.keys)
        self.assertTrue(dkimpy_ok(data, recs, 0) and dkimpy_ok(data, recs, 1))

    async def test_unsignable_messages_are_accepted_unsigned(self):
        for body in (b"To: a@dest.example\r\n\r\nno from\r\n",
                     BASE + b"From: second@example.org\r\n\r\ntwo froms\r\n",
                     b"From: <<<not an address\r\n\r\nbad\r\n",
                     BASE.replace(b"example.org>", b"other.example>") + b"\r\nno key\r\n"):
            await self.send(body)
        await apoll(lambda: len(self.sink.transactions) >= 4, timeout=20, what="4 deliveries")
        for t in self.sink.transactions:
            self.assertNotIn(b"DKIM-Signature:", t.data)
        text = "\n".join(self.lines())
        for reason in ("no From header", "several From headers", "From header does not parse",
                       "no signing key for the From domain (other.example)"):
            self.assertIn(f": dkim: not signed: {reason}", text)

    async def test_signed_is_logged_and_the_missing_record_warned_at_start(self):
        await self.send(BASE + b"\r\nhello\r\n")
        await self.delivered()
        text = "\n".join(self.lines())
        self.assertIn(": dkim: signed d=example.org s=r1 a=rsa-sha256, d=example.org s=e1 a=ed25519-sha256", text)
        await apoll(lambda: "dkim: selector e1 of example.org: no DKIM record" in "\n".join(self.lines()),
                    what="the warning of the missing record")
        self.assertNotIn("selector r1 of example.org", "\n".join(self.lines()))


class Internet(SigningCase):
    networks: list[str] = []  # 127.0.0.1 is the internet here

    async def test_backup_mx_mail_is_not_signed(self):
        await self.send(BASE + b"\r\nfrom outside\r\n", rcpts=("x@backup.example",))
        data = await self.delivered()
        self.assertNotIn(b"DKIM-Signature:", data)

    async def test_authenticated_client_is_signed(self):
        await self.send(BASE + b"\r\nauth\r\n", sender="alice@local.test", login=("alice@local.test", "pw"))
        self.assert_signed(await self.delivered())


class BadKeys(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-dkim-bad-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def relay_with(self, path: str) -> InProcessRelay:
        return InProcessRelay(self.tmp, {"dkim": {"keys": [{"domain": "example.org", "selector": "s",
                                                            "key": path}]}})

    def test_bad_key_files_stop_the_start_naming_the_file(self):
        missing = os.path.join(self.tmp, "missing.pem")
        open_key = os.path.join(self.tmp, "open.pem")
        write_key(open_key, generate_key())
        os.chmod(open_key, 0o644)
        junk = os.path.join(self.tmp, "junk.pem")
        with open(junk, "w") as f:
            f.write("not a key\n")
        os.chmod(junk, 0o600)
        for path, words in ((missing, "no such file"), (open_key, "chmod 600"), (junk, "not a PEM private key")):
            r = self.relay_with(path)
            from relay.runtime.service import RelayService
            with self.assertRaises(StartupError) as cm:
                RelayService(r.config, deliver=False)
            self.assertIn(path, str(cm.exception))
            self.assertIn(words, str(cm.exception))
            self.assertIn("dkim.keys", str(cm.exception))


    def test_workers_a_bad_key_is_said_once_by_the_master(self):
        """workers = 2: the master checks the key files before it starts a
        worker: one clear line naming the file, a non-zero exit, no worker
        started (not one error per worker, nor a restart loop)."""
        junk = os.path.join(self.tmp, "junk.pem")
        with open(junk, "w") as f:
            f.write("not a key\n")
        os.chmod(junk, 0o600)
        port = free_port()
        data = deep_merge(base_config(self.tmp), {
            "workers": 2, "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
            "dkim": {"keys": [{"domain": "example.org", "selector": "s", "key": junk}]}})
        relay = RelayProcess(self.tmp, data, "workers")
        relay.start()
        try:
            poll(relay._died, 30, what="the relay to refuse to start")
            self.assertNotEqual(relay.proc.returncode, 0)
            log = relay.log()
            self.assertIn("not starting", log)
            self.assertEqual(log.count(f"{junk}: not a PEM private key"), 1, log[-3000:])
            self.assertIn("dkim.keys", log)
            self.assertNotIn("worker 0 started", log)
            self.assertFalse(os.path.exists(os.path.join(data["spool"], "w0")), "a worker started anyway")
        finally:
            relay.stop()


class Reload(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-dkim-reload-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.dns = DNSServer(Zone()).start()
        self.addCleanup(self.dns.stop)
        self.key = os.path.join(self.tmp, "k.pem")
        write_key(self.key, generate_key(dkim.ED25519_SHA256))
        self.cfg = os.path.join(self.tmp, "relay.toml")
        self.data = {"dkim": {"keys": [{"domain": "example.org", "selector": "s", "key": self.key,
                                        "algorithm": "ed25519-sha256"}]},
                     # nothing listens there: a message stays in the queue, deferred
                     "relay": {"routes": {"dest.example": f"127.0.0.1:{free_port()}"}},
                     "delivery": {"nameservers": [self.dns.address]}}
        self.relay = InProcessRelay(self.tmp, self.data)
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.relay.data))
        self.relay.config = self.relay.config.__class__(**{**self.relay.config.__dict__, "path": self.cfg})
        await self.relay.start()
        self.addCleanup(self.relay.stop)

    def test_a_bad_key_refuses_the_reload_and_the_running_keys_stay(self):
        svc = self.relay.service
        before = svc.signer.keys
        os.chmod(self.key, 0o640)
        r = svc.reload()
        self.assertFalse(r["ok"])
        self.assertTrue(any(self.key in m and "chmod 600" in m for m in r["messages"]), r)
        self.assertEqual(svc.signer.keys, before)
        os.chmod(self.key, 0o600)
        r = svc.reload()
        self.assertTrue(r["ok"], r)
        self.assertEqual([k.selector for k in svc.signer.keys], ["s"])

    async def test_queue_show_has_the_signature_then_our_received(self):
        from tests.test_relayctl import relayctl

        def run():
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.example")
                s.sendmail("alerts@example.org", ["a@dest.example"], BASE + b"\r\nheld\r\n")
        await in_thread(run)
        qid = self.relay.service.spool.queue_ids()[0]
        r = await in_thread(relayctl, "-c", self.cfg, "queue", "show", qid, cwd=self.tmp)
        self.assertEqual(r.returncode, 0, r.stderr)
        text = r.stdout
        self.assertIn("DKIM-Signature: v=1; a=ed25519-sha256;", text)
        self.assertLess(text.index("DKIM-Signature:"), text.index("Received: from client.example"))
