"""Maildir writing (local delivery) and reading (POP3), as blocking functions.

Everything here does disk I/O and some of it fsyncs, so callers run it in a
thread (``deferToThreadPool``), never on the reactor.  No Twisted here.

On-disk format, chosen so that any Maildir reader (mutt, Dovecot) can read
what we write and so that POP3 never has to scan a file to know its size:

* ``<root>/<domain>/<local>/{tmp,new,cur}``, directories mode 0700, files
  0600.  Domain and local part are lower-cased (user look-ups are
  case-insensitive, so Alice@ and alice@ must share one Maildir).
* Messages are stored with LF line endings (the Maildir convention).  POP3
  sends them with CRLF; the CRLF ("virtual") size and the stored size are in
  the file name, Dovecot-style: ``<time>.M<usec>P<pid>Q<n>R<rand>.<host>,S=<size>,W=<crlf size>``.
* Delivery writes ``tmp/<name>``, fsyncs it, links it into ``new/`` (link,
  not rename: it never replaces a name, and is judged NFS-safe by the link
  count), removes the tmp/ name and fsyncs ``new/``: a crash leaves either
  no message in new/ or a whole one.
* Several hosts may share the tree (docs/shared-storage.md): names carry the
  host name; the POP3 lock (relay.mailbox.mboxlock) holds across hosts.

UIDL values are derived from the part of the name before the first "," (or
":"), which never changes when a message moves from new/ to cur/ or gains
flags; names that do not fit POP3's rules (1-70 printable characters) get a
hash of that part instead.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from relay.common.address import AddressError
from relay.common.fileio import create_exclusive, fsync_dir, makedirs_durable, unlink_quiet, write_all
from relay.mailbox.mboxlock import LOCK_NAME, MailboxLock, MailboxLocked, check_real_dirs, escape_host
from relay.mailbox.users import check_safe_local_part, unsafe_path_part

CHUNK = 256 * 1024
DIR_MODE = 0o700
FILE_MODE = 0o600
MAX_UIDL = 70

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_hostname: str | None = None


# ---------------------------------------------------------------------------
# names and paths


def _escaped_hostname() -> str:
    """The system's host name as the Maildir spec wants it in file names
    (relay.mailbox.mboxlock.escape_host: "/", ":" and "," encoded).

    The system's, not the config's ``hostname``: relays of one fleet may
    all announce one name, but their machines differ (docs/shared-storage.md).
    """
    global _hostname
    if _hostname is None:
        _hostname = escape_host(socket.gethostname() or "localhost")
    return _hostname


def unique_name(now: float | None = None) -> str:
    """A new Maildir base name: time, M<usec>P<pid>Q<counter>R<random>, host.

    Unique across the hosts sharing a mailbox tree by the host name (the
    Maildir spec's rule), within a host by pid and counter, and by 32 random
    bits even if two hosts share a name.
    """
    t = time.time() if now is None else now
    sec = int(t)
    usec = int((t - sec) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    return f"{sec}.M{usec}P{os.getpid()}Q{n}R{secrets.token_hex(4)}.{_escaped_hostname()}"


def check_safe_domain(domain: str) -> None:
    """Refuse a domain that could name a path outside the mailbox root
    (relay.mailbox.users.unsafe_path_part; nor space or DEL in a domain)."""
    if unsafe_path_part(domain, also=" \x7f"):
        raise AddressError(f"domain {domain!r} is not allowed for a mailbox", "5.1.2")


def mailbox_path(root: str, domain: str, local: str) -> str:
    """<root>/<domain>/<local>, lower-cased; AddressError for unsafe names."""
    check_safe_domain(domain)
    check_safe_local_part(local)
    return os.path.join(root, domain.lower(), local.lower())


# Maildirs this process has made durable (created or found, parents
# fsynced): later deliveries skip the checks and the fsyncs.
_durable_maildirs: set[str] = set()


def ensure_maildir(maildir: str) -> None:
    """Create maildir (and missing parents) with tmp/new/cur, mode 0700.

    Every directory on the way is made durable (its parent fsynced), also
    when it already exists: it may have been made by a process that crashed
    before its fsync, or by another thread that has not fsynced yet, and a
    message fsynced into new/ must not vanish with its directory in a power
    loss.  Once done, a process remembers it (no fsyncs per delivery).
    """
    maildir = os.path.abspath(maildir)
    if maildir in _durable_maildirs:
        return
    makedirs_durable(maildir, DIR_MODE)
    check_real_dirs(maildir)  # a planted symlink takes no delivery elsewhere
    for sub in ("tmp", "new", "cur"):
        d = os.path.join(maildir, sub)
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    fsync_dir(maildir)
    _durable_maildirs.add(maildir)


# ---------------------------------------------------------------------------
# line-ending conversion


class _CarryCR:
    """The chunking both streaming converters share: a CR at a chunk's end
    waits for the next chunk (it may be the first half of a CRLF)."""

    def __init__(self) -> None:
        self._carry = b""

    def _join(self, chunk: bytes) -> bytes:
        """The carried CR and chunk, less a CR at its end (carried on)."""
        data = self._carry + chunk if self._carry else chunk
        if data.endswith(b"\r"):
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        return data

    def _rest(self) -> bytes:
        """What is still carried, at the end of the input."""
        data, self._carry = self._carry, b""
        return data


class _ToLF(_CarryCR):
    """Streaming CRLF -> LF."""

    def feed(self, chunk: bytes) -> bytes:
        return self._join(chunk).replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        return self._rest()


class ToCRLF(_CarryCR):
    """Streaming stored -> wire conversion: every LF not preceded by CR
    becomes CRLF; CRLF (a foreign file stored with CRLF) and bare CR pass.

    ``size`` counts the octets produced, which is what LIST must announce.
    """

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def feed(self, chunk: bytes) -> bytes:
        data = self._join(chunk)
        if b"\n" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.size += len(data)
        return data

    def flush(self) -> bytes:
        data = self._rest()
        self.size += len(data)
        return data


class _VirtualSize:
    """Counts the CRLF size of stored bytes without producing them."""

    def __init__(self) -> None:
        self.size = 0
        self._last_cr = False

    def feed(self, data: bytes) -> None:
        if not data:
            return
        lone = data.count(b"\n") - data.count(b"\r\n")
        if self._last_cr and data[:1] == b"\n":
            lone -= 1
        self.size += len(data) + lone
        self._last_cr = data[-1:] == b"\r"


def crlf_size_of_file(path: str) -> int:
    """The octets ToCRLF makes of a stored file (blocking, reads it all)."""
    vs = _VirtualSize()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            vs.feed(chunk)
    return vs.size


# ---------------------------------------------------------------------------
# delivery


def deliver(root: str, domain: str, local: str, src_path: str, src_offset: int, prefix: bytes) -> str:
    """Deliver one spooled message into <root>/<domain>/<local>/new/; return its path.

    src_path holds the message with CRLF line endings from byte src_offset
    on; prefix holds header lines (Return-Path:, Delivered-To:) to put in
    front, CRLF-terminated.  The copy is streamed in CHUNK pieces and stored
    with LF endings.  Only after tmp/ file fsync, link into new/ and fsync
    of new/ does this return: the caller may then record the recipient as
    delivered.

    Raises AddressError (a ValueError, permanent) for a domain or local part
    that could escape root, OSError (temporary: defer) for disk problems;
    no partial file is left in new/ either way.
    """
    maildir = mailbox_path(root, domain, local)
    ensure_maildir(maildir)
    base, fd = _create_tmp(maildir)
    tmp_path = os.path.join(maildir, "tmp", base)
    try:
        try:
            size, vsize = _copy_lf(fd, src_path, src_offset, prefix)
            os.fsync(fd)
        finally:
            os.close(fd)
        # the name carries the sizes, known only now
        final = _link_new(maildir, tmp_path, base, f",S={size},W={vsize}")
    finally:
        unlink_quiet(tmp_path, missing_only=False)
    fsync_dir(os.path.join(maildir, "new"))
    return final


def _create_tmp(maildir: str) -> tuple[str, int]:
    """A new file tmp/<unique name>: (name, fd).  A name another host made
    at the same moment gets a fresh one (O_EXCL never decides alone)."""
    for attempt in range(5):
        base = unique_name()
        path = os.path.join(maildir, "tmp", base)
        try:
            return base, create_exclusive(path, FILE_MODE)
        except FileExistsError:
            if attempt == 4:
                raise
        except FileNotFoundError:
            if attempt:
                raise
            # removed since this process made it durable: make it again
            _durable_maildirs.discard(os.path.abspath(maildir))
            ensure_maildir(maildir)
    raise FileExistsError(errno.EEXIST, "no unique name in tmp/", maildir)


def _copy_lf(fd: int, src_path: str, src_offset: int, prefix: bytes) -> tuple[int, int]:
    """Write prefix and src_path from src_offset to fd with LF endings, in
    CHUNK pieces; return (stored size, CRLF size)."""
    conv = _ToLF()
    vsize = _VirtualSize()
    size = 0
    pending: list[bytes] = []
    pending_len = 0

    def put(data: bytes) -> None:
        nonlocal size, pending_len
        if not data:
            return
        size += len(data)
        vsize.feed(data)
        pending.append(data)
        pending_len += len(data)
        if pending_len >= CHUNK:
            flush()

    def flush() -> None:
        nonlocal pending_len
        if pending:
            write_all(fd, b"".join(pending))
            pending.clear()
            pending_len = 0

    put(conv.feed(prefix))
    with open(src_path, "rb") as src:
        src.seek(src_offset)
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            put(conv.feed(chunk))
    put(conv.flush())
    flush()
    return size, vsize.size


def _link_new(maildir: str, tmp_path: str, base: str, fields: str) -> str:
    """link() tmp_path to new/<base><fields> and return that path.

    link, not rename: link never replaces an existing name, so a name
    clash (however unlikely) can never overwrite a message another host
    delivered; it gets a fresh name instead.  On NFS a retransmitted link
    may report EEXIST (or another error) for a link that was made: the
    link count of the tmp/ file and the inode of the new name decide.
    """
    for _ in range(5):
        final = os.path.join(maildir, "new", base + fields)
        try:
            os.link(tmp_path, final, follow_symlinks=False)
            return final
        except OSError as e:
            st = os.lstat(tmp_path)
            try:
                lst = os.lstat(final)
            except FileNotFoundError:
                lst = None
            if st.st_nlink == 2 and lst is not None and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
                return final
            if e.errno != errno.EEXIST:
                raise
        base = unique_name()
    raise FileExistsError(errno.EEXIST, "no unique name in new/", final)


# ---------------------------------------------------------------------------
# reading


_S_FIELD = re.compile(r",S=(\d+)")
_W_FIELD = re.compile(r",W=(\d+)")
_TIME_PREFIX = re.compile(r"^(\d{1,12})\.(?:M(\d{1,7}))?")

# CRLF sizes computed for files without W= (foreign deliveries), keyed by
# identity and version of the file, so a second login does not read them again.
_size_cache: dict[tuple[int, int, int, int], int] = {}
_size_cache_lock = threading.Lock()
_SIZE_CACHE_MAX = 100_000


def uidl_for(base: str) -> str:
    """The UIDL for a message whose file name, up to ":", is base.

    The part before the first "," is our unique name; it is used as it is
    when it fits RFC 1939 (1-70 characters 0x21-0x7E), else a SHA-1 of it.
    """
    core = base.split(",", 1)[0]
    if 1 <= len(core) <= MAX_UIDL and all(0x21 <= ord(c) <= 0x7E for c in core):
        return core
    return hashlib.sha1(core.encode("utf-8", "surrogateescape")).hexdigest()


def _cached_crlf_size(path: str, st: os.stat_result) -> int:
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _size_cache_lock:
        hit = _size_cache.get(key)
    if hit is not None:
        return hit
    n = crlf_size_of_file(path)
    with _size_cache_lock:
        if len(_size_cache) >= _SIZE_CACHE_MAX:
            _size_cache.clear()
        _size_cache[key] = n
    return n


@dataclass
class Message:
    """One message of a mailbox listing."""

    base: str  # file name up to ":" (stable across new/ -> cur/ and flags)
    uid: str  # UIDL
    size: int  # octets RETR sends, before dot-stuffing
    path: str  # where the file is now; updated by moves
    order: tuple = field(default=(), repr=False)
    seen: bool = False  # has the S flag (a reader has had it)
    queued: bool = field(default=False, repr=False)  # POP3: waiting to be marked seen

    @property
    def in_new(self) -> bool:
        return os.path.basename(os.path.dirname(self.path)) == "new"


def _entries(maildir: str) -> Iterator[os.DirEntry[str]]:
    """The entries of cur/, then of new/ (a directory that is missing has none)."""
    for sub in ("cur", "new"):
        try:
            it = os.scandir(os.path.join(maildir, sub))
        except FileNotFoundError:
            continue
        with it:
            yield from it


def scan(maildir: str) -> list[Message]:
    """List the messages in new/ and cur/, oldest first (blocking)."""
    found: dict[str, Message] = {}
    for entry in _entries(maildir):
        name = entry.name
        if name.startswith("."):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        base = name.split(":", 1)[0]
        if base in found:  # the same message in new/ and cur/ (hard link): once
            continue
        s = _S_FIELD.search(base)
        w = _W_FIELD.search(base)
        if w and (s is None or int(s.group(1)) == st.st_size):
            size = int(w.group(1))
        else:
            try:
                size = _cached_crlf_size(entry.path, st)
            except FileNotFoundError:
                continue
        m = _TIME_PREFIX.match(base)
        if m:
            order = (int(m.group(1)), int(m.group(2) or 0), base)
        else:
            order = (int(st.st_mtime), 0, base)
        _, sep, info = name.partition(":")
        seen = bool(sep) and info.startswith("2,") and "S" in info[2:]
        found[base] = Message(base, uidl_for(base), size, entry.path, order, seen)
    msgs = sorted(found.values(), key=lambda m: m.order)
    uids: set[str] = set()
    for msg in msgs:
        if msg.uid in uids:
            # Two foreign names sharing the part before ",": fall back to the whole base.
            msg.uid = hashlib.sha1(msg.base.encode("utf-8", "surrogateescape")).hexdigest()
        uids.add(msg.uid)
    return msgs


def locate(maildir: str, base: str) -> str | None:
    """Find the current file of a message that moved (another reader renamed it)."""
    for entry in _entries(maildir):
        if entry.name == base or entry.name.startswith(base + ":"):
            return entry.path
    return None


def _seen_name(name: str) -> str:
    base, sep, info = name.partition(":")
    if not sep:
        return base + ":2,S"
    if info.startswith("2,"):
        flags = info[2:]
        if "S" in flags:
            return name
        return base + ":2," + "".join(sorted(flags + "S"))
    return name  # unknown info semantics: leave alone


def mark_seen(maildir: str, msg: Message) -> str:
    """Move msg to cur/ with the S (seen) flag, as a Maildir reader does after
    reading it; its base name, hence its UIDL, stays.  Returns the new path
    (also stored in msg.path).  A message another reader moved is followed;
    one that vanished raises FileNotFoundError.
    """
    for attempt in range(2):
        name = os.path.basename(msg.path)
        target = os.path.join(maildir, "cur", _seen_name(name))
        if target == msg.path:
            msg.seen = True
            return msg.path
        try:
            os.rename(msg.path, target)
        except FileNotFoundError:
            where = locate(maildir, msg.base)
            if where is None or attempt:
                raise
            msg.path = where
            continue
        msg.path = target
        msg.seen = True
        return target
    raise FileNotFoundError(errno.ENOENT, "message vanished", msg.path)


def open_message(maildir: str, msg: Message):
    """Open msg for reading (binary), following a move by another reader."""
    try:
        return open(msg.path, "rb")
    except FileNotFoundError:
        where = locate(maildir, msg.base)
        if where is None:
            raise
        msg.path = where
        return open(where, "rb")


def read_message(maildir: str, msg: Message, limit: int) -> bytes:
    """Up to limit octets of msg's file (one read: meant for small messages)."""
    try:
        fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        where = locate(maildir, msg.base)
        if where is None:
            raise
        msg.path = where
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # A regular file reads short only at its end: one read is the file.
        return os.read(fd, limit)
    finally:
        os.close(fd)


def delete(maildir: str, msgs: list[Message]) -> int:
    """Remove msgs (blocking); fsync the directories; return how many failed.

    A message that is already gone counts as deleted.
    """
    failed = 0
    for msg in msgs:
        try:
            os.unlink(msg.path)
        except FileNotFoundError:
            where = locate(maildir, msg.base)
            if where is not None:
                try:
                    os.unlink(where)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed += 1
        except OSError:
            failed += 1
    if msgs:
        for sub in ("cur", "new"):
            try:
                fsync_dir(os.path.join(maildir, sub))
            except OSError:
                pass
    return failed


def open_mailbox(root: str, domain: str, local: str) -> tuple[str, MailboxLock, list[Message]]:
    """Create the Maildir if needed, lock it and list it (blocking).

    Raises MailboxLocked, AddressError for unsafe names, OSError (LockRefused
    for a planted symbolic link).
    """
    maildir = mailbox_path(root, domain, local)
    ensure_maildir(maildir)
    check_real_dirs(maildir)
    lock = MailboxLock(maildir)
    lock.acquire()
    try:
        msgs = scan(maildir)
    except BaseException:
        lock.release()
        raise
    return maildir, lock, msgs


__all__ = ["LOCK_NAME", "MailboxLock", "MailboxLocked", "check_real_dirs"]  # (their home: relay.mailbox.mboxlock)
