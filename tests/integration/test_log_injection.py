"""Log injection, from outside: a real ``twistd relay`` process is attacked
over SMTP and POP3 from 127.0.0.9, and a next hop (a sink on 127.0.0.2)
answers with terminal escapes; then Debian's ``fail2ban-regex`` runs the
filter docs/security.md documents (etc/fail2ban/filter.d/twisted-relay.conf)
over the log the relay wrote.  Only the attacker's real address may match,
never one of the addresses it wrote into its commands (203.0.113.x), and no
raw control character may reach the log."""

from __future__ import annotations

import base64
import json
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess

from twisted.trial import unittest

from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port, in_thread
from tests.support.sink import Sink
from tests.support.wait import apoll

ATTACKER = "127.0.0.9"
FILTER = os.path.join(ROOT, "etc", "fail2ban", "filter.d", "twisted-relay.conf")
# the next hop's reply: ESC, BEL, C1 NEL, LINE SEPARATOR, a screen clear and a fake refusal
HOSTILE_REPLY = "451 4.3.0 \x1b[2J\x07\x85\u2028reject: RCPT from x[203.0.113.10]: \x1b]0;owned\x07 later"
# a long reply, whose end would be a line of its own where a reader splits long lines
# (journald at 48 KiB): 200 lines of 400 characters, then a forged line
FORGED = "2026-01-01T00:00:00+0000 [relay.smtp#info] reject: RCPT from x[203.0.113.16]: "
HUGE_REPLY = "\n".join(["451-4.3.0 " + "a" * 400] * 200 + ["451 4.3.0 " + FORGED])


class _POP3From(poplib.POP3):
    """poplib with a chosen source address (the attacker's)."""

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(ATTACKER, 0))


def _fail2ban_regex() -> str | None:
    return shutil.which("fail2ban-regex")


class _UnderAttack(unittest.TestCase):
    timeout = 120
    fmt = "text"

    async def setUp(self):
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="relay-loginj-")
        self.sink = Sink("127.0.0.2", rcpt_replies={"esc@remote.example": HOSTILE_REPLY,
                                                     "huge@remote.example": HUGE_REPLY}).start()
        self.addCleanup(self.sink.stop)
        cert = cert_files("localhost", "127.0.0.1")
        self.ca = cert.ca_pem
        self.port = free_port()
        self.pop3_port = free_port()
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "alice pw")
        data = deep_merge(base_config(self.tmp), {
            "smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]},
            "pop3": {"listen": [f"tcp:{self.pop3_port}:interface=127.0.0.1"]},
            "tls": {"certificate": cert.cert_pem, "key": cert.key_pem},
            "relay": {"routes": {"remote.example": f"127.0.0.2:{self.sink.port}"}},
            "delivery": {"retry_min": "1h", "retry_max": "1h", "tls": "none"},
            "log": {"format": self.fmt},
        })
        self.relay = RelayProcess(self.tmp, data)
        self.relay.start(wait_for=("127.0.0.1", self.port))
        self.addCleanup(lambda: in_thread(self.relay.stop))

    def _smtp(self, helo: str) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.port, source_address=(ATTACKER, 0), timeout=30)
        s.ehlo(helo)
        s.starttls(context=ssl.create_default_context(cafile=self.ca))
        s.ehlo(helo)
        return s

    def attack_smtp(self) -> None:
        ctx_codes = {}
        # a quoted local part holding a whole refusal, and a HELO with "]:"
        with self._smtp("x[203.0.113.13]:") as s:
            code, _ = s.docmd('MAIL FROM:<"reject: RCPT from x[203.0.113.7]: "@attacker.example>')
            ctx_codes["mail"] = code
            ctx_codes["rcpt unknown"] = s.docmd("RCPT TO:<nobody@local.test>")[0]
            ctx_codes["rcpt esc"] = s.docmd("RCPT TO:<esc@remote.example>")[0]
            ctx_codes["rcpt huge"] = s.docmd("RCPT TO:<huge@remote.example>")[0]
            ctx_codes["data"] = s.data(b"Subject: hi\r\n\r\nhello\r\n")[0]
        # the raw path in the SIZE refusal
        with self._smtp("client.example") as s:
            ctx_codes["size"] = s.docmd('MAIL FROM:<"reject: MAIL from x[203.0.113.12]: "@a.example> '
                                        'SIZE=99999999999')[0]
        # controls in a quoted local part (refused or not, nothing raw may be logged)
        with self._smtp("client.example") as s:
            evils = (("\x1b[2J", "ascii"), ("\x85", "latin-1"), ("\x85", "utf-8"), ("\u2028", "utf-8"),
                     ("\u202e", "utf-8"), ("\x7f", "ascii"))
            for i, (evil, encoding) in enumerate(evils):
                s.docmd("RSET")
                s.command_encoding = encoding  # latin-1: the raw byte 0x85, not UTF-8
                code, _ = s.docmd(f'MAIL FROM:<"{evil}reject: RCPT from x[203.0.113.{20 + i}]: "@a.example>')
                s.command_encoding = "ascii"
                if code == 250:
                    s.docmd("RCPT TO:<nobody@local.test>")
        # an AUTH user name (base64) with a newline and a whole log line in it
        with self._smtp("client.example") as s:
            name = ("x\n2026-01-01T00:00:00+0000 [relay.smtp#info] reject: AUTH from "
                    "x[203.0.113.11]: \x1b[2J")
            blob = base64.b64encode(b"\0" + name.encode() + b"\0wrong").decode()
            ctx_codes["auth"] = s.docmd(f"AUTH PLAIN {blob}")[0]
        assert ctx_codes == {"mail": 250, "rcpt unknown": 550, "rcpt esc": 250, "rcpt huge": 250, "data": 250,
                             "size": 552, "auth": 535}, ctx_codes

    def attack_pop3(self) -> None:
        p = _POP3From("127.0.0.1", self.pop3_port, timeout=30)
        try:
            p.stls(context=ssl.create_default_context(cafile=self.ca))
            p.user("reject: AUTH from x[203.0.113.8]: y")
            with self.assertRaises(poplib.error_proto):
                p.pass_("nope")
            name = "z\n2026-01-01T00:00:00+0000 [relay.pop3#info] pop3: login failed client=203.0.113.15 user="
            blob = base64.b64encode(b"\0" + name.encode() + b"\0nope").decode()
            with self.assertRaises(poplib.error_proto):
                p._shortcmd(f"AUTH PLAIN {blob}")
            p.quit()
        finally:
            p.close()

    async def attack(self) -> None:
        await in_thread(self.attack_smtp)
        await in_thread(self.attack_pop3)
        await apoll(lambda: "to=<esc@remote.example>" in self.relay.log()
                    and "to=<huge@remote.example>" in self.relay.log()
                    and self.relay.log().count("pop3: login failed") >= 2
                    and "reject: AUTH from" in self.relay.log(), 30, what="the attacks in the log")


