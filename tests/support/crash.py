"""The crash harness: SIGKILL a relay at random moments while mail flows
through it, and count what arrives (issue 8, "Faults: crash").

Parts, all real processes on loopback:

* the relay under test, ``twistd -n relay``, smarthost set to the sink;
* a sink process (tests.support.sinkproc) that records every accepted
  (Message-ID, recipient, digest of the bytes) before its 250 can reach the
  relay;
* client threads in this process, each sending messages with smtplib in a
  loop (1 to 3 recipients each, 1 to 20 KB), reconnecting whenever the relay
  is down, and noting every message that got a 250 with its queue id.

The relay is killed ``kills`` times, each after a random time up
(``min_up``..``max_up`` seconds after it listens again), so kills land
while clients are in DATA, while the spool commits, while deliveries are in
flight and while state files are rewritten.  After each kill, before the
restart, the dead relay's spool says which acknowledged recipients it had
recorded as delivered (the message gone from queue/, or "delivered" in its
state file); the sink's count for each is noted then.  At the end the relay
runs until its queue is empty, and:

* lost: an acknowledged (message, recipient) the sink never got (must be 0);
* corrupt: a copy the sink got whose bytes (from the Message-ID header on:
  the relay adds only its Received header above it) differ from what the
  client sent and got a 250 for (must be 0);
* resent: a pair recorded as delivered that reached the sink again after it
  was recorded (must be 0);
* duplicated: pairs the sink got more than once (allowed: a kill between the
  sink's 250 and the relay's state write means the relay must try again);
* unacknowledged arrivals: messages whose 250 never reached the client (the
  kill came after the commit, before the reply) but were delivered anyway.

``run()`` is used by tests/faults/test_crash.py (a few kills) and by
bench/crash_harness.py (20 and more).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from relay.queue import spool as spoolmod
from tests.support.relay import ROOT, RelayProcess, base_config, deep_merge, free_port
from tests.support.sinkproc import read_digests, read_record
from tests.support.wait import poll

RELAY_IP = "127.0.0.1"
SINK_IP = "127.0.0.5"


@dataclass
class CrashReport:
    kills: int = 0
    worker_kills: int = 0  # of those, a single worker (workers > 1)
    sent: int = 0  # messages whose data was sent (DATA answered 354)
    acked: int = 0  # messages that got a 250
    acked_rcpts: int = 0
    delivered: int = 0  # acknowledged messages that reached the sink (every recipient)
    delivered_rcpts: int = 0
    lost: int = 0  # acknowledged recipients never delivered (must be 0)
    lost_examples: list = field(default_factory=list)
    corrupt: int = 0  # delivered copies whose bytes differ from what was acknowledged (must be 0)
    corrupt_examples: list = field(default_factory=list)
    duplicated: int = 0  # (message, recipient) pairs delivered more than once
    duplicate_copies: int = 0  # extra copies in all
    resent: int = 0  # recorded as delivered, then delivered again (must be 0)
    resent_examples: list = field(default_factory=list)
    recorded: int = 0  # pairs checked against a kill-time record
    unacked_arrived: int = 0  # not acknowledged, delivered anyway (allowed)
    left_in_queue: int = 0
    quarantined: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.corrupt == 0 and self.resent == 0 and self.left_in_queue == 0
                and self.quarantined == 0)

    def text(self) -> str:
        return (
            f"crash harness: {self.kills} SIGKILLs in {self.seconds:.1f}s"
            f"{f' ({self.worker_kills} of a single worker)' if self.worker_kills else ''}\n"
            f"  messages sent        {self.sent}\n"
            f"  acknowledged (250)   {self.acked} ({self.acked_rcpts} recipients)\n"
            f"  delivered            {self.delivered} ({self.delivered_rcpts} recipients)\n"
            f"  lost                 {self.lost}{' ' + str(self.lost_examples[:5]) if self.lost else ''}\n"
            f"  corrupt copies       {self.corrupt}{' ' + str(self.corrupt_examples[:5]) if self.corrupt else ''}"
            f" (bytes differ from what was acknowledged)\n"
            f"  duplicated           {self.duplicated} recipients ({self.duplicate_copies} extra copies; "
            f"each from a delivery cut short by a kill)\n"
            f"  recorded delivered, then sent again  {self.resent}"
            f"{' ' + str(self.resent_examples[:5]) if self.resent else ''} (of {self.recorded} checked at kills)\n"
            f"  not acknowledged but delivered       {self.unacked_arrived} (kill between commit and 250)\n"
            f"  left in queue {self.left_in_queue}, quarantined {self.quarantined}\n"
            f"  result: {'OK' if self.ok else 'FAILED'}"
        )


class SinkProcess:
    def __init__(self, workdir: str, interface: str = SINK_IP, extra_args: tuple[str, ...] = ()):
        self.extra_args = tuple(extra_args)
        self.record = os.path.join(workdir, "sink.record")
        self.log_path = os.path.join(workdir, "sink.log")
        self.interface = interface
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> SinkProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.sinkproc", "--interface", self.interface,
             "--record", self.record, *self.extra_args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log,
        )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"sink did not start: {line!r}; see {self.log_path}")
        self.port = int(line.split()[1])
        return self

    def counts(self) -> Counter:
        return read_record(self.record)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


class Clients:
    """Client threads sending numbered messages in a loop.

    Subclasses choose the messages (``_message``) and what an acknowledged
    one records (``_acked``); ``go`` is cleared to hold the clients back
    (they reconnect once it is set again)."""

    name = "crash"

    def __init__(self, host: str, port: int, n: int, seed: int):
        self.host, self.port = host, port
        self.stop_event = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.lock = threading.Lock()
        # queue id -> (Message-ID, rcpts, sha256 of the message as sent)
        self.acked: dict[str, tuple] = {}
        self.sent = 0
        self.errors: Counter = Counter()
        self.threads = [threading.Thread(target=self._loop, args=(seed * 1000 + i,), daemon=True)
                        for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def snapshot(self) -> dict[str, tuple]:
        with self.lock:
            return dict(self.acked)

    def _message(self, rnd: random.Random, mid: str, n: int) -> tuple[tuple[str, ...], bytes]:
        """(recipients, message) of the n-th message of one client."""
        rcpts = tuple(f"r{k}@dest.test" for k in rnd.sample(range(8), rnd.randint(1, 3)))
        lines = rnd.randint(10, 250)
        msg = (f"Message-ID: <{mid}>\r\nFrom: <c@client.test>\r\nSubject: crash {n}\r\n\r\n"
               + f"{mid} line of text to make up some size .......................\r\n" * lines).encode()
        return rcpts, msg

    def _acked(self, qid: str, mid: str, rcpts: tuple[str, ...], msg: bytes) -> None:
        self.acked[qid] = (mid, rcpts, hashlib.sha256(msg).hexdigest())

    def _loop(self, seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        while not self.stop_event.is_set():
            try:
                with smtplib.SMTP(self.host, self.port, timeout=15) as s:
                    s.ehlo(f"{self.name}.client")
                    while not self.stop_event.is_set() and self.go.is_set():
                        n += 1
                        mid = f"{seed}.{n}@{self.name}.test"
                        rcpts, msg = self._message(rnd, mid, n)
                        s.mail("c@client.test")
                        for r in rcpts:
                            s.rcpt(r)
                        code, _ = s.docmd("DATA")
                        if code != 354:
                            raise smtplib.SMTPResponseException(code, b"DATA refused")
                        with self.lock:
                            self.sent += 1
                        # smtplib.data() would send DATA again: send the body by hand
                        s.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                        code, resp = s.getreply()
                        with self.lock:
                            if code == 250:
                                self._acked(resp.decode().rsplit(" ", 1)[1], mid, rcpts, msg)
                            else:
                                self.errors[f"{code}"] += 1
            except (OSError, smtplib.SMTPException) as e:
                with self.lock:
                    self.errors[e.__class__.__name__] += 1
                self.stop_event.wait(0.02)
            while not self.go.wait(0.05) and not self.stop_event.is_set():
                pass


def spools(spool_root: str) -> list[spoolmod.Spool]:
    """The relay's queues: the top spool and, with workers, each <spool>/w<i>."""
    out = [spoolmod.Spool(spool_root)]
    for name in sorted(os.listdir(spool_root)) if os.path.isdir(spool_root) else ():
        if name.startswith("w") and name[1:].isdigit():
            out.append(spoolmod.Spool(os.path.join(spool_root, name)))
    return out


