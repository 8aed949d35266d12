"""workers = N: a master process and N relay workers sharing the listeners.

Every test runs ``twistd -n relay`` for real.  Each worker owns its queue
(``spool/w<i>``): what one acknowledged, it delivers, also after it was
killed and restarted by the master.

The workers accept on one shared listening socket, and which of them takes a
connection is up to the kernel (and to which one is idle).  A test that needs
a given worker to take connections stops the others (``only_worker``): a
stopped worker accepts nothing, so every new connection goes to the one left
running.  No test relies on how the kernel happens to spread connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port, toml_dumps
from tests.support.wait import poll


def relayctl(cfg_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", cfg_path, *args], env=env,
                          capture_output=True, text=True, timeout=60)


def ids_in(spool: str) -> dict[int, list[str]]:
    out = {}
    for i in (0, 1):
        q = os.path.join(spool, f"w{i}", "queue")
        out[i] = sorted(n for n in os.listdir(q) if spoolmod.is_queue_id(n)) if os.path.isdir(q) else []
    return out


def worker_pids(master_pid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().split()[3] == str(master_pid):
                        with open(f"/proc/{p}/cmdline", "rb") as c:
                            if b"relay.runtime.worker" in c.read():
                                pids.append(int(p))
            except OSError:
                pass
    return sorted(pids)


def worker_map(master_pid: int) -> dict[int, int]:
    """{worker index: pid} of the master's live workers."""
    out = {}
    for pid in worker_pids(master_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            out[int(argv[argv.index(b"--index") + 1])] = pid
        except (OSError, ValueError, IndexError):
            pass
    return out


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def holds_table_lock(pid: int) -> bool:
    """True if the worker holds the lock of the shared connection table
    (stopping it there would block the others' accepts until it goes on)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        fd = int(argv[argv.index(b"--conn-table") + 1])
        ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except (OSError, ValueError, IndexError):
        return False
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "POSIX" and parts[4] == str(pid) \
                    and parts[5].rsplit(":", 1)[-1] == str(ino):
                return True
    return False


@contextlib.contextmanager
def only_worker(relay: RelayProcess, index: int, workers: int = 2):
    """Every new connection goes to worker ``index``: the others are stopped
    (SIGSTOP) meanwhile, never while they hold the connection table's lock."""
    def running():
        m = worker_map(relay.proc.pid)
        return m if len(m) == workers else None

    pids = poll(running, 30, what=f"{workers} workers running")
    stopped = []
    try:
        for j, pid in sorted(pids.items()):
            if j == index:
                continue
            while True:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
                poll(lambda p=pid: _state(p) in ("T", "t", "?"), 10, interval=0.005, what=f"worker {j} stopped")
                if not holds_table_lock(pid):
                    break
                stopped.remove(pid)
                os.kill(pid, signal.SIGCONT)
                poll(lambda p=pid: _state(p) not in ("T", "t"), 10, interval=0.005, what=f"worker {j} going on")
        yield pids[index]
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def send_each(relay: RelayProcess, port: int, n: int, rcpt: str, threads: int = 6) -> list[str]:
    """send_many, half through each worker."""
    acked = []
    for i in (0, 1):
        with only_worker(relay, i):
            acked += send_many(port, n // 2, rcpt, threads=threads, first=i * (n // 2))
    return acked


def send_many(port: int, n: int, rcpt: str, threads: int = 6, first: int = 0) -> list[str]:
    acked: list[str] = []
    lock = threading.Lock()

    def run(k):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            for i in range(first + k, first + n, threads):
                body = f"Message-ID: <w-{i}@client.test>\r\nSubject: {i}\r\n\r\nbody {i}\r\n".encode()
                s.mail("a@client.test")
                s.rcpt(rcpt)
                code, resp = s.data(body)
                assert code == 250, resp
                with lock:
                    acked.append(resp.decode().rsplit(" ", 1)[1])

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return acked


def make(tmp_path, name="relay", **over):
    base = tmp_path / name
    base.mkdir()
    port = free_port()
    data = deep_merge(base_config(str(base)), {"workers": 2, "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"],
                                                                       "max_connections_per_ip": 100}})
    data = deep_merge(data, over)
    return RelayProcess(str(base), data, name), port


