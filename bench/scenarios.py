"""The six measurements of issue 8, one run each; run.py repeats and interleaves them.

Addresses (all loopback, one per role):
  127.0.0.61 smtp-sink (the next hop)       127.0.0.62 our relay
  127.0.0.63 the Postfix instance           127.0.0.64 the next hop that is down
  127.0.0.66 the POP3 servers               127.0.0.70-79 idle clients, 127.0.0.80 the probe
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from mta import Env, OurRelay, Postfix, Sink, run_source
from procs import (
    BenchError,
    Registry,
    children_cpu,
    drop_caches,
    free_port,
    read_banner,
    reset_peak_rss,
    resident_fraction,
    status_kb,
    system_busy,
    threads,
    wait_idle,
)

SINK = "127.0.0.61"
OURS = "127.0.0.62"
POSTFIX = "127.0.0.63"
DOWN = "127.0.0.64"
POP3 = "127.0.0.66"
IDLE_SOURCES = [f"127.0.0.{x}" for x in range(70, 80)]
PROBE_SOURCE = "127.0.0.80"

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Params:
    runs: int = 3
    messages: int = 5000
    sessions: int = 10
    size: int = 2048
    warmup: int = 100
    large_mb: int = 100
    idle: int = 1000
    probes: int = 10
    spool: int = 100_000
    pop3_messages: int = 1000
    pop3_size: int = 2048
    workers: int = 2  # our relay's processes for the relay and accept rates (benchmarks 1 and 2)
    dkim: str = ""  # our relay signs the messages with a key of this algorithm (bench/dkim_accept.py)

    @classmethod
    def quick(cls) -> "Params":
        return cls(runs=1, messages=500, warmup=50, large_mb=10, idle=200, probes=5, spool=5000,
                   pop3_messages=200)


@dataclass
class Ctx:
    reg: Registry
    env: Env
    work: str
    p: Params
    say: Callable[[str], None]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _snapshot(relay, sink: Sink | None) -> dict:
    return {"relay": relay.cpu(), "relay_tree": relay.cpu_tree(), "system": system_busy(),
            "source": children_cpu(), "sink": sink.cpu() if sink else 0.0, "harness": _self_cpu()}


def make_relay(ctx: Ctx, kind: str, d: str, next_hop: tuple[str, int], *, accept: bool):
    if kind == "ours":
        return OurRelay(ctx.reg, ctx.env, d, OURS, next_hop=next_hop, retry_min="1h" if accept else None,
                        max_connections_per_ip=max(100, 2 * ctx.p.sessions), workers=ctx.p.workers,
                        dkim=ctx.p.dkim)
    return Postfix(ctx.reg, ctx.env, d, POSTFIX, next_hop=next_hop)


# -- 1 and 2: relay rate and accept rate ------------------------------------------------


def relay_run(ctx: Ctx, kind: str, accept: bool, i: int, profile: str | None = None) -> dict:
    """smtp-source -> relay -> smtp-sink (accept=False) or -> a closed port
    (accept=True): messages per second and the relay's CPU per message.

    A warm-up batch goes first (Postfix starts its daemons on demand, our relay
    warms its caches); the timed part starts when the relay is idle again.  The
    CPU is counted until the relay is idle after the last message: delivered
    and removed (relay), or queued and its first attempt deferred (accept).
    """
    p = ctx.p
    d = os.path.join(ctx.work, f"{'accept' if accept else 'relay'}-{kind}-{i}")
    sink = None
    relay = None
    spy = None
    try:
        if accept:
            next_hop = (DOWN, free_port(DOWN))
        else:
            sink = Sink(ctx.reg, ctx.env, SINK).start()
            next_hop = (SINK, sink.port)
        relay = make_relay(ctx, kind, d, next_hop, accept=accept).start()
        run_source(ctx.reg, ctx.env, relay.addr, relay.port, p.warmup, sessions=p.sessions, size=p.size)
        if accept:
            wait_for(lambda: relay.queued() >= p.warmup, 120, "the warm-up messages to be queued")
        else:
            sink.wait_count(p.warmup)
            wait_for(lambda: relay.queued() == 0, 120, "the warm-up messages to leave the queue")
        wait_idle(relay.cpu)
        if profile:
            # --subprocesses: the workers are children of the master
            spy = ctx.reg.start("py-spy", [profile_tool(ctx), "record", "-p", str(relay.pid), "-f", "raw",
                                           "--subprocesses", "--threads", "-o", profile],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let it attach
        before = _snapshot(relay, sink)
        t0, t_src = run_source(ctx.reg, ctx.env, relay.addr, relay.port, p.messages, sessions=p.sessions,
                               size=p.size)
        total = p.warmup + p.messages
        if accept:
            t_end = t_src
            wait_for(lambda: relay.queued() >= total, 120, "all messages to be queued")
        else:
            t_end = sink.wait_count(total)
            wait_for(lambda: relay.queued() == 0, 300, "the queue to empty")
        settle = wait_idle(relay.cpu)
        after = _snapshot(relay, sink)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                pass
            ctx.reg.stop(spy, timeout=1)
        n = p.messages
        delta = {k: after[k] - before[k] for k in after}
        res = {
            "rate": n / (t_end - t0),
            "cpu_ms": delta["relay"] * 1000 / n,
            "cpu_tree_ms": delta["relay_tree"] * 1000 / n,
            "system_ms": delta["system"] * 1000 / n,
            "source_ms": delta["source"] * 1000 / n,
            "sink_ms": delta["sink"] * 1000 / n,
            "harness_ms": delta["harness"] * 1000 / n,
            "seconds": t_end - t0,
            "source_seconds": t_src - t0,
            "settle_seconds": settle,
            "processes": relay.processes(),
            "queued_after": relay.queued(),
            "sink_sessions": 0,  # filled in below, once the relay has closed its connections
            "cgroup": relay.cg is not None,
        }
        if accept:
            # where the two do different durable work (see RESULTS.md's notes)
            res["deferrals_on_disk"] = relay.deferrals_on_disk()
        if kind == "ours":
            res["threads"] = threads(relay.pid)
        if accept and relay.queued() != total:
            raise BenchError(f"{relay.name}: {relay.queued()} messages queued, expected {total}")
        if not accept and sink.count != total:
            raise BenchError(f"{relay.name}: the sink has {sink.count} messages, expected {total}")
        relay.stop()
        if sink is not None:
            # smtp-sink counts a session when it ends: cached connections end with the relay
            time.sleep(0.5)
            res["sink_sessions"] = sink.sessions - 1  # less the harness's readiness probe
        return res
    finally:
        if spy is not None and spy.poll() is None:
            ctx.reg.stop(spy, timeout=5, sig=signal.SIGINT)
        if relay is not None:
            relay.stop()
        if sink is not None:
            sink.stop()


def profile_tool(ctx: Ctx) -> str:
    for path in (os.path.join(ctx.env.venv, "bin", "py-spy"), "/work/venv/bin/py-spy"):
        if os.access(path, os.X_OK):
            return path
    from shutil import which

    found = which("py-spy")
    if found:
        return found
    r = subprocess.run([ctx.env.python, "-m", "pip", "install", "-q", "py-spy"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"py-spy is not installed and pip could not install it: {r.stderr[-500:]}")
    return os.path.join(ctx.env.venv, "bin", "py-spy")


# -- 3: a 100 MB message in and out ------------------------------------------------------


def large_run(ctx: Ctx, i: int) -> dict:
    """One message of large_mb MB through our relay to the sink: the time, and
    how far the relay's peak RSS rises above its RSS before the message."""
    size = ctx.p.large_mb * 1024 * 1024
    d = os.path.join(ctx.work, f"large-{i}")
    sink = relay = None
    try:
        sink = Sink(ctx.reg, ctx.env, SINK).start()
        relay = OurRelay(ctx.reg, ctx.env, d, OURS, next_hop=(SINK, sink.port),
                         max_message_size=2 * size + (1 << 20)).start()
        run_source(ctx.reg, ctx.env, relay.addr, relay.port, 1, sessions=1, size=ctx.p.size)
        sink.wait_count(1)
        wait_for(lambda: relay.queued() == 0, 60, "the warm-up message to leave the queue")
        wait_idle(relay.cpu)
        pid = relay.pid
        reset = reset_peak_rss(pid)
        rss0 = status_kb(pid, "VmRSS")
        sampled = [rss0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                try:
                    sampled.append(status_kb(pid, "VmRSS"))
                except (OSError, BenchError):
                    return

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            t0, t_in = run_source(ctx.reg, ctx.env, relay.addr, relay.port, 1, sessions=1, size=size,
                                  timeout=600)
            t_end = sink.wait_count(2, timeout=600)
            wait_for(lambda: relay.queued() == 0, 120, "the large message to leave the queue")
        finally:
            stop.set()
            th.join()
        hwm = status_kb(pid, "VmHWM")
        peak = hwm if reset else max(sampled)
        return {
            "growth_mb": (peak - rss0) / 1024,
            "sampled_growth_mb": (max(sampled) - rss0) / 1024,
            "rss_before_mb": rss0 / 1024,
            "peak_mb": peak / 1024,
            "hwm_reset": reset,
            "seconds": t_end - t0,
            "in_seconds": t_in - t0,
            "mb_per_s": size / (1 << 20) / (t_end - t0),
        }
    finally:
        if relay is not None:
            relay.stop()
        if sink is not None:
            sink.stop()


# -- 4: 1000 idle connections ------------------------------------------------------------


def open_idle(addr: str, port: int, n: int, sources: list[str], batch: int = 40,
              timeout: float = 120.0) -> list[socket.socket]:
    """n connections that read their banner and then say nothing, from several
    source addresses, opened batch at a time: below the relay's listen backlog
    (Twisted's default, 50), which a burst overflows (see burst())."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    try:
        while len(socks) < n:
            pending = 0
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket()
                s.setblocking(False)
                s.bind((sources[len(socks) % len(sources)], 0))
                s.connect_ex((addr, port))
                socks.append(s)
                sel.register(s, selectors.EVENT_READ, bytearray())
                pending += 1
            while pending:
                if time.monotonic() > deadline:
                    raise BenchError(f"only {len(socks) - pending} of {n} idle connections got a banner "
                                     f"within {timeout:.0f}s")
                for key, _ in sel.select(timeout=1.0):
                    buf = key.data
                    try:
                        chunk = key.fileobj.recv(4096)
                    except OSError as e:
                        raise BenchError(f"idle connection {len(socks)}: {e}")
                    if not chunk:
                        raise BenchError(f"the relay closed idle connection {len(socks)} "
                                         f"({bytes(buf)[:80]!r})")
                    buf += chunk
                    if b"\n" in buf:
                        if not buf.startswith(b"220"):
                            raise BenchError(f"idle connection refused: {bytes(buf)[:100]!r}")
                        sel.unregister(key.fileobj)
                        pending -= 1
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()


def burst(addr: str, port: int, n: int, sources: list[str], wait: float = 10.0) -> int:
    """n connects at once: how many get their banner within wait seconds.  When
    the listen queue overflows, Linux (with SYN cookies) may complete the
    handshake on the client side only: such a client waits for a banner that
    never comes, until its own timeout."""
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for k in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.bind((sources[k % len(sources)], 0))
            s.connect_ex((addr, port))
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, bytearray())
        got = 0
        deadline = time.monotonic() + wait
        while got < n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                try:
                    chunk = key.fileobj.recv(4096)
                except OSError:
                    chunk = b""
                key.data.extend(chunk)
                if not chunk or b"\n" in key.data:
                    if key.data.startswith(b"220"):
                        got += 1
                    sel.unregister(key.fileobj)
        return got
    finally:
        sel.close()
        for s in socks:
            s.close()


def _listen_backlog(addr: str, port: int) -> int | None:
    """The listening socket's backlog as ss(8) reports it (Send-Q of a LISTEN socket)."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"src {addr}:{port}"], capture_output=True, text=True,
                             timeout=10).stdout.split()
        return int(out[2]) if len(out) > 2 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _smtp_sessions(relay: OurRelay) -> int | None:
    st = relay.relayctl("status", "--json", timeout=60)
    if st.returncode != 0:
        return None
    return json.loads(st.stdout).get("sessions", {}).get("smtp")


