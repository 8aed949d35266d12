"""SMTPUTF8 through ``twistd relay`` as a real process: a UTF-8 user added
with relayctl, mail to them over SMTP with SMTPUTF8 (Python's smtplib) into
their Maildir, fetched over POP3 (poplib, UTF8) by their UTF-8 name; the
process's log lines and ``relayctl queue show`` with UTF-8 addresses."""

from __future__ import annotations

import os
import poplib
import smtplib
import subprocess
import sys

from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll

PW = "pässwörd"
MSG = ("From: Jörg <jörg@bücher.example>\r\nTo: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n"
       "\r\nÄÖÜ äöü ß\r\n").encode()


def relayctl(config: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", config, *args], env=env,
                          input=input, capture_output=True, text=True, encoding="utf-8", timeout=120)


def test_utf8_user_smtp_in_maildir_pop3_out(tmp_path):
    smtp_port, pop_port = free_port(), free_port()
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{smtp_port}:interface=127.0.0.1"]},
        "pop3": {"listen": [f"tcp:{pop_port}:interface=127.0.0.1"]},
        "local": {"domains": ["Bücher.example"]},
        "delivery": {"retry_min": "1h"},
    })
    relay = RelayProcess(str(tmp_path), data)
    r = relayctl(relay.config_path, "user", "add", "JÖRG@bücher.example", "--password-stdin", input=PW + "\n")
    assert r.returncode == 0 and "user jörg@bücher.example (stored as jörg@xn--bcher-kva.example) added" in r.stderr
    relay.start(wait_for=("127.0.0.1", smtp_port))
    try:
        with smtplib.SMTP("127.0.0.1", smtp_port) as s:
            s.ehlo("client.example")
            assert s.has_extn("smtputf8")
            # without SMTPUTF8 smtplib itself refuses to send a non-ASCII address; the raw refusal:
            s.send("MAIL FROM:<jörg@bücher.example>\r\n".encode())
            code, text = s.getreply()
            assert (code, text) == (553, b"5.6.7 Non-ASCII addresses not permitted for that sender/recipient")
            s.rset()
            assert s.sendmail("jörg@bücher.example", ["JÖRG@xn--BCHER-KVA.example"], MSG,
                              mail_options=["SMTPUTF8"]) == {}
        new = tmp_path / "mail" / "xn--bcher-kva.example" / "jörg" / "new"
        poll(lambda: new.is_dir() and os.listdir(new), 20, what="local delivery")
        c = poplib.POP3("127.0.0.1", pop_port, timeout=10)
        assert c.capa().get("UTF8") == ["USER"]
        c.utf8()
        c.user("jörg@bücher.example")
        c.pass_(PW)
        _, lines, _ = c.retr(1)
        c.quit()
        got = b"\r\n".join(lines) + b"\r\n"
        assert got.startswith(b"Return-Path: <j\xc3\xb6rg@xn--bcher-kva.example>\r\n"
                              b"Delivered-To: j\xc3\xb6rg@xn--bcher-kva.example\r\n"), got[:200]
        assert got.endswith(MSG)
        log = relay.log()
        assert "from=<jörg@xn--bcher-kva.example>" in log, log
        assert "pop3: login client=127.0.0.1 user=jörg@xn--bcher-kva.example" in log, log
    finally:
        relay.stop()


def test_queue_show_of_a_utf8_message(tmp_path):
    """A message held in the queue (no route out), shown by relayctl on the stopped relay's spool."""
    smtp_port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{smtp_port}:interface=127.0.0.1"]},
        "relay": {"networks": ["127.0.0.0/8"], "smarthost": "127.0.0.1:9"},  # nothing listens: deferred
        "delivery": {"retry_min": "1h"},
    })
    relay = RelayProcess(str(tmp_path), data)
    relay.start(wait_for=("127.0.0.1", smtp_port))
    try:
        with smtplib.SMTP("127.0.0.1", smtp_port) as s:
            s.sendmail("jörg@bücher.example", ["δοκιμή@παράδειγμα.δοκιμή"], MSG, mail_options=["SMTPUTF8"])
    finally:
        relay.stop()
    (qid,) = spoolmod.Spool(data["spool"]).queue_ids()
    r = relayctl(relay.config_path, "queue", "show", qid)
    assert r.returncode == 0, r.stderr
    assert "Sender:    <jörg@xn--bcher-kva.example> (jörg@bücher.example)" in r.stdout, r.stdout
    assert "<δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp> (δοκιμή@παράδειγμα.δοκιμή)" in r.stdout, r.stdout
    assert "SMTPUTF8:  yes" in r.stdout
    assert "UTF8SMTP" in r.stdout
