"""Whole system: three relay processes, one mailbox tree (docs/shared-storage.md).

    SMTP -> node1 (127.0.0.31) \\
                                 -> one local.mailboxes tree <- POP3 on node3 (127.0.0.33)
    SMTP -> node2 (127.0.0.32) /                             <- POP3 on node1, node2

Each node has its own config, hostname and spool, and all of them deliver
into, and serve over POP3, the same Maildirs.  While two nodes take mail
over SMTP, POP3 sessions on the third list, retrieve and delete: at the end
every message was retrieved exactly once.  A second login on another node
gets [IN-USE]; a lock of another host counts until it is stale; a node
SIGKILLed with a session open leaves a lock that the next login breaks at
once (same host, its process gone), and nothing that session marked is lost.
"""

from __future__ import annotations

import collections
import os
import poplib
import re
import smtplib
import threading
import time

import pytest

from relay.mailbox import mboxlock
from relay.mailbox import users as usersmod
from tests.support.procs import open_paths
from tests.support.relay import RelayProcess, free_port
from tests.support.wait import poll

IPS = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
USER, PW = "alice@local.test", "alice pw"
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session"
PER_NODE = 40


@pytest.fixture
def fleet(tmp_path):
    smtp_port, pop_port = free_port(IPS), free_port(IPS)
    mail, users = str(tmp_path / "mail"), str(tmp_path / "users")
    usersmod.add_user(users, USER, PW)
    nodes = []
    for i, ip in enumerate(IPS, 1):
        base = tmp_path / f"node{i}"
        base.mkdir()
        data = {
            "hostname": f"node{i}.fleet.test",
            "spool": str(base / "spool"),
            "workers": 1,
            "smtp": {"listen": [f"tcp:{smtp_port}:interface={ip}"]},
            "local": {"domains": ["local.test"], "mailboxes": mail, "users": users},
            "pop3": {"listen": [f"tcp:{pop_port}:interface={ip}"]},
        }
        nodes.append(RelayProcess(str(base), data, f"node{i}"))
    try:
        for n, ip in zip(nodes, IPS):
            n.start(wait_for=(ip, pop_port), timeout=40)
        yield nodes, smtp_port, pop_port, os.path.join(mail, "local.test", "alice")
    finally:
        for n in nodes:
            n.stop()


def in_new(box: str) -> int:
    try:
        return len(os.listdir(os.path.join(box, "new")))
    except FileNotFoundError:  # no delivery yet made the Maildir
        return 0


def login(ip: str, port: int) -> poplib.POP3:
    c = poplib.POP3(ip, port, timeout=20)
    c.user(USER)
    c.pass_(PW)
    return c


def refused_in_use(ip: str, port: int) -> bytes:
    c = poplib.POP3(ip, port, timeout=20)
    try:
        c.user(USER)
        with pytest.raises(poplib.error_proto) as e:
            c.pass_(PW)
        return e.value.args[0]
    finally:
        c.close()


def send(ip: str, port: int, tag: str, n: int, errors: list, halfway: threading.Event | None = None) -> None:
    """n messages over one SMTP session; with halfway, the second half only
    once that is set (a POP3 session has deleted mail meanwhile)."""
    try:
        with smtplib.SMTP(ip, port, timeout=30) as s:
            s.ehlo("client.test")
            for k in range(n):
                if halfway is not None and k == n // 2:
                    assert halfway.wait(120), "no POP3 session took mail"
                body = f"Subject: {tag}-{k}\r\nMessage-ID: <{tag}-{k}@client.test>\r\n\r\nmessage {tag}-{k}\r\n"
                assert s.sendmail("carol@client.test", [USER], body.encode()) == {}
    except Exception as e:  # reported by the test thread
        errors.append(e)


