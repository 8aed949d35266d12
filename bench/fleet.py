#!/usr/bin/env python3
"""The fleet of issue 18, the long version: N relays against one (bench).

    python3 bench/fleet.py                      # 5000 messages: 1 node, then 3 nodes
    python3 bench/fleet.py --messages 20000 --kill

Each run starts a fleet (tests/support/fleet.py: relay processes on
127.0.0.11.., equal-preference MX records in the test DNS, one shared
mailbox tree, one Redis for the limits when redis-server is installed) and
a load of clients in two processes (so the load generator is not limited
by one interpreter's lock), each client looking up the MX hosts and trying
them in random order as an MTA does.  It reports messages acknowledged per
second for one node and for the fleet.  With --kill, the first node of the
fleet is SIGKILLed after a third of the load, its spool drained offline to
a live node (``relayctl queue drain --to``), and the script checks that
every acknowledged message was delivered once (or twice inside the
at-least-once window), as tests/integration/test_fleet_proof.py does on a
smaller load.

On a machine with fewer cores than nodes the fleet shares them: the number
says what the fleet's coordination costs, not how it scales across hosts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def run(n: int, messages: int, clients: int, workers: int, kill: bool, redis: bool = True) -> dict:
    # imported here, after the arguments: `--help` needs no Twisted (and runs with any python3)
    from tests.support import fleet as fleetmod
    from tests.support.fleet import Fleet, load_part
    from tests.support.wait import poll

    with tempfile.TemporaryDirectory(prefix="relay-fleet-") as d:
        fleet = Fleet(d, n=n, workers=workers, redis=redis and fleetmod.redis_server() is not None)
        try:
            fleet.start()
            hosts = fleet.mx_hosts()
            parts = 2
            t0 = time.monotonic()
            with ProcessPoolExecutor(parts) as ex:
                futs = [ex.submit(load_part, hosts, fleet.port, messages // parts + (i < messages % parts),
                                  clients // parts, i * (clients // parts)) for i in range(parts)]
                if kill:
                    poll(lambda: _accepted(fleet) >= messages // 3, 600, what="a third of the load")
                    fleet.nodes[0].kill()
                acked: dict = {}
                uncertain: set = set()
                failures: list = []
                for f in futs:
                    a, u, fl = f.result()
                    acked.update(a)
                    uncertain |= u
                    failures += fl
            seconds = time.monotonic() - t0
            out = {"nodes": n, "acked": len(acked), "seconds": seconds, "rate": len(acked) / seconds,
                   "failures": len(failures), "uncertain": len(uncertain)}
            if kill:
                out.update(_after_kill(fleet, acked, uncertain))
            return out
        finally:
            fleet.stop()


def _accepted(fleet) -> int:
    """Messages the fleet holds or delivered so far (a rough count of the load's progress)."""
    from tests.support.fleet import queued

    return sum(fleet.delivered_local().values()) + sum(len(queued(n.data["spool"])) for n in fleet.nodes)


def _after_kill(fleet, acked: dict, uncertain: set) -> dict:
    from tests.support.fleet import node_ip, queued, relayctl
    from tests.support.wait import poll

    dead = fleet.nodes[0]
    left = len(queued(dead.data["spool"]))
    r = relayctl(dead.config_path, "queue", "drain", "--to", f"{node_ip(1)}:{fleet.port}", timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"drain failed:\n{r.stdout}{r.stderr}")
    fleet.start_sink()
    poll(lambda: all(m in {**fleet.delivered_far(), **fleet.delivered_local()} for m in acked), 1800,
         what="every acknowledged message delivered")
    copies = {**fleet.delivered_far(), **fleet.delivered_local()}
    twice = {m for m, c in copies.items() if c > 1}
    # the windows of docs/fleet.md: a lost reply to the final dot; a delivery
    # the killed node made but had not recorded (handed on again by the drain)
    crash_window = {m for m in twice if acked.get(m) == node_ip(0)}
    return {"drained": left, "twice": len(twice), "twice_outside_window": len(twice - uncertain - crash_window),
            "never_sent_delivered": len(set(copies) - set(acked) - uncertain)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="workers per node")
    ap.add_argument("--no-redis", action="store_true", help="in-process limits (no shared Redis)")
    ap.add_argument("--kill", action="store_true", help="SIGKILL a node mid-load, drain it, check every message")
    args = ap.parse_args()
    redis = not args.no_redis
    results = [run(1, args.messages, args.clients, args.workers, False, redis),
               run(args.nodes, args.messages, args.clients, args.workers, args.kill, redis)]
    for r in results:
        extra = "".join(f", {k} {v}" for k, v in r.items() if k not in ("nodes", "acked", "seconds", "rate"))
        print(f"{r['nodes']} node(s): {r['acked']} messages in {r['seconds']:.1f} s = {r['rate']:.0f}/s{extra}")
    one, many = results
    print(f"fleet / one node: {many['rate'] / one['rate']:.2f}x")
    bad = many.get("twice_outside_window", 0) + many.get("never_sent_delivered", 0) + many["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
