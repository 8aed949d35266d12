"""relay-sendmail as a real subprocess, with the relay (``twistd relay``)
up and down, and - when the tests run as root - as another Unix user:
what works for which users, as the README says.

* the relay's user (or root) writes to the drop directory: queued durably
  whether the relay runs or not;
* another user with the default spool (0700) falls back to SMTP on
  loopback: works while the relay runs, refused with exit 75 otherwise;
* with the drop directory opened to a group (0710 spool, 3730 drop), a
  member of that group queues durably too, and the relay records the real
  submitter from the file's owner.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port, toml_dumps
from tests.support.wait import poll

NOBODY = 65534
DAEMON = 1

MESSAGE = (b"From: Cron Daemon <root@local.test>\n"
           b"To: alice\n"
           b"Bcc: alice@local.test\n"
           b"Subject: Cron <root@host> run-parts /etc/cron.daily\n"
           b"\n"
           b"/etc/cron.daily/logrotate:\n"
           b".\n"
           b"error: something\n")


def sendmail(argv: list[str], data: bytes, *, as_uid: int | None = None, env_extra: dict | None = None,
             cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RELAY_CONFIG", None)
    env.update(env_extra or {})
    if as_uid is None:
        cmd = [sys.executable, "-m", "relay.intake.sendmail", *argv]
    else:
        # The Python tree of this test machine may be unreadable by other
        # users: import everything first, then become the user, as a
        # sendmail installed for all users would simply run.
        cmd = [sys.executable, "-c", _AS_USER.format(root=ROOT, uid=as_uid), *argv]
    return subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=60, cwd=cwd)


_AS_USER = """
import os, sys
sys.path.insert(0, {root!r})
import relay.intake.sendmail, relay.config, relay.common.address, relay.queue.spool, relay.common.endpoints
import smtplib, pwd, tempfile, errno, email.policy, email.headerregistry, email._header_value_parser
import email.utils, email.charset, email.base64mime, email.quoprimime, encodings.idna, idna, ctypes, ctypes.util
'x'.encode('idna')
relay.intake.sendmail.load_config(sys.argv[sys.argv.index('-C') + 1])  # imports what validating endpoints needs
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
sys.exit(relay.intake.sendmail.main(sys.argv[1:]))
"""


class Setup:
    def __init__(self, base: str, **over):
        self.base = base
        self.port = free_port()
        self.data = deep_merge(base_config(base), {"smtp": {"listen": [f"tcp:{self.port}:interface=127.0.0.1"]}})
        self.data = deep_merge(self.data, over)
        usersmod.add_user(self.data["local"]["users"], "alice@local.test", "pw")
        self.cfg = os.path.join(base, "relay.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.data))
        self.spool = spoolmod.Spool(self.data["spool"])
        self.inbox = os.path.join(self.data["local"]["mailboxes"], "local.test", "alice", "new")

    def mails(self) -> list[bytes]:
        if not os.path.isdir(self.inbox):
            return []
        return [open(os.path.join(self.inbox, n), "rb").read() for n in sorted(os.listdir(self.inbox))]

    def relay(self) -> RelayProcess:
        return RelayProcess(self.base, self.data)


def test_relay_up_delivered_at_once(tmp_path):
    s = Setup(str(tmp_path))
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        r = sendmail(["-C", s.cfg, "-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"], MESSAGE)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"" and r.stderr == b""
        poll(s.mails, 10, what="delivery to alice's Maildir")
        (mail,) = s.mails()
        assert f"(twisted-relay, from userid {pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()}))".encode() in mail
        assert b"\nSubject: Cron <root@host> run-parts /etc/cron.daily\n" in mail
        assert b"\n.\nerror: something\n" in mail and b"Bcc" not in mail
        assert os.listdir(s.spool.drop_dir) == []
        assert "client=local" in relay.log() and "(queued by relay-sendmail)" in relay.log()
    finally:
        relay.stop()


def test_relay_down_queued_in_drop_then_delivered_at_start(tmp_path):
    s = Setup(str(tmp_path))
    s.spool.create()  # installed, never started
    r = sendmail(["-C", s.cfg, "alice@local.test"], b"Subject: while down\n\nqueued\n")
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(s.spool.drop_dir)
    assert spoolmod.is_queue_id(name)
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        poll(s.mails, 10, what="delivery after the start")
        (mail,) = s.mails()
        assert b"Subject: while down" in mail and f"id {name};".encode() in mail
        assert os.listdir(s.spool.drop_dir) == []
        assert f"{name}: client=local" in relay.log()
    finally:
        relay.stop()


def test_smtp_fallback_when_the_drop_directory_is_out_of_reach(tmp_path):
    """A config whose spool this process cannot use: submission over SMTP."""
    s = Setup(str(tmp_path))
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        other = deep_merge(s.data, {"spool": str(tmp_path / "not-created" / "spool")})
        cfg = tmp_path / "other.toml"
        cfg.write_text(toml_dumps(other))
        r = sendmail(["-C", str(cfg), "-f", "job@local.test", "-F", "Backup Job", "alice"],
                     b"Subject: via smtp\n\n.leading dot\nbody\n")
        assert r.returncode == 0, r.stderr
        poll(s.mails, 10, what="delivery")
        (mail,) = s.mails()
        assert b"Received: from localhost ([127.0.0.1])" in mail
        me = pwd.getpwuid(os.getuid()).pw_name
        assert f"(relay-sendmail, from userid {me} (uid {os.getuid()}));".encode() in mail
        assert b"From: Backup Job <job@local.test>" in mail and b"\n.leading dot\nbody\n" in mail
        assert b"Return-Path: <job@local.test>" in mail
        # a recipient the relay refuses: nothing queued, the reply is shown
        r = sendmail(["-C", str(cfg), "alice", "nobody@local.test"], b"Subject: x\n\nx\n")
        assert r.returncode == 69 and b"nobody@local.test" in r.stderr and b"550" in r.stderr
        assert b"nothing was queued" in r.stderr
    finally:
        relay.stop()
    r = sendmail(["-C", str(cfg), "alice"], b"Subject: x\n\nx\n")
    assert r.returncode == 75 and b"message NOT queued: the relay is not running" in r.stderr


def test_bad_input_and_refused_modes_as_a_process(tmp_path):
    s = Setup(str(tmp_path))
    s.spool.create()
    r = sendmail(["-C", s.cfg, "-bs"], b"")
    assert r.returncode == 64 and b"-bs" in r.stderr and b"not supported" in r.stderr
    r = sendmail(["-C", s.cfg, "alice"], b"Subject: x\n\nbare\rCR\n")
    assert r.returncode == 65 and b"bare CR" in r.stderr
    r = sendmail(["-C", s.cfg], b"Subject: x\n\nx\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr
    r = sendmail(["alice"], b"x\n", env_extra={"RELAY_CONFIG": s.cfg})
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(s.spool.drop_dir)) == 1
    assert not [n for n in os.listdir(s.spool.drop_dir) if n.startswith(".")]


# -- other users (root only) ----------------------------------------------------------------------


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as other users")


@pytest.fixture
def shared_base():
    base = tempfile.mkdtemp(prefix="relay-sendmail-", dir="/tmp")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_other_user_with_default_spool_uses_smtp_or_gets_75(shared_base):
    s = Setup(shared_base)
    os.chmod(s.cfg, 0o644)
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        assert os.stat(s.spool.root).st_mode & 0o777 == 0o700
        r = sendmail(["-C", s.cfg, "alice"], b"Subject: from nobody\n\nx\n", as_uid=NOBODY)
        assert r.returncode == 0, r.stderr
        poll(s.mails, 10, what="delivery")
        (mail,) = s.mails()
        assert b"(relay-sendmail, from userid nobody (uid 65534))" in mail
        assert b"From: nobody <nobody@local.test>" in mail
    finally:
        relay.stop()
    r = sendmail(["-C", s.cfg, "alice"], b"Subject: lost?\n\nx\n", as_uid=NOBODY)
    assert r.returncode == 75
    assert b"message NOT queued" in r.stderr and b"uid 65534 (nobody) may not write to" in r.stderr
    assert os.listdir(s.spool.drop_dir) == []


@needs_root
def test_group_opened_drop_directory_for_other_users(shared_base):
    """The documented set-up: spool 0710 and drop 3730 owned by the relay's
    user and a submitters' group; the relay runs unprivileged and is in
    that group.  (Here: the relay runs as "daemon" with group "nogroup",
    the submitter is "nobody", whose group is "nogroup".)"""
    s = Setup(shared_base)
    os.chmod(s.cfg, 0o644)
    s.spool.create()
    mail_root = s.data["local"]["mailboxes"]
    os.makedirs(mail_root, 0o700, exist_ok=True)
    for path, _, _files in os.walk(s.spool.root):
        os.chown(path, DAEMON, DAEMON)
    os.chown(mail_root, DAEMON, DAEMON)
    os.chown(s.data["local"]["users"], DAEMON, DAEMON)
    os.chown(s.spool.root, DAEMON, NOBODY)
    os.chmod(s.spool.root, 0o710)
    os.chown(s.spool.drop_dir, DAEMON, NOBODY)
    os.chmod(s.spool.drop_dir, 0o3730)

    # relay down: nobody's message waits in drop/, owned by nobody, readable by the group
    r = sendmail(["-C", s.cfg, "-t"], b"To: alice@local.test\nSubject: offline\n\nx\n", as_uid=NOBODY)
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(s.spool.drop_dir)
    st = os.stat(os.path.join(s.spool.drop_dir, name))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o640)

    log = open(os.path.join(shared_base, "relay.log"), "wb")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                          "-n", "--pidfile=", "--logfile", "-", "-u", str(DAEMON), "-g", str(NOBODY),
                          "relay", "--config", s.cfg], cwd=shared_base, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        poll(lambda: RelayProcess._connectable("127.0.0.1", s.port) or p.poll() is not None, 20,
             what="the relay")
        assert p.poll() is None, open(os.path.join(shared_base, "relay.log")).read()
        poll(s.mails, 10, what="delivery of the message queued while the relay was down")
        # relay up: straight through the drop directory again
        r = sendmail(["-C", s.cfg, "alice"], b"Subject: online\n\nx\n", as_uid=NOBODY)
        assert r.returncode == 0, r.stderr
        poll(lambda: len(s.mails()) == 2, 10, what="the second delivery")
        for mail in s.mails():
            assert b"(twisted-relay, from userid nobody (uid 65534))" in mail
        assert os.listdir(s.spool.drop_dir) == []
        text = open(os.path.join(shared_base, "relay.log")).read()
        assert "members of group 65534" in text and "client=local, uid=65534 (nobody)" in text
    finally:
        p.terminate()
        p.wait(30)
        log.close()


# -- before the first start (no spool yet) ----------------------------------------------------------


def test_never_started_relay_sendmail_makes_the_spool_and_the_first_start_delivers(tmp_path):
    """A fresh install: relay-sendmail (root, or the user who owns the
    directory the spool goes in: the one the relay would make it as) makes
    the relay's own spool layout and queues; the first start delivers."""
    s = Setup(str(tmp_path))
    assert not os.path.exists(s.spool.root)
    r = sendmail(["-C", s.cfg, "alice@local.test"], b"Subject: before the first start\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    for d in (s.spool.root, s.spool.incoming_dir, s.spool.queue_dir, s.spool.quarantine_dir, s.spool.drop_dir):
        st = os.stat(d)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.geteuid()), d
    (name,) = os.listdir(s.spool.drop_dir)
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        poll(s.mails, 20, what="delivery at the first start")
        (mail,) = s.mails()
        assert b"Subject: before the first start" in mail and f"id {name};".encode() in mail
        assert os.listdir(s.spool.drop_dir) == []
    finally:
        relay.stop()