def queued(spool_root: str) -> dict[str, spoolmod.Spool]:
    """Every queued message id, with the spool that holds it."""
    out: dict[str, spoolmod.Spool] = {}
    for sp in spools(spool_root):
        if os.path.isdir(sp.queue_dir):
            out.update((qid, sp) for qid in sp.queue_ids())
    return out


def recorded_delivered(spool_root: str, acked: dict[str, tuple[str, tuple[str, ...], str]]) -> set[tuple[str, str]]:
    """From a dead relay's spool(s): the acknowledged pairs it had recorded as delivered."""
    present = queued(spool_root)
    out: set[tuple[str, str]] = set()
    for qid, (mid, rcpts, _digest) in acked.items():
        if qid not in present:
            out.update((mid, r) for r in rcpts)  # gone: every recipient was final
            continue
        try:
            entry = present[qid].load(qid)
        except (OSError, spoolmod.CorruptEntry):
            continue
        for r in entry.state.recipients:
            if r.status == spoolmod.DELIVERED:
                out.add((mid, r.address.lower()))
    return out


def make_relay(workdir: str, port: int, sink_port: int, workers: int = 1) -> RelayProcess:
    data = deep_merge(base_config(workdir, RELAY_IP), {
        "workers": workers,
        "smtp": {"listen": [f"tcp:{port}:interface={RELAY_IP}"], "max_connections_per_ip": 500},
        "relay": {"smarthost": f"{SINK_IP}:{sink_port}", "smarthost_tls": "none"},
        "delivery": {"retry_min": 1, "retry_max": 2, "connect_timeout": 5, "tls": "none",
                     "max_per_destination": 10},
    })
    return RelayProcess(workdir, data, "relay")


