"""What counting connections per IP for the whole relay costs per connection.

    python bench/connlimit_cost.py [--n 200000] [--workers 2]

Times acquire + release (one connection's worth) on relay.common.connlimit's shared
table (what a worker does with workers > 1) and on the in-process dict (a
relay of one process), with a table holding ``--busy`` other addresses, and
the master's release_worker on that table (once per worker death).  Prints
microseconds per connection; compare with the relay's CPU per message
(bench/RESULTS.md, ~1 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay.common import connlimit  # noqa: E402


def per_connection(counter, n: int) -> float:
    names = [f"192.0.2.{i % 200}" for i in range(1000)]
    t0 = time.perf_counter()
    for i in range(n):
        ip = names[i % 1000]
        counter.acquire(ip, 1 << 30)
        counter.release(ip)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--busy", type=int, default=10000, help="other addresses connected meanwhile")
    a = p.parse_args()
    table = connlimit.SharedTable.create(a.workers)
    shared = table.counter("smtp", 0)
    other = table.counter("smtp", a.workers - 1)
    for i in range(a.busy):
        other.acquire(f"2001:db8::{i:x}", 10)
    rows = [("shared table (workers > 1)", per_connection(shared, a.n)),
            ("in-process dict (workers = 1)", per_connection(connlimit.LocalCounter(), a.n))]
    t0 = time.perf_counter()
    table.release_worker(a.workers - 1)
    rows.append((f"master: release_worker, {a.busy} addresses", (time.perf_counter() - t0) * 1e6))
    for name, us in rows:
        print(f"{name:45s} {us:10.2f} us")
    table.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
