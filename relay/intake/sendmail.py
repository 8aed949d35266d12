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
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

# at import: a submitter run as another user may not read the tree later
from relay import config as configmod
from relay.common import dsn as dsnmod
from relay.common import fileio, xtext
from relay.common.address import AddressError, parse_mailbox
from relay.config import Config
from relay.intake.dropfile import DROP_MAGIC, MAX_HOPS, drop_line, parse_drop_line  # noqa: F401 - tests use them here
from relay.intake.msgread import Message, Reader, field_name, field_value, fold, read_headers
from relay.intake.submit import DropSink, Identity, NoDrop, identity, open_drop, smtp_targets, submit_smtp
from relay.intake.sysexits import (  # noqa: F401 - relay-sendmail's exit statuses, all of them here
    EX_CONFIG,
    EX_DATAERR,
    EX_IOERR,
    EX_OK,
    EX_OSERR,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Fatal,
)
from relay.queue.spool import new_id

PROG = "relay-sendmail"
SYSTEM_CONFIG = "/etc/relay/relay.toml"

# Postfix's sendmail getopt string "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx"
_WITH_ARG = set("ABCFLNORVXbefhopqr")
_FLAGS = set("GIUcimntvx")


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
    dsn: dict[str, str] = field(default_factory=dict)  # -N notify, -R ret, -V envid (relay.common.dsn)
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
        if a == "-V" and (i + 1 >= len(argv) or argv[i + 1].startswith("-") or "@" in argv[i + 1]):
            i += 1  # the old VERP flag (no envid follows): not supported, harmless to ignore
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
                _flag(o, c)
                j += 1
                continue
            raise Fatal(EX_USAGE, f"unknown option -{c} (usage: {PROG} [-t] [-i] [-f sender] [-F name] "
                                  "[recipient ...] < message)")
        i += 1
    o.recipients = argv[i:]
    return o


def _flag(o: Options, c: str) -> None:
    if c == "t":
        o.extract = True
    elif c == "i":
        o.dot_ends = False
    elif c == "v":
        o.verbose += 1
    elif c == "I":
        o.exit_now = "aliases"
    # G, U, c, m, n, x: accepted and ignored (as Postfix)


def _option(o: Options, c: str, value: str) -> None:
    if c in ("f", "r"):
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
    elif c in "NRV":
        _dsn_option(o, c, value)
    # A, L, O, X, e, h, p: accepted and ignored (as Postfix)


def _dsn_option(o: Options, c: str, value: str) -> None:
    """-N never|success,failure,delay, -R full|hdrs, -V envid: the DSN
    request of RCPT NOTIFY, MAIL RET and ENVID (relay.common.dsn checks them)."""
    try:
        if c == "N":
            o.dsn["notify"] = dsnmod.notify_option(value)
        elif c == "R":
            o.dsn["ret"] = dsnmod.parse_ret(value)
        else:
            dsnmod.parse_envid(xtext.encode(value))
            o.dsn["envid"] = value
    except dsnmod.DsnSyntax as e:
        raise Fatal(EX_USAGE, f"-{c} {value[:40]!r}: {e}")




def load_config(explicit: str | None) -> Config:
    """-C FILE, else $RELAY_CONFIG, else /etc/relay/relay.toml, else ./relay.toml.

    Unlike the relay, never the built-in defaults: a cron job's working
    directory must not decide where its mail goes."""
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


def origin(cfg: Config) -> str:
    """The domain of unqualified addresses ("root" from cron): the first
    local domain, else the relay's hostname (Postfix: $myorigin)."""
    return cfg.local.domains[0] if cfg.local.domains else cfg.hostname


def _mailbox(addr: str, cfg: Config, what: str, status: int) -> str:
    a = addr.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if "@" not in a:
        a = f"{a}@{origin(cfg)}"
    try:
        return str(parse_mailbox(a, utf8=True))  # UTF-8 addresses: the message needs SMTPUTF8
    except AddressError as e:
        raise Fatal(status, f"bad {what} address {addr!r}: {e}")


