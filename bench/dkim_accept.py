"""The accept rate with DKIM signing off, with rsa-sha256 and with ed25519-sha256 (issue 14:
signing costs less than 15% of the accept rate).

    sudo python3 bench/dkim_accept.py [--runs 3] [--messages 5000] [--workers 2] [--quick]
                                      [--modes off,rsa-sha256,ed25519-sha256]

bench/run.py's accept scenario (benchmark 2: smtp-source -> our relay, the next hop down, so
every message is only queued), our relay only, once per round in each of the three modes, in
turn (off, rsa-sha256, ed25519-sha256; the order rotated each round so a drift of the machine
falls on each alike).  With signing on, the relay has a key (made by `relayctl dkim keygen`)
for the domain of smtp-source's From header, and every message is signed at intake before its
250.  Prints, per mode, the median rate, the relay's CPU per message, the whole machine's busy
CPU per message (2 / rate on 2 cores when both were busy all the run: the rate is then bound
by CPU, the relay's and any other load's) and the cost against "off": the rate lost, as -x% (a rate above
off's, from noise, shows as +x%), then each run's rate.
Root, like bench/run.py (it uses the same bench venv and work directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc  # noqa: E402
import setup_env  # noqa: E402
from procs import Registry  # noqa: E402

MODES = ("", "rsa-sha256", "ed25519-sha256")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def count_signed(d: str) -> int:
    """The 'dkim: signed' lines in the relay's logs of the run in d (relay.log and the
    files twistd rotated it into at 1 MB: relay.log.1, ...)."""
    n = 0
    for root, _, files in os.walk(d):
        for name in files:
            if name.endswith(".log") or ".log." in name:
                with open(os.path.join(root, name), "rb") as f:
                    n += f.read().count(b": dkim: signed d=")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="rounds (each mode once per round); the median is shown")
    ap.add_argument("--messages", type=int, default=5000, help="messages per run (as bench/run.py)")
    ap.add_argument("--workers", type=int, default=2, help="our relay's worker processes (as bench/run.py)")
    ap.add_argument("--quick", action="store_true", help="1 round of 500 messages")
    ap.add_argument("--workdir", default="/var/tmp/twisted-relay-bench")
    ap.add_argument("--modes", default="off,rsa-sha256,ed25519-sha256",
                    help="the modes to run, comma-separated (off, rsa-sha256, ed25519-sha256)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/dkim_accept.py runs as root (as bench/run.py)", file=sys.stderr)
        return 2
    p = sc.Params.quick() if args.quick else sc.Params(runs=args.runs, messages=args.messages)
    p.workers = args.workers
    modes = tuple("" if m.strip() == "off" else m.strip() for m in args.modes.split(","))
    if not modes or any(m not in MODES for m in modes):
        print(f"--modes: each of off, {', '.join(MODES[1:])}", file=sys.stderr)
        return 2
    setup_env.install_packages(say)
    env = setup_env.make_env(setup_env.ensure_venv(say))
    os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=time.strftime("dkim-%Y%m%d-%H%M%S-"), dir=args.workdir)
    os.chmod(work, 0o755)
    reg = Registry()
    ctx = sc.Ctx(reg=reg, env=env, work=work, p=p, say=say)
    res: dict[str, list[dict]] = {m: [] for m in modes}
    k = len(modes)
    try:
        for i in range(p.runs):
            for m in modes[i % k:] + modes[:i % k]:
                p.dkim = m
                n = i * k + modes.index(m)
                r = sc.relay_run(ctx, "ours", True, n)
                signed = count_signed(os.path.join(work, f"accept-ours-{n}"))
                if (signed >= p.messages) != bool(m):
                    raise SystemExit(f"signing {m or 'off'}: {signed} messages logged as signed")
                res[m].append(r)
                say(f"round {i + 1}, signing {m or 'off'}: {r['rate']:.0f} msg/s, {r['cpu_ms']:.2f} ms CPU/msg"
                    f" (machine {r['system_ms']:.2f} ms, smtp-source {r['source_ms']:.2f} ms)")
    finally:
        reg.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    base_rate = statistics.median(r["rate"] for r in res[""]) if "" in res else None
    print(f"\naccept rate, next hop down, {p.messages} messages of {p.size} bytes, {p.sessions} sessions, "
          f"workers = {p.workers}; medians of {p.runs} run(s)")
    print(f"{'signing':<16} {'msg/s':>8} {'CPU ms/msg':>11} {'machine ms':>11} {'rate cost':>10}  runs (msg/s)")
    for m in modes:
        rates = [r["rate"] for r in res[m]]
        rate = statistics.median(rates)
        cpu = statistics.median(r["cpu_ms"] for r in res[m])
        busy = statistics.median(r["system_ms"] for r in res[m])
        # the cost is what signing takes off the rate: a lower rate is a cost of -x%
        cost = "" if not m or base_rate is None else f"{(rate / base_rate - 1) * 100:+.1f}%"
        print(f"{m or 'off':<16} {rate:>8.0f} {cpu:>11.2f} {busy:>11.2f} {cost:>10}  "
              + " ".join(f"{x:.0f}" for x in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
