"""The POP3 lock across hosts (relay.mailbox.mboxlock, relay.mailbox.pop3lock):
the NFS-safe dot-lock's link-count rule, its stale rules (an injected pid
check; ages set on the lock file, measured against the file server's clock),
planted symbolic links refused, and no descriptor left open."""

from __future__ import annotations

import errno
import os
import time

import pytest
from twisted.internet import defer, task

from relay.mailbox import maildir, mboxlock, pop3lock


def box(tmp_path) -> str:
    d = str(tmp_path / "mail" / "example.org" / "alice")
    maildir.ensure_maildir(d)
    return d


def lock(d: str, host: str = "node-a", alive=lambda pid: True, node: str = "n1", **kw) -> mboxlock.DotLock:
    return mboxlock.DotLock(d, host=host, alive=alive, node=node, **kw)


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def leftovers(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(mboxlock.DOTLOCK_NAME + "."))


def test_acquire_writes_owner_and_release_removes(tmp_path):
    d = box(tmp_path)
    a = lock(d)
    a.acquire()
    assert a.held
    with open(a.path, "rb") as f:
        owner = mboxlock.Owner.parse(f.read())
    assert (owner.host, owner.node, owner.pid) == ("node-a", "n1", os.getpid())
    assert abs(owner.time - time.time()) < 60 and len(owner.token) == 16
    assert os.stat(a.path).st_nlink == 1  # the temporary name is gone
    assert leftovers(d) == []
    a.release()
    assert not os.path.exists(a.path) and not a.held


def test_live_lock_of_another_host_is_held_until_stale_age(tmp_path):
    d = box(tmp_path)
    a = lock(d, "node-a")
    a.acquire()
    b = lock(d, "node-b", stale_after=300)
    age(a.path, 299 - 5)
    with pytest.raises(mboxlock.LockHeld):
        b.acquire()
    assert a.still_ours()
    age(a.path, 301 + 5)  # not refreshed for longer than stale_after: stale
    b.acquire()
    assert b.held and b.broke is not None and b.broke.host == "node-a"
    assert not a.still_ours() and not a.refresh()
    a.release()  # never removes b's lock
    assert b.still_ours()
    assert leftovers(d) == []
    b.release()


def test_same_host_dead_pid_is_stale_at_once(tmp_path):
    d = box(tmp_path)
    dead = {os.getpid()}
    a = lock(d, "node-a")
    a.acquire()
    b = lock(d, "node-a", alive=lambda pid: pid not in dead)
    b.acquire()  # fresh, but its process is gone
    assert b.held
    b.release()


def test_same_host_live_pid_is_held(tmp_path):
    d = box(tmp_path)
    a = lock(d, "node-a")
    a.acquire()
    with pytest.raises(mboxlock.LockHeld):
        lock(d, "node-a", alive=lambda pid: True).acquire()
    a.release()


def test_other_node_with_the_same_name_is_judged_by_age_not_pid(tmp_path):
    """Two containers (or machines) with one host name: a pid in another
    pid namespace says nothing here."""
    d = box(tmp_path)
    a = lock(d, "same", node="n1")
    a.acquire()
    with pytest.raises(mboxlock.LockHeld):
        lock(d, "same", node="n2", alive=lambda pid: False).acquire()
    a.release()


def test_foreign_or_torn_lock_file_only_ages(tmp_path):
    d = box(tmp_path)
    path = os.path.join(d, mboxlock.DOTLOCK_NAME)
    with open(path, "wb") as f:
        f.write(b"\x00garbage pid=notanumber")
    with pytest.raises(mboxlock.LockHeld):
        lock(d, alive=lambda pid: False).acquire()
    age(path, 1000)
    b = lock(d)
    b.acquire()
    b.release()


def test_link_reported_failed_but_made_counts_by_link_count(tmp_path, monkeypatch):
    """NFS: a retransmitted LINK whose first reply was lost answers EEXIST
    (or an error) for a link that was made; the link count decides."""
    d = box(tmp_path)
    real = os.link

    def lossy(src, dst, **kw):
        real(src, dst, **kw)
        raise OSError(errno.EEXIST, "reply lost")

    monkeypatch.setattr(mboxlock.os, "link", lossy)
    a = lock(d)
    a.acquire()
    assert a.held and a.still_ours()
    monkeypatch.setattr(mboxlock.os, "link", real)
    a.release()
    assert not os.path.exists(a.path)