def parse_address_list(value: str) -> list[str]:
    """The addr-specs of an address list ("a@b, Name <c@d>, root"), strictly:
    ValueError names the problem (email.utils.getaddresses would turn
    "not an address" into "not")."""
    import email.errors
    import email.policy

    try:
        h = email.policy.default.header_factory("To", value)
        addrs = [a.addr_spec for a in h.addresses]
    except Exception as e:  # noqa: BLE001 - the stdlib parser raises more than HeaderParseError
        raise ValueError(f"cannot parse it ({e.__class__.__name__})")
    problems = [str(d) for d in h.defects if str(d) != "addr-spec local part with no domain"
                and not isinstance(d, email.errors.NonASCIILocalPartDefect)]  # UTF-8 is fine (RFC 6531)
    if problems:
        raise ValueError("; ".join(dict.fromkeys(problems)))
    return addrs


def addresses(values: list[str], cfg: Config, what: str, status: int) -> list[str]:
    """Each value as an address list (Postfix parses arguments so, too)."""
    out: list[str] = []
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


def sender_address(o: Options, cfg: Config, me: Identity) -> str:
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
# the message, queued


def build_and_queue(o: Options, inp: BinaryIO, cfg: Config, me: Identity) -> str:
    """Read the message, check it as the relay would, queue it: the queue id."""
    sender = sender_address(o, cfg, me)
    recipients = addresses(o.recipients, cfg, "recipient", EX_USAGE)
    msg = read_headers(Reader(inp, cfg.smtp.max_message_size))
    if o.extract:
        recipients += _header_recipients(cfg, msg.headers)
    _check_hops(msg.headers)
    recipients = _checked_recipients(o, cfg, recipients)
    headers = [f for f in msg.headers if field_name(f) not in ("bcc", "resent-bcc")]
    added = _added_headers(o, cfg, me, sender, headers)
    out = _Outgoing(o, msg, headers, added, cfg.smtp.max_message_size)
    try:
        sink = open_drop(cfg, new_id(), me)
    except NoDrop as e:
        return _queue_by_smtp(cfg, me, out, sender, recipients, no_drop=str(e))
    return _queue_in_drop(sink, me, out, sender, recipients)


def _header_recipients(cfg: Config, headers: list[list[bytes]]) -> list[str]:
    """-t: the recipients of the To, Cc and Bcc fields (the Resent- ones when
    there are some)."""
    names = {field_name(f) for f in headers}
    resent = any(n in ("resent-to", "resent-cc", "resent-bcc") for n in names)
    keys = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
    values = [v for f in headers if field_name(f) in keys and (v := field_value(f))]
    return addresses(values, cfg, "recipient (header)", EX_DATAERR)


def _check_hops(headers: list[list[bytes]]) -> None:
    hops = sum(1 for f in headers if field_name(f) == "received")
    if hops > MAX_HOPS:
        # as the SMTP server refuses it (554 5.4.6): a message that went
        # round that often is in a loop, and is not sent round again
        raise Fatal(EX_DATAERR, f"too many hops: {hops} Received headers (more than {MAX_HOPS}; "
                                "a mail loop?): message refused")


def _checked_recipients(o: Options, cfg: Config, recipients: list[str]) -> list[str]:
    """Each recipient once, at least one, no more than smtp.max_recipients."""
    recipients = list(dict.fromkeys(recipients))  # in order, the first of each
    if not recipients:
        if o.extract:
            raise Fatal(EX_DATAERR, "no recipients: none in the To, Cc or Bcc headers and none as arguments")
        raise Fatal(EX_USAGE, "no recipients given: name them as arguments, or use -t to read them "
                              "from the To, Cc and Bcc headers")
    if len(recipients) > cfg.smtp.max_recipients:
        raise Fatal(EX_USAGE, f"too many recipients ({len(recipients)}; smtp.max_recipients is "
                              f"{cfg.smtp.max_recipients})")
    return recipients


def _from_value(name: str | None, addr: str) -> bytes:
    """The From header's value; a UTF-8 address (which formataddr refuses)
    goes in as UTF-8, as RFC 6532 allows in a message that needs SMTPUTF8."""
    if addr.isascii():
        return email.utils.formataddr((name, addr)).encode("ascii", "replace")
    shown = email.utils.formataddr((name, "a@b"))[: -len("<a@b>")] if name else ""
    return f"{shown}<{addr}>".encode("utf-8")


