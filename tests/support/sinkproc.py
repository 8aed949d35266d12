"""tests.support.sink as a process that records every accepted delivery.

The crash harness kills the relay, never the sink, and needs to know, at any
instant, which (Message-ID, recipient) pairs the sink has acknowledged and
how many times.  This process runs a ``Sink`` and appends one line per
accepted recipient to a record file *before* the 250 to the final dot can
be read by the client (the line is written in the same reactor turn that
sends the reply), so a relay that recorded a delivery after reading that
250 always finds it in the record::

    python -m tests.support.sinkproc --interface 127.0.0.5 --record FILE

prints ``READY <port>`` once it listens.  Record lines are
``<message-id> <recipient> <sha256> <body>\\n`` (the digest of the message
as received from its Message-ID header on, so that the relay's own Received
header is left out: what a client sent starts there; then a short digest
of the body alone, which the power-loss harness compares), written with one
``os.write`` on an O_APPEND descriptor each (no torn lines for readers).
Message data is not kept after it is recorded, so memory stays flat over
long runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections import Counter

_MID = re.compile(rb"^Message-ID:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


def message_id(data: bytes) -> str:
    """The Message-ID of a message (header section only), or "-"."""
    end = data.find(b"\r\n\r\n")
    m = _MID.search(data if end < 0 else data[: end + 2])
    return m.group(1).decode("ascii", "replace") if m else "-"


def digest_from_message_id(data: bytes) -> str:
    """sha256 of the message from its Message-ID header line to the end
    ("-" without one): the bytes the crash clients sent, whatever headers a
    relay put above them."""
    end = data.find(b"\r\n\r\n")
    m = _MID.search(data if end < 0 else data[: end + 2])
    return hashlib.sha256(data[m.start():]).hexdigest() if m else "-"


def body_digest(data: bytes) -> str:
    """SHA-256 (hex, 16 digits) of a message's body, CRLF line endings: what
    a relay must pass on unchanged (it adds header fields, never touches the
    body), so a torn or mixed-up copy shows."""
    end = data.find(b"\r\n\r\n")
    return hashlib.sha256(data[end + 4:] if end >= 0 else b"").hexdigest()[:16]


class _Recorder(list):
    """Stands in for Sink.transactions: records, then forgets the data."""

    def __init__(self, fd: int, sink):
        super().__init__()
        self.fd = fd
        self.sink = sink
        self.count = 0

    def append(self, t) -> None:  # called by SinkProtocol right after it sent the 250
        mid = message_id(t.data)
        digest = digest_from_message_id(t.data)
        body = body_digest(t.data)
        lines = "".join(f"{mid} {r.lower()} {digest} {body}\n" for r in t.rcpts)
        os.write(self.fd, lines.encode("ascii", "replace"))
        self.count += 1
        t.data = b""
        t.raw = b""
        t.session.wire = bytearray()
        t.session.transactions.clear()
        t.session.commands.clear()
        t.session.replies.clear()


class _Cycle:
    """A scripted reply list (tests.support.sink._take) that never runs out."""

    def __init__(self, replies: list[str]):
        self.replies = replies
        self.n = 0

    def __len__(self) -> int:
        return 2

    def pop(self, _index: int) -> str:
        self.n += 1
        return self.replies[(self.n - 1) % len(self.replies)]


def _records(path: str):
    """The fields of each complete record line ([] when the file is missing)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [[p.decode() for p in line.split(b" ")] for line in data.split(b"\n") if line.count(b" ") >= 3]


def read_bodies(path: str) -> Counter:
    """(message-id, recipient, body digest) -> copies accepted."""
    return Counter((mid, rcpt, body) for mid, rcpt, _digest, body, *_ in _records(path))


def read_record(path: str) -> Counter:
    """(message-id, recipient) -> how many times the sink accepted it."""
    c: Counter = Counter()
    for (mid, rcpt), digests in read_digests(path).items():
        c[(mid, rcpt)] = len(digests)
    return c


def read_digests(path: str) -> dict[tuple[str, str], list[str]]:
    """(message-id, recipient) -> the digest of every copy the sink accepted."""
    out: dict[tuple[str, str], list[str]] = {}
    for mid, rcpt, digest, *_ in _records(path):
        out.setdefault((mid, rcpt), []).append(digest)
    return out


def main(argv: list[str] | None = None) -> int:
    from twisted.internet import reactor

    from tests.support.sink import Sink

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interface", default="127.0.0.5")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--record", required=True)
    ap.add_argument("--defer", action="append", default=[], metavar="RCPT",
                    help="answer RCPT TO this address 451 twice, then 250, over and over")
    args = ap.parse_args(argv)
    fd = os.open(args.record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sink = Sink(args.interface, port=args.port, reactor=reactor,
                rcpt_replies={r.lower(): _Cycle(["451 4.3.0 try again later"] * 2 + ["250 2.1.5 Ok"])
                              for r in args.defer})
    sink.transactions = _Recorder(fd, sink)
    sink.start()
    print(f"READY {sink.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
