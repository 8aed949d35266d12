"""Outbound DATA vs BDAT (CHUNKING, RFC 3030): messages per second from our
SMTP client (relay.outbound.client.deliver, the delivery code the queue
uses, with its connection cache) to a sink that offers CHUNKING or not.

    .venv/bin/python bench/bdat.py [--n 2000] [--sizes 2000,100000,1000000] [--conc 4] [--rounds 3] [--dots]

The sink is a minimal SMTP server in its own process (on 127.0.0.2, so it
gets the other core): it offers PIPELINING and, for the BDAT runs,
CHUNKING; it reads DATA up to CRLF.CRLF or BDAT by its count, throws the
octets away and answers 250.  So the figure is what our sending side
costs, plus the terminator scan DATA makes every receiver do.  Each size is
run --rounds times alternating DATA and BDAT; the best round of each is
printed, as msg/s and MB/s.  docs/chunking.md has the numbers measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SINK = r'''
import asyncio, sys
chunking = sys.argv[2] == "1"
async def session(reader, writer):
    w = writer.write
    w(b"220 sink ESMTP\r\n")
    while True:
        line = await reader.readline()
        if not line:
            break
        verb = line[:4].upper()
        if verb == b"EHLO":
            w(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n" + (b"250-CHUNKING\r\n" if chunking else b"")
              + b"250 SIZE 100000000\r\n")
        elif verb == b"DATA":
            w(b"354 go\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            w(b"250 2.0.0 Ok: queued\r\n")
        elif verb == b"BDAT":
            parts = line.split()
            await reader.readexactly(int(parts[1]))
            w(b"250 2.0.0 Ok: queued\r\n" if len(parts) > 2 else b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            w(b"221 bye\r\n")
            break
        else:
            w(b"250 Ok\r\n")
        if not reader._buffer:
            await writer.drain()
    writer.close()
async def main():
    srv = await asyncio.start_server(session, "127.0.0.2", 0, limit=1 << 24)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
'''


def message(size: int, dots: bool = False) -> bytes:
    head = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: bench\r\n\r\n"
    # dots: a dot at each line start, the worst case for DATA's stuffing
    line = (b"." if dots else b"x") + b"x" * 74 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def run_once(path: str, size: int, n: int, conc: int, chunking: bool) -> float:
    """Seconds to deliver n messages (conc at a time) to a fresh sink."""
    from twisted.internet import defer, task

    from relay.delivery.mx import Hop
    from relay.outbound.client import deliver
    from relay.outbound.conncache import ConnectionCache
    from relay.outbound.request import MessageFile, Outbound, TLSPolicy

    sink = subprocess.Popen([sys.executable, "-c", SINK, "x", "1" if chunking else "0"], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(sink.stdout.readline())  # type: ignore[union-attr]
        result: list[float] = []

        async def main(reactor):
            cache = ConnectionCache(reactor, idle=30.0)
            hop = Hop("sink.test", "127.0.0.2", port, 10)
            todo = iter(range(n))

            async def worker():
                for _ in todo:
                    out = Outbound(sender="a@origin.test", recipients=("b@dest.test",),
                                   message=MessageFile(path, size, 0, None, False), helo="bench.test",
                                   tls=TLSPolicy("none"))
                    rep = await deliver(reactor, [hop], out, cache=cache)
                    assert all(r.kind == "delivered" for r in rep.results.values()), rep

            t0 = time.perf_counter()
            await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(conc)])
            result.append(time.perf_counter() - t0)

        task.react(lambda r: defer.ensureDeferred(main(r)), [])
    except SystemExit:
        pass
    finally:
        sink.kill()
        sink.wait()
    return result[0]


def child(args: argparse.Namespace) -> None:
    """One timed run in its own process (task.react stops the reactor for good)."""
    print(run_once(args.path, args.size, args.n, args.conc, args.chunking))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sizes", default="2000,100000,1000000")
    ap.add_argument("--conc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dots", action="store_true", help="every line starts with a dot (DATA's worst case)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunking", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(f"{'size':>9} {'n':>6}  {'DATA msg/s':>10} {'BDAT msg/s':>10}  {'DATA MB/s':>9} {'BDAT MB/s':>9}  BDAT/DATA")
    with tempfile.TemporaryDirectory(prefix="relay-bdat-bench-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            data = message(size, args.dots)
            path = os.path.join(tmp, f"m{size}")
            with open(path, "wb") as f:
                f.write(data)
            n = max(20, min(args.n, args.n * 20_000 // size))
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.rounds):
                for chunking in (False, True):
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--size", str(len(data)),
                           "--n", str(n), "--conc", str(args.conc)] + (["--chunking"] if chunking else [])
                    secs = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
                    best[chunking] = min(best[chunking], secs)
            d, b = n / best[False], n / best[True]
            mb = len(data) / 1e6
            print(f"{len(data):>9} {n:>6}  {d:>10.0f} {b:>10.0f}  {d * mb:>9.1f} {b * mb:>9.1f}  {b / d:>8.2f}")


if __name__ == "__main__":
    main()