def idle_run(ctx: Ctx, i: int) -> dict:
    n = ctx.p.idle
    d = os.path.join(ctx.work, f"idle-{i}")
    relay = None
    socks: list[socket.socket] = []
    try:
        relay = OurRelay(ctx.reg, ctx.env, d, OURS, next_hop=(DOWN, free_port(DOWN)),
                         max_connections_per_ip=n + ctx.p.probes + 10).start()
        for _ in range(3):
            read_banner(OURS, relay.port, source=PROBE_SOURCE)
        wait_idle(relay.cpu)
        rss0 = relay.rss_kb()
        t0 = time.monotonic()
        socks = open_idle(OURS, relay.port, n, IDLE_SOURCES)
        t_open = time.monotonic() - t0
        time.sleep(1.0)
        wait_idle(relay.cpu)
        rss1 = relay.rss_kb()
        probes = []
        for _ in range(ctx.p.probes):
            probes.append(read_banner(OURS, relay.port, source=PROBE_SOURCE) * 1000)
            time.sleep(0.1)
        sessions = _smtp_sessions(relay)
        rss2 = relay.rss_kb()
        if sessions is not None and sessions < n:
            raise BenchError(f"the relay reports {sessions} SMTP sessions with {n} idle connections open")
        for s in socks:
            s.close()
        socks = []
        wait_for(lambda: _smtp_sessions(relay) == 0, 60, "the idle sessions to close", interval=0.5)
        burst_n = min(n, 500)
        burst_got = burst(OURS, relay.port, burst_n, IDLE_SOURCES)
        return {
            "rss_mb": max(rss1, rss2) / 1024,
            "rss_before_mb": rss0 / 1024,
            "kb_per_connection": (rss1 - rss0) / n,
            "banner_ms": statistics.median(probes),
            "banner_max_ms": max(probes),
            "probes_ms": probes,
            "open_seconds": t_open,
            "sessions_reported": sessions,
            "listen_backlog": _listen_backlog(OURS, relay.port),
            "burst": burst_n,
            "burst_banners_10s": burst_got,
        }
    finally:
        for s in socks:
            s.close()
        if relay is not None:
            relay.stop()


