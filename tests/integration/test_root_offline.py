"""Root on a spool (or users-file directory) another user controls.

The spool belongs to the relay's user; whoever holds that account can
put a symbolic link at any name in it.  Root's routine commands (relayctl
status, queue actions with the relay down, user add, relay-sendmail) must
never create, change or chown anything through such a link.  Here the
spool belongs to nobody (65534), links are planted where root used to
follow them, and the real commands run as subprocesses as root; the
targets outside must be untouched, and the commands still work (or say
what is wrong).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from relay.queue import spool as spoolmod
from tests.support.relay import ROOT
from tests.test_control import make_spool

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: root's commands on another user's spool")


@pytest.fixture
def base():
    d = tempfile.mkdtemp(prefix="relay-rootoff-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_ctl(cfg: str, *args: str, input_text: str | None = None, env_extra: dict | None = None
            ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
    env.pop("RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", cfg, *args], input=input_text,
                          capture_output=True, text=True, env=env, timeout=60, cwd="/")


def give_away(path: str, uid: int = NOBODY) -> None:
    for top, _dirs, files in os.walk(path):
        os.lchown(top, uid, uid)
        for n in files:
            os.lchown(os.path.join(top, n), uid, uid)


def nobody_spool(base: str, specs: list[dict]) -> tuple[str, spoolmod.Spool, list[str]]:
    cfg, ids = make_spool(base, specs)
    sp = spoolmod.Spool(os.path.join(base, "spool"))
    give_away(sp.root)
    return cfg, sp, ids


def outside(base: str) -> str:
    """A directory of root's, as /etc is."""
    d = os.path.join(base, "etc")
    os.mkdir(d, 0o755)
    return d


def snapshot(d: str) -> dict:
    out = {}
    for n in sorted(os.listdir(d)):
        st = os.lstat(os.path.join(d, n))
        with open(os.path.join(d, n), "rb") as f:
            out[n] = (st.st_uid, st.st_gid, st.st_mode, f.read())
    return out


# -- the spool lock -------------------------------------------------------------------------------


@pytest.mark.parametrize("target_exists", [False, True], ids=["absent", "present"])
def test_status_as_root_does_not_follow_a_lock_link(base, target_exists):
    cfg, sp, _ = nobody_spool(base, [{"rcpts": ["x@dest.test"]}])
    etc = outside(base)
    target = os.path.join(etc, "ld.so.preload")
    if target_exists:
        with open(target, "wb") as f:
            f.write(b"/lib/keep.so\n")
        os.chmod(target, 0o644)
    before = snapshot(etc)
    lock = os.path.join(sp.root, "lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    os.symlink(target, lock)
    os.lchown(lock, NOBODY, NOBODY)  # planted by the spool's owner
    for args in (["status"], ["queue"], ["queue", "hold", "--help"]):
        r = run_ctl(cfg, *args)
        if args[-1] != "--help":
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert f"{lock} is a symbolic link: not following it" in r.stderr, r.stderr
    assert snapshot(etc) == before
    assert os.path.islink(lock)


def test_status_as_root_makes_the_lock_as_the_spools_owner(base):
    cfg, sp, _ = nobody_spool(base, [{"rcpts": ["x@dest.test"]}])
    lock = os.path.join(sp.root, "lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    r = run_ctl(cfg, "status")
    assert r.returncode == 1 and "Relay:      not running" in r.stdout, r.stderr
    assert "Queue:" in r.stdout or "1" in r.stdout
    st = os.lstat(lock)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)


def test_relayctl_as_root_does_not_connect_through_a_control_socket_link(base):
    """control.sock replaced by a link to a socket only root may use: root's
    relayctl must not reach it with root's credentials."""
    import socket

    cfg, sp, _ = nobody_spool(base, [{"rcpts": ["x@dest.test"]}])
    etc = outside(base)
    victim = os.path.join(etc, "root-only.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(victim)
        os.chmod(victim, 0o600)
        srv.listen(8)
        srv.setblocking(False)
        link = os.path.join(sp.root, "control.sock")
        os.symlink(victim, link)
        os.lchown(link, NOBODY, NOBODY)
        r = run_ctl(cfg, "status", env_extra={"RELAYCTL_TIMEOUT": "2"})
        assert r.returncode == 1, (r.stdout, r.stderr)
        with pytest.raises(BlockingIOError):
            conn, _ = srv.accept()
            conn.close()
    finally:
        srv.close()


# -- queue actions with the relay down --------------------------------------------------------------


def test_offline_actions_as_root_leave_files_the_spools_owners(base):
    cfg, sp, (a, b) = nobody_spool(base, [{"rcpts": ["x@dest.test"]}, {"rcpts": ["y@dest.test"]}])
    r = run_ctl(cfg, "queue", "hold", a)
    assert r.returncode == 0, r.stderr
    st = os.stat(sp.state_path(a))
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    r = run_ctl(cfg, "queue", "bounce", b)
    assert r.returncode == 0, r.stderr
    dsns = [n for n in sp.queue_ids() if n not in (a, b)]
    assert len(dsns) == 1 and b not in sp.queue_ids()
    st = os.stat(sp.message_path(dsns[0]))
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    for d in (sp.queue_dir, sp.incoming_dir):
        for n in os.listdir(d):
            assert os.lstat(os.path.join(d, n)).st_uid == NOBODY, n


@pytest.mark.parametrize("action", ["hold", "bounce", "delete", "retry"])
def test_offline_action_as_root_writes_nothing_through_a_linked_queue_dir(base, action):
    """queue/ replaced by a link to a directory of root's holding a queued
    message: as root, relayctl would write its state file or DSN there (and
    chown it), or remove root's file."""
    cfg, sp, (a,) = nobody_spool(base, [{"rcpts": ["x@dest.test"]}])
    etc = outside(base)
    for n in os.listdir(sp.queue_dir):
        shutil.copy(os.path.join(sp.queue_dir, n), os.path.join(etc, n))
    shutil.rmtree(sp.queue_dir)
    os.symlink(etc, sp.queue_dir)
    os.lchown(sp.queue_dir, NOBODY, NOBODY)
    before = snapshot(etc)
    r = run_ctl(cfg, "queue", action, a)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Permission denied" in r.stderr or "permission denied" in r.stderr, r.stderr
    assert f"relayctl run by root acts as the spool's owner, uid {NOBODY}" in r.stderr, r.stderr
    assert snapshot(etc) == before


# -- relayctl user add ---------------------------------------------------------------------------


def users_config(base: str) -> tuple[str, str]:
    udir = os.path.join(base, "udir")
    os.mkdir(udir, 0o700)
    os.chown(udir, NOBODY, NOBODY)
    users = os.path.join(udir, "users")
    cfg, _ = make_spool(base, [])
    text = open(cfg).read().replace(repr(os.path.join(base, "users")).replace("'", '"'), f'"{users}"')
    assert users in text
    with open(cfg, "w") as f:
        f.write(text)
    return cfg, users


def test_user_add_as_root_does_not_follow_a_lock_link(base):
    cfg, users = users_config(base)
    etc = outside(base)
    target = os.path.join(etc, "ld.so.preload")
    os.symlink(target, users + ".lock")
    os.lchown(users + ".lock", NOBODY, NOBODY)
    r = run_ctl(cfg, "user", "add", "alice@local.test", "--password-stdin", input_text="secret\n")
    assert r.returncode == 1, r.stderr
    assert "users.lock is a symbolic link: not following it" in r.stderr
    assert os.listdir(etc) == [] and not os.path.exists(users)


def test_user_add_as_root_makes_the_file_the_directory_owners(base):
    cfg, users = users_config(base)
    r = run_ctl(cfg, "user", "add", "alice@local.test", "--password-stdin", input_text="secret\n")
    assert r.returncode == 0, r.stderr
    for p in (users, users + ".lock"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600), p
    assert open(users).read().startswith("alice@local.test:$scrypt$")


# -- relay-sendmail as root ------------------------------------------------------------------------


def sendmail_as_root(cfg: str, *args: str, data: bytes = b"Subject: x\n\nx\n") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "relay.intake.sendmail", "-C", cfg, *args], input=data,
                          capture_output=True, env=env, timeout=60, cwd="/")