def _added_headers(o: Options, cfg: Config, me: Identity, sender: str, headers: list[list[bytes]]) -> list[bytes]:
    """From, Date and Message-ID, for a message without them."""
    names = {field_name(f) for f in headers}
    added: list[bytes] = []
    if "from" not in names:
        name = o.full_name if o.full_name is not None else me.gecos
        addr = sender or _mailbox(me.user or "MAILER-DAEMON", cfg, "sender", EX_USAGE)
        added.append(b"From: " + _from_value(name, addr))
    if "date" not in names:
        added.append(b"Date: " + email.utils.formatdate(localtime=True).encode("ascii"))
    if "message-id" not in names:
        added.append(b"Message-ID: " + f"<{new_id()}.{secrets.token_hex(4)}@{cfg.hostname}>".encode("ascii"))
    return added


class _Outgoing:
    """The message as it is written out: its header fields folded, the added
    fields, the body read on to its end; every octet counted against
    smtp.max_message_size, and 8-bit data noted (BODY=8BITMIME)."""

    def __init__(self, o: Options, msg: Message, headers: list[list[bytes]], added: list[bytes], limit: int):
        self.o = o
        self.msg = msg
        self.headers = headers
        self.added = added
        self.limit = limit
        self.size = 0

    def put(self, write: Callable[[bytes], object], data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise Fatal(EX_DATAERR, f"message too big: over smtp.max_message_size ({self.limit} octets)")
        if not self.msg.eight_bit and any(b > 127 for b in data):
            self.msg.eight_bit = True
        write(data)

    def write_to(self, write: Callable[[bytes], object]) -> None:
        for f in self.headers:
            for ln in f:
                for part in fold(ln, header=True):
                    self.put(write, part + b"\r\n")
        for added in self.added:
            self.put(write, added + b"\r\n")
        self.put(write, b"\r\n")
        lines = iter(self.msg.first_body)
        while True:
            line = next(lines, None)
            if line is None:
                line = self.msg.reader.line()
                if line is None:
                    break
            if self.o.dot_ends and line == b".":
                break
            for part in fold(line, header=False):
                self.put(write, part + b"\r\n")


def _queue_in_drop(sink: DropSink, me: Identity, out: _Outgoing, sender: str, recipients: list[str]) -> str:
    """Into the drop directory: the envelope line, the message, then the
    durable rename (the queue id); nothing left behind on a failure."""
    try:
        sink.write(drop_line(sender, recipients, me.uid, me.user, time.time(), out.o.dsn or None))
        out.write_to(sink.write)
        try:
            return sink.commit()
        except OSError as e:
            raise Fatal(EX_TEMPFAIL, f"cannot queue the message in {sink.dir}: {e.strerror or e}")
    except BaseException:
        sink.abort()
        raise


def _queue_by_smtp(cfg: Config, me: Identity, out: _Outgoing, sender: str, recipients: list[str],
                   no_drop: str) -> str:
    """Over SMTP to the relay (drop/ is not ours to write): the message in a
    temporary file first, with a Received field saying who ran this."""
    targets = smtp_targets(cfg)
    if not targets:
        raise Fatal(EX_TEMPFAIL, _not_queued(no_drop, "the relay has no plain TCP SMTP listener to submit to"))
    tmp = tempfile.NamedTemporaryFile(prefix="relay-sendmail.", delete=False)
    try:
        date = email.utils.formatdate(localtime=True)
        who = f"{_safe(me.user) or 'unknown'} (uid {me.uid})"
        out.put(tmp.write, f"Received: by {cfg.hostname} (relay-sendmail, from userid {who});\r\n\t{date}\r\n"
                .encode("ascii", "replace"))
        out.write_to(tmp.write)
        tmp.flush()
        tmp.close()
        queued = submit_smtp(cfg, tmp.name, out.size, sender, recipients, out.msg.eight_bit, smtp_targets(cfg),
                             dsn=out.o.dsn)
        if queued is None:
            raise Fatal(EX_TEMPFAIL, _not_queued(no_drop, "the relay is not running (no answer on "
                                                 + ", ".join(f"{h}:{p}" for h, p in smtp_targets(cfg)) + ")"))
        return queued
    finally:
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
