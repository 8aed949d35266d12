"""[proxy] listeners over real sockets: a fake load balancer (a raw socket
bound to the balancer's 127.0.0.x sending the header) in front of an
in-process relay.  The client the header names is the one the relay's
decisions, limits, logs and Received header use; anyone else is refused."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import tempfile

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay import config as configmod
from relay.common import logsafe
from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.relay import InProcessRelay, deep_merge, in_thread
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll

BALANCER = "127.0.0.5"  # proxy.trusted
STRANGER = "127.0.0.1"  # not a balancer
MX = "tcp:0:interface=127.0.0.1"
MX_PLAIN = "tcp:0:interface=127.0.0.1:backlog=64"  # the same address, no PROXY
SUBMISSION_TLS = "ssl:0:interface=127.0.0.1"
POP3 = "tcp:0:interface=127.0.0.1"
POP3S = "ssl:0:interface=127.0.0.1"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client: str, port: int = 40000) -> bytes:
    fam = "TCP6" if ":" in client else "TCP4"
    dst = "::1" if fam == "TCP6" else "127.0.0.1"
    return f"PROXY {fam} {client} {dst} {port} 25\r\n".encode()


def v2(client: str | None, port: int = 40000, tlvs: bytes = b"") -> bytes:
    if client is None:  # LOCAL: a health check
        return V2_SIG + b"\x20\x00\x00\x00"
    block = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25) + tlvs
    return V2_SIG + b"\x21\x11" + struct.pack("!H", len(block)) + block


def via_balancer(addr, header: bytes, source: str = BALANCER, pieces: int = 1) -> RawSMTP:
    c = RawSMTP(*addr, source=source)
    step = max(1, len(header) // pieces)
    for i in range(0, len(header), step):
        c.send(header[i:i + step])  # separate writes: the header may come in several segments
    return c


def closed_without_a_word(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


class ProxyCase(unittest.TestCase):
    proxy: dict = {}
    extra: dict = {}

    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-proxy-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.certs = cert_files("localhost", "127.0.0.1")
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice-pw")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        over = {
            "tls": {"certificate": self.certs.cert_pem, "key": self.certs.key_pem, "auth_requires_tls": False},
            "relay": {"networks": ["10.1.0.0/16"]},
            "smtp": {"listen": [MX, MX_PLAIN], "submission": [SUBMISSION_TLS], "max_connections_per_ip": 2},
            "pop3": {"listen": [POP3, POP3S], "max_connections_per_ip": 1},
            "proxy": {"listeners": [MX, SUBMISSION_TLS, POP3, POP3S], "trusted": [f"{BALANCER}/32", "::1"],
                      "header_timeout": "1s", **self.proxy},
        }
        self.relay = InProcessRelay(self.tmp, deep_merge(over, self.extra), deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        p = self.relay.ports
        self.mx, self.mx_plain = p[f"smtp {MX}"], p[f"smtp {MX_PLAIN}"]
        self.smtps, self.pop3, self.pop3s = p[f"submission {SUBMISSION_TLS}"], p[f"pop3 {POP3}"], p[f"pop3 {POP3S}"]

    def log(self) -> str:
        return "\n".join(formatEvent(e) or "" for e in self.events)

    def gate(self):
        return self.relay.service.proxy

    def queued(self) -> list[bytes]:
        spool = self.relay.service.spool
        out = []
        for qid in spool.queue_ids():
            _, off, _ = spool.read_envelope(qid)
            with open(spool.message_path(qid), "rb") as f:
                f.seek(off)
                out.append(f.read())
        return out


class TheClientAddressDecides(ProxyCase):
    async def test_relay_networks_by_the_client_in_the_header_v1_and_v2(self):
        def run():
            out = {}
            for name, header in (("lan-v1", v1("10.1.2.3")), ("lan-v2", v2("10.1.2.4")),
                                 ("out-v1", v1("192.0.2.9")), ("out-v2", v2("198.51.100.7")),
                                 ("split", v2("10.1.9.9", tlvs=b"\x05\x00\x03abc"))):
                c = via_balancer(self.mx, header, pieces=3 if name == "split" else 1)
                greet = c.reply()
                c.cmd("EHLO client.example")
                c.cmd("MAIL FROM:<a@b.example>")
                rcpt = c.cmd("RCPT TO:<friend@remote.example>")
                data = None
                if rcpt.code == 250:
                    c.cmd("DATA")
                    data = c.cmd(f"Subject: {name}\r\n\r\nbody\r\n.")
                c.cmd("QUIT")
                out[name] = (greet.code, rcpt.code, data and data.code)
            return out

        out = await in_thread(run)
        self.assertEqual(out["lan-v1"], (220, 250, 250))
        self.assertEqual(out["lan-v2"], (220, 250, 250))
        self.assertEqual(out["split"], (220, 250, 250))
        self.assertEqual(out["out-v1"][:2], (220, 554))  # the balancer (127.0.0.5) is not what counts
        self.assertEqual(out["out-v2"][:2], (220, 554))
        received = sorted(m.split(b"\r\n")[0] for m in self.queued())
        self.assertEqual(received, [b"Received: from client.example ([10.1.2.3])",
                                    b"Received: from client.example ([10.1.2.4])",
                                    b"Received: from client.example ([10.1.9.9])"])
        log = self.log()
        self.assertIn(f"proxy: connect from [10.1.2.3]:40000 via [{BALANCER}] (PROXY v1 TCP4)", log)
        self.assertIn(f"proxy: connect from [198.51.100.7]:40000 via [{BALANCER}] (PROXY v2 TCP4)", log)
        self.assertEqual(self.gate().accepted, {"v1": 2, "v2": 3})

    async def test_the_connection_limit_counts_the_client_not_the_balancer(self):
        def run():
            a = [via_balancer(self.mx, v1("10.1.2.3", 40000 + i)) for i in range(3)]
            codes = [c.reply().code for c in a]
            other = via_balancer(self.mx, v2("10.1.2.4"))  # same balancer, another client
            codes.append(other.reply().code)
            for c in a + [other]:
                c.sock.close()
            return codes

        self.assertEqual(await in_thread(run), [220, 220, 421, 220])
        self.assertIn("reject: connect from [10.1.2.3]: too many connections (2)", self.log())

    async def test_local_health_check_uses_the_balancer_address(self):
        def run():
            c = via_balancer(self.mx, v2(None))
            greet = c.reply()
            c.cmd("EHLO lb")
            c.cmd("MAIL FROM:<a@b.example>")
            return greet.code, c.cmd("RCPT TO:<friend@remote.example>").code

        self.assertEqual(await in_thread(run), (220, 554))
        self.assertIn(f"proxy: connect from [{BALANCER}] (PROXY v2 LOCAL UNSPEC -: the balancer's own", self.log())

    async def test_af_unix_uses_the_balancer_address_and_its_path_is_escaped_in_the_log(self):
        block = b"/run/x\n2026 forged line".ljust(108, b"\0") + b"/run/relay".ljust(108, b"\0")
        header = V2_SIG + b"\x21\x31" + struct.pack("!H", len(block)) + block

        def run():
            c = via_balancer(self.mx, header)
            return c.reply().code

        self.assertEqual(await in_thread(run), 220)
        (event,) = [e for e in self.events if e.get("log_namespace") == "relay.proxy"]
        self.assertEqual(event["client"], "/run/x\n2026 forged line")  # a field logsafe neutralises
        shown = formatEvent(logsafe.neutralise(event))
        self.assertIn(f"proxy: connect from [{BALANCER}] (PROXY v2 PROXY UNIX /run/x\\x0a2026\\x20forged\\x20line:",
                      shown)

    async def test_starttls_through_the_wrapper(self):
        def run():
            c = via_balancer(self.mx, v1("10.1.2.3"))
            c.reply()
            c.cmd("EHLO client.example")
            r = c.cmd("STARTTLS")
            c.starttls(self.certs.ca_pem)
            e2 = c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<a@b.example>")
            c.cmd("RCPT TO:<friend@remote.example>")
            c.cmd("DATA")
            d = c.cmd("Subject: tls\r\n\r\nbody\r\n.")
            return r.code, e2.code, d.code

        self.assertEqual(await in_thread(run), (220, 250, 250))
        (msg,) = self.queued()
        self.assertTrue(msg.startswith(b"Received: from client.example ([10.1.2.3])"), msg[:80])
        self.assertIn(b"with ESMTPS", msg.split(b"\r\n\r\n")[0])

    async def test_implicit_tls_starts_after_the_header(self):
        def run():
            s = socket.create_connection(self.smtps, source_address=(BALANCER, 0), timeout=10)
            s.sendall(v2("10.1.2.3"))
            tls = ssl.create_default_context(cafile=self.certs.ca_pem).wrap_socket(s, server_hostname="localhost")
            banner = tls.recv(200)
            tls.close()
            return banner

        self.assertTrue((await in_thread(run)).startswith(b"220 "))
        await apoll(lambda: "connect from [10.1.2.3]" in self.log(), what="the proxied TLS client logged")


class RateLimitsByTheClient(ProxyCase):
    extra = {"limits": {"messages_per_ip": "1/1h", "messages_per_sender": "off"}}

    async def test_messages_per_ip_counts_each_client_behind_one_balancer(self):
        def run():
            a = via_balancer(self.mx, v1("192.0.2.9"))
            a.reply()
            a.cmd("EHLO client.example")
            first = a.cmd("MAIL FROM:<a@b.example>")
            a.cmd("RSET")
            second = a.cmd("MAIL FROM:<a@b.example>")
            b = via_balancer(self.mx, v2("192.0.2.10"))
            b.reply()
            b.cmd("EHLO other.example")
            other = b.cmd("MAIL FROM:<a@b.example>")
            return first, second, other

        first, second, other = await in_thread(run)
        self.assertEqual((first.code, second.code, other.code), (250, 450, 250))
        self.assertIn("too many messages from 192.0.2.9", " ".join(second.lines))


class OwnCertificate(ProxyCase):
    """An ssl: PROXY listener with its own privateKey= listens as plain TCP
    too: the header first, then its own TLS."""

    async def test_ssl_with_its_own_key_after_the_header(self):
        own = f"ssl:0:interface=127.0.0.1:privateKey={self.certs.key_pem}:certKey={self.certs.cert_pem}"
        await self.relay.stop()
        data = deep_merge(self.relay.data, {"smtp": {"submission": [own]},
                                            "proxy": {"listeners": [own]}})
        self.relay = InProcessRelay(self.tmp, data, deliver=False)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        addr = self.relay.ports[f"submission {self.relay.config.smtp.submission[0]}"]

        def run():
            s = socket.create_connection(addr, source_address=(BALANCER, 0), timeout=10)
            s.sendall(v1("10.1.2.3"))
            tls = ssl.create_default_context(cafile=self.certs.ca_pem).wrap_socket(s, server_hostname="localhost")
            banner = tls.recv(200)
            tls.close()
            return banner

        self.assertTrue((await in_thread(run)).startswith(b"220 "))


class AnyoneElseIsRefused(ProxyCase):
    async def test_a_non_balancer_is_closed_before_any_reply(self):
        def run():
            out = []
            for header in (v1("10.1.2.3"), b""):
                s = socket.create_connection(self.mx, source_address=(STRANGER, 0), timeout=10)
                s.sendall(header)
                out.append(closed_without_a_word(s))
                s.close()
            return out

        self.assertEqual(await in_thread(run), [True, True])
        self.assertEqual(self.gate().refused["untrusted"], 2)
        self.assertIn(f"proxy: refused [{STRANGER}]: not a configured load balancer", self.log())
        page = self.relay.service.metrics.render().decode()
        self.assertIn('relay_proxy_refused_total{reason="untrusted"} 2.0', page)

    async def test_a_balancer_without_a_valid_header_is_closed(self):
        def run():
            out = []
            for data in (b"EHLO client.example\r\n", b"PROXY TCP4 10.1.2.3 127.0.0.1 1\r\n",
                         b"PROXY UNKNOWN " + b"x" * 200, V2_SIG + b"\x21\x11\xff\xff"):
                s = socket.create_connection(self.mx, source_address=(BALANCER, 0), timeout=10)
                s.sendall(data)
                out.append(closed_without_a_word(s))
                s.close()
            return out

        self.assertEqual(await in_thread(run), [True] * 4)
        r = self.gate().refused
        self.assertEqual((r["garbage"], r["bad_v1"], r["oversize"]), (1, 1, 2))
        self.assertIn(f"proxy: refused connection via [{BALANCER}]: bad PROXY header (garbage", self.log())

    async def test_a_silent_balancer_connection_is_closed_after_the_timeout(self):
        def run():
            s = socket.create_connection(self.mx, source_address=(BALANCER, 0), timeout=15)
            s.sendall(b"PROXY TCP4 10.1.")  # a part, then nothing
            ok = closed_without_a_word(s, 15)
            s.close()
            return ok

        self.assertTrue(await in_thread(run))
        self.assertEqual(self.gate().refused["timeout"], 1)
        self.assertIn("no complete header in 1s", self.log())
        self.assertEqual(self.relay.service.smtp_ctx.limiter.counts(), {})

    async def test_a_header_on_a_normal_listener_is_just_a_bad_command(self):
        def run():
            c = via_balancer(self.mx_plain, v1("10.1.2.3"))
            greet = c.reply()
            bad = c.reply()
            c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<a@b.example>")
            return greet.code, bad.code, c.cmd("RCPT TO:<friend@remote.example>").code

        greet, bad, rcpt = await in_thread(run)
        self.assertEqual(greet, 220)
        self.assertGreaterEqual(bad, 500)
        self.assertEqual(rcpt, 554)  # the balancer's own address, 127.0.0.5, is not in relay.networks


def pop3_greeting(sock) -> bytes:
    f = sock.makefile("rb")
    line = f.readline()
    f.close()
    return line


class POP3BehindTheBalancer(ProxyCase):
    async def test_pop3_plain_and_ssl_and_the_limit_per_client(self):
        def run():
            a = socket.create_connection(self.pop3, source_address=(BALANCER, 0), timeout=10)
            a.sendall(v1("10.1.2.3") + b"USER alice@local.test\r\n")
            f = a.makefile("rb")
            greet, user = f.readline(), f.readline()
            a.sendall(b"PASS alice-pw\r\n")
            login = f.readline()
            b = socket.create_connection(self.pop3, source_address=(BALANCER, 0), timeout=10)
            b.sendall(v2("10.1.2.3"))  # the same client again: over its limit of 1
            second = pop3_greeting(b)
            c = socket.create_connection(self.pop3s, source_address=(BALANCER, 0), timeout=10)
            c.sendall(v2("10.1.2.4"))
            tls = ssl.create_default_context(cafile=self.certs.ca_pem).wrap_socket(c, server_hostname="localhost")
            third = pop3_greeting(tls)
            for s in (a, b, tls):
                s.close()
            return greet, user, login, second, third

        greet, user, login, second, third = await in_thread(run)
        self.assertTrue(greet.startswith(b"+OK"), greet)
        self.assertTrue(user.startswith(b"+OK"), user)
        self.assertTrue(login.startswith(b"+OK"), login)
        self.assertTrue(second.startswith(b"-ERR [SYS/TEMP] Too many connections"), second)
        self.assertTrue(third.startswith(b"+OK"), third)
        self.assertIn("pop3: reject: connect from [10.1.2.3]: too many connections", self.log())

    async def test_pop3_refuses_a_non_balancer(self):
        def run():
            s = socket.create_connection(self.pop3, source_address=(STRANGER, 0), timeout=10)
            ok = closed_without_a_word(s)
            s.close()
            return ok

        self.assertTrue(await in_thread(run))


class Config(unittest.TestCase):
    def test_a_listener_that_is_not_ours_and_an_empty_trusted_list_are_refused(self):
        base = {"smtp": {"listen": ["tcp:2525:interface=127.0.0.1"]}}
        with self.assertRaises(configmod.ConfigError) as e:
            configmod.load(data={**base, "proxy": {"listeners": ["tcp:25"], "trusted": ["10.0.0.1"]}})
        self.assertIn("proxy.listeners: 'tcp:25' is not an endpoint of smtp.listen", str(e.exception.problems))
        with self.assertRaises(configmod.ConfigError) as e:
            configmod.load(data={**base, "proxy": {"listeners": ["tcp:2525:interface=127.0.0.1"]}})
        self.assertIn("proxy.trusted: empty", str(e.exception.problems))
        with self.assertRaises(configmod.ConfigError) as e:
            configmod.load(data={**base, "proxy": {"trusted": ["nonsense"]}})
        self.assertIn("proxy.trusted", str(e.exception.problems))
        cfg = configmod.load(data={**base, "proxy": {"listeners": ["tcp:2525:interface=127.0.0.1"],
                                                     "trusted": ["10.0.0.0/24"]}})
        self.assertEqual(cfg.proxy.listeners, ("tcp:2525:interface=127.0.0.1",))
