"""``relayctl queue drain`` between two ``twistd relay`` processes.

Node A runs with workers = 2 (two queues, two control sockets) on
127.0.0.1, its next hop for dead.test a closed port; node B, on 127.0.0.3,
is the peer (its own next hop for dead.test is closed too, so what it
takes over stays in its queue to be looked at).  The live drain empties both
of A's queues into B, and then A, stopped with its spool left behind,
drains nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import tempfile

import pytest

from tests.support.relay import RelayProcess, free_port
from tests.support.wait import poll
from tests.test_control import json_lines, run_ctl


def node(tmp: str, name: str, ip: str, port: int, dead: int, workers: int) -> RelayProcess:
    d = os.path.join(tmp, name)
    os.makedirs(d)
    return RelayProcess(d, {
        "hostname": f"{name}.test", "spool": os.path.join(d, "spool"), "workers": workers,
        "smtp": {"listen": [f"tcp:{port}:interface={ip}"]}, "pop3": {"listen": []},
        "local": {"domains": ["local.test"], "mailboxes": os.path.join(d, "mail"), "users": os.path.join(d, "users")},
        "relay": {"routes": {"dead.test": f"127.0.0.2:{dead}"}},
        "delivery": {"retry_min": "1h", "retry_max": "2h", "connect_timeout": 5},
    }, name=name)


@pytest.fixture
def fleet():
    tmp = tempfile.mkdtemp(prefix="relay-drainp-")
    dead = free_port(("127.0.0.2",))
    pa, pb = free_port(("127.0.0.1",)), free_port(("127.0.0.3",))
    a = node(tmp, "node-a", "127.0.0.1", pa, dead, 2)
    b = node(tmp, "node-b", "127.0.0.3", pb, dead, 1)
    a.start(("127.0.0.1", pa))
    b.start(("127.0.0.3", pb))
    yield a, b, pa, pb
    a.stop()
    b.stop()
    shutil.rmtree(tmp, True)


def send(port: int, rcpt: str, sender: str = "sender@client.test") -> str:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        s.mail(sender)
        s.rcpt(rcpt)
        code, resp = s.data(b"Subject: drained\r\n\r\nbody\r\n")
        assert code == 250, resp
        return resp.decode().rsplit(" ", 1)[1]


def records(proc: RelayProcess) -> dict[str, dict]:
    r = run_ctl(proc.config_path, "queue", "--json")
    assert r.returncode == 0, r.stderr
    return {d["queue_id"]: d for d in json_lines(r.stdout)}


def test_live_drain_of_a_node_with_two_workers(fleet):
    a, b, pa, pb = fleet
    ids = {send(pa, f"r{i}@dead.test", sender="" if i == 0 else "sender@client.test") for i in range(6)}

    def all_deferred():
        recs = records(a)
        return set(recs) == ids and all(r["recipients"][0]["attempts"] >= 1 for r in recs.values())

    poll(all_deferred, 30, what="node A's messages deferred")
    r = run_ctl(a.config_path, "queue", "drain", "--to", f"127.0.0.3:{pb}", "--json")
    assert r.returncode == 0, r.stderr
    lines = {d["queue_id"]: d for d in json_lines(r.stdout)}
    assert set(lines) == ids
    assert all(d["complete"] and d["removed"] and d["node"] == "node-a.test" for d in lines.values())
    assert run_ctl(a.config_path, "queue").stdout == "Mail queue is empty\n"
    got = records(b)
    assert {d["peer_queue_id"] for d in lines.values()} == set(got)
    assert sorted(g["recipients"][0]["address"] for g in got.values()) == sorted(f"r{i}@dead.test" for i in range(6))
    assert sorted(g["sender"] for g in got.values()) == [""] + ["sender@client.test"] * 5
    some = next(iter(lines.values()))
    shown = json.loads(run_ctl(b.config_path, "queue", "show", some["peer_queue_id"], "--json").stdout)
    assert f"X-Relay-Drained: node=node-a.test; queue-id={some['queue_id']}" in shown["headers"]
    poll(lambda: f"{some['queue_id']}: drained from node node-a.test" in a.log(), 10, what="node A's log line")
    poll(lambda: f"{some['peer_queue_id']}: client=node-a.test" in b.log(), 10, what="node B's log line")

    # node A stopped, its spool left: offline, nothing more to drain
    a.stop()
    r = run_ctl(a.config_path, "queue", "drain", "--to", f"127.0.0.3:{pb}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "drained 0 messages" in r.stderr
