"""Connections per client IP, counted once for the whole relay.

``smtp.max_connections_per_ip`` (and POP3's limit) is one limit for the
relay, however many worker processes accept connections.  The protocols
see a small interface, a *connection counter*::

    admitted, count = counter.acquire(ip, limit)   # at connect
    counter.release(ip)                            # at disconnect (only if admitted)
    counter.count(ip)                              # relay-wide, for logs and tests
    counter.counts()                               # {ip: n} of this process's open ones
    confirm(counter, ip, limit)                    # after acquire: the fleet's answer, or None

``confirm`` is for a limit shared by a fleet of relays (``limits.redis``,
relay.common.redislimits.FleetCounter wraps one of the counters below): a
Deferred of (admitted, count) the protocol waits for before its greeting;
None when there is nothing more to ask.

Two implementations:

* ``LocalCounter``: a dict, for a relay of one process (``workers = 1``).
* ``SharedCounter``: a view of a ``SharedTable``, a hash table of counts in
  shared memory that every worker maps.  The master creates it (a memfd,
  sealed against resizing) before it starts any worker and passes the
  descriptor down; it survives the worker's exec of Python because it is an
  inherited descriptor, not a path.  Each entry holds one count per worker
  (its *column*); a worker writes only its own column and the limit is
  checked against the sum.  When a worker dies, its connections are gone
  with it, so the master zeroes its column (``release_worker``) before it
  starts the replacement: a crashed worker's counts never leak.

Why this design and not asking the master over a socketpair: a check is a
few microseconds inside the worker (a POSIX record lock, a hash probe, an
add) and needs no round trip before the banner, no queue of pending
answers, and the master is not on the path of every connection.  The lock
is an ``fcntl`` record lock: the kernel drops it when its holder dies, so a
worker SIGKILLed inside ``acquire`` cannot wedge the others (an flock on the
inherited descriptor would be shared by all of them, hence useless).  It is
held only for in-memory work (no I/O, no page of a file on disk), so taking
it on the reactor thread is cheap.  Keys are a keyed BLAKE2b of the
protocol name and the address (the key is random per table), so clients
cannot choose addresses that pile up on one probe chain.

The table has room for 49,152 addresses connected at once (3/4 of its
slots); past that a new address is refused like one over its limit (421),
with an error logged once a minute, while addresses already in it go on.

All calls come from one thread per process (the reactor's).  Cost per
connection (acquire + release; ``python bench/connlimit_cost.py``): about
12 us on the 2-core reference machine at load 2.5 (26-34 us at load 7),
against about 1 us for the dict of a single-process relay and about 1 ms of
CPU per accepted message; the master's ``release_worker`` scans the table
(about 40 ms with 10,000 addresses connected), once per worker death.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="relay.connlimit")

MAGIC = b"RLYCONN1"
HEADER = struct.Struct("<8sII16sI")  # magic, capacity, workers, hash key, used entries
HEADER_SIZE = 64
USED_AT = HEADER.size - 4
_U32 = struct.Struct("<I")
KEY_SIZE = 16
EMPTY = bytes(KEY_SIZE)
CAPACITY = 1 << 16  # slots; at most 3/4 of them used: 49152 addresses connected at once
FULL_LOG_INTERVAL = 60.0


class LocalCounter:
    """Connections per key in this process only (a relay of one process)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> tuple[bool, int]:
        """(admitted, how many were open before): counts one more unless
        ``limit`` are open."""
        n = self._counts.get(key, 0)
        if n >= limit:
            return False, n
        self._counts[key] = n + 1
        return True, n

    def release(self, key: str) -> None:
        n = self._counts.get(key, 0) - 1
        if n <= 0:
            self._counts.pop(key, None)
        else:
            self._counts[key] = n

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def confirm(self, key: str, limit: int) -> None:
        """Nothing to ask beyond this process (see ``confirm`` below)."""
        return None

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


class TableFull(Exception):
    pass


