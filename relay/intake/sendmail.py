"""relay-sendmail: the sendmail command line for local programs.

cron, PHP's mail(), git send-email, monitoring tools and mail(1) pipe a
message into ``sendmail [options] [recipients]``.  This accepts the calling
conventions they use (Postfix's sendmail(1) is the reference: the same
options are honoured, ignored or refused) and queues the message:

1. **The drop directory** (``<spool>/drop``) when this user may write to it:
   the message is written to a temporary name, fsynced, renamed to its
   queue id and the directory fsynced, so it is queued durably whether or
   not the relay runs; the relay picks it up at start and, while running,
   at once (inotify; relay/intake/pickup.py).  The relay learns who submitted it
   from the file's owner, which a user cannot forge, and when from the
   file's ctime.  Every step is relative to an fd on the real drop
   directory, reached without following a link below the spool: root never
   writes anywhere the spool's owner could point it to.  Before the relay's
   first start there is no spool: root (as the spool's owner) or the user
   the relay would make it as makes the relay's own layout first.
2. **SMTP to the relay's own listener on loopback** otherwise (the spool is
   0700, so by default only the relay's user and root may write to drop/):
   the relay answers 250 only once the message is on disk.  The user name
   in the Received header is then only a claim of this program.
3. Neither (the relay is down and drop/ is not writable): nothing is
   queued, exit 75 (EX_TEMPFAIL) with a message saying so and why drop/
   could not be used (no permission, no spool yet, a link).

Input: LF or CRLF line endings (stored as CRLF); a bare CR is refused; a
line with only "." ends the message unless -i/-oi; lines over 998 octets are
folded (headers, at white space when there is some) or broken (body), as
Postfix does.  Date, Message-ID and From are added when missing, Bcc
removed.  Exit codes are sendmail's (sysexits.h).
"""

from __future__ import annotations

import email.utils
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import BinaryIO

# at import: a submitter run as another user may not read the tree later
from relay.common import dotstuff, fileio, privdrop
from relay.intake.dropfile import DROP_MAGIC, DROP_MODE, MAX_HOPS, MAX_LINE, drop_line, parse_drop_line  # noqa: F401

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

PROG = "relay-sendmail"
SYSTEM_CONFIG = "/etc/relay/relay.toml"

MAX_HEADER_SECTION = 1 << 20
SMTP_TIMEOUT = 60.0

# Postfix's sendmail getopt string "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"
_WITH_ARG = set("ABCFLNORVXbefhopqr")
_FLAGS = set("GIUcimntvx")
_HEADER = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")


class Fatal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------
# options


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    dot_ends: bool = True  # cleared by -i / -oi
    config: str | None = None  # -C
    body: str | None = None  # -B 7BIT | 8BITMIME
    verbose: int = 0
    exit_now: str | None = None  # -bi / -I / -q<interval>: nothing to do


def parse_args(argv: list[str]) -> Options:
    """Sendmail's command line, parsed as Postfix does (options end at the
    first argument that is not one, or at "--")."""
    o = Options()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        if a == "-q":
            raise Fatal(EX_USAGE, "-q (run the queue) is not supported: the relay retries on its own "
                                  "schedule; use relayctl to act on the queue")
        if a == "-V":  # VERP (Postfix): not supported, harmless to ignore
            i += 1
            continue
        j = 1
        while j < len(a):
            c = a[j]
            if c in _WITH_ARG:
                value = a[j + 1:]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise Fatal(EX_USAGE, f"option -{c} requires an argument")
                    value = argv[i]
                _option(o, c, value)
                break
            if c in _FLAGS:
                _option(o, c, None)
                j += 1
                continue
            raise Fatal(EX_USAGE, f"unknown option -{c} (usage: {PROG} [-t] [-i] [-f sender] [-F name] "
                                  "[recipient ...] < message)")
        i += 1
    o.recipients = argv[i:]
    return o