def children(pid: int) -> list[int]:
    """The child processes of pid (the workers of a master)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_relay(relay: RelayProcess) -> None:
    """SIGKILL the relay; with workers, the master, then wait for its workers
    to die too (they get SIGKILL from the kernel when the master dies)."""
    workers = children(relay.proc.pid)
    relay.kill(signal.SIGKILL)
    relay._log.close()
    poll(lambda: not any(alive(w) for w in workers), 30, interval=0.01, what="the workers to die with the master")


def run(workdir: str, kills: int = 5, clients: int = 8, seed: int | None = None, min_up: float = 0.3,
        max_up: float = 1.5, drain_timeout: float = 120.0, progress=None, workers: int = 1) -> CrashReport:
    """Run the harness in workdir (an empty directory); return the report.

    With workers > 1 the relay is a master and that many worker processes;
    half the kills (at random) SIGKILL the whole relay, the others a single
    worker, which the master restarts on its own."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    say = progress or (lambda msg: None)
    t0 = time.monotonic()
    report = CrashReport()
    sink = SinkProcess(workdir).start()
    port = free_port((RELAY_IP,))
    relay = make_relay(workdir, port, sink.port, workers)
    spool_root = relay.data["spool"]
    recorded: dict[tuple[str, str], int] = {}  # pair -> sink copies when first seen recorded
    cl = Clients(RELAY_IP, port, clients, seed)
    acked: dict = {}
    try:
        relay.start(wait_for=(RELAY_IP, port))
        cl.start()
        for k in range(kills):
            up = rnd.uniform(min_up, max_up)
            time.sleep(up)  # a random moment: this is the fault injection, not a wait for a result
            victim = None
            if workers > 1 and rnd.random() < 0.5:
                pids = sorted(children(relay.proc.pid))
                victim = rnd.choice(pids) if pids else None
            if victim is not None:
                # one worker only: its own queue, the others go on
                os.kill(victim, signal.SIGKILL)
                poll(lambda v=victim: not alive(v), 30, interval=0.01, what="the worker to die")
                report.worker_kills += 1
            else:
                kill_relay(relay)
            report.kills += 1
            acked = cl.snapshot()
            done = recorded_delivered(spool_root, acked)
            counts = sink.counts()
            for pair in done:
                if pair not in recorded:
                    recorded[pair] = counts[pair]
            say(f"kill {k + 1}/{kills} ({'worker ' + str(victim) if victim else 'relay'}) after {up:.2f}s: "
                f"{len(acked)} acknowledged, {len(recorded)} recipients recorded delivered")
            if victim is None:
                relay.start(wait_for=(RELAY_IP, port), timeout=60)
            else:
                poll(lambda: len([c for c in children(relay.proc.pid) if alive(c)]) == workers
                     or relay._died(), 60, interval=0.05, what="the master to restart the worker")
        # let the last incarnation take some new mail too, then drain
        poll(lambda: len(cl.snapshot()) > len(acked) or relay._died(), 30, what="mail after the last restart")
        cl.stop()
        poll(lambda: not queued(spool_root) or relay._died(), drain_timeout,
             interval=0.1, what="the relay to deliver everything")
        relay.stop()
        acked = cl.snapshot()
        counts = sink.counts()
        digests = read_digests(sink.record)
        report.left_in_queue = len(queued(spool_root))
        report.quarantined = sum(len(os.listdir(sp.quarantine_dir)) for sp in spools(spool_root)
                                 if os.path.isdir(sp.quarantine_dir))
    finally:
        cl.stop()
        if relay.proc is not None and relay.proc.poll() is None:
            kill_relay(relay)
        sink.stop()
    report.sent = cl.sent
    report.acked = len(acked)
    acked_mids = set()
    for qid, (mid, rcpts, digest) in acked.items():
        acked_mids.add(mid)
        report.acked_rcpts += len(rcpts)
        for r in rcpts:
            bad = [d for d in digests.get((mid, r), []) if d != digest]
            if bad:
                report.corrupt += len(bad)
                report.corrupt_examples.append((qid, mid, r))
        got = [counts[(mid, r)] for r in rcpts]
        report.delivered_rcpts += sum(1 for g in got if g)
        if all(got):
            report.delivered += 1
        for r, g in zip(rcpts, got):
            if not g:
                report.lost += 1
                report.lost_examples.append((qid, mid, r))
    for n in counts.values():
        if n > 1:
            report.duplicated += 1
            report.duplicate_copies += n - 1
    report.unacked_arrived = len({mid for (mid, _r) in counts} - acked_mids)
    report.recorded = len(recorded)
    for pair, n in recorded.items():
        if counts[pair] != n:
            report.resent += 1
            report.resent_examples.append((pair, n, counts[pair]))
    report.seconds = time.monotonic() - t0
    say(f"seed {seed}; client errors: {dict(cl.errors)}")
    return report
