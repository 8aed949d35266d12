"""The long power-loss run (issue 12, item 15): the relay's spool and
Maildirs on a FUSE file system that forgets, at each power cut, whatever was
not made durable (tests/support/powerfs.py); SIGKILL plus a cut at random
moments under load, the relay restarted on what survived each time.

    python bench/power_loss.py [--cuts 10] [--clients 8] [--seed N] [--keep DIR]

Prints acknowledged, delivered, lost (must be 0), torn copies and
quarantined files (must be 0), recorded delivered then sent again (must be
0), duplicates, and what the cuts threw away.  Exit status 0 when all hold,
1 otherwise, 2 when FUSE is not available here (needs root, /dev/fuse, the
Debian package fuse3 and the test extra's mfusepy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.powerfs import available  # noqa: E402
from tests.support.powerloss import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=10, help="power cuts under load (one more after the drain)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--min-up", type=float, default=0.5, help="shortest time up before a cut (s)")
    ap.add_argument("--max-up", type=float, default=3.0, help="longest time up before a cut (s)")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, spool, sink record)")
    args = ap.parse_args(argv)
    why = available()
    if why is not None:
        print(f"power-loss run not possible here: {why}", file=sys.stderr)
        return 2
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        work = args.keep
    else:
        work = tempfile.mkdtemp(prefix="relay-power-")
    try:
        report = run(work, cuts=args.cuts, clients=args.clients, seed=args.seed, min_up=args.min_up,
                     max_up=args.max_up, drain_timeout=300.0, progress=lambda m: print(m, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(work, True)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
