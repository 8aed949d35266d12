"""Running it for real: SIGTERM, SIGHUP reload, privilege drop, socket activation.

Every test runs ``twistd -n relay`` as a real process.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port, toml_dumps
from tests.support.smtpclient import RawSMTP
from tests.support.wait import poll


def make(tmp_path, **over):
    port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    data = deep_merge(data, over)
    return RelayProcess(str(tmp_path), data), port


def test_sigterm_lets_a_transaction_finish_then_421(tmp_path):
    relay, port = make(tmp_path, relay={"smarthost": f"127.0.0.1:{free_port()}"},
                       delivery={"retry_min": "1h", "retry_max": "1h"})
    relay.start(wait_for=("127.0.0.1", port))
    try:
        busy = RawSMTP("127.0.0.1", port)
        busy.reply()
        busy.cmd("EHLO busy")
        idle = RawSMTP("127.0.0.1", port)
        idle.reply()
        idle.cmd("EHLO idle")
        assert busy.cmd("MAIL FROM:<a@b.example>").code == 250
        assert busy.cmd("RCPT TO:<x@remote.example>").code == 250
        assert busy.cmd("DATA").code == 354
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        t0 = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        # the idle session is closed at once with 421 4.3.2
        r = idle.reply()
        assert (r.code, r.lines[0][:5]) == (421, "4.3.2")
        # no new connections
        poll(lambda: not RelayProcess._connectable("127.0.0.1", port), 30, what="the listener to close")
        # the transaction in progress finishes and is acknowledged
        busy.send(b"second half\r\n.\r\n")
        r = busy.reply()
        assert r.code == 250, r
        qid = r.lines[0].rsplit(" ", 1)[1]
        bye = busy.reply()
        assert (bye.code, bye.lines[0][:5]) == (421, "4.3.2")
        relay.proc.wait(30)
        assert time.monotonic() - t0 < 30
        assert qid in spoolmod.Spool(relay.data["spool"]).queue_ids()
        assert "stopped in" in relay.log()
    finally:
        relay.stop()


def test_sigterm_with_a_stalled_client_exits_within_bound(tmp_path):
    relay, port = make(tmp_path)
    relay.start(wait_for=("127.0.0.1", port))
    try:
        c = RawSMTP("127.0.0.1", port, timeout=40)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@b.example>")
        c.cmd("RCPT TO:<postmaster@local.test>")
        c.cmd("DATA")
        c.send(b"Subject: never finished\r\n")
        t0 = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        r = c.reply()  # after the grace period
        took = time.monotonic() - t0
        assert (r.code, r.lines[0][:5]) == (421, "4.3.2")
        assert 5 < took < 25
        relay.proc.wait(20)
        assert time.monotonic() - t0 < 30
        sp = spoolmod.Spool(relay.data["spool"])
        assert sp.queue_ids() == [] and sp.incoming_leftovers() == []
    finally:
        relay.stop()


def test_second_sigterm_exits_at_once_without_loss(tmp_path):
    relay, port = make(tmp_path)
    relay.start(wait_for=("127.0.0.1", port))
    try:
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@b.example", ["postmaster@local.test"], b"Subject: acked\r\n\r\nx\r\n")
        c = RawSMTP("127.0.0.1", port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@b.example>")
        c.cmd("RCPT TO:<postmaster@local.test>")
        c.cmd("DATA")
        relay.proc.send_signal(signal.SIGTERM)
        poll(lambda: "stopped" not in relay.log() and not RelayProcess._connectable("127.0.0.1", port), 30,
             what="the relay to start stopping")
        t0 = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        relay.proc.wait(15)
        # "at once": well before the 10 s a transaction in progress would get
        # (the margin is for a busy CI machine, where a process exit takes time)
        assert time.monotonic() - t0 < 8
        assert "second SIGTERM" in relay.log()
        mailbox = os.path.join(relay.data["local"]["mailboxes"], "local.test", "postmaster", "new")
        sp = spoolmod.Spool(relay.data["spool"])
        # the acknowledged message is delivered or still queued
        assert (os.path.isdir(mailbox) and os.listdir(mailbox)) or sp.queue_ids()
    finally:
        relay.stop()


def test_sighup_reload_and_bad_config_refused(tmp_path):
    relay, port = make(tmp_path)
    relay.start(wait_for=("127.0.0.1", port))

    def rcpt(addr):
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.ehlo("x")
            s.mail("a@b.example")
            return s.rcpt(addr)[0]

    try:
        assert rcpt("someone@far.example") == 250
        # loopback no longer trusted: relaying is refused after SIGHUP
        data = deep_merge(relay.data, {"relay": {"networks": ["10.9.0.0/16"]},
                                       "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1",
                                                           f"tcp:{free_port()}:interface=127.0.0.1"]}})
        with open(relay.config_path, "w") as f:
            f.write(toml_dumps(data))
        relay.proc.send_signal(signal.SIGHUP)
        poll(lambda: "config reloaded" in relay.log(), 10, what="the reload")
        assert rcpt("someone@far.example") == 554
        assert "smtp.listen changed: takes effect after a restart" in relay.log()
        # a bad config is refused as a whole; the running one stays
        with open(relay.config_path, "w") as f:
            f.write(toml_dumps(data).replace('networks = ["10.9.0.0/16"]', 'networks = ["not a net"]')
                    + "\n[delivery]\nretry_min = \"soon\"\n")
        relay.proc.send_signal(signal.SIGHUP)
        poll(lambda: "reload refused" in relay.log(), 10, what="the refusal")
        assert "relay.networks" in relay.log()
        assert rcpt("someone@far.example") == 554
        assert relay.proc.poll() is None
    finally:
        relay.stop()


def test_reload_picks_up_new_certificate(tmp_path):
    from tests.support.certs import cert_files

    a = cert_files("localhost", "127.0.0.1")
    b = cert_files("127.0.0.1", "renewed.example")
    os.makedirs(tmp_path / "tls")
    shutil.copy(a.cert_pem, tmp_path / "tls" / "cert.pem")
    shutil.copy(a.key_pem, tmp_path / "tls" / "key.pem")
    relay, port = make(tmp_path, tls={"certificate": str(tmp_path / "tls" / "cert.pem"),
                                      "key": str(tmp_path / "tls" / "key.pem")})
    relay.start(wait_for=("127.0.0.1", port))

    def serial():
        import ssl

        with smtplib.SMTP("127.0.0.1", port) as s:
            s.starttls(context=ssl.create_default_context(cafile=a.ca_pem))
            return s.sock.getpeercert()["serialNumber"]

    try:
        first = serial()
        shutil.copy(b.cert_pem, tmp_path / "tls" / "cert.pem")
        shutil.copy(b.key_pem, tmp_path / "tls" / "key.pem")
        relay.proc.send_signal(signal.SIGHUP)
        poll(lambda: "TLS certificate" in relay.log(), 10, what="the reload")
        assert serial() != first
    finally:
        relay.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind port 25 and drop privileges")
def test_privilege_drop_binds_port_25_then_runs_as_nobody():
    ip = "127.0.0.77"
    s = socket.socket()
    try:
        s.bind((ip, 25))
    except OSError:
        pytest.skip(f"{ip}:25 is in use")
    finally:
        s.close()
    base = tempfile.mkdtemp(prefix="relay-priv-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        nobody = 65534
        spool = os.path.join(base, "spool")
        mail = os.path.join(base, "mail")
        for d in (spool, mail):
            os.mkdir(d, 0o700)
            os.chown(d, nobody, nobody)
        users = os.path.join(base, "users")
        usersmod.add_user(users, "alice@local.test", "pw")
        os.chown(users, nobody, nobody)
        data = deep_merge(base_config(base), {
            "smtp": {"listen": [f"tcp:25:interface={ip}"]},
            "local": {"domains": ["local.test"]},
        })
        cfg = os.path.join(base, "relay.toml")
        with open(cfg, "w") as f:
            f.write(toml_dumps(data))
        os.chmod(cfg, 0o644)
        env = dict(os.environ, PYTHONPATH=ROOT)
        log = open(os.path.join(base, "log"), "wb")
        p = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                              "-n", "--pidfile=", "--logfile", "-", "-u", str(nobody), "-g", str(nobody),
                              "relay", "--config", cfg], cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            poll(lambda: RelayProcess._connectable(ip, 25) or p.poll() is not None, 20, what="port 25")
            assert p.poll() is None, open(os.path.join(base, "log")).read()
            with open(f"/proc/{p.pid}/status") as f:
                uids = [ln for ln in f if ln.startswith("Uid:")][0].split()[1:]
            assert set(uids) == {str(nobody)}
            with smtplib.SMTP(ip, 25) as s:
                s.sendmail("a@b.example", ["alice@local.test"], b"Subject: as nobody\r\n\r\nx\r\n")
            new = os.path.join(mail, "local.test", "alice", "new")
            poll(lambda: os.path.isdir(new) and os.listdir(new), 10, what="local delivery as nobody")
            (name,) = os.listdir(new)
            st = os.stat(os.path.join(new, name))
            assert st.st_uid == nobody and st.st_mode & 0o077 == 0
            assert os.stat(os.path.join(spool, "queue")).st_uid == nobody
            assert os.stat(os.path.join(spool, "queue")).st_mode & 0o777 == 0o700
        finally:
            p.terminate()
            p.wait(30)
            log.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_systemd_socket_activation(tmp_path):
    """The relay serves on a socket it inherits (LISTEN_FDS), as systemd passes it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(50)
    port = sock.getsockname()[1]
    data = deep_merge(base_config(str(tmp_path)), {"smtp": {"listen": ["systemd:domain=INET:index=0"]}})
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml_dumps(data))
    env = dict(os.environ, PYTHONPATH=ROOT, LISTEN_FDS="1", LISTEN_FDNAMES="smtp")
    fd = sock.fileno()

    def child():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)
        os.environ["LISTEN_PID"] = str(os.getpid())

    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', sys.executable, "-c",
         "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "--logfile", "-",
         "relay", "--config", str(cfg)],
        env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=child, pass_fds=(fd, 3), cwd=tmp_path)
    sock.close()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            code, _ = s.ehlo("x")
            assert code == 250
            s.sendmail("a@b.example", ["postmaster@local.test"], b"Subject: activated\r\n\r\nx\r\n")
        assert p.poll() is None
    finally:
        p.terminate()
        p.wait(30)
        log.close()