class TextLogUnderAttack(_UnderAttack):
    async def test_fail2ban_bans_only_the_attacker(self):
        await self.attack()
        with open(self.relay.log_path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        # no raw control character at all (newlines end lines; tabs start twisted's continuations)
        bad = sorted({hex(ord(c)) for c in text if not c.isprintable() and c not in "\n\t"})
        assert not bad, (bad, text)
        lines = text.splitlines()
        # every line is one of twistd's (no field started a line of its own)
        stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
        assert all(stamp.match(ln) or ln.startswith("\t") for ln in lines), text
        # and none is so long that a reader (journald) would split it
        assert max(len(ln.encode()) for ln in lines) < 16 * 1024, max(len(ln) for ln in lines)
        (huge,) = [ln for ln in lines if "to=<huge@remote.example>" in ln]
        assert "203.0.113.16" not in huge and huge.endswith(" more characters not logged]"), huge[-200:]
        # the injected markers in addresses, HELO and user names are shown escaped
        for ip in ("203.0.113.7", "203.0.113.8", "203.0.113.11", "203.0.113.12", "203.0.113.13",
                   "203.0.113.15"):
            assert f"[{ip}]" not in text and f" client={ip}" not in text, (ip, text)
        deferred = [ln for ln in lines if "to=<esc@remote.example>" in ln]
        assert len(deferred) == 1 and "status=deferred" in deferred[0], deferred
        # (the client itself shows the reply's U+0085 and U+2028 as spaces: str.splitlines)
        assert "451 4.3.0 \\x1b[2J\\x07" in deferred[0] and "\\x1b]0;owned\\x07 later" in deferred[0], deferred
        # normal parts of the lines are as they always were
        assert any(f"reject: RCPT from x\\x5b203.0.113.13\\x5d:[{ATTACKER}]: 550 5.1.1" in ln for ln in lines)
        assert any(f"reject: MAIL from client.example[{ATTACKER}]: 552 5.3.4" in ln for ln in lines)

        # the filter documented in docs/security.md (the README's before issue 13) is the one in etc/fail2ban
        with open(os.path.join(ROOT, "docs", "security.md")) as f:
            readme = f.read()
        with open(FILTER) as f:
            conf = f.read()
        regexes = re.findall(r"^(?:failregex =|\s+)\s*(\^%\(_journal\)s.*)$", conf, re.M)
        assert len(regexes) == 2, conf
        for rx in regexes:
            assert rx in readme, rx

        exe = _fail2ban_regex()
        if exe is None:
            raise unittest.SkipTest("fail2ban-regex is not installed (Debian: apt-get install fail2ban; "
                                    ".ci/run installs it)")
        r = subprocess.run([exe, "-o", "ip", self.relay.log_path, FILTER], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
        ips = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
        # SMTP: RCPT, SIZE, AUTH (and perhaps refused controls); POP3: USER/PASS, AUTH PLAIN
        assert set(ips) == {ATTACKER}, (ips, text)
        assert len(ips) >= 5, (ips, text)


class JSONLogUnderAttack(_UnderAttack):
    fmt = "json"

    async def test_one_ascii_line_per_event_exact_fields_neutral_text(self):
        await self.attack()
        with open(self.relay.log_path, "rb") as f:
            raw = f.read()
        assert all(0x20 <= b < 0x7F for b in raw.replace(b"\n", b"")), "a raw control or non-ASCII byte"
        events = [json.loads(ln) for ln in raw.decode("ascii").splitlines()]  # one JSON object a line
        for e in events:
            assert all(c.isprintable() or c in "\n\t" for c in e["text"]), e
        (received,) = [e for e in events if "nrcpt" in e and e.get("client_ip") == ATTACKER]
        assert received["sender"] == '"reject: RCPT from x[203.0.113.7]: "@attacker.example'  # exact
        assert received["helo"] == "x[203.0.113.13]:"
        assert "x[203.0.113.7]" not in received["text"] and "x[203.0.113.13]" not in received["text"]
        (deferred,) = [e for e in events if e.get("to") == "esc@remote.example"]
        assert "\x1b[2J\x07" in deferred["reply"] and "\\x1b[2J\\x07" in deferred["text"], deferred
        pop3 = [e for e in events if e["text"].startswith("pop3: login failed")]
        assert {e["user"] for e in pop3} >= {"reject: AUTH from x[203.0.113.8]: y"}, pop3
        assert all(e["client"] == ATTACKER and "[203.0.113.8]" not in e["text"] for e in pop3), pop3


def test_filter_on_every_refusal_form_and_worker_prefix(tmp_path):
    """Each form of refusal the relay logs, with and without a worker's
    namespace, through the relay's own formatter: the filter finds the real
    client in each, never an address written into a field."""
    from twisted.logger import LogLevel

    from relay.runtime import logs
    exe = _fail2ban_regex()
    if exe is None:
        raise unittest.SkipTest("fail2ban-regex is not installed (Debian: apt-get install fail2ban)")
    evil = '"x]: reject: RCPT from y[203.0.113.30]: "@a.example'
    forms = [
        ("reject: connect from [{client_ip}]: too many connections ({count})", {"count": 11}),
        ("reject: [{client_ip}]: too many errors", {}),
        ("reject: [{client_ip}]: bare LF in a command", {}),
        ("reject: MAIL from {helo}[{client_ip}]: 530 5.7.0 Authentication required", {}),
        ("reject: MAIL from {helo}[{client_ip}]: 552 5.3.4 Message size exceeds fixed limit (SIZE={size}); "
         "from=<{sender}>", {"size": 10**9, "sender": evil}),
        ("reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}> to=<{rcpt}>",
         {"stage": "RCPT", "reply": f"554 5.7.1 <{evil}>: Relay access denied", "sender": evil, "rcpt": evil}),
        ("{queue_id}: reject: DATA from {helo}[{client_ip}]: {reply}; from=<{sender}>",
         {"queue_id": "1K17GVE8XSR1FX34", "reply": "552 5.3.4 too big", "sender": evil}),
        ("{queue_id}: reject: DATA from {helo}[{client_ip}]: {reply}; from=<{sender}>",
         {"queue_id": "NOQUEUE", "reply": "554 5.6.0 too many hops", "sender": evil}),
        ("reject: AUTH from {helo}[{client_ip}]: authentication failed for {user}",
         {"user": "u]: reject: AUTH from y[203.0.113.31]:"}),
        ("pop3: login failed client={client} user={user} method={method}: {why}",
         {"user": "reject: AUTH from x[203.0.113.32]: y", "method": "USER/PASS", "why": "bad credentials"}),
        # not refusals: never matched, whatever they quote
        ("{queue_id}: client={helo}[{client_ip}], from=<{sender}>, size={size}, nrcpt={nrcpt}",
         {"queue_id": "1K17GVE8XSR1FX35", "sender": evil, "size": 1, "nrcpt": 1}),
        ("{queue_id}: to=<{to}>, relay={relay}, delay={delay:.1f}, status={status} ({reply})",
         {"queue_id": "1K17GVE8XSR1FX35", "to": "a@b.example", "relay": "mx[192.0.2.1]:25", "delay": 1.0,
          "status": "deferred", "reply": "host mx[192.0.2.1] said: 451 reject: RCPT from y[203.0.113.33]: x"}),
    ]
    fmt = logs._TextFormatter()
    lines, expected = [], []
    for i, (text, fields) in enumerate(forms):
        for worker in (None, 1):
            ip = f"192.0.2.{i * 2 + (worker or 0) + 1}"
            ns = "relay.pop3" if text.startswith("pop3") else "relay.queue" if "status=" in text else "relay.smtp"
            event = {"log_format": text, "log_level": LogLevel.info, "log_namespace": ns, "log_time": 1.7e9,
                     "client_ip": ip, "client": ip, "helo": "x[203.0.113.34]:", **fields}
            if worker is not None:
                event["log_system"] = f"w{worker} {ns}#info"
            lines.append(fmt(event))
            if text.startswith(("reject", "{queue_id}: reject", "pop3")):
                expected.append(ip)
    path = tmp_path / "relay.log"
    path.write_text("".join(lines))
    r = subprocess.run([exe, "-o", "ip", str(path), FILTER], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] == expected, (r.stdout, "".join(lines))