class SharedTable:
    """Per-key, per-worker connection counts in shared memory (see the module docstring).

    Layout: a 64-byte header, then ``capacity`` entries of a 16-byte key
    (all zero: free) and ``workers`` little-endian uint32 counts.  Open
    addressing with linear probing; an entry whose counts all reach zero is
    removed by backward shifting, so no tombstones accumulate.
    """

    def __init__(self, fd: int, *, owner: bool = False):
        self.fd = fd
        size = os.fstat(fd).st_size
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        magic, cap, workers, hkey, _used = HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC or cap & (cap - 1) or size < HEADER_SIZE + cap * (KEY_SIZE + 4 * workers):
            self.mm.close()
            raise ValueError(f"descriptor {fd} is not a connection table")
        self.capacity = cap
        self.mask = cap - 1
        self.workers = workers
        self.hash_key = hkey
        self.stride = KEY_SIZE + 4 * workers
        self.counts_fmt = struct.Struct(f"<{workers}I")
        self.owner = owner
        self._last_full_log = 0.0

    @classmethod
    def create(cls, workers: int, capacity: int = CAPACITY) -> "SharedTable":
        """A new table in a memfd (inheritable, so workers can be given it)."""
        if capacity & (capacity - 1) or capacity < 4:
            raise ValueError("capacity must be a power of two")
        size = HEADER_SIZE + capacity * (KEY_SIZE + 4 * workers)
        fd = os.memfd_create("relay-connections", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # no process holding it may shrink it under the others (SIGBUS)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            with mmap.mmap(fd, HEADER_SIZE) as mm:
                HEADER.pack_into(mm, 0, MAGIC, capacity, workers, os.urandom(16), 0)
            os.set_inheritable(fd, True)
            return cls(fd, owner=True)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self.mm.close()
        if self.owner:
            os.close(self.fd)

    def counter(self, namespace: str, worker: int) -> "SharedCounter":
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range")
        return SharedCounter(self, namespace, worker)

    # -- under the lock ---------------------------------------------------
    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def key(self, namespace: str, name: str) -> bytes:
        k = bytearray(hashlib.blake2b(f"{namespace}\0{name}".encode("utf-8", "surrogateescape"),
                                      digest_size=KEY_SIZE, key=self.hash_key).digest())
        k[0] |= 1  # never all zero (a free slot)
        return bytes(k)

    def _off(self, i: int) -> int:
        return HEADER_SIZE + i * self.stride

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[8:], "little") & self.mask

    def _find(self, key: bytes) -> tuple[int, bool]:
        mm, mask, stride = self.mm, self.mask, self.stride
        i = int.from_bytes(key[8:], "little") & mask
        for _ in range(self.capacity):
            off = HEADER_SIZE + i * stride
            k = mm[off:off + KEY_SIZE]
            if k == key:
                return i, True
            if k == EMPTY:
                return i, False
            i = (i + 1) & mask
        return -1, False

    def _used(self) -> int:
        return _U32.unpack_from(self.mm, USED_AT)[0]

    def _set_used(self, n: int) -> None:
        _U32.pack_into(self.mm, USED_AT, n)

    def _counts(self, i: int) -> tuple[int, ...]:
        return self.counts_fmt.unpack_from(self.mm, self._off(i) + KEY_SIZE)

    def _remove(self, i: int) -> None:
        """Free slot i, shifting later entries of its probe chain back."""
        mm, mask = self.mm, self.mask
        j = i
        while True:
            j = (j + 1) & mask
            oj = self._off(j)
            kj = mm[oj:oj + KEY_SIZE]
            if kj == EMPTY:
                break
            h = self._home(kj)
            # kj stays where it is if its home lies cyclically in (i, j]
            if (i < h <= j) if i <= j else (h > i or h <= j):
                continue
            oi = self._off(i)
            mm[oi:oi + self.stride] = mm[oj:oj + self.stride]
            i = j
        oi = self._off(i)
        mm[oi:oi + self.stride] = bytes(self.stride)
        self._set_used(self._used() - 1)

    def acquire(self, key: bytes, worker: int, limit: int) -> tuple[bool, int]:
        lockf, fd = fcntl.lockf, self.fd
        lockf(fd, fcntl.LOCK_EX)
        try:
            i, found = self._find(key)
            off = HEADER_SIZE + i * self.stride
            if found:
                counts = self.counts_fmt.unpack_from(self.mm, off + KEY_SIZE)
                total = sum(counts)
                if total >= limit:
                    return False, total
                _U32.pack_into(self.mm, off + KEY_SIZE + 4 * worker, counts[worker] + 1)
                return True, total
            if limit < 1:
                return False, 0
            used = self._used()
            if i < 0 or used + 1 > self.capacity * 3 // 4:
                raise TableFull(used)
            self.mm[off:off + KEY_SIZE] = key
            _U32.pack_into(self.mm, off + KEY_SIZE + 4 * worker, 1)
            self._set_used(used + 1)
            return True, 0
        finally:
            lockf(fd, fcntl.LOCK_UN)

    def release(self, key: bytes, worker: int) -> None:
        lockf, fd = fcntl.lockf, self.fd
        lockf(fd, fcntl.LOCK_EX)
        try:
            i, found = self._find(key)
            if not found:
                return
            off = HEADER_SIZE + i * self.stride + KEY_SIZE
            counts = self.counts_fmt.unpack_from(self.mm, off)
            mine = counts[worker]
            if mine == 0:
                return
            if sum(counts) == 1:
                self._remove(i)
            else:
                _U32.pack_into(self.mm, off + 4 * worker, mine - 1)
        finally:
            lockf(fd, fcntl.LOCK_UN)

    def count(self, key: bytes) -> int:
        self._lock()
        try:
            i, found = self._find(key)
            return sum(self._counts(i)) if found else 0
        finally:
            self._unlock()

    def release_worker(self, worker: int) -> int:
        """Zero a dead worker's column (the master, before it restarts it);
        returns how many connections it had counted."""
        self._lock()
        try:
            mm, stride, fmt = self.mm, self.stride, self.counts_fmt
            keep: list[tuple[bytes, tuple[int, ...]]] = []
            freed = 0
            data = mm[HEADER_SIZE:HEADER_SIZE + self.capacity * stride]
            for off in range(0, len(data), stride):
                k = data[off:off + KEY_SIZE]
                if k == EMPTY:
                    continue
                counts = list(fmt.unpack_from(data, off + KEY_SIZE))
                freed += counts[worker]
                counts[worker] = 0
                if any(counts):
                    keep.append((k, tuple(counts)))
            if not freed:
                return 0
            # rebuild: simpler than deleting while scanning, and rare (a worker died)
            mm[HEADER_SIZE:HEADER_SIZE + self.capacity * stride] = bytes(self.capacity * stride)
            for k, kept in keep:
                i, _ = self._find(k)
                off = self._off(i)
                mm[off:off + KEY_SIZE] = k
                fmt.pack_into(mm, off + KEY_SIZE, *kept)
            self._set_used(len(keep))
            return freed
        finally:
            self._unlock()

    def log_full(self, used: int) -> None:
        now = time.monotonic()
        if now - self._last_full_log >= FULL_LOG_INTERVAL:
            self._last_full_log = now
            log.error("connection table full: {used} client addresses connected at once; "
                      "new addresses are refused until some leave", used=used)