@needs_root
def test_never_started_relay_root_makes_the_layout_as_the_spools_owner(shared_base):
    """The documented install (``install -d -o relay /var/spool/relay``),
    never started: root's relay-sendmail makes the rest of the layout as
    the spool's owner (nobody here), the relay running as that user
    delivers it at its first start."""
    s = Setup(shared_base)
    os.chmod(s.cfg, 0o644)
    mail_root = s.data["local"]["mailboxes"]
    os.makedirs(mail_root, 0o700)
    os.mkdir(s.spool.root, 0o700)
    for p in (s.spool.root, mail_root, s.data["local"]["users"]):
        os.chown(p, NOBODY, NOBODY)
    r = sendmail(["-C", s.cfg, "alice@local.test"], b"Subject: cron before the start\n\nx\n")
    assert r.returncode == 0, r.stderr
    for d in (s.spool.incoming_dir, s.spool.queue_dir, s.spool.quarantine_dir, s.spool.drop_dir):
        st = os.stat(d)
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, NOBODY, NOBODY), d
    (name,) = os.listdir(s.spool.drop_dir)
    st = os.stat(os.path.join(s.spool.drop_dir, name))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, NOBODY, 0o640)  # root's: root sent it

    log = open(os.path.join(shared_base, "relay.log"), "wb")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                          "-n", "--pidfile=", "--logfile", "-", "-u", str(NOBODY), "-g", str(NOBODY),
                          "relay", "--config", s.cfg], cwd=shared_base, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        poll(lambda: RelayProcess._connectable("127.0.0.1", s.port) or p.poll() is not None, 20,
             what="the relay")
        assert p.poll() is None, open(os.path.join(shared_base, "relay.log")).read()
        poll(s.mails, 20, what="delivery at the first start")
        (mail,) = s.mails()
        assert b"(twisted-relay, from userid root (uid 0))" in mail
        assert b"Subject: cron before the start" in mail
    finally:
        p.terminate()
        p.wait(30)
        log.close()