def test_link_that_failed_is_not_a_lock(tmp_path, monkeypatch):
    d = box(tmp_path)

    def fails(src, dst, **kw):
        raise OSError(errno.EIO, "server gone")

    monkeypatch.setattr(mboxlock.os, "link", fails)
    with pytest.raises(OSError) as e:
        lock(d).acquire()  # nothing at the lock name either: the storage fails, not "in use"
    assert e.value.errno == errno.EIO and not isinstance(e.value, mboxlock.LockRefused)
    assert leftovers(d) == [] and not os.path.exists(os.path.join(d, mboxlock.DOTLOCK_NAME))


def test_break_puts_back_a_lock_taken_in_between(tmp_path):
    """Two hosts judged the same lock stale; one broke it and took it: the
    slower one must not remove the new holder's lock."""
    d = box(tmp_path)
    old = lock(d, "node-a")
    old.acquire()
    st = os.lstat(old.path)
    with open(old.path, "rb") as f:
        owner = mboxlock.Owner.parse(f.read())
    age(old.path, 1000)
    fast = lock(d, "node-b")
    fast.acquire()
    slow = lock(d, "node-c")
    slow._break(st, owner)  # what it judged stale is gone; fast's lock is there
    assert fast.still_ours()
    assert leftovers(d) == []
    fast.release()


@pytest.mark.parametrize("kind", ["symlink", "dangling", "dir", "fifo"])
def test_planted_thing_at_the_lock_name_is_refused(tmp_path, kind):
    d = box(tmp_path)
    path = os.path.join(d, mboxlock.DOTLOCK_NAME)
    target = str(tmp_path / "victim")
    with open(target, "wb") as f:
        f.write(b"keep me")
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "dangling":
        os.symlink(str(tmp_path / "nowhere"), path)
    elif kind == "dir":
        os.mkdir(path)
    else:
        os.mkfifo(path)
    age(path, 10_000)
    with pytest.raises(mboxlock.LockRefused):
        lock(d, alive=lambda pid: False).acquire()
    assert os.path.lexists(path)  # not removed
    with open(target, "rb") as f:
        assert f.read() == b"keep me"
    assert not os.path.exists(str(tmp_path / "nowhere"))
    assert leftovers(d) == []


def test_symlink_at_the_flock_name_is_refused(tmp_path):
    d = box(tmp_path)
    target = str(tmp_path / "victim")
    open(target, "wb").close()
    os.symlink(target, os.path.join(d, mboxlock.LOCK_NAME))
    with pytest.raises(OSError):
        maildir.MailboxLock(d, dotlock=lock(d)).acquire()
    assert not os.path.exists(os.path.join(d, mboxlock.DOTLOCK_NAME))


@pytest.mark.parametrize("sub", ["", "new", "cur", "tmp", "domain", "empty"])
def test_planted_symlink_maildir_refused(tmp_path, sub):
    root = str(tmp_path / "mail")
    d = os.path.join(root, "example.org", "mallory")
    elsewhere = str(tmp_path / "elsewhere")
    os.makedirs(os.path.join(elsewhere, "new"))
    os.makedirs(os.path.join(elsewhere, "cur"))
    os.makedirs(os.path.join(elsewhere, "tmp"))
    if sub == "domain":  # <root>/example.org -> a tree whose mallory/ has new, cur, tmp
        os.makedirs(root)
        os.makedirs(str(tmp_path / "dom"))
        os.symlink(elsewhere, str(tmp_path / "dom" / "mallory"))
        os.symlink(str(tmp_path / "dom"), os.path.join(root, "example.org"))
    elif sub == "empty":  # a link to an empty directory: nothing may be made in it
        empty = str(tmp_path / "empty")
        os.makedirs(empty)
        os.makedirs(os.path.dirname(d))
        os.symlink(empty, d)
        with pytest.raises(OSError):
            maildir.open_mailbox(root, "example.org", "mallory")
        assert os.listdir(empty) == []
        return
    elif sub:
        os.makedirs(d)
        for s in ("new", "cur", "tmp"):
            if s != sub:
                os.mkdir(os.path.join(d, s))
        os.symlink(os.path.join(elsewhere, sub), os.path.join(d, sub))
    else:
        os.makedirs(os.path.dirname(d))
        os.symlink(elsewhere, d)
    with pytest.raises(OSError):
        maildir.open_mailbox(root, "example.org", "mallory")
    src = str(tmp_path / "src")
    with open(src, "wb") as f:
        f.write(b"Subject: x\r\n\r\nbody\r\n")
    with pytest.raises(OSError):
        maildir.deliver(root, "example.org", "mallory", src, 0, b"")
    for s in ("new", "cur", "tmp"):
        assert os.listdir(os.path.join(elsewhere, s)) == []
    assert not os.path.exists(os.path.join(elsewhere, mboxlock.LOCK_NAME))


