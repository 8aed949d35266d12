"""What DKIM signing costs per message and per MB (issue 14: less than 15% of the accept rate).

    .venv/bin/python bench/dkim_cost.py [--n 300] [--mb 20]

Times what intake will do for each trusted message, in the thread it runs
in: relay.intake.dkim.sign_message (read the header block, choose the keys
by the From domain, sign), for a 2 KB message (CPU ms per message, the median of
5 rounds of --n signatures) and for a --mb MB message (ms per MB: the body
hash, which does not depend on the key), with RSA 2048 and Ed25519 keys,
relaxed/relaxed and simple/simple; and the private-key operation alone
(OpenSSL's, through cryptography: the floor for that key type).  The file is in the page cache (as a
message just written to the spool is), so this is CPU, not disk.  Compare
the per-message figure with the relay's accept CPU per message
(bench/RESULTS.md, "2. accept CPU per message"), printed beside it when
that file has it.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay.intake import dkim, dkimkeys  # noqa: E402

HEAD = (b"Received: from client.lan (client.lan [192.0.2.10]) by relay.example.org with ESMTPSA id 4f2a;"
        b" Tue, 01 Dec 2026 10:00:00 +0000\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        b"From: Alerts <alerts@nas.example.org>\r\nTo: Admin <admin@example.net>\r\n"
        b"Subject: disk /dev/sda1 is 91% full\r\nMessage-ID: <20261201100000.4f2a@nas.example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")


def write_message(path: str, body_bytes: int) -> None:
    """A message of HEAD and about body_bytes of body: text for a small one, base64 lines for a large one."""
    with open(path, "wb") as f:
        f.write(HEAD)
        if body_bytes < 100_000:
            line = b"The quick brown fox jumps over the lazy dog;  it  was\tnot amused. \r\n"
            f.write(line * (body_bytes // len(line) + 1))
            return
        block = base64.b64encode(os.urandom(57 * 1000))
        lines = b"".join(block[i:i + 76] + b"\r\n" for i in range(0, len(block), 76))
        for _ in range(body_bytes // len(lines) + 1):
            f.write(lines)


def per_message(path: str, key: dkim.SigningKey, canon: str, n: int) -> float:
    """CPU ms for the whole intake step: headers, the choice of keys, the signature."""
    table = {key.domain: [key]}
    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            choice, sigs = dkim.sign_message(path, 0, table, canonicalization=canon)
            assert choice.signed and len(sigs) == 1
        rounds.append((time.process_time() - t0) / n * 1000)
    return statistics.median(rounds)


def per_mb(path: str, key: dkim.SigningKey, canon: str) -> float:
    size_mb = os.path.getsize(path) / (1024 * 1024)
    rounds = []
    for _ in range(3):
        t0 = time.process_time()
        dkim.sign(path, 0, key, canonicalization=canon)
        rounds.append((time.process_time() - t0) * 1000 / size_mb)
    return statistics.median(rounds)


def accept_cpu_ms() -> float | None:
    """The relay's accept CPU per message from bench/RESULTS.md (ours), if there."""
    try:
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^\| 2\. accept CPU per message \(ms\) \| ([0-9.]+) \|", text, re.M)
    return float(m.group(1)) if m else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="signatures per round for the 2 KB message")
    p.add_argument("--mb", type=int, default=20, help="size of the large message")
    a = p.parse_args()
    base = accept_cpu_ms()
    with tempfile.TemporaryDirectory() as d:
        small, large = os.path.join(d, "small"), os.path.join(d, "large")
        write_message(small, 2048 - len(HEAD))
        write_message(large, a.mb * 1024 * 1024)
        keys = []
        for sel, alg in (("rsa2048", dkim.RSA_SHA256), ("ed25519", dkim.ED25519_SHA256)):
            path = os.path.join(d, f"{sel}.pem")
            dkimkeys.write_key(path, dkimkeys.generate_key(alg))
            keys.append(dkim.load_key(path, "example.org", sel, alg))
        print(f"2 KB message: {os.path.getsize(small)} bytes; large: {os.path.getsize(large) / 1048576:.1f} MB;"
              f" accept CPU per message (bench/RESULTS.md): {base if base is not None else '-'} ms")
        print(f"{'key':10s} {'canonicalization':18s} {'ms/2KB msg':>11s} {'of accept':>10s} {'ms/MB':>8s}")
        for key in keys:
            data = b"x" * 700  # about what a 2 KB message's signed headers come to
            t0 = time.process_time()
            for _ in range(a.n):
                key.sign(data)
            ms = (time.process_time() - t0) / a.n * 1000
            share = f"{ms / base * 100:9.1f}%" if base else f"{'-':>10s}"
            print(f"{key.selector:10s} {'(signature alone)':18s} {ms:11.3f} {share} {'-':>8s}")
            for canon in ("relaxed/relaxed", "simple/simple"):
                ms = per_message(small, key, canon, a.n)
                share = f"{ms / base * 100:9.1f}%" if base else f"{'-':>10s}"
                print(f"{key.selector:10s} {canon:18s} {ms:11.3f} {share} {per_mb(large, key, canon):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