def test_two_workers_share_the_port_and_deliver_everything(tmp_path):
    dport = free_port(("127.0.0.4",))
    final = RelayProcess(str(tmp_path), deep_merge(base_config(str(tmp_path)), {
        "hostname": "final.test", "spool": str(tmp_path / "final-spool"),
        "smtp": {"listen": [f"tcp:{dport}:interface=127.0.0.4"]},
        "local": {"domains": ["dest.test"], "mailboxes": str(tmp_path / "final-mail"),
                  "users": str(tmp_path / "final-users")},
    }), "final")
    usersmod.add_user(str(tmp_path / "final-users"), "u@dest.test", "pw")
    relay, port = make(tmp_path, relay={"routes": {"dest.test": f"127.0.0.4:{dport}"}})
    final.start(wait_for=("127.0.0.4", dport))
    relay.start(wait_for=("127.0.0.1", port))
    try:
        acked = send_each(relay, port, 120, "u@dest.test")
        assert len(acked) == 120
        box = tmp_path / "final-mail" / "dest.test" / "u" / "new"
        poll(lambda: box.is_dir() and len(os.listdir(box)) == 120, 30, what="120 messages in the Maildir")
        log = relay.log()
        # both workers took connections, and their lines are in the master's log
        assert "[w0 relay.smtp#info]" in log and "[w1 relay.smtp#info]" in log, log[-2000:]
        for qid in acked[:5]:
            assert f"{qid}: to=<u@dest.test>" in log
        poll(lambda: not any(ids_in(relay.data["spool"]).values()), 10, what="empty queues")
    finally:
        relay.stop()
        final.stop()


def test_relayctl_sees_every_worker_and_acts_on_the_right_one(tmp_path):
    relay, port = make(tmp_path, relay={"smarthost": f"127.0.0.1:{free_port()}"},
                       delivery={"retry_min": "1h", "retry_max": "1h"})
    relay.start(wait_for=("127.0.0.1", port))
    try:
        acked = send_each(relay, port, 40, "x@remote.test", threads=8)
        spool = relay.data["spool"]
        poll(lambda: all(ids_in(spool).values()), 10, what="messages in both workers' queues")
        st = relayctl(relay.config_path, "status", "--json")
        assert st.returncode == 0, st.stderr
        s = json.loads(st.stdout)
        assert s["running"] and len(s["workers"]) == 2 and all(w["running"] for w in s["workers"])
        assert s["queue"]["total"] == 40
        assert s["counters"]["received"] == 40
        q = relayctl(relay.config_path, "queue", "--json")
        listed = sorted(json.loads(line)["queue_id"] for line in q.stdout.splitlines())
        assert listed == sorted(acked)
        table = relayctl(relay.config_path, "queue")
        assert table.stdout.rstrip().endswith("40 messages (0 active, 40 deferred, 0 on hold).")
        target = ids_in(spool)[1][0]  # a message of worker 1
        assert relayctl(relay.config_path, "queue", "show", target).returncode == 0
        r = relayctl(relay.config_path, "queue", "hold", target)
        assert r.returncode == 0, r.stderr
        assert relayctl(relay.config_path, "queue", "delete", target).returncode == 0
        gone = relayctl(relay.config_path, "queue", "show", target)
        assert gone.returncode == 1 and target in gone.stderr
        unknown = relayctl(relay.config_path, "queue", "hold", "1K17ZZZZZZZZZZZZ")
        assert unknown.returncode == 1 and "1K17ZZZZZZZZZZZZ" in unknown.stderr
        rl = relayctl(relay.config_path, "reload")
        assert rl.returncode == 0 and "worker 0:" in rl.stderr and "worker 1:" in rl.stderr
        # each worker compares the file with its own config (its spool, its socket): nothing changed
        assert "takes effect after a restart" not in rl.stderr, rl.stderr
    finally:
        relay.stop()


