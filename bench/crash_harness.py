"""The long crash run of issue 8: SIGKILL the relay at random moments (20
times by default) while concurrent clients send mail through it to a sink,
and print the report (sent, acknowledged, delivered, lost, duplicated).

    .venv/bin/python bench/crash_harness.py [--kills 20] [--clients 10] [--workers N] [--seed N] [--keep DIR]

Exit status 0 when nothing acknowledged was lost and nothing recorded as
delivered was sent again, 1 otherwise.  Everything runs on loopback
(the relay as ``twistd -n relay``, the sink as tests.support.sinkproc);
see tests/support/crash.py for what is checked and how.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.crash import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1,
                    help="relay worker processes (config `workers`); with 2 or more, half the kills "
                         "hit a single worker")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--min-up", type=float, default=0.3, help="shortest time up before a kill (s)")
    ap.add_argument("--max-up", type=float, default=2.0, help="longest time up before a kill (s)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, spool, sink record)")
    args = ap.parse_args(argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        work = args.keep
    else:
        work = tempfile.mkdtemp(prefix="relay-crash-")
    try:
        report = run(work, kills=args.kills, clients=args.clients, seed=args.seed, min_up=args.min_up,
                     max_up=args.max_up, drain_timeout=300.0, workers=args.workers,
                     progress=lambda m: print(m, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, True)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