# -- 5: a spool of 100,000 deferred messages ----------------------------------------------


def spool_fill(ctx: Ctx) -> str:
    """Fill a spool with deferred messages, written like queue_listing.py does
    (without fsync: this measures start-up and listing, not queueing)."""
    spool = os.path.join(ctx.work, "bigspool", "spool")
    os.makedirs(os.path.dirname(spool), exist_ok=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import queue_listing; "
            "queue_listing.fill(sys.argv[2], int(sys.argv[3]))")
    r = subprocess.run([ctx.env.python, "-c", code, HERE, spool, str(ctx.p.spool)], capture_output=True,
                       text=True, cwd=ctx.env.root)
    if r.returncode != 0:
        raise BenchError(f"filling the spool failed: {r.stderr[-1000:]}")
    return spool


def _probe_accept(addr: str, port: int, deadline: float) -> float:
    """Send one message (to postmaster, delivered locally, so it leaves the
    queue) as soon as the relay takes it; the monotonic time of its 250."""
    msg = b"From: probe@source.bench.test\r\nSubject: probe\r\n\r\nstart-up probe\r\n"
    while True:
        try:
            with smtplib.SMTP(addr, port, local_hostname="probe.bench.test", timeout=60,
                              source_address=(PROBE_SOURCE, 0)) as c:
                c.sendmail("probe@source.bench.test", ["postmaster@local.bench.test"], msg)
                return time.monotonic()
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise BenchError(f"the relay did not accept mail on {addr}:{port} in time")
            time.sleep(0.02)