@needs_root
def test_never_started_relay_other_user_is_told_what_is_wrong(shared_base):
    s = Setup(shared_base)
    os.chmod(s.cfg, 0o644)
    r = sendmail(["-C", s.cfg, "alice"], b"Subject: x\n\nx\n", as_uid=NOBODY)
    assert r.returncode == 75
    assert (f"the spool {s.spool.root} does not exist yet: start the relay once, or run relay-sendmail "
            "as root or as the relay's user").encode() in r.stderr, r.stderr
    assert b"may not write" not in r.stderr
    assert not os.path.exists(s.spool.root)


# -- a group-opened drop directory: who and when come from the file, not its text --------------------


_WRITE_AS = """
import os, sys
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
d, name, data = sys.argv[1], sys.argv[2], sys.stdin.buffer.read()
fd = os.open(os.path.join(d, "." + name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
os.write(fd, data)
os.fsync(fd)
os.close(fd)
os.rename(os.path.join(d, "." + name + ".tmp"), os.path.join(d, name))
"""


@needs_root
@pytest.mark.parametrize("forge", ["user", "arrival"])
def test_group_member_cannot_forge_the_submitter_or_backdate_arrival(shared_base, forge):
    """nobody, a member of the drop directory's group, writes a drop file by
    hand claiming to be "root" (with its own uid, as relay-sendmail's line
    has it), or an arrival 30 days ago (past delivery.max_lifetime, so a
    backdated message would be bounced at its first failed attempt)."""
    import json
    import time

    dead = free_port()
    s = Setup(shared_base, relay={"routes": {"dest.test": f"127.0.0.1:{dead}"}},
              delivery={"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5})
    os.chmod(s.cfg, 0o644)
    s.spool.create()
    os.chown(s.spool.root, 0, NOBODY)
    os.chmod(s.spool.root, 0o710)
    os.chown(s.spool.drop_dir, 0, NOBODY)
    os.chmod(s.spool.drop_dir, 0o3730)
    qid = spoolmod.new_id()
    forged = {"from": "boss@local.test", "rcpt": ["x@dest.test"],
              "t": time.time() - 30 * 86400 if forge == "arrival" else time.time(),
              "uid": NOBODY, "user": "root" if forge == "user" else "nobody"}
    data = (b"RELAYDROP1 " + json.dumps(forged).encode() + b"\nSubject: forged\r\n\r\nx\r\n")
    started = time.time()
    w = subprocess.run([sys.executable, "-c", _WRITE_AS.format(uid=NOBODY), s.spool.drop_dir, qid], input=data,
                       capture_output=True, timeout=60)
    assert w.returncode == 0, w.stderr
    assert os.stat(os.path.join(s.spool.drop_dir, qid)).st_uid == NOBODY
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        poll(lambda: f"{qid}: client=local" in relay.log(), 20, what="the pickup")
        poll(lambda: "deferred" in relay.log() or "bounced" in relay.log() or "expired" in relay.log(), 20,
             what="the first attempt")
        env, _, _ = s.spool.read_envelope(qid)  # still queued: deferred, not bounced as expired
        assert env.client["uid"] == NOBODY and env.client["user"] == "nobody"
        assert started - 5 <= env.arrival <= time.time()
        with open(s.spool.message_path(qid), "rb") as f:
            assert b"(twisted-relay, from userid nobody (uid 65534))" in f.read()
        text = relay.log()
        assert f"{qid}: client=local, uid=65534 (nobody)" in text and "(root)" not in text
    finally:
        relay.stop()


def test_a_drop_file_name_cannot_forge_a_log_line(tmp_path):
    """Whoever may write to drop/ chooses the names there: one with a
    newline and a fail2ban-looking text is logged quoted, on one line."""
    s = Setup(str(tmp_path))
    s.spool.create()
    evil = "x\nreject: RCPT from x[203.0.113.7]: 554 5.7.1 forged"
    with open(os.path.join(s.spool.drop_dir, evil), "wb") as f:
        f.write(b"garbage")
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        poll(lambda: "moved to quarantine" in relay.log(), 20, what="the quarantine")
        lines = relay.log().splitlines()
        assert not [ln for ln in lines if ln.startswith("reject:") or "reject: RCPT" in ln.split("drop/")[0]]
        (line,) = [ln for ln in lines if "moved to quarantine:" in ln]
        assert "drop/x\\x0areject:\\x20RCPT\\x20from\\x20x\\x5b203.0.113.7\\x5d:\\x20554\\x205.7.1\\x20forged:" in line
    finally:
        relay.stop()
