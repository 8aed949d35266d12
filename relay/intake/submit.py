"""Where a relay-sendmail message goes: the relay's drop directory, or SMTP
to the relay's own listener (relay.intake.sendmail says when which).

The drop directory (``<spool>/drop``), when this user may write to it: a
temporary name, fsync, rename to the queue id, directory fsync, every step
relative to an fd on the real directory (``DropSink``, ``drop_dir_fd``);
before the relay's first start, the spool's layout made as its owner
(``prepare_spool``).  Otherwise SMTP to a plain TCP listener on loopback
(``submit_smtp``): the relay answers 250 only once the message is on disk.
"""

from __future__ import annotations

import errno
import os
import pwd
import smtplib
from dataclasses import dataclass

from relay.common import dotstuff, endpoints, fileio, privdrop, xtext
from relay.config import Config
from relay.intake.dropfile import DROP_MODE
from relay.intake.sysexits import EX_TEMPFAIL, EX_UNAVAILABLE, Fatal
from relay.queue.spool import Spool

SMTP_TIMEOUT = 60.0


@dataclass
class Identity:
    uid: int
    user: str
    gecos: str


def identity() -> Identity:
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Identity(uid, "", "")
    return Identity(uid, pw.pw_name, (pw.pw_gecos or "").split(",")[0].strip())