def _option(o: Options, c: str, value: str | None) -> None:
    if c == "t":
        o.extract = True
    elif c == "i":
        o.dot_ends = False
    elif c == "v":
        o.verbose += 1
    elif c == "I":
        o.exit_now = "aliases"
    elif c in ("f", "r"):
        o.sender = value
    elif c == "F":
        o.full_name = value
    elif c == "C":
        o.config = value
    elif c == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise Fatal(EX_USAGE, "-B needs 7BIT or 8BITMIME")
        o.body = value.upper()
    elif c == "o":
        if value.startswith("i"):
            o.dot_ends = False
        # -oA, -o7, -o8, -om, -odb, -odi, -oem, -oep, ...: ignored (as Postfix)
    elif c == "b":
        mode = value[:1]
        if mode == "m":
            return
        if mode == "s":
            raise Fatal(EX_USAGE, "-bs (an SMTP conversation on standard input) is not supported: "
                                  "connect to the relay's SMTP listener instead, or pipe the message "
                                  "to relay-sendmail without -bs")
        if mode == "p":
            raise Fatal(EX_USAGE, "-bp (list the queue) is not supported here: use relayctl")
        if mode == "i":
            o.exit_now = "aliases"
            return
        if mode == "d":
            raise Fatal(EX_USAGE, "-bd (daemon mode) is not supported: start the relay with twistd or systemd")
        raise Fatal(EX_USAGE, f"-b{value} is not supported (only -bm, the default)")
    elif c == "q":
        if value[:1].isdigit():
            o.exit_now = "queue interval"  # -q1h: a daemon's run interval; nothing to do (as Postfix)
            return
        raise Fatal(EX_USAGE, f"-q{value} is not supported: use relayctl to act on the queue")
    # A, G, L, N, O, R, U, V, X, c, e, h, m, n, p, x: accepted and ignored (as Postfix)


# ---------------------------------------------------------------------------
# who, where


@dataclass
class Identity:
    uid: int
    user: str
    gecos: str


def identity() -> Identity:
    import pwd

    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Identity(uid, "", "")
    return Identity(uid, pw.pw_name, (pw.pw_gecos or "").split(",")[0].strip())


def load_config(explicit: str | None):
    """-C FILE, else $RELAY_CONFIG, else /etc/relay/relay.toml, else ./relay.toml.

    Unlike the relay, never the built-in defaults: a cron job's working
    directory must not decide where its mail goes."""
    from relay import config as configmod
    path = explicit or os.environ.get("RELAY_CONFIG") or None
    if path is None:
        for candidate in (SYSTEM_CONFIG, "relay.toml"):
            if os.path.exists(candidate):
                path = os.path.abspath(candidate)
                break
    if path is None:
        raise Fatal(EX_CONFIG, f"no relay config found: give -C FILE, set RELAY_CONFIG, or install {SYSTEM_CONFIG}")
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        raise Fatal(EX_CONFIG, "bad relay config:\n" + "\n".join(e.problems))


def origin(cfg) -> str:
    """The domain of unqualified addresses ("root" from cron): the first
    local domain, else the relay's hostname (Postfix: $myorigin)."""
    return cfg.local.domains[0] if cfg.local.domains else cfg.hostname


def _mailbox(addr: str, cfg, what: str, status: int) -> str:
    from relay.common.address import AddressError, parse_mailbox

    a = addr.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if "@" not in a:
        a = f"{a}@{origin(cfg)}"
    try:
        return str(parse_mailbox(a))
    except AddressError as e:
        raise Fatal(status, f"bad {what} address {addr!r}: {e}")


def parse_address_list(value: str) -> list[str]:
    """The addr-specs of an address list ("a@b, Name <c@d>, root"), strictly:
    ValueError names the problem (email.utils.getaddresses would turn
    "not an address" into "not")."""
    import email.policy

    try:
        h = email.policy.default.header_factory("To", value)
        addrs = [a.addr_spec for a in h.addresses]
    except Exception as e:  # noqa: BLE001 - the stdlib parser raises more than HeaderParseError
        raise ValueError(f"cannot parse it ({e.__class__.__name__})")
    problems = [str(d) for d in h.defects if str(d) != "addr-spec local part with no domain"]
    if problems:
        raise ValueError("; ".join(dict.fromkeys(problems)))
    return addrs