def test_two_nodes_deliver_while_a_third_serves_pop3(fleet):
    nodes, smtp_port, pop_port, box = fleet
    errors: list = []
    halfway = threading.Event()
    senders = [threading.Thread(target=send, args=(IPS[i], smtp_port, f"n{i + 1}", PER_NODE, errors, halfway),
                                daemon=True)
               for i in (0, 1)]
    for t in senders:
        t.start()
    expected = {f"n{i}-{k}" for i in (1, 2) for k in range(PER_NODE)}
    got: collections.Counter[str] = collections.Counter()
    uidls: dict[str, str] = {}
    in_use_checked = False
    sessions = 0
    by: set[bytes] = set()
    deadline = time.monotonic() + 180
    new, cur = os.path.join(box, "new"), os.path.join(box, "cur")
    while set(got) != expected and time.monotonic() < deadline:
        # the next session once there is mail again (a poll with a deadline, never a fixed sleep)
        poll(lambda: not os.path.isdir(new) or os.listdir(new) or os.listdir(cur), 60, what="more mail")
        c = login(IPS[2], pop_port)
        sessions += 1
        try:
            if not in_use_checked:
                # a session open on node3: the others refuse the mailbox
                assert refused_in_use(IPS[0], pop_port) == IN_USE
                assert refused_in_use(IPS[1], pop_port) == IN_USE
                in_use_checked = True
            listing = c.uidl()[1]
            for line in listing:
                num, uid = line.decode().split()
                _, lines, _ = c.retr(int(num))
                m = re.search(rb"^Subject: (n\d-\d+)$", b"\n".join(lines), re.M)
                assert m, lines[:10]
                tag = m.group(1).decode()
                got[tag] += 1
                by.update(re.findall(rb"by (node\d)\.fleet\.test", b"\n".join(lines)))
                uidls[tag] = uid
                c.dele(int(num))
        finally:
            c.quit()
        if got:
            halfway.set()  # the rest is sent (and delivered) while the next sessions run
    for t in senders:
        t.join(60)
    assert not errors, errors
    assert in_use_checked and sessions > 1  # (the second half came after a session's QUIT)
    assert by == {b"node1", b"node2"}  # both nodes delivered (their Received: lines)
    # no descriptor left open in the tree (polled: a session's last close may still be on its way)
    poll(lambda: not [p for p in open_paths(nodes[2].proc.pid) if p.startswith(os.path.dirname(box))], 10,
         what="no descriptor of the POP3 node left open in the mailbox tree")
    assert set(got) == expected, sorted(expected - set(got))[:10]
    assert [t for t, k in got.items() if k != 1] == [], "a message retrieved twice"
    assert len(set(uidls.values())) == len(expected)
    # the mailbox is empty, and every node says so
    for ip in IPS:
        c = login(ip, pop_port)
        assert c.stat() == (0, 0)
        c.quit()


def test_uidls_are_the_same_on_every_node_and_after_another_node_read(fleet):
    nodes, smtp_port, pop_port, box = fleet
    errors: list = []
    send(IPS[0], smtp_port, "u", 3, errors)
    assert not errors
    poll(lambda: in_new(box) == 3, 30, what="3 deliveries")
    views = []
    for i, ip in enumerate(IPS):
        c = login(ip, pop_port)
        views.append(c.uidl()[1])
        if i == 0:
            c.retr(1)  # read on node1: moved new/ -> cur/ (seen)
        c.quit()
    assert views[0] == views[1] == views[2]
    assert len(os.listdir(os.path.join(box, "cur"))) == 1


def test_another_hosts_lock_counts_until_stale(fleet):
    nodes, _smtp_port, pop_port, box = fleet
    c = login(IPS[0], pop_port)  # makes the Maildir
    c.quit()
    path = os.path.join(box, mboxlock.DOTLOCK_NAME)
    with open(path, "wb") as f:
        f.write(mboxlock.Owner("far.away.host", "other", 1, int(time.time()), "feedc0de").render())
    assert refused_in_use(IPS[1], pop_port) == IN_USE
    old = time.time() - mboxlock.STALE_AFTER + 30
    os.utime(path, (old, old))  # refreshed 4.5 minutes ago: still live
    assert refused_in_use(IPS[1], pop_port) == IN_USE
    old = time.time() - mboxlock.STALE_AFTER - 30
    os.utime(path, (old, old))  # not refreshed for longer than the stale age
    c = login(IPS[1], pop_port)
    with open(path, "rb") as f:
        assert mboxlock.Owner.parse(f.read()).pid == nodes[1].proc.pid
    c.quit()
    assert not os.path.exists(path)
    poll(lambda: "broke a stale mailbox lock" in nodes[1].log(), 10, what="the broken lock in the log")
    assert "host=far.away.host" in nodes[1].log()


def test_node_killed_with_a_session_open_leaves_a_lock_that_goes_stale(fleet):
    nodes, smtp_port, pop_port, box = fleet
    errors: list = []
    send(IPS[0], smtp_port, "k", 2, errors)
    assert not errors
    poll(lambda: in_new(box) == 2, 30, what="2 deliveries")
    c = login(IPS[1], pop_port)
    c.dele(1)  # marked, never QUIT: must not be removed
    lock = os.path.join(box, mboxlock.DOTLOCK_NAME)
    with open(lock, "rb") as f:
        assert mboxlock.Owner.parse(f.read()).pid == nodes[1].proc.pid
    nodes[1].kill()  # SIGKILL with the session open
    c.sock.close()
    assert os.path.exists(lock)  # left behind, as a crash leaves it
    # same host, its process gone: stale at once, on any node
    c = login(IPS[2], pop_port)
    assert c.stat()[0] == 2
    with open(lock, "rb") as f:
        assert mboxlock.Owner.parse(f.read()).pid == nodes[2].proc.pid
    assert refused_in_use(IPS[0], pop_port) == IN_USE
    c.quit()
    assert not os.path.exists(lock)
    c = login(IPS[0], pop_port)
    assert c.stat()[0] == 2
    c.quit()
    poll(lambda: not [p for p in open_paths(nodes[0].proc.pid) if p.startswith(box)], 10,
         what="no descriptor of node 1 left open in the mailbox")
