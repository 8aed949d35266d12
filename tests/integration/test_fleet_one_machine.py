"""docs/fleet.md "One machine": the defaults use the machine.

Real ``twistd -n relay`` processes: without a ``workers`` line a master with
one worker per core; a ``unix:`` listener makes it one process (and says
why); the single-process queue and the workers' queues follow a change of
the number; a worker that dies for good (made to, with the test hook
$RELAY_TEST_WORKER_CRASH of relay.runtime.worker) has its accepted mail
delivered by the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from relay.config import default_workers
from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from relay.runtime.master import RESTART_BURST
from relay.runtime.queuemoves import queued_ids
from relay.runtime.worker import CRASH_HOOK
from tests.integration.test_workers import only_worker, relayctl, send_many, worker_map, worker_pids
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll

FINAL_IP = "127.0.0.6"


def final_relay(tmp_path, port: int) -> RelayProcess:
    """The next hop: a one-process relay with the mailbox u@dest.test."""
    usersmod.add_user(str(tmp_path / "final-users"), "u@dest.test", "pw")
    return RelayProcess(str(tmp_path), deep_merge(base_config(str(tmp_path)), {
        "hostname": "final.test", "spool": str(tmp_path / "final-spool"),
        "smtp": {"listen": [f"tcp:{port}:interface={FINAL_IP}"]},
        "local": {"domains": ["dest.test"], "mailboxes": str(tmp_path / "final-mail"),
                  "users": str(tmp_path / "final-users")},
    }), "final")


def delivered(tmp_path) -> list[str]:
    box = tmp_path / "final-mail" / "dest.test" / "u" / "new"
    return sorted(os.listdir(box)) if box.is_dir() else []


def relay_data(tmp_path, port: int, sink_port: int, **over) -> dict:
    """A relay to the final relay, with no workers line (unless over gives one)."""
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "max_connections_per_ip": 100},
        "relay": {"smarthost": f"{FINAL_IP}:{sink_port}"},
        "delivery": {"retry_min": 1, "retry_max": 1},
    })
    del data["workers"]
    return deep_merge(data, over)


def put(root: str, n: int) -> list[str]:
    os.makedirs(os.path.dirname(root), mode=0o700, exist_ok=True)
    sp = spoolmod.Spool(root)
    sp.create()
    ids = []
    for k in range(n):
        env = spoolmod.Envelope(spoolmod.new_id(), "a@client.test", ["u@dest.test"], time.time())
        sp.inject(env, f"Message-ID: <old-{k}@client.test>\r\nSubject: old\r\n\r\nbody\r\n".encode())
        ids.append(env.queue_id)
    return ids


def test_no_workers_line_is_a_master_with_one_worker_per_core(tmp_path):
    port = free_port()
    relay = RelayProcess(str(tmp_path), relay_data(tmp_path, port, free_port((FINAL_IP,))))
    relay.start(wait_for=("127.0.0.1", port))
    try:
        n = default_workers()
        if n == 1:
            pytest.skip("one core: the default is one process")
        poll(lambda: len(worker_pids(relay.proc.pid)) == n, 30, what=f"{n} workers")
        assert f"twisted-relay master starting {n} workers" in relay.log()

        def status():
            st = relayctl(relay.config_path, "status", "--json")
            assert st.returncode in (0, 1), st.stderr
            s = json.loads(st.stdout) if st.returncode == 0 else {}
            return s if all(w["running"] for w in s.get("workers", [])) and s.get("workers") else None

        s = poll(status, 30, what="relayctl status: every worker running")
        assert [w["index"] for w in s["workers"]] == list(range(n))
    finally:
        relay.stop()


def test_a_unix_listener_without_workers_is_one_process_and_says_why(tmp_path):
    if default_workers() == 1:
        pytest.skip("one core: one process anyway")
    port = free_port()
    sock = str(tmp_path / "smtp.sock")
    data = relay_data(tmp_path, port, free_port((FINAL_IP,)),
                      smtp={"listen": [f"tcp:{port}:interface=127.0.0.1", f"unix:{sock}"]})
    relay = RelayProcess(str(tmp_path), data)
    relay.start(wait_for=("127.0.0.1", port))
    try:
        assert worker_pids(relay.proc.pid) == []
        assert f"workers = 1, not one per core ({default_workers()}): smtp.listen 'unix:{sock}' cannot be " \
               "shared by workers" in relay.log()
        assert os.path.exists(sock)
    finally:
        relay.stop()


def test_a_unix_listener_with_explicit_workers_is_a_config_error(tmp_path):
    port = free_port()
    data = relay_data(tmp_path, port, free_port((FINAL_IP,)), workers=2,
                      smtp={"listen": [f"unix:{tmp_path / 'smtp.sock'}"]})
    relay = RelayProcess(str(tmp_path), data)
    relay.start()
    assert relay.proc.wait(60) != 0
    log = relay.log()
    assert "not starting" in log and "smtp.listen" in log and "with workers > 1 only tcp:" in log, log[-2000:]
    relay.stop()


@pytest.mark.parametrize("before,after", [("one", "auto"), ("workers", "one")])
def test_queued_mail_follows_a_change_of_workers(tmp_path, before, after):
    """The single-process queue (<spool>/queue) when the relay now runs workers,
    and the workers' queues (<spool>/w<i>/queue) when it now runs one process:
    every message delivered once."""
    sink_port = free_port((FINAL_IP,))
    final = final_relay(tmp_path, sink_port)
    port = free_port()
    data = relay_data(tmp_path, port, sink_port, **({"workers": 1} if after == "one" else {}))
    spool = data["spool"]
    ids = put(spool, 4) if before == "one" else put(os.path.join(spool, "w0"), 2) + put(os.path.join(spool, "w1"), 3)
    relay = RelayProcess(str(tmp_path), data)
    final.start(wait_for=(FINAL_IP, sink_port))
    relay.start(wait_for=("127.0.0.1", port))
    try:
        poll(lambda: len(delivered(tmp_path)) >= len(ids), 40, what="every old message delivered")
        poll(lambda: not queued_ids(spool) and not any(queued_ids(os.path.join(spool, f"w{i}")) for i in (0, 1)),
             20, what="every queue empty")
        assert len(delivered(tmp_path)) == len(ids)
        log = relay.log()
        if after == "one":
            assert "moved 5 queued messages from the workers' queues (<spool>/w<i>/) into the queue" in log
        elif default_workers() > 1:
            assert "moved 4 queued messages into the workers' queues" in log
    finally:
        relay.stop()
        final.stop()


def test_a_worker_that_dies_for_good_has_its_mail_delivered_by_the_other(tmp_path):
    sink_port = free_port((FINAL_IP,))
    final = final_relay(tmp_path, sink_port)
    port = free_port()
    crash = tmp_path / "crash-workers"
    relay = RelayProcess(str(tmp_path), relay_data(tmp_path, port, sink_port, workers=2))
    relay.env = {CRASH_HOOK: str(crash)}  # absent for now: every worker starts
    relay.start(wait_for=("127.0.0.1", port))
    spool = relay.data["spool"]
    try:
        with only_worker(relay, 1):  # the next hop is down: worker 1 keeps them
            acked = send_many(port, 12, "u@dest.test", threads=3)
        assert len(acked) == 12 and sorted(queued_ids(os.path.join(spool, "w1"))) == sorted(acked)
        crash.write_text("1\n")  # from now on worker 1 cannot start
        os.kill(worker_map(relay.proc.pid)[1], signal.SIGKILL)
        poll(lambda: "worker 1 died for good: worker 0 restarts to take its 12 queued messages" in relay.log(),
             60, what="worker 1 declared dead for good")
        assert relay.log().count("worker 1 ended unexpectedly") >= RESTART_BURST + 1
        poll(lambda: "moved 12 queued messages of worker 1 into worker 0's queue" in relay.log(), 60,
             what="the hand-over")
        assert queued_ids(os.path.join(spool, "w1")) == []
        poll(lambda: 0 in worker_map(relay.proc.pid), 30, what="worker 0 running again")
        final.start(wait_for=(FINAL_IP, sink_port))
        poll(lambda: len(delivered(tmp_path)) >= 12, 60, what="worker 1's mail delivered by worker 0")
        poll(lambda: not queued_ids(os.path.join(spool, "w0")), 20, what="worker 0's queue empty")
        assert len(delivered(tmp_path)) == 12  # each once
        lines = relay.log().splitlines()
        for qid in acked:  # by worker 0
            assert any(f"{qid}: to=<u@dest.test>" in line and "[w0 " in line for line in lines), qid
    finally:
        relay.stop()
        final.stop()


def test_relayctl_check_with_no_workers_line(tmp_path):
    """relayctl on a config without workers reads the queues of the workers a master would run."""
    if default_workers() == 1:
        pytest.skip("one core: one queue")
    data = relay_data(tmp_path, free_port(), free_port((FINAL_IP,)))
    relay = RelayProcess(str(tmp_path), data)  # writes the config; never started
    ids = put(os.path.join(data["spool"], "w0"), 1)
    r = subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", relay.config_path, "queue", "--json"],
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line)["queue_id"] for line in r.stdout.splitlines()]
    assert listed == ids


def test_a_worker_that_refuses_its_first_start_stops_the_relay(tmp_path):
    """What stops one process at start (here: its control socket's path is a
    file) stops a master too, with a non-zero status, not a restart loop."""
    port = free_port()
    ctl = tmp_path / "ctl"
    data = relay_data(tmp_path, port, free_port((FINAL_IP,)), workers=2, control={"socket": str(ctl)})
    (tmp_path / "ctl.w0").write_text("not a socket")
    relay = RelayProcess(str(tmp_path), data)
    relay.start()
    assert relay.proc.wait(60) == 1
    log = relay.log()
    assert "exists and is not a socket" in log and "twisted-relay is not starting" in log, log[-3000:]
    assert log.count("worker 0 started") == 1
    assert (tmp_path / "ctl.w0").read_text() == "not a socket"
    relay.stop()


def test_a_worker_sigkilled_mid_delivery_loses_nothing(tmp_path):
    """Worker 1 is SIGKILLed while it delivers its queue: every acknowledged
    message reaches the sink, and a message is delivered twice only if it was
    in the at-least-once window (the sink's 250 read, not yet recorded): at
    most one per connection of the worker's."""
    from tests.support.crash import SinkProcess

    sink_ip = "127.0.0.7"
    sink_port = free_port((sink_ip,))
    sink = SinkProcess(str(tmp_path), sink_ip, extra_args=("--port", str(sink_port)))
    port = free_port()
    conns = 3
    relay = RelayProcess(str(tmp_path), relay_data(tmp_path, port, sink_port, workers=2, relay={
        "smarthost": f"{sink_ip}:{sink_port}", "smarthost_tls": "none"},
        delivery={"max_per_destination": conns, "tls": "none"}))
    relay.start(wait_for=("127.0.0.1", port))
    try:
        with only_worker(relay, 1):  # the sink is down: worker 1 keeps them all
            acked = send_many(port, 60, "u@remote.test", threads=4)
        assert len(acked) == 60
        victim = worker_map(relay.proc.pid)[1]
        sink.start()
        poll(lambda: sum(sink.counts().values()) >= 5, 60, interval=0.005, what="worker 1 delivering")
        os.kill(victim, signal.SIGKILL)
        at_kill = sum(sink.counts().values())
        assert at_kill < 60, "worker 1 delivered everything before the kill: it proves nothing"
        poll(lambda: len(sink.counts()) == 60, 90, what="every acknowledged message at the sink")
        poll(lambda: not queued_ids(os.path.join(relay.data["spool"], "w1")), 30, what="worker 1's queue empty")
        counts = sink.counts()
        assert sorted(mid for mid, _ in counts) == sorted(f"w-{i}@client.test" for i in range(60))
        twice = [k for k, n in counts.items() if n > 1]
        assert len(twice) <= conns and all(counts[k] == 2 for k in twice), counts
        assert "worker 1 ended unexpectedly (exit signal 9)" in relay.log()
    finally:
        relay.stop()
        sink.stop()