def addresses(values: list[str], cfg, what: str, status: int) -> list[str]:
    """Each value as an address list (Postfix parses arguments so, too)."""
    out = []
    for v in values:
        try:
            found = parse_address_list(v)
        except ValueError as e:
            raise Fatal(status, f"bad {what} address {v!r}: {e}")
        if not found and not _group_only(v):
            raise Fatal(status, f"bad {what} address {v!r}")
        out.extend(_mailbox(a, cfg, what, status) for a in found)
    return out


def _group_only(v: str) -> bool:
    """A group ("undisclosed-recipients:;") holds no address: not an error."""
    return ":" in v and v.rstrip().endswith(";")


def sender_address(o: Options, cfg, me: Identity) -> str:
    if o.sender is not None:
        s = o.sender.strip()
        if s in ("", "<>"):
            return ""
        try:
            found = parse_address_list(s)
        except ValueError as e:
            raise Fatal(EX_USAGE, f"bad sender address {o.sender!r} (-f): {e}")
        if len(found) != 1:
            raise Fatal(EX_USAGE, f"bad sender address {o.sender!r} (-f)")
        return _mailbox(found[0], cfg, "sender", EX_USAGE)
    if not me.user:
        raise Fatal(EX_OSERR, f"no login name for uid {me.uid}: give the sender with -f")
    return _mailbox(me.user, cfg, "sender", EX_USAGE)


# ---------------------------------------------------------------------------
# reading the message


class Reader:
    """Standard input as logical lines without their line ending.

    Only LF or CRLF end a line; a CR anywhere else is refused (it would be a
    line ending to some and not to others: SMTP smuggling)."""

    def __init__(self, inp: BinaryIO, limit: int):
        self.inp = inp
        self.limit = limit
        self.lineno = 0
        self.total = 0
        self.eof = False

    def line(self) -> bytes | None:
        if self.eof:
            return None
        try:
            raw = self.inp.readline(self.limit + 2)
        except OSError as e:
            raise Fatal(EX_IOERR, f"cannot read the message from standard input: {e.strerror or e}")
        if not raw:
            self.eof = True
            return None
        self.lineno += 1
        self.total += len(raw)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        elif len(raw) >= self.limit + 2:
            raise Fatal(EX_DATAERR, f"message too big: over smtp.max_message_size ({self.limit} octets)")
        else:
            self.eof = True  # a last line without a line ending
        if b"\r" in raw:
            raise Fatal(EX_DATAERR, f"line {self.lineno}: bare CR (a carriage return not followed by a "
                                    "line feed): message refused; end lines with LF or CRLF")
        return raw


@dataclass
class Message:
    headers: list[list[bytes]]  # fields, each its lines (first + continuations)
    first_body: list[bytes]  # body lines read while looking for the end of the headers
    reader: Reader
    blank_missing: bool  # the body started without an empty line
    eight_bit: bool = False


def read_headers(rd: Reader) -> Message:
    headers: list[list[bytes]] = []
    size = 0
    first = True
    while True:
        ln = rd.line()
        if ln is None:
            return Message(headers, [], rd, False)
        if first and (ln.startswith(b"From ") or ln.lstrip(b">").startswith(b"From ")):
            first = False
            continue  # an mbox separator, as Postfix strips it
        first = False
        if ln == b"":
            return Message(headers, [], rd, False)
        if ln[:1] in (b" ", b"\t") and headers:
            headers[-1].append(ln)
        elif _HEADER.match(ln):
            headers.append([ln])
        else:
            # not a header: the body starts here, without its empty line
            return Message(headers, [ln], rd, True)
        size += len(ln) + 2
        if size > MAX_HEADER_SECTION:
            raise Fatal(EX_DATAERR, f"header section longer than {MAX_HEADER_SECTION} octets: message refused")