class SharedCounter:
    """One protocol's view of a SharedTable, in one worker: the same
    interface as LocalCounter, counting relay-wide."""

    def __init__(self, table: SharedTable, namespace: str, worker: int):
        self.table = table
        self.namespace = namespace
        self.worker = worker
        self._own: dict[str, int] = {}  # this worker's open connections, per key
        self._keys: dict[str, bytes] = {}

    def _key(self, name: str) -> bytes:
        k = self._keys.get(name)
        if k is None:
            k = self.table.key(self.namespace, name)
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[name] = k
        return k

    def acquire(self, key: str, limit: int) -> tuple[bool, int]:
        try:
            ok, n = self.table.acquire(self._key(key), self.worker, limit)
        except TableFull as e:
            self.table.log_full(e.args[0])
            return False, 0
        if ok:
            self._own[key] = self._own.get(key, 0) + 1
        return ok, n

    def release(self, key: str) -> None:
        n = self._own.get(key, 0)
        if n <= 0:
            return
        if n == 1:
            del self._own[key]
        else:
            self._own[key] = n - 1
        self.table.release(self._key(key), self.worker)

    def count(self, key: str) -> int:
        return self.table.count(self._key(key))

    def counts(self) -> dict[str, int]:
        return dict(self._own)

    def confirm(self, key: str, limit: int) -> None:
        return None


def confirm(counter: Any, key: str, limit: int) -> "defer.Deferred[tuple[bool, int]] | None":
    """After ``acquire`` admitted a connection: a Deferred of (admitted, count)
    when the limit is also the fleet's (relay.common.redislimits.FleetCounter,
    ``limits.redis``), else None (the local answer stands).  When it fires
    with False the protocol refuses the connection and releases it as usual."""
    ask = getattr(counter, "confirm", None)
    return ask(key, limit) if ask is not None else None