class DropSink:
    """A file in <spool>/drop: temp name, fsync, rename, directory fsync.

    Every step is relative to ``dir_fd``, an fd on the drop directory
    reached without following a link below the spool (``drop_dir_fd``):
    relay-sendmail run by root never creates, renames or chowns a file
    anywhere else, whatever the spool's owner put at those names."""

    def __init__(self, drop_dir: str, dir_fd: int, qid: str):
        self.dir = drop_dir
        self.dir_fd = dir_fd
        self.qid = qid
        self.tmp = fileio.temp_name(qid)
        self.final = os.path.join(drop_dir, qid)
        # chmod: whatever the umask, the relay must be able to read it
        self.file = fileio.DurableFile(self.tmp, mode=DROP_MODE, chmod=True, dir_fd=dir_fd,
                                       buffering=256 * 1024, setup=self._group)

    def _group(self, fd: int) -> None:
        dir_gid = os.fstat(self.dir_fd).st_gid
        if os.fstat(fd).st_gid != dir_gid:
            try:
                os.fchown(fd, -1, dir_gid)  # root, or a member of the directory's group
            except PermissionError:
                pass

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> str:
        """fsync, rename, fsync the directory.  A submitter in a group-opened
        drop directory (mode 3730) may write but not read it, so it cannot
        open the directory to fsync it: syncfs() on the file's filesystem
        does it then (the whole filesystem, but only on this path, for local
        submissions)."""
        try:
            self.file.commit(self.qid, close_first=False)
        finally:
            self._close_dir()
        return self.qid

    def abort(self) -> None:
        self.file.abort()
        self._close_dir()

    def _close_dir(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


class NoDrop(Exception):
    """This user cannot queue through drop/; the text says why."""


def drop_dir_fd(root: str) -> int:
    """An O_PATH fd on ``<root>/drop``: the spool root as configured (the
    administrator's path, maybe a link), then ``drop`` without following a
    link.  As root, the directory must belong to root or to the user who
    controls the spool (relay.common.privdrop.controller): nobody else's."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    rfd = os.open(root, flags)
    try:
        fd = os.open("drop", flags | os.O_NOFOLLOW, dir_fd=rfd)
    finally:
        os.close(rfd)
    if os.geteuid() == 0:
        try:
            owner = privdrop.controller(root)[0]
            uid = os.fstat(fd).st_uid
            if uid not in (0, owner):
                raise NoDrop(f"{root}/drop belongs to uid {uid}, not to the spool's owner (uid {owner}): "
                             "not writing to it as root")
        except privdrop.UnsafePath as e:
            os.close(fd)
            raise NoDrop(str(e))
        except BaseException:
            os.close(fd)
            raise
    return fd


def prepare_spool(cfg: Config, me: Identity) -> None:
    """Before the relay's first start there is no spool: make its layout
    (relay.queue.spool.Spool.create: the relay's own modes, fsynced) when this is
    root or the user the relay would make it as (the owner of the spool, or
    of the directory it goes in).  As root, it is made as that user, so it
    is theirs.  NoDrop: anyone else, saying so."""
    sp = Spool(cfg.spool)
    try:
        os.stat(sp.drop_dir)
        return
    except FileNotFoundError:
        pass
    except OSError:
        return  # not ours to look into: the open says why
    if os.path.lexists(sp.drop_dir):
        return  # a dangling link: the open refuses it
    parent = os.path.dirname(sp.root)
    if not os.path.isdir(parent):
        raise NoDrop(f"the spool {sp.root} does not exist, nor does {parent} (the relay makes only the spool "
                     "itself)")
    try:
        uid, gid = privdrop.controller(sp.root)
    except privdrop.UnsafePath as e:
        raise NoDrop(str(e))
    where = f"the spool {sp.root}" if not os.path.lexists(sp.root) else f"the spool's drop directory {sp.drop_dir}"
    if os.geteuid() != 0 and os.geteuid() != uid:
        raise NoDrop(f"{where} does not exist yet: start the relay once, or run relay-sendmail as root "
                     "or as the relay's user")
    try:
        with privdrop.as_user(uid, gid):
            sp.create()
    except OSError as e:
        raise NoDrop(f"{where} does not exist yet and cannot be made as uid {uid}: {e.strerror or e}")


def open_drop(cfg: Config, qid: str, me: Identity) -> DropSink:
    """The drop sink; NoDrop when this user may not write to drop/."""
    prepare_spool(cfg, me)
    drop = Spool(cfg.spool).drop_dir
    try:
        fd = drop_dir_fd(Spool(cfg.spool).root)
    except (PermissionError, FileNotFoundError):
        raise NoDrop(f"uid {me.uid} ({me.user or '?'}) may not write to {drop}")
    except OSError as e:
        # O_PATH|O_NOFOLLOW opens a link itself, which O_DIRECTORY refuses: ENOTDIR
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(drop):
            raise NoDrop(f"{drop} is a symbolic link: not following it")
        if e.errno == errno.ENOTDIR:
            raise NoDrop(f"{drop} is not a directory")
        raise Fatal(EX_TEMPFAIL, f"cannot open {drop}: {e.strerror or e}")
    try:
        return DropSink(drop, fd, qid)
    except (PermissionError, FileNotFoundError, OSError) as e:
        os.close(fd)
        if isinstance(e, (PermissionError, FileNotFoundError)) or e.errno in (errno.EROFS, errno.EACCES,
                                                                               errno.EPERM):
            raise NoDrop(f"uid {me.uid} ({me.user or '?'}) may not write to {drop}")
        raise Fatal(EX_TEMPFAIL, f"cannot write to {drop}: {e.strerror or e}")


def smtp_targets(cfg: Config) -> list[tuple[str, int]]:
    """Loopback addresses of the relay's plain SMTP listeners."""
    out = []
    for desc in cfg.smtp.listen:
        try:
            spec = endpoints.parse(desc)
        except ValueError:
            continue
        if spec.kind not in ("tcp", "tcp6") or spec.port is None:
            continue
        iface = spec.interface
        if iface in ("", "0.0.0.0"):
            iface = "127.0.0.1" if spec.kind == "tcp" else "::1"
        elif iface == "::":
            iface = "::1"
        out.append((iface, spec.port))
    return out


def submit_smtp(cfg: Config, path: str, size: int, sender: str, recipients: list[str], eight_bit: bool,
                targets: list[tuple[str, int]], dsn: dict[str, str] | None = None) -> str | None:
    """Submit over SMTP; None when no listener answers (the relay is down).
    ``dsn``: relay-sendmail's -N, -R, -V (notify, ret, envid) as DSN parameters."""
    errors = []
    for host, port in targets:
        try:
            s = smtplib.SMTP(host, port, local_hostname="localhost", timeout=SMTP_TIMEOUT)
        except (OSError, smtplib.SMTPException) as e:
            errors.append(f"{host}:{port}: {e}")
            continue
        try:
            return _smtp_transaction(s, path, size, sender, recipients, eight_bit, dsn or {})
        finally:
            try:
                s.quit()
            except (OSError, smtplib.SMTPException):
                s.close()
    return None


def _smtp_transaction(s, path: str, size: int, sender: str, recipients: list[str], eight_bit: bool,
                      dsn: dict[str, str]) -> str:
    def fail(code: int, text: bytes | str, what: str):
        msg = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        raise Fatal(EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE,
                    f"the relay refused {what}: {code} {msg}")

    try:
        code, text = s.ehlo()
        if code != 250:
            code, text = s.helo()
            if code != 250:
                fail(code, text, "HELO")
        opts = []
        if s.does_esmtp:
            if s.has_extn("size"):
                opts.append(f"SIZE={size}")
            if eight_bit and s.has_extn("8bitmime"):
                opts.append("BODY=8BITMIME")
            if not all(a.isascii() for a in [sender, *recipients]) and s.has_extn("smtputf8"):
                opts.append("SMTPUTF8")  # smtplib then sends the commands in UTF-8
        dsn_ok = s.does_esmtp and s.has_extn("dsn")
        if dsn_ok:
            opts += [f"RET={dsn['ret']}"] if "ret" in dsn else []
            opts += [f"ENVID={xtext.encode(dsn['envid'])}"] if "envid" in dsn else []
        code, text = s.mail(sender, opts)
        if code != 250:
            fail(code, text, f"the sender <{sender}>")
        for r in recipients:
            code, text = s.rcpt(r, [f"NOTIFY={dsn['notify']}"] if dsn_ok and "notify" in dsn else [])
            if code not in (250, 251):
                s.rset()
                fail(code, text, f"the recipient <{r}> (nothing was queued)")
        s.putcmd("data")
        code, text = s.getreply()
        if code != 354:
            fail(code, text, "DATA")
        stuffer = dotstuff.Stuffer()
        with open(path, "rb") as f:
            while chunk := f.read(65536):
                s.sock.sendall(stuffer.feed(chunk))
        s.sock.sendall(stuffer.end())
        code, text = s.getreply()
        if code != 250:
            fail(code, text, "the message")
        reply = text.decode("utf-8", "replace")
        return reply.rsplit(" ", 1)[-1] if "queued as" in reply else reply
    except (OSError, smtplib.SMTPException) as e:
        raise Fatal(EX_TEMPFAIL, f"SMTP submission to the relay failed: {e}; the message may not be queued")