def test_refresh_touches_and_keeps_it_fresh(tmp_path):
    d = box(tmp_path)
    a = lock(d)
    a.acquire()
    age(a.path, 250)
    assert a.refresh()
    assert time.time() - os.stat(a.path).st_mtime < 60
    with pytest.raises(mboxlock.LockHeld):
        lock(d, "node-b", stale_after=200).acquire()
    a.release()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_left_open(tmp_path):
    d = box(tmp_path)
    before = _open_fds()
    for _ in range(50):
        m = maildir.MailboxLock(d, dotlock=lock(d))
        m.acquire()
        other = maildir.MailboxLock(d, dotlock=lock(d))
        with pytest.raises(maildir.MailboxLocked):
            other.acquire()
        m.refresh()
        m.release()
        path, lk, _ = maildir.open_mailbox(str(tmp_path / "mail"), "example.org", "alice")
        lk.release()
    assert _open_fds() == before


def test_keep_fresh_refreshes_on_the_clock_and_stops_at_release(tmp_path):
    d = box(tmp_path)
    m = maildir.MailboxLock(d, dotlock=lock(d))
    m.acquire()
    clock = task.Clock()

    def sync(f, *a, **kw):
        return defer.maybeDeferred(f, *a, **kw)

    pop3lock.keep_fresh(m, clock, sync, "alice@example.org")
    age(m.dotlock.path, 200)
    clock.advance(mboxlock.REFRESH_EVERY - 1)
    assert time.time() - os.stat(m.dotlock.path).st_mtime > 100  # not yet
    clock.advance(1)
    assert time.time() - os.stat(m.dotlock.path).st_mtime < 60
    assert len(clock.getDelayedCalls()) == 1
    m.release()
    assert clock.getDelayedCalls() == []
    assert not os.path.exists(m.dotlock.path)


def test_keep_fresh_warns_once_when_the_lock_was_taken(tmp_path):
    d = box(tmp_path)
    m = maildir.MailboxLock(d, dotlock=lock(d, "node-a"))
    m.acquire()
    clock = task.Clock()
    pop3lock.keep_fresh(m, clock, lambda f, *a: defer.maybeDeferred(f, *a), "alice@example.org")
    age(m.dotlock.path, 1000)
    thief = lock(d, "node-b")
    thief.acquire()  # this host was cut off for longer than the stale age
    clock.advance(mboxlock.REFRESH_EVERY)
    assert thief.still_ours()  # refresh never touches someone else's lock
    m.release()
    assert thief.still_ours()
    thief.release()


def test_escape_host():
    assert mboxlock.escape_host("we/ird:host,name") == r"we\057ird\072host\054name"
    assert mboxlock.escape_host("a b=c\\") == r"a\040b\075c\134"
    e = mboxlock.escape_host("ünï")
    assert all(0x21 <= ord(c) <= 0x7E for c in e)


def test_a_lock_of_this_host_is_stale_once_the_flock_is_ours(tmp_path):
    """Every session of this host takes the flock before the dot-lock and
    drops it after: holding the flock, a dot-lock of this host has no live
    session, whatever its pid says (a reused pid, this very process)."""
    d = box(tmp_path)
    leftover = lock(d, "node-a", node="n1")
    leftover.acquire()
    leftover._ino = None  # forgotten without its release (the file stays)
    with pytest.raises(mboxlock.LockHeld):
        lock(d, "node-a", node="n1", alive=lambda pid: True).acquire()
    m = maildir.MailboxLock(d, dotlock=lock(d, "node-a", node="n1", alive=lambda pid: True))
    m.acquire()
    assert m.held and m.dotlock.broke is not None
    other_host = maildir.MailboxLock(d, dotlock=lock(d, "node-b"))
    with pytest.raises(maildir.MailboxLocked):
        other_host.acquire()  # this process's flock: the other MailboxLock stops there
    m.release()
    # another host's lock is not this host's to judge by the flock
    far = lock(d, "node-b")
    far.acquire()
    with pytest.raises(maildir.MailboxLocked):
        maildir.MailboxLock(d, dotlock=lock(d, "node-a", node="n1")).acquire()
    far.release()