def field_name(f: list[bytes]) -> str:
    return f[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(f: list[bytes]) -> str:
    raw = b"".join([f[0].split(b":", 1)[1]] + f[1:])
    return raw.decode("utf-8", "replace").strip()


def fold(line: bytes, header: bool) -> list[bytes]:
    """Lines of at most MAX_LINE octets: headers fold before white space
    (lossless), else with an inserted space; body lines are broken."""
    out = []
    while len(line) > MAX_LINE:
        cut = -1
        if header:
            cut = max(line.rfind(b" ", 1, MAX_LINE), line.rfind(b"\t", 1, MAX_LINE))
        if cut > 0:
            out.append(line[:cut])
            line = line[cut:]
        else:
            out.append(line[:MAX_LINE])
            line = (b" " if header else b"") + line[MAX_LINE:]
    out.append(line)
    return out


# ---------------------------------------------------------------------------
# where the message goes


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


def prepare_spool(cfg, me: Identity) -> None:
    """Before the relay's first start there is no spool: make its layout
    (relay.queue.spool.Spool.create: the relay's own modes, fsynced) when this is
    root or the user the relay would make it as (the owner of the spool, or
    of the directory it goes in).  As root, it is made as that user, so it
    is theirs.  NoDrop: anyone else, saying so."""
    from relay.queue.spool import Spool

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


def open_drop(cfg, qid: str, me: Identity) -> DropSink:
    """The drop sink; NoDrop when this user may not write to drop/."""
    import errno

    from relay.queue.spool import Spool

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


def smtp_targets(cfg) -> list[tuple[str, int]]:
    """Loopback addresses of the relay's plain SMTP listeners."""
    from relay.runtime import endpoints
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


def submit_smtp(cfg, path: str, size: int, sender: str, recipients: list[str], eight_bit: bool,
                targets: list[tuple[str, int]]) -> str | None:
    """Submit over SMTP; None when no listener answers (the relay is down)."""
    import smtplib

    errors = []
    for host, port in targets:
        try:
            s = smtplib.SMTP(host, port, local_hostname="localhost", timeout=SMTP_TIMEOUT)
        except (OSError, smtplib.SMTPException) as e:
            errors.append(f"{host}:{port}: {e}")
            continue
        try:
            return _smtp_transaction(s, path, size, sender, recipients, eight_bit)
        finally:
            try:
                s.quit()
            except (OSError, smtplib.SMTPException):
                s.close()
    return None


def _smtp_transaction(s, path: str, size: int, sender: str, recipients: list[str], eight_bit: bool) -> str:
    import smtplib

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
        code, text = s.mail(sender, opts)
        if code != 250:
            fail(code, text, f"the sender <{sender}>")
        for r in recipients:
            code, text = s.rcpt(r)
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


# ---------------------------------------------------------------------------


def build_and_queue(o: Options, inp: BinaryIO, cfg, me: Identity) -> str:
    from relay.queue.spool import new_id

    sender = sender_address(o, cfg, me)
    recipients = addresses(o.recipients, cfg, "recipient", EX_USAGE)
    limit = cfg.smtp.max_message_size
    rd = Reader(inp, limit)
    msg = read_headers(rd)
    headers = msg.headers
    if o.extract:
        names = {field_name(f) for f in headers}
        resent = any(n in ("resent-to", "resent-cc", "resent-bcc") for n in names)
        keys = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        values = [v for f in headers if field_name(f) in keys and (v := field_value(f))]
        recipients += addresses(values, cfg, "recipient (header)", EX_DATAERR)
    hops = sum(1 for f in headers if field_name(f) == "received")
    if hops > MAX_HOPS:
        # as the SMTP server refuses it (554 5.4.6): a message that went
        # round that often is in a loop, and is not sent round again
        raise Fatal(EX_DATAERR, f"too many hops: {hops} Received headers (more than {MAX_HOPS}; "
                                "a mail loop?): message refused")
    seen: set[str] = set()
    recipients = [r for r in recipients if not (r in seen or seen.add(r))]
    if not recipients:
        if o.extract:
            raise Fatal(EX_DATAERR, "no recipients: none in the To, Cc or Bcc headers and none as arguments")
        raise Fatal(EX_USAGE, "no recipients given: name them as arguments, or use -t to read them "
                              "from the To, Cc and Bcc headers")
    if len(recipients) > cfg.smtp.max_recipients:
        raise Fatal(EX_USAGE, f"too many recipients ({len(recipients)}; smtp.max_recipients is "
                              f"{cfg.smtp.max_recipients})")
    headers = [f for f in headers if field_name(f) not in ("bcc", "resent-bcc")]
    names = {field_name(f) for f in headers}
    added: list[bytes] = []
    if "from" not in names:
        name = o.full_name if o.full_name is not None else me.gecos
        addr = sender or _mailbox(me.user or "MAILER-DAEMON", cfg, "sender", EX_USAGE)
        added.append(b"From: " + email.utils.formataddr((name, addr)).encode("ascii", "replace"))
    if "date" not in names:
        added.append(b"Date: " + email.utils.formatdate(localtime=True).encode("ascii"))
    if "message-id" not in names:
        added.append(b"Message-ID: " + f"<{new_id()}.{secrets.token_hex(4)}@{cfg.hostname}>".encode("ascii"))

    qid = new_id()
    try:
        sink = open_drop(cfg, qid, me)
        no_drop = ""
    except NoDrop as e:
        sink = None
        no_drop = str(e)
    via_drop = sink is not None
    tmp = None
    if sink is None:
        targets = smtp_targets(cfg)
        if not targets:
            raise Fatal(EX_TEMPFAIL, _not_queued(no_drop, "the relay has no plain TCP SMTP listener to submit to"))
        tmp = tempfile.NamedTemporaryFile(prefix="relay-sendmail.", delete=False)
        sink = tmp
    try:
        size = 0

        def put(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise Fatal(EX_DATAERR, f"message too big: over smtp.max_message_size ({limit} octets)")
            if not msg.eight_bit and any(b > 127 for b in data):
                msg.eight_bit = True
            sink.write(data)

        if via_drop:
            sink.write(drop_line(sender, recipients, me.uid, me.user, time.time()))
        else:
            date = email.utils.formatdate(localtime=True)
            who = f"{_safe(me.user) or 'unknown'} (uid {me.uid})"
            put(f"Received: by {cfg.hostname} (relay-sendmail, from userid {who});\r\n\t{date}\r\n"
                .encode("ascii", "replace"))
        for f in headers:
            for ln in f:
                for part in fold(ln, header=True):
                    put(part + b"\r\n")
        for ln in added:
            put(ln + b"\r\n")
        put(b"\r\n")
        lines = iter(msg.first_body)
        while True:
            ln = next(lines, None)
            if ln is None:
                ln = rd.line()
                if ln is None:
                    break
            if o.dot_ends and ln == b".":
                break
            for part in fold(ln, header=False):
                put(part + b"\r\n")
        if via_drop:
            try:
                return sink.commit()
            except OSError as e:
                raise Fatal(EX_TEMPFAIL, f"cannot queue the message in {sink.dir}: {e.strerror or e}")
        tmp.flush()
        tmp.close()
        queued = submit_smtp(cfg, tmp.name, size, sender, recipients, msg.eight_bit, smtp_targets(cfg))
        if queued is None:
            raise Fatal(EX_TEMPFAIL, _not_queued(no_drop, "the relay is not running (no answer on "
                                                 + ", ".join(f"{h}:{p}" for h, p in smtp_targets(cfg)) + ")"))
        return queued
    except BaseException:
        if via_drop:
            sink.abort()
        raise
    finally:
        if tmp is not None:
            try:
                tmp.close()
            except OSError:
                pass
            fileio.unlink_quiet(tmp.name)


def _not_queued(no_drop: str, why: str) -> str:
    return (f"message NOT queued: {why}, and {no_drop} (see \"Sending from local programs\" in the README "
            "to allow it)")


def _safe(text: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "()\\;" else "?" for c in text)[:64]


def main(argv: list[str] | None = None, stdin: BinaryIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    inp = stdin if stdin is not None else sys.stdin.buffer
    try:
        o = parse_args(argv)
        if o.exit_now == "aliases":
            print(f"{PROG}: nothing to do: the relay re-reads its aliases file by itself", file=sys.stderr)
            return EX_OK
        if o.exit_now:
            return EX_OK
        cfg = load_config(o.config)
        me = identity()
        qid = build_and_queue(o, inp, cfg, me)
        if o.verbose > 1:
            print(f"{PROG}: queued as {qid}", file=sys.stderr)
        return EX_OK
    except Fatal as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: message not queued", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as e:
        print(f"{PROG}: {e}: message not queued", file=sys.stderr)
        return EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
