"""What sender rewriting costs per message (issue 14), on the reactor where it runs.

    .venv/bin/python bench/rewrite_cost.py [--n 5000]

Times what the SMTP server does more for a message from a trusted client when
[rewrite] has entries: the envelope sender looked up (relay.intake.rewrite.
SenderMap.address) and the message passed through a HeaderStage as
relay.smtp.transfer feeds it (a 2 KB message with From, Sender and Reply-To
to rewrite, in lines as the DATA reader passes them, and the same message
whose headers match nothing).  Prints CPU microseconds per message, the
median of 5 rounds of --n messages, beside the relay's accept CPU per
message (bench/RESULTS.md, "2. accept CPU per message") when that file has it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
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
