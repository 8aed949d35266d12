"""Maildir on storage several hosts share (relay.mailbox.maildir): names
unique across hosts, delivery that never overwrites, UIDLs that do not
depend on the node, listings that cope with files another node renames."""

from __future__ import annotations

import errno
import os

import pytest

from relay.mailbox import maildir

MSG = b"Subject: shared\r\n\r\nbody\r\n"


def src(tmp_path) -> str:
    p = str(tmp_path / "src")
    with open(p, "wb") as f:
        f.write(MSG)
    return p


def test_name_carries_the_host_pid_counter_and_random(monkeypatch):
    monkeypatch.setattr(maildir, "_hostname", None)
    monkeypatch.setattr(maildir.socket, "gethostname", lambda: "node/1:a")
    a, b = maildir.unique_name(1000.5), maildir.unique_name(1000.5)
    assert a != b
    assert a.startswith(f"1000.M500000P{os.getpid()}Q") and a.endswith(r".node\0571\072a")
    monkeypatch.setattr(maildir, "_hostname", None)


def test_a_name_clash_never_overwrites(tmp_path, monkeypatch):
    """Two hosts (or a broken clock) making one name: the second delivery
    gets a fresh name, the first message is intact."""
    root = str(tmp_path / "mail")
    names = iter(["1.M1P1Q1R1.clash", "1.M1P1Q1R1.clash", "2.M2P2Q2R2.fresh"])
    monkeypatch.setattr(maildir, "unique_name", lambda now=None: next(names))
    s = src(tmp_path)
    first = maildir.deliver(root, "example.org", "alice", s, 0, b"X-First: 1\r\n")
    second = maildir.deliver(root, "example.org", "alice", s, 0, b"X-Secnd: 1\r\n")
    assert first != second and os.path.basename(second).startswith("2.M2P2Q2R2.fresh,")
    with open(first, "rb") as f:
        assert f.read().startswith(b"X-First: 1\n")
    with open(second, "rb") as f:
        assert f.read().startswith(b"X-Secnd: 1\n")
    box = os.path.dirname(os.path.dirname(first))
    assert os.listdir(os.path.join(box, "tmp")) == []


def test_link_reported_failed_but_made_is_delivered_once(tmp_path, monkeypatch):
    """NFS: a retransmitted LINK whose first reply was lost reports EEXIST;
    the message is delivered once, under the name that was made."""
    root = str(tmp_path / "mail")
    real = os.link

    def lossy(a, b, **kw):
        real(a, b, **kw)
        raise OSError(errno.EEXIST, "reply lost")

    monkeypatch.setattr(maildir.os, "link", lossy)
    p = maildir.deliver(root, "example.org", "alice", src(tmp_path), 0, b"")
    box = os.path.dirname(os.path.dirname(p))
    assert os.listdir(os.path.join(box, "new")) == [os.path.basename(p)]
    assert os.listdir(os.path.join(box, "tmp")) == []
    assert os.stat(p).st_nlink == 1


def test_link_failure_defers_and_leaves_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "mail")

    def fails(a, b, **kw):
        raise OSError(errno.EIO, "server gone")

    monkeypatch.setattr(maildir.os, "link", fails)
    with pytest.raises(OSError):
        maildir.deliver(root, "example.org", "alice", src(tmp_path), 0, b"")
    box = os.path.join(root, "example.org", "alice")
    assert os.listdir(os.path.join(box, "new")) == [] and os.listdir(os.path.join(box, "tmp")) == []


def test_uidl_is_the_same_on_every_node_and_after_moves(tmp_path):
    """UIDLs come from the file name: a copy of the tree (another node's
    view: other inodes) lists the same UIDLs, also after another node moved
    the message to cur/ and changed its flags."""
    root = str(tmp_path / "mail")
    s = src(tmp_path)
    for _ in range(3):
        maildir.deliver(root, "example.org", "alice", s, 0, b"")
    box = os.path.join(root, "example.org", "alice")
    before = [(m.uid, m.size) for m in maildir.scan(box)]
    m0 = maildir.scan(box)[0]
    os.rename(m0.path, os.path.join(box, "cur", os.path.basename(m0.path) + ":2,S"))
    m1 = maildir.scan(box)[1]
    os.rename(m1.path, os.path.join(box, "cur", os.path.basename(m1.path) + ":2,FRS"))
    after = [(m.uid, m.size) for m in maildir.scan(box)]
    assert after == before
    # another node's view: the same names, other inodes
    other = str(tmp_path / "other")
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(other, sub))
        for n in os.listdir(os.path.join(box, sub)):
            with open(os.path.join(box, sub, n), "rb") as f, open(os.path.join(other, sub, n), "wb") as g:
                g.write(f.read())
    assert [(m.uid, m.size) for m in maildir.scan(other)] == before


def test_session_follows_a_file_another_node_renamed(tmp_path):
    """A listing made before another node moved a message (new -> cur, or
    flags changed): reading, marking seen and deleting find it."""
    root = str(tmp_path / "mail")
    s = src(tmp_path)
    for _ in range(2):
        maildir.deliver(root, "example.org", "alice", s, 0, b"")
    box = os.path.join(root, "example.org", "alice")
    msgs = maildir.scan(box)
    os.rename(msgs[0].path, os.path.join(box, "cur", os.path.basename(msgs[0].path) + ":2,"))
    os.rename(msgs[1].path, os.path.join(box, "cur", os.path.basename(msgs[1].path) + ":2,F"))
    assert maildir.read_message(box, msgs[0], 1000).endswith(b"body\n")
    maildir.mark_seen(box, msgs[1])
    assert msgs[1].path.endswith(":2,FS")
    m2 = maildir.scan(box)[1]
    os.rename(m2.path, m2.path[:-1])  # flags change once more under the session
    assert maildir.delete(box, msgs) == 0
    assert maildir.scan(box) == []


def test_a_tmp_name_in_use_gets_a_fresh_one(tmp_path, monkeypatch):
    """Another host writing tmp/<name> right now: O_EXCL refuses the name
    and the delivery takes a fresh one instead of failing."""
    root = str(tmp_path / "mail")
    box = os.path.join(root, "example.org", "alice")
    maildir.ensure_maildir(box)
    with open(os.path.join(box, "tmp", "1.M1P1Q1R1.busy"), "wb") as f:
        f.write(b"another host's message in progress")
    names = iter(["1.M1P1Q1R1.busy", "2.M2P2Q2R2.fresh"])
    monkeypatch.setattr(maildir, "unique_name", lambda now=None: next(names))
    p = maildir.deliver(root, "example.org", "alice", src(tmp_path), 0, b"")
    assert os.path.basename(p).startswith("2.M2P2Q2R2.fresh,")
    assert os.listdir(os.path.join(box, "tmp")) == ["1.M1P1Q1R1.busy"]
