"""Rate limits (so many per window, per key), counted once for the whole relay.

Why a table of fixed slots and not a dict: the keys come from clients (an
address, a user name, an envelope sender), so an attacker with many
addresses must not grow memory without bound, and with ``workers > 1`` the
workers must count together (one limit for the relay, not one per worker).
The same table serves both: ``RateTable.local()`` lives in an anonymous
mapping of this process (``workers = 1``); ``RateTable.create_shared()``
is a sealed memfd the master makes before it starts any worker and passes
down (as ``relay.common.connlimit``'s table), each worker mapping it.

Counting: a sliding window approximated from two fixed windows aligned on
the window length (as Cloudflare's and nginx's limiters): the estimate is
``previous * (1 - elapsed / window) + current``, so a client cannot send
twice the limit across a window boundary, and a limit is released little
by little as the window moves, wholly after two windows.  Time is given by
the caller (the reactor's ``seconds()``: task.Clock in tests; the workers'
reactors all read the wall clock, so they agree on the window).

Memory: ``CAPACITY`` slots of ``SLOT`` bytes (2 MiB).  A key is a keyed
BLAKE2b of the limit and the name (the hash key random per table, so
clients cannot aim at one probe chain); it is looked for in ``PROBE``
slots from its home.  A new key takes a free or expired slot there (one
untouched for two windows counts nothing), else the slot with the smallest
count: under a flood of new keys the relay forgets the least active ones
first (it limits less, never refuses an innocent client).

Atomicity with workers: every ``take`` holds an ``fcntl`` record lock on
the memfd for the in-memory work only (a hash probe, a few adds); the
kernel drops it when its holder dies, so a worker killed inside cannot
wedge the others.  A local table takes no lock.

With ``limits.redis`` the fleet's counts are kept in Redis
(relay.common.redislimits); this table then counts this node's share
(``add``) and answers alone while Redis is away.

Each slot keeps a printable name (the limit and the key, truncated to
``NAME_SIZE`` bytes) so that ``relayctl status`` can list who is near a
limit, whatever worker counted it.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"RLYRATE1"
HEADER = struct.Struct("<8sI16s")  # magic, capacity, hash key
HEADER_SIZE = 64
KEY_SIZE = 16
NAME_SIZE = 72
# key, window start, window length, start of the window a refusal was logged in, current, previous, max
ENTRY = struct.Struct(f"<{KEY_SIZE}sdddIII4x{NAME_SIZE}s")
SLOT = ENTRY.size  # 128
CAPACITY = 1 << 14  # 16384 keys tracked at once (2 MiB)
PROBE = 16
EMPTY = bytes(KEY_SIZE)
NEVER = -1.0  # no refusal logged yet


@dataclass(frozen=True)
class Want:
    """One limit a command must stay under: its name ("limits.messages_per_ip"),
    the key it counts ("127.0.0.9"), the maximum and the window in seconds."""

    limit: str
    key: str
    max: int
    window: float


@dataclass(frozen=True)
class Refusal:
    want: Want
    count: int  # the estimate when refused
    first: bool  # the first refusal of this key in this window: log it


@dataclass(frozen=True)
class Usage:
    limit: str
    key: str
    count: int
    max: int
    window: float


class RateTable:
    """Counts per key in a fixed table (see the module docstring)."""

    def __init__(self, mm: mmap.mmap, fd: int | None = None, *, owner: bool = False):
        self.mm = mm
        self.fd = fd
        self.owner = owner
        magic, cap, hkey = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or cap & (cap - 1) or len(mm) < HEADER_SIZE + cap * SLOT:
            raise ValueError("not a rate-limit table")
        self.capacity = cap
        self.hash_key = hkey

    @staticmethod
    def _init(mm: mmap.mmap, capacity: int) -> None:
        HEADER.pack_into(mm, 0, MAGIC, capacity, os.urandom(16))

    @classmethod
    def local(cls, capacity: int = CAPACITY) -> "RateTable":
        if capacity & (capacity - 1) or capacity < PROBE:
            raise ValueError("capacity must be a power of two >= PROBE")
        mm = mmap.mmap(-1, HEADER_SIZE + capacity * SLOT)
        cls._init(mm, capacity)
        return cls(mm)

    @classmethod
    def create_shared(cls, capacity: int = CAPACITY) -> "RateTable":
        """A new table in a memfd, inheritable so that workers can be given it."""
        size = HEADER_SIZE + capacity * SLOT
        fd = os.memfd_create("relay-ratelimits", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            cls._init(mm, capacity)
            os.set_inheritable(fd, True)
            return cls(mm, fd, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> "RateTable":
        """A worker's view of the master's table (an inherited descriptor)."""
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise ValueError(f"descriptor {fd} is not a rate-limit table")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            return cls(mm, fd)
        except ValueError:
            mm.close()
            raise ValueError(f"descriptor {fd} is not a rate-limit table")

    def close(self) -> None:
        self.mm.close()
        if self.owner and self.fd is not None:
            os.close(self.fd)

    def _lock(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _key(self, want: Want) -> bytes:
        k = bytearray(hashlib.blake2b(f"{want.limit}\0{want.key}".encode("utf-8", "surrogateescape"),
                                      digest_size=KEY_SIZE, key=self.hash_key).digest())
        k[0] |= 1  # never all zero (a free slot)
        return bytes(k)

    # -- under the lock ------------------------------------------------------
    def _slot(self, key: bytes, now: float) -> tuple[int, bool]:
        """(offset, found) of key's slot: its own, else the one it may take."""
        mm, mask = self.mm, self.capacity - 1
        home = int.from_bytes(key[8:], "little") & mask
        victim, victim_count = -1, math.inf
        for step in range(PROBE):
            off = HEADER_SIZE + ((home + step) & mask) * SLOT
            k, start, window, _logged, cur, prev, _max, _name = ENTRY.unpack_from(mm, off)
            if k == key:
                return off, True
            if k == EMPTY or now >= start + 2 * window:
                if victim_count > -1:
                    victim, victim_count = off, -1
                continue
            est = _estimate(start, window, cur, prev, now)
            if est < victim_count:
                victim, victim_count = off, est
        return victim, False

    def _read(self, off: int, now: float, want: Want) -> tuple[float, float, int, int]:
        """(window start, logged start, current, previous) rolled to now."""
        _k, start, window, logged, cur, prev, _max, _name = ENTRY.unpack_from(self.mm, off)
        if window != want.window:  # the limit was changed by a reload: start afresh
            start, cur, prev, logged = 0.0, 0, 0, NEVER
        now_start = math.floor(now / want.window) * want.window
        if start != now_start:
            prev = cur if start == now_start - want.window else 0
            cur, start = 0, now_start
        return start, logged, cur, prev

    def take(self, wants: list[Want], now: float, n: int = 1) -> Refusal | None:
        """Count n for every want, or for none if one of them would go over
        its maximum (that one is returned)."""
        if not wants:
            return None
        keys = [self._key(w) for w in wants]
        self._lock()
        try:
            rows = []
            for want, key in zip(wants, keys):
                off, found = self._slot(key, now)
                if off < 0:  # PROBE slots all busy with fresher keys than nothing: cannot happen
                    continue
                start, logged, cur, prev = self._read(off, now, want) if found else (
                    math.floor(now / want.window) * want.window, NEVER, 0, 0)
                est = _estimate(start, want.window, cur, prev, now)
                if est + n > want.max:
                    first = logged != start
                    self._write(off, key, want, start, start, cur, prev)
                    return Refusal(want, math.ceil(est), first)
                rows.append((want, key))
            # every want fits: count them, each slot found again (two new keys may have
            # been given the same free slot above)
            for want, key in rows:
                off, found = self._slot(key, now)
                start, logged, cur, prev = self._read(off, now, want) if found else (
                    math.floor(now / want.window) * want.window, NEVER, 0, 0)
                self._write(off, key, want, start, logged, cur + n, prev)
            return None
        finally:
            self._unlock()

    def check(self, wants: list[Want], now: float, n: int = 1) -> Refusal | None:
        """``take``, as the SMTP session asks every limits table (the fleet's,
        relay.common.redislimits.FleetRates, may answer with a Deferred)."""
        return self.take(wants, now, n)

    def add(self, wants: list[Want], now: float, n: int = 1) -> None:
        """Count n for every want without a check: what the fleet's limits
        (Redis) admitted is this node's share, known here when Redis is not."""
        keys = [self._key(w) for w in wants]
        self._lock()
        try:
            for want, key in zip(wants, keys):
                off, found = self._slot(key, now)
                if off < 0:
                    continue
                start, logged, cur, prev = self._read(off, now, want) if found else (
                    math.floor(now / want.window) * want.window, NEVER, 0, 0)
                self._write(off, key, want, start, logged, cur + n, prev)
        finally:
            self._unlock()

    def _write(self, off: int, key: bytes, want: Want, start: float, logged: float, cur: int, prev: int) -> None:
        name = f"{want.limit}\0{want.key}".encode("utf-8", "surrogateescape")[:NAME_SIZE]
        ENTRY.pack_into(self.mm, off, key, start, want.window, logged, min(cur, 0xFFFFFFFF), prev,
                        want.max, name)

    def count(self, want: Want, now: float) -> int:
        """The estimate for one key now (for tests and logs)."""
        key = self._key(want)
        self._lock()
        try:
            off, found = self._slot(key, now)
            if not found:
                return 0
            start, _logged, cur, prev = self._read(off, now, want)
            return math.ceil(_estimate(start, want.window, cur, prev, now))
        finally:
            self._unlock()

    def free_at(self, want: Want, now: float) -> float:
        """When one more fits under want (now if it does already)."""
        key = self._key(want)
        self._lock()
        try:
            off, found = self._slot(key, now)
            if not found:
                return now
            start, _logged, cur, prev = self._read(off, now, want)
        finally:
            self._unlock()
        if cur + 1 > want.max:
            return start + want.window  # the next window (then the previous one weighs, checked again)
        if prev and _estimate(start, want.window, cur, prev, now) + 1 > want.max:
            # prev * (1 - e / window) + cur + 1 <= max
            return start + want.window * (1.0 - (want.max - cur - 1) / prev)
        return now

    def usage(self, now: float, at_least: float = 0.8) -> list[Usage]:
        """Every key at or above ``at_least`` of its maximum, fullest first."""
        self._lock()
        try:
            data = bytes(self.mm[HEADER_SIZE:HEADER_SIZE + self.capacity * SLOT])
        finally:
            self._unlock()
        out = []
        for k, start, window, _logged, cur, prev, mx, name in ENTRY.iter_unpack(data):
            if k == EMPTY or not mx or now >= start + 2 * window:
                continue
            now_start = math.floor(now / window) * window
            if start != now_start:
                cur, prev = 0, (cur if start == now_start - window else 0)
            est = math.ceil(_estimate(now_start, window, cur, prev, now))
            if est >= at_least * mx:
                limit, _, key = name.rstrip(b"\0").decode("utf-8", "replace").partition("\0")
                out.append(Usage(limit, key, est, mx, window))
        out.sort(key=lambda u: (-u.count / u.max, u.limit, u.key))
        return out


def _estimate(start: float, window: float, cur: int, prev: int, now: float) -> float:
    """The sliding-window estimate: the previous window weighted by how much
    of it is still inside the last ``window`` seconds."""
    elapsed = min(max(now - start, 0.0), window)
    return prev * (1.0 - elapsed / window) + cur
