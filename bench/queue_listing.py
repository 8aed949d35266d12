"""How long ``relayctl queue`` takes on a big queue, live and offline.

    .venv/bin/python bench/queue_listing.py [--messages 10000 100000] [--keep DIR]

For each size: a spool is filled with that many deferred messages (written
directly in the spool format, without fsync: this measures listing, not
queueing), a ``twistd relay`` process is started on it, and the wall time
of ``relayctl queue`` (the table) and ``relayctl queue --json`` (output to
/dev/null) is measured, median of 3 runs; then the relay is stopped and the
same is measured offline (relayctl reading the spool).  Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay.queue import spool as spoolmod  # noqa: E402

BODY = b"Subject: bench\r\nMessage-ID: <%s@bench>\r\n\r\n" + b"x" * 70 + b"\r\n"


def fill(spool_dir: str, n: int) -> None:
    sp = spoolmod.Spool(spool_dir)
    sp.create()
    now = time.time()
    for i in range(n):
        qid = spoolmod.new_id()
        env = spoolmod.Envelope(qid, f"sender{i % 97}@example.org", [f"user{i}@down.test", "other@down.test"],
                                now - 600, client={"ip": "127.0.0.1", "helo": "bench", "proto": "ESMTP"})
        st = spoolmod.State.fresh(env)
        for r in st.recipients:
            r.status = spoolmod.DEFERRED
            r.attempts = 3
            r.reply = "connect to 127.0.0.9[127.0.0.9]:2699: Connection refused"
            r.next_attempt = now + 3600
            r.history = [{"t": now - 600 + k, "relay": "127.0.0.9[127.0.0.9]:2699", "status": "deferred",
                          "reply": r.reply} for k in range(3)]
        with open(sp.message_path(qid), "wb") as f:
            f.write(env.to_line() + BODY % qid.encode())
        with open(sp.state_path(qid), "wb") as f:
            f.write(st.to_bytes())


def config(base: str, port: int) -> str:
    path = os.path.join(base, "relay.toml")
    with open(path, "w") as f:
        f.write(f"""hostname = "bench.test"
spool = "{base}/spool"
[smtp]
listen = ["tcp:{port}:interface=127.0.0.1"]
[pop3]
listen = []
[local]
domains = ["local.test"]
mailboxes = "{base}/mail"
users = "{base}/users"
[relay]
routes = {{"down.test" = "127.0.0.9:2699"}}
[delivery]
retry_min = "1h"
""")
    return path


def relayctl(cfg: str, *args: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.monotonic()
    with open(os.devnull, "wb") as null:
        p = subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", cfg, *args], stdout=null,
                           stderr=subprocess.PIPE, env=env, timeout=600)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"relayctl {' '.join(args)} failed: {p.stderr.decode()}")
    return dt


def median3(cfg: str, *args: str) -> float:
    return statistics.median(relayctl(cfg, *args) for _ in range(3))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def count_lines(cfg: str) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", cfg, "queue", "--json"],
                         capture_output=True, env=env, timeout=600).stdout
    return sum(1 for line in out.splitlines() if json.loads(line))


def run(n: int, keep: str | None) -> dict:
    base = keep or tempfile.mkdtemp(prefix="relay-bench-q-")
    os.makedirs(base, exist_ok=True)
    spool_dir = os.path.join(base, "spool")
    if not os.path.isdir(os.path.join(spool_dir, "queue")) or len(os.listdir(os.path.join(spool_dir, "queue"))) < 2 * n:
        shutil.rmtree(spool_dir, ignore_errors=True)
        t0 = time.monotonic()
        fill(spool_dir, n)
        print(f"filled {n} messages in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    port = free_port()
    cfg = config(base, port)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(base, "relay.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                             "--pidfile=", "--logfile", "-", "relay", "--config", cfg],
                            cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    res: dict = {"messages": n}
    try:
        while True:
            with open(os.path.join(base, "relay.log"), "rb") as f:
                if b"queue loaded" in f.read():
                    break
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                raise SystemExit("the relay did not load its queue")
            time.sleep(0.05)
        res["load"] = time.monotonic() - t0
        assert count_lines(cfg) == n, "listing incomplete"
        res["live_table"] = median3(cfg, "queue")
        res["live_json"] = median3(cfg, "queue", "--json")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    res["offline_table"] = median3(cfg, "queue")
    res["offline_json"] = median3(cfg, "queue", "--json")
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--keep", metavar="DIR", help="keep (and reuse) the filled spool under DIR/<n>")
    args = ap.parse_args()
    rows = [run(n, os.path.join(args.keep, str(n)) if args.keep else None) for n in args.messages]
    print(f"{'messages':>9} {'relay start->loaded':>20} {'live table':>11} {'live --json':>12} "
          f"{'offline table':>14} {'offline --json':>15}")
    for r in rows:
        print(f"{r['messages']:>9} {r['load']:>19.2f}s {r['live_table']:>10.2f}s {r['live_json']:>11.2f}s "
              f"{r['offline_table']:>13.2f}s {r['offline_json']:>14.2f}s")


if __name__ == "__main__":
    main()