class TestPOP3Session:
    """The lock as a POP3 session holds it (task.Clock, a StringTransport)."""

    def setup(self, tmp_path):
        from relay.mailbox import pop3
        from relay.mailbox.users import UserDB
        from tests.support.pop3server import ALICE, PASSWORDS, FakeTransport, write_users

        users = str(tmp_path / "users")
        write_users(users, PASSWORDS)
        self.clock = task.Clock()
        self.root = str(tmp_path / "mail")
        f = pop3.POP3Factory(hostname="pop.example.org", mailbox_root=self.root, local_domains=["example.org"],
                             userdb=UserDB(users), reactor=self.clock)
        f.run_blocking = lambda fn, *a, **kw: defer.maybeDeferred(fn, *a, **kw)
        self.box = maildir.mailbox_path(self.root, ALICE.split("@")[1], ALICE.split("@")[0])
        self.dotlock = os.path.join(self.box, mboxlock.DOTLOCK_NAME)

        def connect():
            p = f.buildProtocol(None)
            t = FakeTransport()
            p.makeConnection(t)
            p.dataReceived(f"USER {ALICE}\r\nPASS {PASSWORDS[ALICE]}\r\n".encode())
            return p, t

        return connect

    def ticks(self) -> list:
        return [c for c in self.clock.getDelayedCalls() if c.active() and c.func.__name__ == "tick"]

    @pytest.mark.parametrize("end", ["QUIT", "disconnect"])
    def test_held_refreshed_and_released(self, tmp_path, end):
        connect = self.setup(tmp_path)
        p, t = connect()
        assert b"+OK Logged in" in t.value()
        assert os.path.exists(self.dotlock)
        age(self.dotlock, 200)
        self.clock.advance(mboxlock.REFRESH_EVERY)
        assert time.time() - os.stat(self.dotlock).st_mtime < 60  # touched while the session lives
        p2, t2 = connect()
        assert t2.value().endswith(b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n")
        p2.connectionLost(None)
        assert len(self.ticks()) == 1
        if end == "QUIT":
            p.dataReceived(b"QUIT\r\n")
        p.connectionLost(None)
        assert not os.path.exists(self.dotlock)
        assert self.ticks() == []  # no refresh timer outlives the session

    def test_planted_symlink_at_the_lock_refused_with_sys_temp(self, tmp_path):
        connect = self.setup(tmp_path)
        maildir.ensure_maildir(self.box)
        victim = str(tmp_path / "victim")
        with open(victim, "wb") as f:
            f.write(b"root's file")
        os.symlink(victim, self.dotlock)
        p, t = connect()
        assert t.value().endswith(b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later\r\n")
        p.connectionLost(None)
        assert os.path.islink(self.dotlock)
        with open(victim, "rb") as f:
            assert f.read() == b"root's file"


CONTEND = r"""
import os, sys, time
from relay.mailbox import mboxlock
d, host, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
marker, counter = os.path.join(d, "inside"), os.path.join(d, "counter")
done = 0
deadline = time.monotonic() + 60
while done < rounds and time.monotonic() < deadline:
    lk = mboxlock.DotLock(d, host=host)
    try:
        lk.acquire()
    except mboxlock.LockHeld:
        continue
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # raises if another is inside
    os.close(fd)
    with open(counter) as f:
        n = int(f.read())
    with open(counter + ".new", "w") as f:
        f.write(str(n + 1))
    os.rename(counter + ".new", counter)
    os.unlink(marker)
    lk.release()
    done += 1
print(done)
"""


def test_processes_of_several_hosts_exclude_each_other(tmp_path):
    """Four processes, each calling itself another host, take turns on one
    lock: never two inside at once, no update lost, nothing left behind."""
    import subprocess
    import sys

    d = box(tmp_path)
    with open(os.path.join(d, "counter"), "w") as f:
        f.write("0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", CONTEND, d, f"host-{i}", "25"], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e.decode()[-500:] for _, e in outs]
    assert [int(o) for o, _ in outs] == [25] * 4
    with open(os.path.join(d, "counter")) as f:
        assert f.read() == "100"
    assert not os.path.exists(os.path.join(d, mboxlock.DOTLOCK_NAME))
    assert leftovers(d) == []