def test_sendmail_as_root_does_not_write_through_a_drop_link(base):
    cfg, sp, _ = nobody_spool(base, [])
    etc = outside(base)
    shutil.rmtree(sp.drop_dir)
    os.symlink(etc, sp.drop_dir)
    os.lchown(sp.drop_dir, NOBODY, NOBODY)
    r = sendmail_as_root(cfg, "alice@local.test")
    assert r.returncode == 75, r.stderr
    assert f"{sp.drop_dir} is a symbolic link: not following it".encode() in r.stderr
    assert b"message NOT queued" in r.stderr
    assert os.listdir(etc) == []


def test_sendmail_as_root_into_the_spool_owners_drop_directory(base):
    """The ordinary case still works, the file being root's (the relay
    names root as the submitter)."""
    cfg, sp, _ = nobody_spool(base, [])
    r = sendmail_as_root(cfg, "alice@local.test")
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(sp.drop_dir)
    st = os.stat(os.path.join(sp.drop_dir, name))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, NOBODY, 0o640)


# -- the relay itself, started as root without -u ----------------------------------------------------


def test_relay_as_root_refuses_a_spool_another_user_controls(base):
    """twistd run as root (no -u) on the relay user's spool would follow
    that user's links as root for as long as it runs: it does not start."""
    from tests.support.relay import RelayProcess, base_config, deep_merge, free_port
    from tests.support.wait import poll

    port = free_port()
    data = deep_merge(base_config(base), {"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}})
    sp = spoolmod.Spool(data["spool"])
    sp.create()
    give_away(sp.root)
    etc = outside(base)
    os.symlink(os.path.join(etc, "ld.so.preload"), os.path.join(sp.root, "lock"))
    os.lchown(os.path.join(sp.root, "lock"), NOBODY, NOBODY)
    relay = RelayProcess(base, data).start()
    try:
        poll(lambda: relay.proc.poll() is not None, 30, what="the relay to give up")
        assert relay.proc.returncode != 0
        assert f"{sp.root} is controlled by uid {NOBODY}: a relay running as root" in relay.log(), relay.log()
        assert os.listdir(etc) == []
    finally:
        relay.stop()
