"""``twistd relay`` as a real process: defaults, bad config, start-up recovery,
and memory while receiving a 100 MB message."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll


def twistd(args, cwd, env_extra=None, timeout=30):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    env.pop("RELAY_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def port_busy(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return False
    except OSError:
        return True
    finally:
        s.close()


@pytest.mark.skipif(port_busy(2525), reason="port 2525 is in use on this machine")
def test_defaults_without_config(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RELAY_CONFIG", None)
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                          "-n", "--pidfile=", "--logfile", "-", "relay"],
                         cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(lambda: RelayProcess._connectable("127.0.0.1", 2525) or p.poll() is not None, 20,
             what="the relay on 127.0.0.1:2525")
        with smtplib.SMTP("127.0.0.1", 2525) as s:
            s.ehlo()
            assert s.mail("someone@example.org")[0] == 250
            assert s.rcpt("postmaster@localhost")[0] == 250
            code, reply = s.data(b"Subject: hi\r\n\r\nhello\r\n")
        assert code == 250, reply
        qid = re.search(rb"queued as (\S+)", reply).group(1).decode()
        text = (tmp_path / "log").read_text()
        assert "SMTP listening on tcp:2525:interface=127.0.0.1" in text
        assert f"spool {tmp_path}/spool" in text
        assert "local domains: localhost" in text
        # The message was queued in ./spool (the default) under the id the
        # 250 named, and is then delivered there by the default local rules.
        assert f"{qid}: client=" in text
        poll(lambda: f"{qid}: removed" in (tmp_path / "log").read_text(), 30,
             what=f"{qid} handled and removed from the default spool")
        out = (tmp_path / "log").read_text()
        assert re.search(re.escape(f"{qid}: to=<postmaster@localhost>") + r".*status=sent", out), out
        assert os.listdir(tmp_path / "spool" / "queue") == []
    finally:
        p.terminate()
        p.wait(30)
        log.close()


def test_bad_config_does_not_start(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[smtp]\nlisten = ["tcp:notaport"]\ntimeout = "soon"\n')
    r = twistd(["-n", "--pidfile=", "relay", "--config", str(cfg)], cwd=tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "smtp.listen" in out and "smtp.timeout" in out and str(cfg) in out


def test_relay_toml_in_cwd_is_used(tmp_path):
    (tmp_path / "relay.toml").write_text("[smtp]\nmax_recipients = 0\n")
    r = twistd(["-n", "--pidfile=", "relay"], cwd=tmp_path)
    assert r.returncode != 0
    assert "smtp.max_recipients" in r.stdout + r.stderr


def test_startup_recovery_and_quarantine(tmp_path):
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]},
        "relay": {"smarthost": f"127.0.0.1:{free_port()}"},
        "delivery": {"retry_min": "1h", "retry_max": "1h"},
    })
    sp = spoolmod.Spool(data["spool"])
    sp.create()
    # a half-received message from a crash
    (tmp_path / "spool" / "incoming" / "1K17AAAAAAAAAAAA.tmp").write_bytes(b"RELAYQ1 {}\npartial")
    # a corrupt queue entry and a good one
    bad = spoolmod.new_id()
    (tmp_path / "spool" / "queue" / bad).write_bytes(b"garbage, not an envelope\r\n")
    env = spoolmod.Envelope(spoolmod.new_id(), "a@b.example", ["x@remote.example"], time.time())
    inc = sp.incoming(env)
    inc.write(b"Subject: kept\r\n\r\nbody\r\n")
    good = inc.finish()
    # a state file whose message is gone, and a stray temp file
    orphan = spoolmod.new_id()
    (tmp_path / "spool" / "queue" / (orphan + ".state")).write_bytes(b"{}")
    (tmp_path / "spool" / "queue" / (good + ".state.abcd.tmp")).write_bytes(b"{")

    relay = RelayProcess(str(tmp_path), data)
    port = int(data["smtp"]["listen"][0].split(":")[1])
    relay.start(wait_for=("127.0.0.1", port))
    try:
        poll(lambda: "spool scanned" in relay.log() or "queue loaded" in relay.log(), 20, what="scan")
        log = relay.log()
        assert "1K17AAAAAAAAAAAA.tmp" in log
        assert bad in log and "quarantine" in log
        assert sp.incoming_leftovers() == []
        assert bad in os.listdir(sp.quarantine_dir)
        assert good in sp.queue_ids()
        assert not os.path.exists(sp.state_path(orphan))
        assert not os.path.exists(tmp_path / "spool" / "queue" / (good + ".state.abcd.tmp"))
        # and it still accepts mail
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@b.example", ["y@remote.example"], b"Subject: new\r\n\r\nx\r\n")
    finally:
        relay.stop()


def _rss_kb(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_100mb_message_streams_with_flat_memory(tmp_path):
    port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "max_message_size": 200_000_000},
        "relay": {"smarthost": f"127.0.0.1:{free_port()}"},
        "delivery": {"retry_min": "1h", "retry_max": "1h"},
    })
    relay = RelayProcess(str(tmp_path), data)
    relay.start(wait_for=("127.0.0.1", port))
    try:
        line = b"0123456789" * 9 + b"\r\n"  # 92 bytes
        chunk = line * 11000  # ~1 MB
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@b.example", ["x@remote.example"], b"Subject: small\r\n\r\nwarm up\r\n")
            base = _rss_kb(relay.proc.pid)
            s.ehlo("x")
            s.mail("a@b.example")
            s.rcpt("x@remote.example")
            s.putcmd("data")
            code, _ = s.getreply()
            assert code == 354
            total = 0
            sock = s.sock
            sock.sendall(b"Subject: big\r\n\r\n")
            while total < 100 * 1024 * 1024:
                sock.sendall(chunk)
                total += len(chunk)
            sock.sendall(b".\r\n")
            code, resp = s.getreply()
            assert code == 250, resp
        peak = _rss_kb(relay.proc.pid)
        growth_mb = (peak - base) / 1024
        assert growth_mb < 10, f"RSS peak grew by {growth_mb:.1f} MB for a 100 MB message"
        qid = resp.decode().rsplit(" ", 1)[1]
        env, off, size = spoolmod.Spool(data["spool"]).read_envelope(qid)
        assert size > total
    finally:
        relay.stop()
