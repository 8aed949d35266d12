"""The power-loss harness (issue 12, item 15): like tests/support/crash.py,
but every kill is a power cut of the disk too.

The spool and the mailboxes live on a PowerFS (tests/support/powerfs.py).
Clients send mail (1 to 3 recipients each: next-hop recipients, two of which
the sink defers twice out of three RCPTs, and local ones, delivered into
Maildirs on the same file system).  At each cut:

1. the relay is SIGKILLed;
2. what it had recorded as delivered is noted (its spool as it left it: a
   message gone from queue/, or "delivered" in its state file), with how
   many copies each of those recipients had then (sink record, Maildirs);
3. the file system loses everything that was not durable;
4. the relay restarts on what survived.

At the end the relay drains its queue, one more cut comes (so that what was
finished last must be durable too), the relay drains again, and the report
counts: acknowledged, delivered, lost (an acknowledged recipient that has
no copy: must be 0), torn (a copy whose body differs from what was sent:
must be 0), quarantined files (must be 0), recorded delivered then sent
again (must be 0), duplicates (allowed: a cut between the delivery and its
record), and what the file system threw away.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from relay.queue import spool as spoolmod
from tests.support import crash
from tests.support.crash import RELAY_IP, SINK_IP, SinkProcess, kill_relay, queued
from tests.support.pop3server import write_users
from tests.support.powerfs import PowerFS
from tests.support.relay import RelayProcess, base_config, deep_merge, free_port
from tests.support.sinkproc import body_digest, message_id, read_bodies
from tests.support.wait import poll

REMOTE = [f"r{k}@dest.test" for k in range(6)]
DEFERRED = ["d0@dest.test", "d1@dest.test"]  # the sink answers 451, 451, 250, ...
LOCAL = [f"u{k}@local.test" for k in range(4)]


@dataclass
class PowerReport:
    cuts: int = 0
    sent: int = 0
    acked: int = 0
    acked_rcpts: int = 0
    delivered: int = 0  # acknowledged messages with a copy for every recipient
    delivered_rcpts: int = 0
    local_rcpts: int = 0  # of the acknowledged recipients, those delivered into Maildirs
    lost: int = 0
    lost_examples: list = field(default_factory=list)
    torn: int = 0
    torn_examples: list = field(default_factory=list)
    quarantined: int = 0
    quarantined_names: list = field(default_factory=list)
    resent: int = 0
    resent_examples: list = field(default_factory=list)
    recorded: int = 0
    duplicated: int = 0
    duplicate_copies: int = 0
    left_in_queue: int = 0
    fs: Counter = field(default_factory=Counter)  # totals of the cuts' summaries
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.torn or self.quarantined or self.resent or self.left_in_queue)

    def text(self) -> str:
        f = self.fs
        return (
            f"power-loss harness: {self.cuts} power cuts in {self.seconds:.1f}s\n"
            f"  messages sent        {self.sent}\n"
            f"  acknowledged (250)   {self.acked} ({self.acked_rcpts} recipients, {self.local_rcpts} local)\n"
            f"  delivered            {self.delivered} ({self.delivered_rcpts} recipients)\n"
            f"  lost                 {self.lost}{' ' + str(self.lost_examples[:5]) if self.lost else ''}\n"
            f"  torn copies          {self.torn}{' ' + str(self.torn_examples[:5]) if self.torn else ''}\n"
            f"  quarantined files    {self.quarantined}"
            f"{' ' + str(self.quarantined_names[:5]) if self.quarantined else ''}\n"
            f"  recorded delivered, then sent again  {self.resent}"
            f"{' ' + str(self.resent_examples[:5]) if self.resent else ''} (of {self.recorded} checked at cuts)\n"
            f"  duplicated           {self.duplicated} recipients ({self.duplicate_copies} extra copies; "
            f"each from a delivery cut short)\n"
            f"  left in queue        {self.left_in_queue}\n"
            f"  thrown away by the cuts: {f['names_dropped']} names, {f['empty_never_synced']} files "
            f"emptied (never synced), {f['reverted']} reverted to their last sync, "
            f"{f['names_restored']} names brought back; {f['fsyncs']} fsyncs, {f['dir_fsyncs']} dir fsyncs\n"
            f"  result: {'OK' if self.ok else 'FAILED'}"
        )


class Clients(crash.Clients):
    """The crash harness's clients, with local and deferred recipients too;
    every body's digest is kept (an acknowledged message records its
    Message-ID and recipients)."""

    name = "power"

    def __init__(self, host: str, port: int, n: int, seed: int):
        super().__init__(host, port, n, seed)
        self.digests: dict[str, str] = {}  # Message-ID -> body digest (every message sent)

    def _message(self, rnd: random.Random, mid: str, n: int) -> tuple[tuple[str, ...], bytes]:
        rcpts = tuple(rnd.sample(REMOTE + DEFERRED + LOCAL, rnd.randint(1, 3)))
        body = f"{mid} line of text to make up some size ....................\r\n".encode() * rnd.randint(5, 150)
        with self.lock:
            self.digests[mid] = hashlib.sha256(body).hexdigest()[:16]
        return rcpts, f"Message-ID: <{mid}>\r\nFrom: <c@client.test>\r\nSubject: power {n}\r\n\r\n".encode() + body

    def _acked(self, qid: str, mid: str, rcpts: tuple[str, ...], msg: bytes) -> None:
        self.acked[qid] = (mid, rcpts)


def maildir_copies(mail_root: str) -> Counter:
    """(message-id, recipient, body digest) -> copies in the Maildirs."""
    out: Counter = Counter()
    for addr in LOCAL:
        local, domain = addr.split("@")
        box = os.path.join(mail_root, domain, local)
        for sub in ("new", "cur"):
            d = os.path.join(box, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                try:
                    with open(os.path.join(d, name), "rb") as f:
                        data = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                except FileNotFoundError:
                    continue
                out[(message_id(data), addr, body_digest(data))] += 1
    return out


def final_pairs(spool_root: str, acked: dict) -> dict[tuple[str, str], str]:
    """At a kill, from the spool as the relay left it (page cache): the
    acknowledged (message, recipient) pairs it had recorded as final, with
    their queue ids (a message gone from queue/: all of its recipients)."""
    present = queued(spool_root)
    out: dict[tuple[str, str], str] = {}
    for qid, (mid, rcpts) in acked.items():
        if qid not in present:
            out.update(((mid, r), qid) for r in rcpts)
            continue
        try:
            entry = present[qid].load(qid)
        except (OSError, spoolmod.CorruptEntry):
            continue
        for r in entry.state.recipients:
            if r.final:
                out[(mid, r.address.lower())] = qid
    return out


def kept_records(spool_root: str, at_kill: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    """Of the records seen at the kill, those the relay had really made:
    still final in the spool that survived the cut, or replaced by a state
    file the cut left unreadable (a record lost by a write in the wrong
    order, which is the relay's fault).  A record whose write was still in
    flight at the kill (the cut brought back the previous, readable state,
    or the message file of a removal not yet durable) is not one: its
    recipient may be tried again (at-least-once)."""
    present = queued(spool_root)
    out: set[tuple[str, str]] = set()
    for pair, qid in at_kill.items():
        if qid not in present:
            out.add(pair)
            continue
        try:
            entry = present[qid].load(qid)
        except spoolmod.CorruptEntry:
            out.add(pair)
            continue
        except OSError:
            continue
        if any(r.final and r.address.lower() == pair[1] for r in entry.state.recipients):
            out.add(pair)
    return out


def run(workdir: str, cuts: int = 3, clients: int = 6, seed: int | None = None, min_up: float = 0.5,
        max_up: float = 2.0, drain_timeout: float = 120.0, progress=None) -> PowerReport:
    seed = seed if seed is not None else random.randrange(1 << 30)
    rnd = random.Random(seed)
    say = progress or (lambda msg: None)
    t0 = time.monotonic()
    report = PowerReport()
    fs = PowerFS(os.path.join(workdir, "fs")).mount()
    sink = None
    relay = None
    cl = Clients(RELAY_IP, 0, 0, seed)
    try:
        sink = SinkProcess(workdir, SINK_IP, extra_args=tuple(a for d in DEFERRED for a in ("--defer", d))).start()
        users = os.path.join(workdir, "users")
        write_users(users, {a: "pw" for a in LOCAL})
        port = free_port((RELAY_IP,))
        data = deep_merge(base_config(workdir, RELAY_IP), {
            "spool": os.path.join(fs.mnt, "spool"),
            "local": {"mailboxes": os.path.join(fs.mnt, "mail"), "users": users},
            "smtp": {"listen": [f"tcp:{port}:interface={RELAY_IP}"], "max_connections_per_ip": 500},
            "relay": {"smarthost": f"{SINK_IP}:{sink.port}", "smarthost_tls": "none"},
            "delivery": {"retry_min": 1, "retry_max": 2, "connect_timeout": 5, "tls": "none",
                         "max_per_destination": 10},
        })
        relay = RelayProcess(workdir, data, "relay")
        spool_root, mail_root = data["spool"], data["local"]["mailboxes"]
        recorded: dict[tuple[str, str], int] = {}  # pair -> copies just after the cut that followed its record
        cl = Clients(RELAY_IP, port, clients, seed)

        def copies() -> Counter:
            c: Counter = Counter()
            for (mid, r, _d), n in list(read_bodies(sink.record).items()) + list(maildir_copies(mail_root).items()):
                c[(mid, r)] += n
            return c

        def start_relay() -> None:
            """Start the relay and wait until it has loaded its queue (over
            this file system a big backlog takes seconds to read), so that
            each time up until the next cut is spent delivering too."""
            try:
                offset = os.path.getsize(relay.log_path)
            except FileNotFoundError:
                offset = 0
            cl.go.clear()  # no new mail until the queue is loaded: the backlog stays bounded
            relay.start(wait_for=(RELAY_IP, port), timeout=60)

            def loaded() -> bool:
                with open(relay.log_path, "rb") as f:
                    f.seek(offset)
                    return b"queue loaded:" in f.read()

            poll(lambda: loaded() or relay._died(), 120, interval=0.05, what="the relay to load its queue")
            cl.go.set()

        def cut(label: str) -> None:
            kill_relay(relay)
            acked = cl.snapshot()
            at_kill = final_pairs(spool_root, acked)
            summary = fs.cut()
            report.cuts += 1
            for k, v in summary.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    report.fs[k] += v
            fs.mount()
            after = copies()
            done = kept_records(spool_root, at_kill)
            for pair in done:
                if pair not in recorded:
                    recorded[pair] = after[pair]
            say(f"cut {report.cuts} ({label}): {len(acked)} acknowledged, {len(recorded)} recipients recorded "
                f"delivered; lost on the disk: {summary.get('names_dropped', 0)} names, "
                f"{summary.get('empty_never_synced', 0)} files emptied")
            start_relay()

        start_relay()
        cl.start()
        for _k in range(cuts):
            up = rnd.uniform(min_up, max_up)
            time.sleep(up)  # a random moment: the fault injection itself, not a wait for a result
            cut(f"under load, after {up:.2f}s")
        acked = cl.snapshot()
        poll(lambda: len(cl.snapshot()) > len(acked) or relay._died(), 60, what="mail after the last restart")
        cl.stop()
        poll(lambda: not queued(spool_root) or relay._died(), drain_timeout, interval=0.1,
             what="the relay to deliver everything")
        cut("after the queue drained")
        poll(lambda: not queued(spool_root) or relay._died(), drain_timeout, interval=0.1,
             what="the relay to deliver everything again")
        relay.stop()
        report.left_in_queue = len(queued(spool_root))
        # from the log of every incarnation: a quarantine rename is not
        # fsynced, so a later cut may have undone it
        qdir = os.path.join(spool_root, "quarantine")
        names = set(os.listdir(qdir)) if os.path.isdir(qdir) else set()
        with open(relay.log_path, encoding="utf-8", errors="replace") as f:
            names.update(m.group(1) for m in re.finditer(r"\] (\S+): moved to quarantine", f.read()))
        report.quarantined_names = sorted(names)
        report.quarantined = len(names)
        bodies = read_bodies(sink.record) + maildir_copies(mail_root)
    finally:
        try:
            cl.stop()
            if relay is not None and relay.proc is not None and relay.proc.poll() is None:
                kill_relay(relay)
            if sink is not None:
                sink.stop()
        finally:
            fs.unmount()
    acked = cl.snapshot()
    counts: Counter = Counter()
    for (mid, r, digest), n in bodies.items():
        counts[(mid, r)] += n
        if digest != cl.digests.get(mid):
            report.torn += n
            report.torn_examples.append((mid, r))
    report.sent = cl.sent
    report.acked = len(acked)
    for qid, (mid, rcpts) in acked.items():
        report.acked_rcpts += len(rcpts)
        report.local_rcpts += sum(1 for r in rcpts if r in LOCAL)
        got = [counts[(mid, r)] for r in rcpts]
        report.delivered_rcpts += sum(1 for g in got if g)
        report.delivered += all(got)
        for r, g in zip(rcpts, got):
            if not g:
                report.lost += 1
                report.lost_examples.append((qid, mid, r))
    for n in counts.values():
        if n > 1:
            report.duplicated += 1
            report.duplicate_copies += n - 1
    report.recorded = len(recorded)
    for pair, n in recorded.items():
        if counts[pair] > n:
            report.resent += 1
            report.resent_examples.append((pair, n, counts[pair]))
    report.seconds = time.monotonic() - t0
    say(f"seed {seed}; client errors: {dict(cl.errors)}")
    return report
