"""The pickup: messages from relay-sendmail's drop directory into the queue.

relay-sendmail writes ``<spool>/drop/<queue id>`` atomically (a dot-named
temp file, fsync, rename, directory fsync: relay.common.fileio; relay/intake/dropfile.py has the
format).  The pickup turns each into a normal queue entry through the
spool's own durable path (incoming/, fsync, rename into queue/, directory
fsync), and only then removes the drop file; a crash in between leaves both,
and since the queue entry keeps the drop file's name as its queue id, the
start-up pass (``reconcile``, run before the queue is loaded) sees it is
already queued and removes the drop file: nothing is lost or sent twice.

Who submitted it: the file's owner (fstat of the open file, then the
password database), which a local user cannot forge; when: the file's
ctime (its rename into drop/), which its owner cannot set back.  The uid,
user and time written in the envelope line are never used (in a drop
directory opened to a group, every member writes that line).

Anything that is not a well-formed drop file (garbage, a symlink, a
hard link, a file the relay cannot read, a bare CR or LF, a line over 998
octets, a message over smtp.max_message_size, a bad address) is moved to
``quarantine/drop-<name>`` with the reason logged: never lost, never
guessed at.  When it runs: at start, on every inotify event in drop/ (at
once), and by a periodic scan (a safety net, and the only trigger where
inotify does not exist).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from relay.common import fileio
from relay.common.address import AddressError, parse_mailbox
from relay.common.dsn import DsnRequest
from relay.config import Config
from relay.intake.accept import Intake, Source
from relay.intake.dropfile import MAX_HOPS, MAX_LINE, parse_drop_line
from relay.intake.rewrite import HeaderStage, log_rewrites, sender_map
from relay.queue import spool as spoolmod
from relay.queue.diskio import DiskPool

inotify: ModuleType | None
try:  # imported now, not at start: after twistd -u/-g the Python tree may not be readable
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None

log = Logger(namespace="relay.pickup")
SOURCE = Source(log, "{queue_id}: handing the message to the queue failed", state_file=True)
LogFn = Callable[..., None]

SCAN_INTERVAL = 10.0  # seconds between safety scans when inotify watches drop/
POLL_INTERVAL = 1.0  # seconds between scans without inotify
STALE_TMP = 24 * 3600.0  # a temp file untouched this long: its writer died
RETRY_AFTER = 60.0  # seconds before a file that failed for a passing reason is tried again
CHUNK = 256 * 1024
MAX_ENVELOPE_LINE = 1 << 20


class Quarantined(Exception):
    """The file is not a well-formed drop file; the reason says why."""


def drop_dsn(drop: "DropFile") -> DsnRequest | None:
    """The DSN request of a drop file (-N applies to every recipient); the
    pickup is a trusted source: not limited."""
    d = drop.dsn
    if not d:
        return None
    n = len(drop.recipients)
    return DsnRequest(d.get("ret", ""), d.get("envid", ""), [d.get("notify")] * n, [None] * n)


@dataclass
class DropFile:
    """A drop file opened and its envelope read (the fd stays open)."""

    name: str
    fd: int
    offset: int  # where the message starts
    size: int  # message octets
    sender: str
    recipients: list[str]
    arrival: float
    uid: int
    user: str
    dsn: dict[str, str] | None = None  # relay-sendmail's -N, -R, -V (relay.intake.dropfile)


# ---------------------------------------------------------------------------
# blocking work (run in the disk pool, or before the reactor runs)


def reconcile(spool: spoolmod.Spool, log_fn: LogFn | None = None) -> int:
    """Remove drop files already queued under their id (a crash after the
    queue commit, before the drop file's removal).  Run it before the queue
    is loaded: afterwards the queued copy may already be delivered and gone."""
    try:
        names = os.listdir(spool.drop_dir)
    except FileNotFoundError:
        return 0
    done = 0
    for name in names:
        if spoolmod.is_queue_id(name) and os.path.exists(spool.message_path(name)):
            fileio.unlink_quiet(os.path.join(spool.drop_dir, name))
            done += 1
            if log_fn:
                log_fn("{queue_id}: drop file removed: it was already queued", queue_id=name)
    if done:
        fileio.fsync_dir(spool.drop_dir)
    return done


def ready_names(spool: spoolmod.Spool, now: float, log_fn: LogFn | None = None) -> list[str]:
    """Drop files to pick up, oldest first; stale temp files go to quarantine."""
    out: list[str] = []
    try:
        names = os.listdir(spool.drop_dir)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if name.startswith("."):
            try:
                st = os.lstat(os.path.join(spool.drop_dir, name))
            except FileNotFoundError:
                continue
            if now - st.st_mtime > STALE_TMP:
                quarantine(spool, name, "incomplete: relay-sendmail never finished writing it", log_fn)
            continue
        out.append(name)
    return out





def _shown(name: str) -> str:
    """A file name in drop/ as logged: anyone who may write there chooses it
    (a newline, "reject: RCPT from ..."); it is cut short here, and the log
    formatter escapes it as a name (relay.common.logsafe: the ``name`` and ``dest``
    fields), so it stays one field on one line."""
    return name if len(name) <= 80 else name[:80] + "..."


def _qid(name: str) -> str | None:
    """The queue id a drop file name stands for (the log's grep key), if any."""
    stem = name.lstrip(".")[:16]
    return stem if spoolmod.is_queue_id(stem) else None


def quarantine(spool: spoolmod.Spool, name: str, reason: str, log_fn: LogFn | None = None) -> bool:
    src = os.path.join(spool.drop_dir, name)
    dst = os.path.join(spool.quarantine_dir, "drop-" + name.lstrip("."))
    if os.path.lexists(dst):
        dst = f"{dst}.{secrets.token_hex(3)}"
    try:
        os.rename(src, dst)
        fileio.fsync_dir(spool.drop_dir)
    except FileNotFoundError:
        return True
    except OSError as e:
        if log_fn:
            log_fn("drop/{name}: cannot move to quarantine ({error}); left in place: {reason}",
                   name=_shown(name), error=e.strerror, reason=reason, queue_id=_qid(name))
        return False
    if log_fn:
        log_fn("drop/{name}: moved to quarantine as {dest}: {reason}", name=_shown(name),
               dest=_shown(os.path.basename(dst)), reason=reason, queue_id=_qid(name))
    return True


def _owner(st_uid: int) -> tuple[int, str]:
    """Who submitted the file: its owner (fstat of the open file), named by
    the password database.  The uid and user name written in the file are
    never used: in a drop directory opened to a group, any member writes
    that line (``"user": "root"``)."""
    try:
        return st_uid, pwd.getpwuid(st_uid).pw_name
    except KeyError:
        return st_uid, ""


def _arrival(st: os.stat_result, now: float) -> float:
    """When the message was queued: the drop file's ctime (set by the
    kernel when relay-sendmail renamed it into drop/, and never settable
    backwards by its owner), bounded by now; never the time written in the
    file, which its writer chooses."""
    return st.st_ctime if 0 < st.st_ctime <= now else now


def _address(text: str, what: str) -> str:
    try:
        return str(parse_mailbox(text, utf8=True))  # a local source: UTF-8 addresses too (SMTPUTF8)
    except AddressError as e:
        raise Quarantined(f"bad {what} address {text!r}: {e}")


def open_drop_file(spool: spoolmod.Spool, name: str, max_size: int) -> DropFile | None:
    """Open and check one drop file; None if it is gone; Quarantined if bad."""
    if not spoolmod.is_queue_id(name):
        raise Quarantined("unexpected file name in drop/ (relay-sendmail names files by queue id)")
    path = os.path.join(spool.drop_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Quarantined("a symbolic link, not a file")
        if e.errno in (errno.EACCES, errno.EPERM):
            try:
                st = os.lstat(path)
                raise Quarantined(f"not readable by the relay (uid {os.geteuid()}): mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}")
            except FileNotFoundError:
                return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Quarantined("not a regular file")
        if st.st_nlink != 1:
            raise Quarantined(f"has {st.st_nlink} hard links (a drop file has one)")
        head = os.pread(fd, MAX_ENVELOPE_LINE, 0)
        nl = head.find(b"\n")
        if nl < 0:
            raise Quarantined("no envelope line")
        try:
            env = parse_drop_line(head[: nl + 1])
        except ValueError as e:
            raise Quarantined(str(e))
        offset = nl + 1
        size = st.st_size - offset
        if size > max_size:
            raise Quarantined(f"message of {size} octets is over smtp.max_message_size ({max_size})")
        sender = _address(env["from"], "sender") if env["from"] else ""
        rcpts = [_address(r, "recipient") for r in env["rcpt"]]
        uid, user = _owner(st.st_uid)
        arrival = _arrival(st, time.time())
        return DropFile(name, fd, offset, size, sender, rcpts, arrival, uid, user, env.get("dsn") or None)
    except BaseException:
        os.close(fd)
        raise


class _LineCheck:
    """Streams the message through: only CRLF ends a line, lines of at most
    998 octets (what the SMTP server enforces on DATA, so that the outbound
    client never sends what an inbound client could not)."""

    def __init__(self) -> None:
        self.cr = False  # the previous chunk ended with CR
        self.linelen = 0  # octets of the current line so far
        self.in_header = True  # until the first empty line
        self.start = b""  # the first octets of the current line (to spot "Received:")
        self.hops = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self.cr:
            if not data.startswith(b"\n"):
                raise Quarantined("bare CR in the message (only CRLF may end a line)")
            self.cr = False
            self._end_of_line()
            self.linelen = 0
            data = data[1:]
        parts = data.split(b"\n")
        for line in parts[:-1]:
            if not line.endswith(b"\r"):
                raise Quarantined("bare LF in the message (only CRLF may end a line)")
            self._text(line[:-1])
            self._end_of_line()
            self.linelen = 0
        last = parts[-1]
        if last.endswith(b"\r"):
            self.cr = True
            last = last[:-1]
        self._text(last)

    def _end_of_line(self) -> None:
        if self.in_header:
            if self.linelen == 0:
                self.in_header = False
            elif self.start[:9].lower() == b"received:":
                self.hops += 1
                if self.hops > MAX_HOPS:
                    raise Quarantined(f"too many hops: more than {MAX_HOPS} Received headers (a mail loop?)")
        self.start = b""

    def _text(self, text: bytes) -> None:
        if b"\r" in text:
            raise Quarantined("bare CR in the message (only CRLF may end a line)")
        if self.in_header and len(self.start) < 9:
            self.start += text[: 9 - len(self.start)]
        self.linelen += len(text)
        if self.linelen > MAX_LINE:
            raise Quarantined(f"a line longer than {MAX_LINE} octets")

    def finish(self) -> bytes:
        """What must be appended so that the message ends with CRLF."""
        if self.cr:
            raise Quarantined("bare CR at the end of the message")
        return b"" if self.linelen == 0 else b"\r\n"


def copy_drop(spool: spoolmod.Spool, drop: DropFile, envelope: spoolmod.Envelope,
              hostname: str, stage: HeaderStage | None = None) -> spoolmod.IncomingMessage:
    """Copy the drop file into a new message in incoming/ (checked on the
    way; its header block through ``stage``, the sender rewriting, if any),
    not yet committed: relay.intake.accept makes it durable."""
    try:
        if os.path.exists(spool.message_path(drop.name)):
            # queued by an earlier pass that could not remove the drop file
            remove_drop(spool, drop.name)
            raise FileExistsError(drop.name)
        inc = spool.incoming(envelope)

        def put(data: bytes) -> None:
            inc.write(stage.feed(data) if stage is not None else data)

        try:
            date = email.utils.format_datetime(email.utils.localtime())
            who = f"{_safe(drop.user) or 'unknown'} (uid {drop.uid})"
            inc.write(f"Received: by {hostname} (twisted-relay, from userid {who})\r\n"
                      f"\tid {drop.name}; {date}\r\n".encode("ascii", "replace"))
            check = _LineCheck()
            pos = drop.offset
            while True:
                chunk = os.pread(drop.fd, CHUNK, pos)
                if not chunk:
                    break
                pos += len(chunk)
                check.feed(chunk)
                put(chunk)
            put(check.finish())
            if stage is not None:
                inc.write(stage.finish())
        except BaseException:
            inc.abort()
            raise
        return inc
    finally:
        os.close(drop.fd)


def remove_drop(spool: spoolmod.Spool, name: str) -> None:
    """The drop file's message is durably queued: only now may the drop file go."""
    fileio.unlink_quiet(os.path.join(spool.drop_dir, name))
    fileio.fsync_dir(spool.drop_dir)


def drop_client(drop: DropFile) -> dict[str, Any]:
    """The envelope's client field of a message from relay-sendmail."""
    return {"proto": "sendmail", "uid": drop.uid, **({"user": drop.user} if drop.user else {})}


def _safe(text: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "()\\;" else "?" for c in text)[:64]


# ---------------------------------------------------------------------------
# the service


class Pickup(service.Service):
    """Watches the drop directory and queues what arrives, through the intake."""

    name = "pickup"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, *, reactor: Any, spool: spoolmod.Spool, disk: DiskPool, intake: Intake, config: Config,
                 scan_interval: float | None = None):
        # reactor: IReactorTime, IReactorThreads and IReactorFDSet (inotify), zope
        # interfaces that mypy cannot read as one type
        self.reactor = reactor
        self.spool = spool
        self.disk = disk
        self.intake = intake
        self.config = config
        self.received = 0
        self.quarantined = 0
        self._scan_interval = scan_interval
        self._busy: defer.Deferred[None] | None = None
        self._again = False
        self._retry_at: dict[str, float] = {}
        self._notifier: Any = None  # twisted.internet.inotify.INotify while watching
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = reactor

    def reconfigure(self, config: Config) -> None:
        """A reload: smtp.max_message_size and hostname apply to the next file."""
        self.config = config

    # -- life cycle ------------------------------------------------------------
    def startService(self) -> None:
        """Runs before the queue is loaded (RelayService starts its children
        first): the reconcile pass must see the queue as it was on disk."""
        super().startService()
        try:
            reconcile(self.spool, lambda fmt, **kw: log.info(fmt, **kw))
        except OSError as e:
            log.error("pickup: cannot check {drop}: {error}", drop=self.spool.drop_dir, error=str(e))
        watching = self._watch()
        interval = self._scan_interval or (SCAN_INTERVAL if watching else POLL_INTERVAL)
        self._describe(watching, interval)
        self._loop.start(interval, now=True)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._notifier is not None:
            try:
                self._notifier.loseConnection()
            except Exception:  # noqa: BLE001 - already closed
                pass
            self._notifier = None
        if self._busy is not None:
            d: defer.Deferred[None] = defer.Deferred()

            def stopped(result: object) -> object:
                d.callback(None)
                return result

            self._busy.addBoth(stopped)
            return d
        return None

    def _watch(self) -> bool:
        if inotify is None:
            return False
        try:
            notifier = inotify.INotify(reactor=self.reactor)
            notifier.startReading()
            notifier.watch(FilePath(self.spool.drop_dir), mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
                           callbacks=[self._notified])
        except Exception as e:  # noqa: BLE001 - no inotify here: the periodic scan does it all
            log.info("pickup: inotify not available ({error}); scanning drop/ every {interval}s",
                     error=str(e), interval=POLL_INTERVAL)
            return False
        self._notifier = notifier
        return True

    def _describe(self, watching: bool, interval: float) -> None:
        try:
            st = os.stat(self.spool.drop_dir)
        except OSError:
            return
        mode = stat.S_IMODE(st.st_mode)
        who = ("only root and uid {uid}".format(uid=st.st_uid) if not mode & 0o022 else
               "members of group {gid}, root and uid {uid}".format(gid=st.st_gid, uid=st.st_uid)
               if mode & 0o020 and not mode & 0o002 else "every local user")
        log.info("pickup: {drop} (mode {mode:04o}: {who} may queue mail offline with relay-sendmail); "
                 "{how}", drop=self.spool.drop_dir, mode=mode, who=who,
                 how="watched with inotify" if watching else f"scanned every {interval:g}s")

    def _notified(self, _ignored: object, filepath: FilePath[Any], mask: int) -> None:
        name = filepath.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not name.startswith("."):
            self.kick()

    # -- work --------------------------------------------------------------------------
    def kick(self) -> None:
        """Scan the drop directory now (or again right after the scan in progress)."""
        if not self.running:
            return
        if self._busy is not None:
            self._again = True
            return
        d: defer.Deferred[None] = defer.ensureDeferred(self._scan())
        self._busy = d

        def done(result: object) -> object:
            self._busy = None
            return result

        d.addErrback(lambda f: log.failure("pickup: scanning the drop directory failed", f))
        d.addBoth(done)

    async def _scan(self) -> None:
        while True:
            self._again = False
            names = await self.disk.run(ready_names, self.spool, time.time(), self._log_fn())
            now = self.reactor.seconds()
            for name in names:
                if not self.running:
                    return
                if self._retry_at.get(name, 0.0) > now:
                    continue
                await self._one(name)
            if not self._again or not self.running:
                return

    def _log_fn(self) -> LogFn:
        def fn(fmt: str, **kw: object) -> None:
            self.reactor.callFromThread(lambda: log.info(fmt, **kw))

        return fn

    async def _one(self, name: str) -> None:
        cfg = self.config
        try:
            drop = await self.disk.run(open_drop_file, self.spool, name, cfg.smtp.max_message_size)
        except Quarantined as e:
            await self._quarantine(name, str(e))
            return
        except OSError as e:
            self._later(name, f"cannot open it: {e.strerror or e}")
            return
        if drop is None:
            return
        rw = cfg.rewrite  # relay-sendmail is a trusted source: its senders are rewritten
        full = sender_map(rw.senders, rw.masquerade)
        smap = None if full.empty else full
        try:
            env = self.intake.envelope(drop.sender, drop.recipients, drop_client(drop), queue_id=drop.name,
                                       arrival=drop.arrival, rewrite=smap, dsn=drop_dsn(drop))
        except Exception as e:  # noqa: BLE001 - close the file; try again later
            os.close(drop.fd)
            self._later(name, f"alias expansion failed: {e}")
            return
        try:
            stage = HeaderStage(smap) if smap is not None else None
            inc = await self.disk.run(copy_drop, self.spool, drop, env, cfg.hostname, stage)
            if stage is not None:
                log_rewrites(log, name, stage)
            await self.intake.accept(inc, SOURCE, announce=partial(self._queued, drop),
                                     settle=partial(remove_drop, self.spool, name), trusted=True)
        except FileExistsError:
            log.info("{queue_id}: drop file removed: it was already queued", queue_id=name)
        except Quarantined as e:
            await self._quarantine(name, str(e))
        except OSError as e:
            self._later(name, f"cannot queue it: {e.strerror or e}")

    def _queued(self, drop: DropFile, entry: spoolmod.QueueEntry) -> None:
        """The message is durably queued and its drop file gone."""
        self._retry_at.pop(drop.name, None)
        self.received += 1
        env = entry.envelope
        log.info(
            "{queue_id}: client=local, uid={uid}{_user}, from=<{sender}>, size={size}, nrcpt={nrcpt} "
            "(queued by relay-sendmail)",
            queue_id=env.queue_id, client="local", uid=drop.uid, user=drop.user or None,
            _user=f" ({drop.user})" if drop.user else "", sender=env.sender, size=entry.size,
            nrcpt=len(env.recipients), recipients=env.recipients, source="sendmail",
        )

    async def _quarantine(self, name: str, reason: str) -> None:
        moved = await self.disk.run(quarantine, self.spool, name, reason)
        if moved:
            self.quarantined += 1
            self._retry_at.pop(name, None)
            log.error("drop/{name}: moved to quarantine: {reason}", name=_shown(name), reason=reason,
                      queue_id=_qid(name))
        else:
            self._later(name, f"cannot move it to quarantine ({reason})")

    def _later(self, name: str, why: str) -> None:
        self._retry_at[name] = self.reactor.seconds() + RETRY_AFTER
        log.warn("drop/{name}: not picked up, trying again in {secs:g}s: {why}", name=_shown(name),
                 secs=RETRY_AFTER, why=why, queue_id=_qid(name))