def test_a_killed_worker_is_restarted_and_delivers_its_queue(tmp_path):
    sink_port = free_port(("127.0.0.5",))
    relay, port = make(tmp_path, relay={"smarthost": f"127.0.0.5:{sink_port}"},
                       delivery={"retry_min": 1, "retry_max": 1})
    final = RelayProcess(str(tmp_path), deep_merge(base_config(str(tmp_path)), {
        "hostname": "final.test", "spool": str(tmp_path / "final-spool"),
        "smtp": {"listen": [f"tcp:{sink_port}:interface=127.0.0.5"]},
        "local": {"domains": ["dest.test"], "mailboxes": str(tmp_path / "final-mail"),
                  "users": str(tmp_path / "final-users")},
    }), "final")
    usersmod.add_user(str(tmp_path / "final-users"), "u@dest.test", "pw")
    relay.start(wait_for=("127.0.0.1", port))
    try:
        acked = send_each(relay, port, 30, "u@dest.test")  # the next hop is down: all deferred
        spool = relay.data["spool"]
        poll(lambda: all(ids_in(spool).values()), 10, what="messages in both queues")
        victim = worker_pids(relay.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        poll(lambda: len(worker_pids(relay.proc.pid)) == 2 and victim not in worker_pids(relay.proc.pid), 20,
             what="the master to restart the worker")
        assert "ended unexpectedly" in relay.log()
        final.start(wait_for=("127.0.0.5", sink_port))
        box = tmp_path / "final-mail" / "dest.test" / "u" / "new"
        poll(lambda: box.is_dir() and len(os.listdir(box)) == len(acked), 40,
             what="every acknowledged message delivered")
    finally:
        relay.stop()
        final.stop()


def test_sigterm_stops_master_and_workers_and_orphans_are_adopted(tmp_path):
    relay, port = make(tmp_path, relay={"smarthost": f"127.0.0.1:{free_port()}"},
                       delivery={"retry_min": "1h", "retry_max": "1h"})
    # a message left in the single-process layout (spool/queue) before workers were configured
    sp = spoolmod.Spool(relay.data["spool"])
    sp.create()
    env = spoolmod.Envelope(spoolmod.new_id(), "a@b.test", ["x@remote.test"], time.time())
    inc = sp.incoming(env)
    inc.write(b"Subject: old\r\n\r\nbody\r\n")
    old = inc.finish()
    relay.start(wait_for=("127.0.0.1", port))
    try:
        poll(lambda: old in ids_in(relay.data["spool"])[0], 10, what="the old message in worker 0's queue")
        assert "moved 1 queued messages" in relay.log()
        workers = worker_pids(relay.proc.pid)
        assert len(workers) == 2
        t0 = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        relay.proc.wait(40)
        assert time.monotonic() - t0 < 35
        assert all(not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split()[2] == "Z"
                   for p in workers)
        assert "twisted-relay master stopped" in relay.log()
    finally:
        relay.stop()


def test_sighup_reaches_every_worker(tmp_path):
    relay, port = make(tmp_path)
    relay.start(wait_for=("127.0.0.1", port))

    def rcpt():
        codes = set()
        for i in (0, 1):  # through each worker
            with only_worker(relay, i), smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                s.ehlo("x")
                s.mail("a@b.example")
                codes.add((i, s.rcpt("someone@far.example")[0]))
        return codes

    try:
        assert rcpt() == {(0, 250), (1, 250)}
        relay.data = deep_merge(relay.data, {"relay": {"networks": ["10.9.0.0/16"]}})
        with open(relay.config_path, "w") as f:
            f.write(toml_dumps(relay.data))
        relay.proc.send_signal(signal.SIGHUP)
        poll(lambda: relay.log().count("config reloaded") >= 2, 10, what="both workers to reload")
        assert rcpt() == {(0, 554), (1, 554)}
    finally:
        relay.stop()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_are_the_sum_of_the_workers(tmp_path):
    mport = free_port()
    relay, port = make(tmp_path, relay={"smarthost": f"127.0.0.1:{free_port()}"},
                       delivery={"retry_min": "1h", "retry_max": "1h"},
                       metrics={"listen": [f"tcp:{mport}:interface=127.0.0.1"]})
    relay.start(wait_for=("127.0.0.1", port))
    try:
        acked = send_each(relay, port, 40, "x@remote.test", threads=8)
        spool = relay.data["spool"]
        poll(lambda: all(ids_in(spool).values()), 10, what="messages in both workers' queues")
        poll(lambda: scrape(mport)[("relay_queue_messages", (("state", "deferred"),))] == 40, 10,
             what="40 deferred messages in the metrics")
        m = scrape(mport)
        assert m[("relay_workers", (("state", "configured"),))] == 2
        assert m[("relay_workers", (("state", "answering"),))] == 2
        assert m[("relay_messages_received_total", (("source", "smtp"),))] == len(acked) == 40
        assert m[("relay_sessions_total", (("protocol", "smtp"),))] >= 8
        assert m[("relay_queue_oldest_message_age_seconds", ())] < 120
        assert 1.7e9 < m[("relay_start_time_seconds", ())] <= time.time()
        builds = [k for k in m if k[0] == "relay_build_info"]
        assert len(builds) == 1 and m[builds[0]] == 1
        # a worker that is down is left out of the scrape, and the page says so
        victim = worker_pids(relay.proc.pid)[0]
        os.kill(victim, signal.SIGSTOP)
        try:
            m = scrape(mport)
            assert m[("relay_workers", (("state", "answering"),))] == 1
            assert m[("relay_queue_messages", (("state", "deferred"),))] < 40
        finally:
            os.kill(victim, signal.SIGCONT)
    finally:
        relay.stop()


def test_metrics_port_in_use_is_a_clear_start_up_error(tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        mport = busy.getsockname()[1]
        relay, port = make(tmp_path, metrics={"listen": [f"tcp:{mport}:interface=127.0.0.1"]})
        relay.start()
        poll(relay._died, 30, what="the relay to refuse to start")
        assert relay.proc.returncode != 0
        log = relay.log()
        assert f"cannot listen on metrics endpoint 'tcp:{mport}:interface=127.0.0.1'" in log, log[-2000:]
        assert not os.path.exists(os.path.join(relay.data["spool"], "w0")), "a worker started anyway"
    finally:
        busy.close()
        relay.stop()


def connect(port: int, timeout: float = 20.0) -> tuple[socket.socket, str]:
    """A new client: (socket, its first reply line, or "" if none came in time)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(512)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return s, data.split(b"\r\n", 1)[0].decode("ascii", "replace")


def test_max_connections_per_ip_is_one_limit_for_all_workers(tmp_path):
    relay, port = make(tmp_path, smtp={"max_connections_per_ip": 3})
    relay.start(wait_for=("127.0.0.1", port))
    held: list[socket.socket] = []
    try:
        # the limit counts what every worker has open: 2 on worker 0 ...
        with only_worker(relay, 0):
            for _ in range(2):
                s, line = connect(port)
                held.append(s)
                assert line.startswith("220 "), line
        # ... so worker 1 may take only one more
        replies = []
        with only_worker(relay, 1):
            for _ in range(4):
                s, line = connect(port)
                held.append(s)
                replies.append(line)
        assert replies[0].startswith("220 "), replies
        assert [r.split(" ", 2)[:2] for r in replies[1:]] == [["421", "4.7.0"]] * 3, replies
        assert "too many connections (3)" in relay.log()
        # a worker that dies takes its connections with it: they no longer count
        victim = worker_map(relay.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        poll(lambda: "worker 0 ended unexpectedly" in relay.log(), 20, what="the master to see worker 0 die")
        lines = []
        for _ in range(3):
            s, line = connect(port)
            held.append(s)
            lines.append(line)
        assert [r[:3] for r in lines] == ["220", "220", "421"], lines
        # a client that leaves frees its slot, whichever worker served it
        held[2].close()  # worker 1's banner connection

        def admitted():
            s, line = connect(port)
            held.append(s)
            return line.startswith("220 ")

        poll(admitted, 20, interval=0.1, what="a slot freed by a client that left")
    finally:
        for s in held:
            s.close()
        relay.stop()


def test_pop3_max_connections_per_ip_is_one_limit_for_all_workers(tmp_path):
    """POP3's per-address limit counts on the same relay-wide table as SMTP's."""
    pport = free_port()
    relay, port = make(tmp_path, pop3={"listen": [f"tcp:{pport}:interface=127.0.0.1"], "max_connections_per_ip": 2})
    relay.start(wait_for=("127.0.0.1", pport))
    held: list[socket.socket] = []
    try:
        with only_worker(relay, 0):
            s, line = connect(pport)
            held.append(s)
            assert line.startswith("+OK "), line
        replies = []
        with only_worker(relay, 1):
            for _ in range(3):
                s, line = connect(pport)
                held.append(s)
                replies.append(line)
        assert replies[0].startswith("+OK "), replies
        assert replies[1:] == ["-ERR [SYS/TEMP] Too many connections from your address, try again later"] * 2, replies
        # SMTP's count for the same address is its own
        s, line = connect(port)
        held.append(s)
        assert line.startswith("220 "), line
    finally:
        for s in held:
            s.close()
        relay.stop()


def test_a_worker_that_keeps_dying_is_given_no_connections(tmp_path):
    relay, port = make(tmp_path)
    relay.start(wait_for=("127.0.0.1", port))
    try:
        # kill worker 1 at each start until the master waits before the next one
        from relay.runtime.master import RESTART_BACKOFF, RESTART_BURST

        assert RESTART_BACKOFF >= 20  # the check below must end well before its restart
        last = None
        for kills in range(1, RESTART_BURST + 2):
            def new_worker1(last=last):
                p = worker_map(relay.proc.pid).get(1)
                return p if p != last else None

            pid = poll(new_worker1, 30, what="worker 1 (re)started")
            os.kill(pid, signal.SIGKILL)
            last = pid
            poll(lambda n=kills: relay.log().count("worker 1 ended unexpectedly") >= n, 20,
                 what="the master to see worker 1 die")
        assert 1 not in worker_map(relay.proc.pid)
        # worker 0 takes every new client while worker 1 is down (well before its restart)
        t0 = time.monotonic()
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        try:
            got = []
            for s in clients:
                data = b""
                try:
                    s.settimeout(max(0.1, 10 - (time.monotonic() - t0)))
                    while b"\r\n" not in data:
                        chunk = s.recv(512)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                got.append(data[:3])
            assert got == [b"220"] * 20, got
            assert 1 not in worker_map(relay.proc.pid), "worker 1 restarted during the test: it proves nothing"
            assert f"worker 1 ended {RESTART_BURST + 1} times in 60 s: next start in {RESTART_BACKOFF:.0f} s" \
                in relay.log()
        finally:
            for s in clients:
                s.close()
    finally:
        relay.stop()