def _list_json(relay: OurRelay) -> tuple[float, int]:
    t0 = time.monotonic()
    r = relay.relayctl("queue", "--json")
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise BenchError(f"relayctl queue --json failed ({r.returncode}): {r.stderr.decode()[-300:]}")
    return dt, r.stdout.count(b"\n")


def spool_sample(spool: str, k: int = 200) -> list[str]:
    """k of the spool's files (messages and envelopes, spread over the listing):
    fincore on them says how much of the spool is in the page cache."""
    names: list[str] = []
    for sub in ("queue", "incoming"):
        try:
            names += sorted(os.path.join(spool, sub, n) for n in os.listdir(os.path.join(spool, sub)))
        except FileNotFoundError:
            pass
    step = max(1, len(names) // k)
    return names[::step][:k]


def spool_run(ctx: Ctx, spool: str, i: int, cold: bool = False) -> dict:
    """Our relay started on the big spool: cold (sync; drop_caches first, so
    the spool, its directories and inodes, and the relay's own code are read
    from the disk, as after a reboot) or warm (right after a run that read it
    all)."""
    n = ctx.p.spool
    d = os.path.join(ctx.work, f"spool-{'cold' if cold else 'warm'}-{i}")
    relay = None
    sample = spool_sample(spool)
    cached_kb = None
    if cold:
        cached_kb = drop_caches()
    resident = resident_fraction(sample)
    if cold and resident is not None and resident > 0.05:
        raise BenchError(f"after dropping the caches {resident:.0%} of a sample of spool files is still "
                         "in the page cache: not a cold start")
    try:
        relay = OurRelay(ctx.reg, ctx.env, d, OURS, next_hop=(DOWN, free_port(DOWN)), retry_min="1h",
                         spool=spool).start(wait_loaded=False)
        t0 = relay.t_start
        t_accept = _probe_accept(OURS, relay.port, t0 + 300)
        while True:
            _dt, count = _list_json(relay)
            if count >= n:
                t_listed = time.monotonic()
                break
            if time.monotonic() - t0 > 600:
                raise BenchError(f"relayctl queue --json lists {count} of {n} messages after 600s")
        t_loaded = relay.wait_log("queue loaded", 600)
        wait_idle(relay.cpu, timeout=300)
        listings = []
        for _ in range(3):
            dt, count = _list_json(relay)
            if count < n:
                raise BenchError(f"relayctl queue --json listed {count} of {n} messages")
            listings.append(dt)
        return {
            "cache": "cold" if cold else "warm",
            "accept_seconds": t_accept - t0,
            "listed_seconds": t_listed - t0,
            "loaded_seconds": t_loaded - t0,
            "listing_seconds": statistics.median(listings),
            "listings": listings,
            "rss_mb": relay.rss_kb() / 1024,
            "peak_rss_mb": status_kb(relay.pid, "VmHWM") / 1024,
            # how much of a sample of the spool's files was in the page cache at the start
            "resident_at_start": resident if resident is not None else "?",
            "cached_mb_after_drop": cached_kb / 1024 if cached_kb is not None else "-",
        }
    finally:
        if relay is not None:
            relay.stop()


# -- 6: POP3 -------------------------------------------------------------------------------


def pop3_all(ctx: Ctx, peer: bool) -> dict:
    """bench/pop3_bench.py (ours vs Dovecot, interleaved runs) on the bench venv."""
    out = os.path.join(ctx.work, "pop3.json")
    argv = [ctx.env.python, os.path.join(HERE, "pop3_bench.py"), "--messages", str(ctx.p.pop3_messages),
            "--size", str(ctx.p.pop3_size), "--runs", str(ctx.p.runs), "--host", POP3, "--json", out]
    if not peer:
        argv.append("--no-dovecot")
    p = ctx.reg.start("pop3_bench", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ctx.env.root)
    try:
        text, _ = p.communicate(timeout=1800)
    finally:
        ctx.reg.stop(p, timeout=5)
    if not os.path.exists(out):
        raise BenchError(f"pop3_bench.py failed ({p.returncode}): {text.decode(errors='replace')[-1500:]}")
    with open(out) as f:
        res = json.load(f)
    res["output"] = text.decode(errors="replace")
    if p.returncode != 0 and not res.get("errors"):
        raise BenchError(f"pop3_bench.py failed ({p.returncode}): {res['output'][-1500:]}")
    return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
