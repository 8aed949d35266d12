"""The spool's names: queue ids and the files' names under the spool.

Layout under the spool directory (all 0700)::

    incoming/<id>.tmp   a message being received; never acknowledged
    queue/<id>          a queued message: one envelope line, then the message
    queue/<id>.state    per-recipient delivery state (absent: all pending)
    quarantine/         entries that could not be read, moved aside
    drop/               messages from relay-sendmail, picked up at start

A queue id is 16 characters of Crockford's base32: 11 for the microseconds
since the epoch, then 5 random ones.  Its own module because relay-sendmail,
the pickup, the offline tools and the control socket need ids and names
without the rest of the spool.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import threading
import time

STATE_SUFFIX = ".state"
TMP_SUFFIX = ".tmp"
STOCK_PREFIX = "stock-"  # empty files made ahead of time in incoming/

# Crockford's base32: digits then letters, in ASCII order, so ids sort by time.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


class IdGenerator:
    """Queue ids: 11 chars of microseconds since the epoch, then 5 random chars.

    Sortable by arrival (fixed width, alphabet in ASCII order), unique across
    processes sharing a spool (the random part) and strictly increasing within
    one process (the time part never repeats).
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        # not secret, only unlikely to collide across processes: a PRNG
        # seeded from the OS (reseeded in a forked child) spares a
        # getrandom() system call per id
        self._rand = random.Random(secrets.randbits(128))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: self._rand.seed(secrets.randbits(128)))

    def __call__(self) -> str:
        with self._lock:
            now = time.time_ns() // 1000
            if now <= self._last:
                now = self._last + 1
            self._last = now
            r = self._rand.getrandbits(25)
        return _b32((now << 25) | r, 16)


new_id = IdGenerator()


_QID = re.compile(r"[0-9A-HJKMNP-TV-Z]{16}\Z")


def is_queue_id(text: str) -> bool:
    return len(text) == 16 and _QID.match(text) is not None


def id_time(qid: str) -> float:
    n = 0
    for c in qid[:11]:
        n = n * 32 + _ALPHABET.index(c)
    return n / 1e6
