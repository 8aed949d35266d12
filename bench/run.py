#!/usr/bin/env python3
"""twisted-relay benchmarks, side by side with Postfix and Dovecot (issue 8).

    sudo python3 bench/run.py             # full run, medians of 3 (about 10 minutes)
    sudo python3 bench/run.py --quick     # small counts, 1 run (development)

Runs as root on a Debian-like machine; installs what is missing (Debian's
postfix and dovecot-pop3d with apt-get, our relay from this checkout into
bench/.venv).  Everything runs on loopback, one 127.0.0.x address per role,
with a private Postfix instance and a private Dovecot (the system's own
services and port 25 are never touched).  Measures, in the same run:

  1. relay rate: smtp-source (2 KB, 10 sessions, 5000 messages) -> relay -> smtp-sink,
     messages per second until the sink has them all, and the relay's CPU per message
  2. accept rate with the next hop down (messages only queued), CPU per message
  3. one 100 MB message in and out of our relay: peak RSS growth
  4. 1000 idle SMTP connections to our relay: RSS, banner wait of a new client
  5. a spool of 100,000 deferred messages: start -> accepting mail, relayctl
     queue --json, RSS; started cold (sync; drop_caches) and warm
  6. POP3: one session retrieving 1000 x 2 KB messages, ours vs Dovecot, each
     message compared with what was delivered

Ours and the peer alternate within each round, and which goes first
alternates from round to round.  A full run also rewrites docs/benchmarks.md's
benchmark summary from the new bench/RESULTS.md (bench/summary.py).

prints one table (metric, ours, peer, ratio ours/peer, target, met?) and
writes it with the machine, versions and raw numbers to bench/RESULTS.md
(full runs) or bench/out/ (--quick, --only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc  # noqa: E402
import setup_env  # noqa: E402
import summary  # noqa: E402
from procs import BenchError, OthersMonitor, Registry, raise_nofile, remove_our_cgroups  # noqa: E402

BENCHES = ("relay", "accept", "large", "idle", "spool", "pop3")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the table -------------------------------------------------------------------------------


class Row:
    def __init__(self, label: str, unit: str, ours: list[float], peer: list[float] | None, *,
                 target: str = "-", met: Callable[[float, float | None], bool] | None = None,
                 digits: int = 0, error: str | None = None, ratio: bool = True):
        self.label, self.unit = label, unit
        self.ours, self.peer = ours, peer
        self.target, self.met_fn, self.digits, self.error = target, met, digits, error
        self.show_ratio = ratio

    def med(self, xs: list[float] | None) -> float | None:
        return statistics.median(xs) if xs else None

    def cells(self) -> list[str]:
        o, p = self.med(self.ours), self.med(self.peer)
        r = o / p if (o is not None and p and self.show_ratio) else None
        fmt = f"{{:.{self.digits}f}}"
        ours = fmt.format(o) if o is not None else ("error" if self.error else "-")
        peer = fmt.format(p) if p is not None else "-"
        ratio = f"{r:.2f}x" if r is not None else "-"
        if self.met_fn is None or o is None:
            met = "error" if (self.error and o is None and self.met_fn) else "-"
        else:
            try:
                met = "yes" if self.met_fn(o, r) else "no"
            except TypeError:  # a ratio target without a peer figure
                met = "-"
        return [f"{self.label} ({self.unit})", ours, peer, ratio, self.target, met]


HEAD = ["metric", "ours", "peer", "ratio", "target", "met?"]


def text_table(rows: list[Row]) -> str:
    cells = [HEAD] + [r.cells() for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(w[i]) if i == 0 or i == 4 else c[i].rjust(w[i]) for i in range(len(c))))
        if k == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def md_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "|".join(["---", "--:", "--:", "--:", "---", "---"]) + "|"]
    for r in rows:
        out.append("| " + " | ".join(r.cells()) + " |")
    return "\n".join(out)


def build_rows(res: dict, errors: dict, p: sc.Params, peer_names: dict) -> list[Row]:
    rows: list[Row] = []

    def runs(bench: str, who: str, field: str) -> list[float]:
        return [r[field] for r in res.get(bench, {}).get(who, [])]

    pf = peer_names.get("postfix", "Postfix")
    load = f"{p.messages} x {p.size / 1024:g} KB, {p.sessions} sessions"
    wk = f" (ours: workers = {getattr(p, 'workers', 1)})"
    if "relay" in res or "relay" in errors:
        e = errors.get("relay")
        rows.append(Row(f"1. relay rate to smtp-sink, {load}{wk}", "msg/s", runs("relay", "ours", "rate"),
                        runs("relay", "postfix", "rate") or None, target=f">= 1.20x {pf}",
                        met=lambda o, r: r >= 1.2, error=e))
        rows.append(Row("1. relay CPU per message", "ms", runs("relay", "ours", "cpu_ms"),
                        runs("relay", "postfix", "cpu_ms") or None, digits=2, error=e))
    if "accept" in res or "accept" in errors:
        e = errors.get("accept")
        rows.append(Row(f"2. accept rate, next hop down{wk}", "msg/s", runs("accept", "ours", "rate"),
                        runs("accept", "postfix", "rate") or None, target=f">= 1.20x {pf}",
                        met=lambda o, r: r >= 1.2, error=e))
        rows.append(Row("2. accept CPU per message", "ms", runs("accept", "ours", "cpu_ms"),
                        runs("accept", "postfix", "cpu_ms") or None, digits=2, error=e))
    if "large" in res or "large" in errors:
        e = errors.get("large")
        lg = res.get("large", {}).get("ours", [])
        rows.append(Row(f"3. {p.large_mb} MB message in and out: peak RSS growth", "MB",
                        [r["growth_mb"] for r in lg], None, target="< 20 MB", met=lambda o, r: o < 20,
                        digits=1, error=e))
        rows.append(Row(f"3. {p.large_mb} MB message: source start -> at the sink", "s",
                        [r["seconds"] for r in lg], None, digits=2, error=e))
    if "idle" in res or "idle" in errors:
        e = errors.get("idle")
        idl = res.get("idle", {}).get("ours", [])
        rows.append(Row(f"4. {p.idle} idle SMTP connections: relay RSS", "MB", [r["rss_mb"] for r in idl],
                        None, target="< 100 MB", met=lambda o, r: o < 100, digits=1, error=e))
        rows.append(Row("4. banner wait of a new client (median)", "ms", [r["banner_ms"] for r in idl], None,
                        target="< 100 ms", met=lambda o, r: o < 100, digits=1, error=e))
        if idl:
            rows.append(Row(f"4. burst: {idl[0]['burst']} connects at once, banner within 10 s", "clients",
                            [r["burst_banners_10s"] for r in idl], None, error=e))
    if "spool" in res or "spool" in errors:
        e = errors.get("spool")
        n = f"{p.spool:,}"
        for who, cache in (("ours", "warm"), ("ours-cold", "cold")):
            sp = res.get("spool", {}).get(who, [])
            if cache == "cold" and "ours-cold" not in res.get("spool", {}) and "spool-cold" not in errors:
                continue  # results from before cold starts were measured (--render of an old JSON)
            ec = e or (errors.get("spool-cold") if cache == "cold" else None)
            lab = f"5. {n} deferred, {cache} cache"
            rows.append(Row(f"{lab}: start -> mail accepted", "s", [r["accept_seconds"] for r in sp], None,
                            target="< 10 s", met=lambda o, r: o < 10, digits=2, error=ec))
            rows.append(Row(f"{lab}: relayctl queue --json", "s", [r["listing_seconds"] for r in sp],
                            None, target="< 5 s", met=lambda o, r: o < 5, digits=2, error=ec))
            rows.append(Row(f"{lab}: start -> listing complete", "s", [r["listed_seconds"] for r in sp],
                            None, digits=2, error=ec))
            rows.append(Row(f"{lab}: relay peak RSS", "MB", [r["peak_rss_mb"] for r in sp], None,
                            target="< 300 MB", met=lambda o, r: o < 300, digits=0, error=ec))
    if "pop3" in res or "pop3" in errors:
        e = errors.get("pop3")
        po = {who: [r["rate"] if isinstance(r, dict) else r for r in runs]  # old JSON: plain rates
              for who, runs in res.get("pop3", {}).items()}
        rows.append(Row(f"6. POP3 LIST+RETR {p.pop3_messages} x {p.pop3_size / 1024:g} KB, one session",
                        "msg/s", po.get("ours", []), po.get("dovecot") or None,
                        target=f">= 1.00x {peer_names.get('dovecot', 'Dovecot')}", met=lambda o, r: r >= 1.0,
                        error=e))
        checked = {who: [r["compared"] for r in runs if isinstance(r, dict)]
                   for who, runs in res.get("pop3", {}).items()}
        if checked.get("ours"):
            # the fewest of any run: every run must have retrieved and compared them all
            rows.append(Row("6. POP3 messages retrieved and equal to those delivered (fewest of any run)",
                            "messages", [min(checked["ours"])],
                            [min(checked["dovecot"])] if checked.get("dovecot") else None, ratio=False,
                            target=f"= {p.pop3_messages}", met=lambda o, r: o == p.pop3_messages, error=e))
    return rows


# -- running ---------------------------------------------------------------------------------


def round_order(i: int, peer: bool) -> tuple[str, ...]:
    """Who goes first in round i: ours and Postfix alternate (AB BA AB ...), so
    that a drift of the machine's load, or what one run leaves behind (page
    cache, dirty pages still being written), does not always favour the same
    side."""
    if not peer:
        return ("ours",)
    return ("ours", "postfix") if i % 2 == 0 else ("postfix", "ours")


def run_all(ctx: sc.Ctx, only: list[str], peer: bool, profile: str | None,
            mark: Callable[[str], None] = lambda bench: None) -> tuple[dict, dict, dict]:
    p = ctx.p
    res: dict = {}
    errors: dict = {}
    extra: dict = {}

    def attempt(bench: str, fn: Callable[[], None]) -> None:
        mark(bench)
        try:
            fn()
        except (BenchError, OSError, ValueError, RuntimeError) as e:
            errors[bench] = str(e)
            say(f"{bench}: FAILED: {e}")
            traceback.print_exc()

    for bench, accept in (("relay", False), ("accept", True)):
        if bench not in only:
            continue

        def go(bench=bench, accept=accept) -> None:
            res[bench] = {"ours": [], "postfix": []}
            for i in range(p.runs):
                for pos, kind in enumerate(round_order(i, peer), 1):
                    say(f"{bench} run {i + 1}/{p.runs}: {kind}")
                    r = sc.relay_run(ctx, kind, accept, i)
                    r["order"] = pos  # 1: went first in its round
                    res[bench][kind].append(r)
                    say(f"  {r['rate']:.0f} msg/s, {r['cpu_ms']:.2f} ms CPU/msg "
                        f"(process tree {r['cpu_tree_ms']:.2f}, whole machine {r['system_ms']:.2f})")

        attempt(bench, go)

    if "large" in only:
        def go_large() -> None:
            res["large"] = {"ours": []}
            for i in range(p.runs):
                say(f"large run {i + 1}/{p.runs}: {p.large_mb} MB through our relay")
                r = sc.large_run(ctx, i)
                res["large"]["ours"].append(r)
                say(f"  {r['seconds']:.2f} s, peak RSS +{r['growth_mb']:.1f} MB")

        attempt("large", go_large)

    if "idle" in only:
        def go_idle() -> None:
            res["idle"] = {"ours": []}
            for i in range(p.runs):
                say(f"idle run {i + 1}/{p.runs}: {p.idle} idle connections to our relay")
                r = sc.idle_run(ctx, i)
                res["idle"]["ours"].append(r)
                say(f"  RSS {r['rss_mb']:.1f} MB, banner {r['banner_ms']:.1f} ms (max {r['banner_max_ms']:.1f})")

        attempt("idle", go_idle)

    if "spool" in only:
        def go_spool() -> None:
            # "ours" keeps its name (warm page cache, as before); "ours-cold" after drop_caches
            res["spool"] = {"ours": [], "ours-cold": []}
            say(f"spool: writing {p.spool:,} deferred messages")
            t0 = time.monotonic()
            spool = sc.spool_fill(ctx)
            extra["spool_fill_seconds"] = time.monotonic() - t0
            try:
                for i in range(p.runs):
                    # cold first: the cold run reads the whole spool, which leaves it warm for the next
                    for cold in (True, False):
                        which = "cold (caches dropped)" if cold else "warm"
                        say(f"spool run {i + 1}/{p.runs}, {which}: starting our relay on {p.spool:,} messages")
                        try:
                            r = sc.spool_run(ctx, spool, i, cold=cold)
                        except BenchError as e:
                            if not cold:
                                raise
                            errors["spool-cold"] = str(e)
                            say(f"  cold start: FAILED: {e}")
                            continue
                        res["spool"]["ours-cold" if cold else "ours"].append(r)
                        say(f"  accepting after {r['accept_seconds']:.2f} s, listed after "
                            f"{r['listed_seconds']:.2f} s, --json {r['listing_seconds']:.2f} s, "
                            f"peak RSS {r['peak_rss_mb']:.0f} MB; spool sample in the page cache at the "
                            f"start: {_pct(r['resident_at_start'])}")
            finally:
                shutil.rmtree(os.path.dirname(spool), ignore_errors=True)

        attempt("spool", go_spool)

    if "pop3" in only:
        def go_pop3() -> None:
            say(f"pop3: {p.pop3_messages} x {p.pop3_size} B, {p.runs} runs each (bench/pop3_bench.py)")
            out = sc.pop3_all(ctx, peer)
            res["pop3"] = {"ours": [], "dovecot": []}
            for name, r in out["servers"].items():
                who = "ours" if r["ours"] else "dovecot"
                res["pop3"][who] = [{"rate": out["messages"] / t, "seconds": t, "retrieved": n, "compared": c}
                                    for t, n, c in zip(r["seconds"], r["retrieved"], r["compared"])]
                if not r["ours"]:
                    extra["dovecot_name"] = name
            extra["pop3_output"] = out["output"]
            sys.stderr.write(out["output"])
            if out.get("errors"):
                # a server that listed or returned other messages than were delivered
                raise BenchError("; ".join(f"{k}: {e}" for k, e in out["errors"].items()))

        attempt("pop3", go_pop3)

    if profile:
        def go_profile() -> None:
            say(f"profile: one more relay run of our relay under py-spy -> {profile}")
            r = sc.relay_run(ctx, "ours", False, 99, profile=profile)
            extra["profile_run"] = r
            import pyspy_summary

            extra["profile_summary"] = pyspy_summary.summary(profile, top=20)

        attempt("profile", go_profile)
    return res, errors, extra


def results_md(rows: list[Row], res: dict, errors: dict, extra: dict, meta: dict) -> str:
    m, v = meta["machine"], meta["versions"]
    la0, la1 = meta["load_start"], meta["load_end"]
    out = ["# Benchmark results: twisted-relay vs Postfix and Dovecot\n",
           f"- Date: {meta['date']} (took {meta['duration'] / 60:.1f} min)",
           f"- Command: `{meta['command']}`",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['kernel']}, {m['os']}, "
           f"virtualization: {m['virtualization']}",
           f"- Spool and Postfix queue: {meta['work']} on {m['disk']}",
           f"- Load average at the start: {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}; at the end: "
           f"{la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f} (the machine is shared; the load during and at the end "
           "of the run includes the benchmark's own processes: the `rest` column of the CPU accounting "
           "check in bench/RESULTS.md shows how much CPU others used during the relay and accept runs)",
           f"- Other work on the machine during the run: {others_note(meta)}",
           f"- Versions: Python {v['python']}, Twisted {v['twisted']}, Postfix {v['postfix']}, "
           f"Dovecot {v['dovecot']}, twisted-relay {v['twisted-relay']}",
           f"- Commit measured: {v.get('checkout', '?')} (the whole checkout, bench/ included; the relay's "
           f"code last changed in {v['twisted-relay']})",
           f"- Runs: median of {meta['runs']} (each figure below); ratio = ours / peer; ours and the peer "
           "alternate within each round, and which goes first alternates from round to round",
           f"- Sizes: {sizes_note(meta)}",
           "", md_table(rows), ""]
    if errors:
        out += ["## Errors", ""] + [f"- {k}: {e}" for k, e in errors.items()] + [""]
    out += ["## Where the two do different work", "", different_work(res).strip(), ""]
    out += ["## How it was measured", "", METHOD.strip(), "", "## Raw numbers (every run)", ""]
    for bench in BENCHES:
        if bench not in res:
            continue
        for who, runs in res[bench].items():
            if not runs:
                continue
            out.append(f"**{bench} / {who}**")
            out.append("")
            if isinstance(runs[0], dict):
                keys = [k for k in runs[0] if k not in ("probes_ms", "listings")]
                out.append("| run | " + " | ".join(keys) + " |")
                out.append("|" + "---|" * (len(keys) + 1))
                for i, r in enumerate(runs, 1):
                    out.append(f"| {i} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
            else:
                out.append("msg/s per run: " + ", ".join(f"{x:.0f}" for x in runs))
            out.append("")
    acc = cpu_check(res)
    if acc:
        out += ["## CPU accounting check", "", CPU_CHECK.strip(), "", acc, ""]
    if extra.get("profile_summary"):
        out += ["## Where our relay's time goes (py-spy, one extra relay run)", "",
                f"Rate under the profiler: {extra['profile_run']['rate']:.0f} msg/s.", "", "```",
                extra["profile_summary"], "```", ""]
    if extra.get("spool_fill_seconds"):
        out.append(f"Filling the spool took {extra['spool_fill_seconds']:.0f} s (not timed).\n")
    return "\n".join(out) + "\n"


def others_note(meta: dict) -> str:
    """How much of the machine other processes (other users' tests and benchmarks) took."""
    o = meta.get("others")
    if not o:
        return "not recorded (an older bench/run.py)"
    secs = ", ".join(f"{k} {v['share']:.0%}" for k, v in o["sections"].items() if k != "start")
    # process names in quotes, not code spans: they are not commands to run
    # (tests/test_readme_commands.py runs the code spans of docs/benchmarks.md)
    top = ", ".join(f'"{label}" {cpu:.0f} s' for label, cpu in o["top"][:4]) or "none"
    bench = ", ".join(f'"{b}"' for b in o["benchmarks"]) or "none"
    return (f"about {o['share']:.0%} of the {o['cores']} cores on average ({secs}; the machine's process "
            f"CPU less this benchmark's), most CPU among those sampled every 5 s: {top}; other benchmark "
            f"runs seen: {bench}")


def sizes_note(meta: dict) -> str:
    """The sizes of this run, and whether they are the full ones (a reduced run says so)."""
    full = dataclasses.asdict(sc.Params())
    got = meta.get("params", full)
    diff = [f"{k} {got[k]:,} (full: {full[k]:,})" for k in full if k in got and got[k] != full[k]
            and k != "workers"]
    if not diff:
        return "the full sizes (bench/scenarios.py Params)"
    return "REDUCED run: " + ", ".join(diff)


def different_work(res: dict) -> str:
    """Where ours and the peer do not do the same durable work: said next to the
    figures, so that nobody reads a ratio as more than it is."""
    acc = res.get("accept", {})

    def med(who: str) -> str:
        xs = [r["deferrals_on_disk"] for r in acc.get(who, []) if "deferrals_on_disk" in r]
        return f"{statistics.median(xs):.0f}" if xs else "?"

    return f"""
- **Deferrals with the next hop down (2. accept rate and its CPU).** Both write each message
  to disk and fsync it before the 250. After that they differ: once a next hop refused a
  connection, our relay marks it dead for a while and defers the other messages to it
  without an attempt ("delivery temporarily suspended"); such a suspended deferral stays in
  memory only (the message file is unchanged; after a crash it is simply tried again), and a
  state file is written only for messages that had a real attempt. Postfix also suspends the
  dead destination, but writes every deferral down: its bounce daemon appends the reason to
  a defer logfile per message (`defer/`) and qmgr moves the queue file into `deferred/`.
  Deferrals on disk at the end of an accept run (median): ours {med('ours')}, Postfix
  {med('postfix')} (`deferrals_on_disk` in the raw numbers). So in the accept run Postfix
  writes a record per message that ours keeps in memory: the accept figures compare the two
  as each is configured by default, not the same durable work.
- **Relaying to smtp-sink (1.)**: both fsync each message before the 250 and remove it once
  delivered; neither writes a deferral. Postfix logs through postlogd to a file, ours to its
  own log file.
- **POP3 (6.)**: neither fsyncs. Dovecot builds its index files and moves the messages from
  new/ to cur/ on the untimed first login, and in the timed session records the retrieved
  messages as seen (its default `pop3_no_flag_updates = no`); ours writes no index and
  renames each retrieved message from new/ to cur/ during the timed session.
- **Cold spool (5., cold cache)**: the page cache, dentries and inodes are dropped in this
  machine's kernel (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root) before the relay starts,
  and `resident_at_start` in the raw numbers is the share of a sample of 200 spool files still
  cached at that moment (fincore). On a virtual machine, a cache of the host below the virtual
  disk is out of reach: "cold" is cold for this kernel, reads may still be served from the
  host's memory.
"""


CPU_CHECK = """
Medians per message, ms.  `relay` is the figure in the table (cgroup); `tree` the /proc sum
over the relay's process tree; `machine` all busy CPU of the machine; `rest` = machine -
relay - smtp-source - smtp-sink - this harness: the kernel's softirq work for loopback
traffic and other users of the machine.  For Postfix `tree` can come out lower than `relay`:
/proc counts each process in whole clock ticks (10 ms), and a run has dozens of short-lived
smtpd, cleanup and smtp processes; the cgroup counts nanoseconds.
"""


def cpu_check(res: dict) -> str:
    lines = []
    for bench in ("relay", "accept"):
        for who, runs in res.get(bench, {}).items():
            if not runs:
                continue

            def med(k: str, runs: list = runs) -> float:
                return statistics.median(r[k] for r in runs)

            rest = med("system_ms") - med("cpu_ms") - med("source_ms") - med("sink_ms") - med("harness_ms")
            lines.append(f"| {bench} | {who} | {med('cpu_ms'):.2f} | {med('cpu_tree_ms'):.2f} | "
                         f"{med('system_ms'):.2f} | {med('source_ms'):.2f} | {med('sink_ms'):.2f} | {rest:.2f} | "
                         f"{statistics.median(r['processes'] for r in runs):.0f} |")
    if not lines:
        return ""
    return "\n".join(["| bench | relay | relay (cgroup) | tree (/proc) | machine | smtp-source | smtp-sink | rest "
                      "| processes at the end |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"] + lines)


def _pct(x) -> str:
    return f"{x:.0%}" if isinstance(x, float) else str(x)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


METHOD = """
- Load: Postfix's `smtp-source` (HELO, a new connection per message, its default), 2 KB
  messages, 10 parallel sessions; next hop: Postfix's `smtp-sink` (counting with `-c`).
  A warm-up batch (100 messages) goes first; the timed part starts when the relay is idle.
- Relay rate: from the start of smtp-source until the sink has counted every message.
  Accept rate: from the start of smtp-source until it has its last 250 (next hop: a closed port;
  our relay with `delivery.retry_min = 1h`; Postfix's defaults).
- CPU per message: CPU of the relay from just before the load until it is idle again (all
  delivered and removed, or all queued and the first attempt deferred), divided by the
  message count.  Counted in a cgroup of its own (every process the relay ever had,
  exited ones too) where cgroups are writable; the raw numbers also show the /proc
  process-tree sum (`cpu_tree_ms`: live processes plus what they reaped) and the whole
  machine's busy time per message (`system_ms`, includes smtp-source, smtp-sink, the kernel
  and other users).  Our relay, for the relay and accept rates, is a master and `workers`
  relay processes (the config key; `--workers`, default 2, one per core: each worker has its
  own queue, all share the listening port), elsewhere one process (threads included); Postfix
  is a master and its daemons (smtpd, cleanup, qmgr, smtp, trivial-rewrite, anvil, postlogd...),
  all counted.
- Our relay: `twistd relay` from bench/.venv, `relay.smarthost = [127.0.0.61]:PORT`, default
  fsync behaviour (each message fsynced before its 250), `smtp.max_connections_per_ip` raised
  to 100.  Postfix: a private instance (own config, queue and data directories),
  `relayhost = [127.0.0.61]:PORT`, its default queue fsync, default process limits and
  destination concurrency, no chroot, client connection/rate limits raised, no reverse DNS
  (`smtpd_peername_lookup = no`; ours does none), logging to a file through postlogd (ours to
  its log file).
- `sink_sessions` in the raw numbers: the SMTP sessions smtp-sink saw during the run, warm-up
  included (each outbound connection of the relay, counted when it closes).
- Large message: one message of that many MB through our relay to the sink; growth =
  VmHWM after minus VmRSS before (the peak is reset through /proc/PID/clear_refs first).
- Idle connections: opened 40 at a time (below the relay's listen backlog, Twisted's default
  50) from 127.0.0.70-79, each reads its banner then says nothing; RSS is VmRSS with all of
  them open; the probe is a new client from 127.0.0.80, connect to complete banner, 10 probes
  per run.  Then, with those closed, a burst: 500 connects at once (or as many as the idle
  count), counting the banners that arrive within 10 s.
- Deferred spool: written like bench/queue_listing.py (not timed); "start"
  is the spawn of twistd; "mail accepted" the 250 of a message from a probe client retrying
  every 20 ms; the listing time is `relayctl queue --json` once the queue is loaded (median
  of 3); peak RSS is the relay's VmHWM after those listings.
- Order: in each round of the relay and accept rates, ours and Postfix run one after the
  other, and who goes first alternates (round 1 ours first, round 2 Postfix first, ...;
  `order` in the raw numbers: 1 = went first); POP3 alternates the same way.
- Deferred spool, cold and warm: in each round our relay starts twice on the same spool:
  cold (caches dropped right before the start, see above), then warm (the cold run has just
  read the whole spool).
- POP3: bench/pop3_bench.py: poplib, LIST + RETR of every message + QUIT in one session,
  each server on a fresh copy of the same Maildir after an untimed login; Dovecot from a
  private config. Each of the messages is distinct (its number in Message-ID and body, and a
  line starting with a dot); after the timer stops every retrieved message is compared, byte
  for byte, with the delivered files (LF as CRLF, dot-stuffing undone): a run that lists or
  retrieves fewer, more or other messages fails, and the benchmark reports an error instead of
  a rate (`retrieved`, `compared` in the raw numbers).
"""


def render(raw: str, results_path: str | None) -> int:
    """The results file again from a raw results.json, e.g. after a change of format."""
    with open(raw) as f:
        data = json.load(f)
    meta, res, errors, extra = data["meta"], data["results"], data["errors"], data["extra"]
    p = sc.Params(**meta["params"]) if "params" in meta else sc.Params()
    v = meta["versions"]
    peer_names = {"postfix": f"Postfix {v['postfix']}"}
    if extra.get("dovecot_name"):
        peer_names["dovecot"] = extra["dovecot_name"].replace("dovecot", "Dovecot")
    rows = build_rows(res, errors, p, peer_names)
    full = meta.get("full", "--quick" not in meta["command"] and "--only" not in meta["command"])
    path = results_path or os.path.join(setup_env.BENCH, "RESULTS.md" if full else "out/RESULTS-partial.md")
    with open(path, "w") as f:
        f.write(results_md(rows, res, errors, extra, meta))
    print(text_table(rows))
    print(f"\nwritten: {os.path.relpath(path)} (from {raw})")
    if os.path.abspath(path) == os.path.abspath(summary.RESULTS):
        rewrite_summary()
    return 0


def rewrite_summary() -> None:
    """docs/benchmarks.md quotes the committed results only: its summary is regenerated
    from bench/RESULTS.md (bench/summary.py) whenever that file is written."""
    with open(summary.RESULTS) as f:
        results = f.read()
    with open(summary.PAGE) as f:
        page = f.read()
    try:
        new = summary.update(page, results)
    except summary.SummaryError as e:
        say(f"docs/benchmarks.md not updated: {e}")
        return
    if new != page:
        with open(summary.PAGE, "w") as f:
            f.write(new)
        say("docs/benchmarks.md: benchmark summary rewritten from bench/RESULTS.md")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts and 1 run, for development")
    ap.add_argument("--workers", type=int, default=2,
                    help="our relay's worker processes for the relay and accept rates (config key "
                         "`workers`; default 2 = the cores of the reference machine)")
    ap.add_argument("--runs", type=int, help="runs per figure (median); default 3, 1 with --quick")
    ap.add_argument("--messages", type=int, help="messages per relay/accept run (default 5000)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--no-peer", action="store_true", help="measure our relay only (no Postfix, no Dovecot)")
    ap.add_argument("--profile", metavar="FILE",
                    help="after the runs, one more relay run of ours under py-spy (raw output to FILE)")
    ap.add_argument("--max-load", type=float, metavar="L",
                    help="first wait until the 1-minute load average is below L")
    ap.add_argument("--max-wait", type=float, default=900, metavar="S", help="... for at most S seconds (900)")
    ap.add_argument("--workdir", default="/var/tmp/twisted-relay-bench",
                    help="where spools and Postfix queues go: a real disk, not tmpfs (default %(default)s)")
    ap.add_argument("--results", help="where to write the results (default bench/RESULTS.md for a full run, "
                                      "else bench/out/RESULTS-partial.md)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, spools)")
    ap.add_argument("--render", metavar="JSON",
                    help="only re-write the results file from a raw bench/out/results.json (no measuring)")
    args = ap.parse_args()
    if args.render:
        return render(args.render, args.results)

    if os.geteuid() != 0:
        print("bench/run.py runs as root: it installs packages, starts Postfix and Dovecot (which switch "
              "users) and reads other processes' /proc entries", file=sys.stderr)
        return 2
    p = sc.Params.quick() if args.quick else sc.Params()
    p.workers = args.workers
    if args.runs:
        p.runs = args.runs
    if args.messages:
        p.messages = args.messages
    only = [b.strip() for b in args.only.split(",")] if args.only else list(BENCHES)
    bad = [b for b in only if b not in BENCHES]
    if bad:
        ap.error(f"unknown benchmark {', '.join(bad)}; choose from {', '.join(BENCHES)}")
    full = not args.quick and not args.only and not args.no_peer and args.runs in (None, 3) and not args.messages
    results_path = args.results or (os.path.join(setup_env.BENCH, "RESULTS.md") if full
                                    else os.path.join(setup_env.BENCH, "out", "RESULTS-partial.md"))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    t_start = time.time()
    installed = setup_env.install_packages(say)
    python = setup_env.ensure_venv(say)
    env = setup_env.make_env(python)
    nofile = raise_nofile(65536)
    os.makedirs(args.workdir, exist_ok=True)
    os.chmod(args.workdir, 0o755)
    work = tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=args.workdir)
    os.chmod(work, 0o755)
    mach = setup_env.machine(work)
    if "tmpfs" in mach["disk"].split(";")[0]:
        say(f"WARNING: {work} is on tmpfs: fsync costs nothing there; use --workdir on a real disk")
    vers = setup_env.versions(env)
    say(f"twisted-relay {vers['twisted-relay']} on Python {vers['python']}, Twisted {vers['twisted']}; "
        f"Postfix {vers['postfix']}; Dovecot {vers['dovecot']}; RLIMIT_NOFILE {nofile}; work dir {work}")
    la0 = setup_env.wait_for_quiet(args.max_load, args.max_wait, say) if args.max_load else setup_env.loadavg()
    say(f"load average {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}")

    reg = Registry()
    ctx = sc.Ctx(reg=reg, env=env, work=work, p=p, say=say)
    others = OthersMonitor().start()
    try:
        res, errors, extra = run_all(ctx, only, not args.no_peer, args.profile, mark=others.mark)
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        raise
    finally:
        others.stop()
        reg.stop_all()
        remove_our_cgroups()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    la1 = setup_env.loadavg()

    peer_names = {"postfix": f"Postfix {vers['postfix']}"}
    if extra.get("dovecot_name"):
        peer_names["dovecot"] = extra["dovecot_name"].replace("dovecot", "Dovecot")
    rows = build_rows(res, errors, p, peer_names)
    table = text_table(rows)
    print()
    print(f"twisted-relay vs {peer_names['postfix']} / {peer_names.get('dovecot', 'Dovecot')}: "
          f"medians of {p.runs} run(s); load average {la0[0]:.2f} at the start, {la1[0]:.2f} at the end")
    print(table)
    if errors:
        print("\nerrors:\n" + "\n".join(f"  {k}: {e}" for k, e in errors.items()))

    command = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], setup_env.ROOT)]
                                     + sys.argv[1:])
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "duration": time.time() - t_start, "command": command, "machine": mach, "versions": vers,
            "load_start": la0, "load_end": la1, "runs": p.runs, "work": args.workdir, "installed": installed,
            "params": dataclasses.asdict(p), "full": full, "others": others.summary(os.cpu_count() or 1)}
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, "w") as f:
        f.write(results_md(rows, res, errors, extra, meta))
    raw = os.path.join(setup_env.BENCH, "out", "results.json")
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "w") as f:
        json.dump({"meta": meta, "results": res, "errors": errors,
                   "extra": {k: v for k, v in extra.items() if k != "pop3_output"}}, f, indent=1, default=str)
    print(f"\nwritten: {os.path.relpath(results_path)} (raw: {os.path.relpath(raw)})")
    if os.path.abspath(results_path) == os.path.abspath(summary.RESULTS):
        rewrite_summary()
    if extra.get("profile_summary"):
        print()
        print(extra["profile_summary"])
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench/run.py: interrupted ({e or 'Ctrl-C'}); every process it started is stopped", file=sys.stderr)
        sys.exit(130)
