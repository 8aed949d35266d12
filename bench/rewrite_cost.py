"""What sender rewriting costs per message (issue 14), on the reactor where it runs.

    .venv/bin/python bench/rewrite_cost.py [--n 5000] [--accept 3000]

Times what the SMTP server does more for a message from a trusted client when
[rewrite] has entries: the envelope sender looked up (relay.intake.rewrite.
SenderMap.address) and the message passed through a HeaderStage as
relay.smtp.transfer feeds it (a 2 KB message with From, Sender and Reply-To
to rewrite, in lines as the DATA reader passes them, and the same message
whose headers match nothing).  Prints CPU microseconds per message, the
median of 5 rounds of --n messages, beside the relay's accept CPU per
message (bench/RESULTS.md, "2. accept CPU per message") when that file has it.

With ``--accept N``: the accept rate itself, end to end.  A ``twistd relay``
(one process, its next hop down so that messages are only queued) gets N of
those 2 KB messages from 10 pipelined SMTP sessions on loopback, once with
an empty [rewrite] and once with the map above; prints messages per second
and the relay's CPU per message for each, the best of 3 rounds each, the
two alternating.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay.config.values import parse_masquerade, parse_senders  # noqa: E402
from relay.intake.rewrite import HeaderStage, SenderMap  # noqa: E402

MAP = SenderMap(parse_senders({"root@nas.lan": "alerts@example.org"}),
                parse_masquerade({"*.lan": "example.org", "printer.local": "example.org"}))
HEAD = (b'From: "NAS" <root@nas.lan>\r\nSender: cron@printer.lan\r\nReply-To: ops <ops@x.lan>, b@example.com\r\n'
        b"To: someone@example.com\r\nSubject: daily report\r\nDate: Wed, 2 Dec 2026 07:00:00 +0000\r\n"
        b"Message-ID: <1234@nas.lan>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
BODY = b"".join(b"line %04d of the report, some text to make it two kilobytes long.\r\n" % i for i in range(26))


def one(message: bytes, chunks: list[bytes]) -> int:
    MAP.address("root@nas.lan")
    s = HeaderStage(MAP)
    n = 0
    for c in chunks:
        n += len(s.feed(c))
    return n + len(s.finish())


def per_message_us(message: bytes, n: int) -> float:
    chunks = [message]  # a small message arrives in one read
    rounds = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            one(message, chunks)
        rounds.append((time.process_time() - t) / n * 1e6)
    return statistics.median(rounds)


def accept_cpu_ms() -> float | None:
    try:
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
            m = re.search(r"\| 2\. accept CPU per message \(ms\) \| ([0-9.]+) \|", f.read())
    except OSError:
        return None
    return float(m.group(1)) if m else None


def _client(host: str, port: int, count: int, message: bytes) -> None:
    s = socket.create_connection((host, port))
    f = s.makefile("rb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line

    reply()
    s.sendall(b"EHLO nas.lan\r\n")
    reply()
    for _ in range(count):
        s.sendall(b"MAIL FROM:<root@nas.lan>\r\nRCPT TO:<someone@dest.example>\r\nDATA\r\n")
        for _ in range(3):
            reply()
        s.sendall(message + b".\r\n")
        r = reply()
        assert r.startswith(b"250"), r
    s.sendall(b"QUIT\r\n")
    s.close()


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def accept_round(n: int, rewrite: bool, message: bytes) -> tuple[float, float]:
    import shutil
    import tempfile

    from tests.support.relay import RelayProcess, base_config, deep_merge, free_port

    tmp = tempfile.mkdtemp(prefix="relay-rwbench-")
    try:
        port = free_port()
        data = deep_merge(base_config(tmp), {
            "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "max_connections_per_ip": 50},
            "relay": {"routes": {"dest.example": "127.0.0.1:1"}},
            "delivery": {"retry_min": "1h", "retry_max": "2h"},
            "rewrite": {"senders": {"root@nas.lan": "alerts@example.org"},
                        "masquerade": {"*.lan": "example.org", "printer.local": "example.org"}} if rewrite else {},
        })
        relay = RelayProcess(tmp, data).start(wait_for=("127.0.0.1", port))
        try:
            assert relay.proc is not None
            cpu0, t0 = _cpu(relay.proc.pid), time.monotonic()
            threads = [threading.Thread(target=_client, args=("127.0.0.1", port, n // 10, message))
                       for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            secs, cpu = time.monotonic() - t0, _cpu(relay.proc.pid) - cpu0
        finally:
            relay.stop()
        return n // 10 * 10 / secs, cpu / (n // 10 * 10) * 1000
    finally:
        shutil.rmtree(tmp, True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--accept", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if args.accept:
        best: dict[bool, tuple[float, float]] = {}
        for _ in range(3):
            for rw in (False, True):
                rate, cpu = accept_round(args.accept, rw, HEAD + BODY)
                if rw not in best or rate > best[rw][0]:
                    best[rw] = (rate, cpu)
        for rw in (False, True):
            print(f"accept, rewrite {'on ' if rw else 'off'}: {best[rw][0]:.0f} msg/s, "
                  f"{best[rw][1]:.2f} ms relay CPU per message")
        print(f"rate with rewriting / without: {best[True][0] / best[False][0]:.3f}")
        return 0
    matching = HEAD + BODY
    other = re.sub(rb"(nas|printer|x)\.lan", b"example.net", HEAD) + BODY
    accept = accept_cpu_ms()
    for name, msg in (("2 KB, From/Sender/Reply-To rewritten", matching), ("2 KB, nothing matches", other)):
        us = per_message_us(msg, args.n)
        share = f" = {us / 10 / accept:.1f}% of the accept CPU per message ({accept} ms)" if accept else ""
        print(f"{name}: {us:.1f} us CPU per message{share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
