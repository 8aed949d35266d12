"""``relayctl queue drain --to HOST:PORT``: hand this node's queue to another relay.

For a node that goes away: planned maintenance (the relay runs: live), or a
dead node's disk mounted on another host (no relay holds the spool: offline).
What is sent and how each recipient's outcome is recorded is
relay.queue.drain's (the envelope sender, the open recipients only, the DSN
request, an ``X-Relay-Drained`` trace header; a message removed only after
the peer's 250).

Live, each message goes through the running relay's control socket (the
QueueDrain command, one message per call so that each line is printed as
it is done): the relay sends it with its own outbound client and takes it
from its queue runner meanwhile, so it is never delivered twice by that
relay while handed over.  Messages that arrive during the drain are listed
again after each pass and drained too, until a pass finds nothing new.

Offline, relayctl holds the spool lock for the whole drain (a relay starting
meanwhile waits for it, relay.admin.offline; a relay holding the lock makes
the drain refuse to run offline) and sends with the same outbound client on
a reactor of its own: only here does relayctl import Twisted.  The spool
writes (blocking, as every offline verb's) are made between two SMTP
sessions, when the reactor has nothing else to serve.

With workers > 1 every worker's queue (``<spool>/w<i>``) is drained, each
live or offline as its worker runs or not, and, with no master running, the
queues no worker owns (``_orphans``).  Once the peer did not answer
at all (connection refused, timeout) the drain stops: the rest is kept and
listed.  Exit status 0 when every message was handed over, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterable

from relay.admin import client as cc
from relay.admin.offline import NoSuchMessage, OfflineSpool, RelayRunning
from relay.admin.reach import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    CtlError,
    Live,
    answer_timeout,
    close_all,
    err,
    load_config,
    offline,
    open_relays,
)
from relay.config import values as cfgvalues
from relay.config.workerpaths import worker_config
from relay.control import proto

DEFAULT_WAIT = 60  # seconds the relay waits for a delivery attempt under way before it drains
DEFAULT_TIMEOUT = 60  # seconds for the peer's answer to each command (and to connect)


class Options:
    """The peer and how to reach it, as given on the command line."""

    def __init__(self, args, hostname: str):
        try:
            hp = cfgvalues.parse_hostport(args.to, default_port=25)
        except cfgvalues.Bad as e:
            raise CtlError(f"--to: expected {e}, got {args.to!r}", EXIT_USAGE)
        self.host, self.port = hp.host, hp.port
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise CtlError(f"--to: cannot resolve {self.host}: {e.strerror}")
        self.address = str(infos[0][4][0])
        self.ehlo = args.ehlo or hostname
        self.tls = args.tls
        self.ca_file = os.path.abspath(args.ca_file) if args.ca_file else None
        if self.ca_file and not os.access(self.ca_file, os.R_OK):
            raise CtlError(f"--ca-file: cannot read {self.ca_file}")
        if args.ca_file and self.tls != "require":
            raise CtlError("--ca-file goes with --tls require", EXIT_USAGE)
        self.auth: tuple[str, str] | None = None
        if args.auth:
            if not args.password_file:
                raise CtlError("--auth USER needs --password-file FILE", EXIT_USAGE)
            if self.tls == "none":
                raise CtlError("--auth needs TLS (the password is never sent in the clear): --tls may or require",
                               EXIT_USAGE)
            try:
                with open(args.password_file, encoding="utf-8") as f:
                    pw = f.readline()
            except OSError as e:
                raise CtlError(f"--password-file: {args.password_file}: {e.strerror}")
            self.auth = (args.auth, pw[:-1] if pw.endswith("\n") else pw)
        self.held = bool(args.held)
        self.wait = int(args.wait)
        self.timeout = int(args.timeout)

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def request(self, qid: str) -> dict[str, Any]:
        return {"id": qid, "host": self.host, "address": self.address, "port": self.port, "ehlo": self.ehlo,
                "tls": self.tls, "ca_file": self.ca_file, "auth_user": self.auth[0] if self.auth else None,
                "auth_password": self.auth[1] if self.auth else None, "held": self.held, "wait": self.wait,
                "reply_timeout": self.timeout}


class Report:
    """The output: a line (or a JSON object) per message, and what remains."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.remaining: list[str] = []
        self.done = 0
        self.peer_down = False
        self.found: set[str] = set()  # the ids given that some queue had

    def add(self, r: dict[str, Any]) -> None:
        if r.get("peer_down"):
            self.peer_down = True
        if r.get("complete"):
            self.done += 1
        else:
            self.remaining.append(r["queue_id"])
        if self.as_json:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(format_line(r) + "\n")
        sys.stdout.flush()

    def not_tried(self, qids: Iterable[str], node: str, peer: str, why: str) -> None:
        for qid in qids:
            self.add({"queue_id": qid, "node": node, "peer": peer, "handed_over": [], "peer_queue_id": "",
                      "refused": [], "kept": [], "removed": False, "complete": False, "error": why,
                      "peer_down": False})


def format_line(r: dict[str, Any]) -> str:
    parts = [f"{r['queue_id']}:"]
    if r["handed_over"]:
        parts.append(f"handed over to {r['peer']} as {r['peer_queue_id'] or '?'}: "
                     + ", ".join(f"<{a}>" for a in r["handed_over"]))
    for x in r["refused"]:
        parts.append(f"kept <{x['recipient']}>, refused by the peer: {x['reply']}")
    for x in r["kept"]:
        parts.append(f"kept <{x['recipient']}>: {x['reply']}")
    if r["error"]:
        parts.append(f"kept: {r['error']}")
    return " ".join(parts[:2]) + "".join("; " + p for p in parts[2:])


# -- live: through the control socket --------------------------------------------------------------


def _live_ids(client: cc.Client) -> list[tuple[str, bool]]:
    """(queue id, held) of every message of the running relay."""
    out = []
    start = True
    while True:
        box = client.call(proto.QUEUE_LIST, start=start, limit=2000)
        start = False
        for line in box["lines"].splitlines():
            if line.strip():
                rec = json.loads(line)
                out.append((rec["queue_id"], rec.get("queue_name") == "hold"))
        if not box["more"]:
            return out


def _drain_live(relay: Live, opts: Options, ids: list[str] | None, report: Report) -> None:
    client = relay.client
    per_call = opts.wait + opts.timeout * 24 + answer_timeout()
    tried: set[str] = set()
    while not report.peer_down:
        if ids is not None:
            todo = [i for i in ids if i not in tried]
        else:
            todo = [q for q, held in _live_ids(client) if q not in tried and (opts.held or not held)]
        if not todo:
            return
        for n, qid in enumerate(todo):
            tried.add(qid)
            try:
                box = client.call(proto.QUEUE_DRAIN, timeout=per_call, **opts.request(qid))
            except cc.RemoteError as e:
                if e.code == proto.NoSuchMessage.code:
                    continue  # another worker's, or delivered meanwhile (cmd_drain checks the ids given)
                raise CtlError(e.description or e.code)
            except cc.ControlError as e:
                raise CtlError(str(e))
            r = json.loads(box["result"])
            report.add(r)
            report.found.add(qid)
            if report.peer_down:
                report.not_tried(todo[n + 1:], r["node"], opts.name, "not tried: the peer did not answer")
                return
        if ids is not None:
            return


# -- offline: the spool of a stopped relay ----------------------------------------------------------


def run_on_reactor(work: Callable[[Any], Any]) -> Any:
    """Run ``work(reactor)`` (a coroutine) on Twisted's reactor, started here
    (relayctl's only reactor); its result or its exception."""
    from twisted.internet import defer
    from twisted.internet import reactor as _reactor
    from twisted.python.failure import Failure

    reactor: Any = _reactor
    box: list[Any] = []

    def begin() -> None:
        d = defer.ensureDeferred(work(reactor))

        def end(result: object) -> None:
            box.append(result)
            reactor.stop()

        d.addBoth(end)

    reactor.callWhenRunning(begin)
    reactor.run(installSignalHandlers=False)
    result = box[0] if box else None
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _drain_offline(spools: list[OfflineSpool], opts: Options, ids: list[str] | None, report: Report) -> None:
    """Every stopped queue in one run of the reactor (it cannot be restarted),
    each while relayctl holds its spool lock."""
    from relay.queue import drain as drainmod

    kw: dict[str, Any] = {}
    if opts.timeout:
        from relay.outbound.request import Timeouts

        kw = {"connect_timeout": float(opts.timeout), "timeouts": Timeouts.uniform(float(opts.timeout))}
    peer = drainmod.Peer(opts.host, opts.address, opts.port, opts.ehlo, opts.tls, opts.ca_file, opts.auth, **kw)

    async def one(reactor: Any, off: OfflineSpool, qid: str) -> drainmod.Result:
        node, sp = off.config.hostname, off.spool
        result = drainmod.Result(qid, node, peer.name)
        try:
            with off._as_owner():
                entry = sp.load(qid)
        except (OSError, ValueError) as e:
            result.error = f"unreadable: {e}"
            return result
        if entry.state.done:
            return result
        if entry.state.hold and not opts.held:
            result.error = "on hold: not drained (release it, or drain it with --held)"
            return result
        rcpts = drainmod.open_recipients(entry.state)
        header = drainmod.trace_header(node, qid, entry.envelope.arrival)
        with off._as_owner():
            path = drainmod.prepare(sp.incoming_dir, sp.message_path(qid), entry.offset, entry.size, header)
        try:
            rep = await drainmod.hand_over(reactor, peer, entry.envelope, rcpts, path, len(header) + entry.size)
        finally:
            with off._as_owner():
                drainmod.unlink_quiet(path)
        drainmod.apply(result, entry.state, rcpts, rep, time.time())
        with off._as_owner():
            if entry.state.done:
                sp.remove(qid)
                result.removed = True
            else:
                sp.write_state(qid, entry.state)
        return result

    async def queue_of(reactor: Any, off: OfflineSpool) -> None:
        present = off.ids()
        todo = present if ids is None else [i for i in ids if i in set(present)]
        for n, qid in enumerate(todo):
            report.found.add(qid)
            r = await one(reactor, off, qid)
            if not r.handed_over and not r.error and not r.refused and not r.deferred:
                continue  # all recipients already final: nothing to hand over
            report.add(r.as_json())
            if report.peer_down:
                report.not_tried(todo[n + 1:], off.config.hostname, peer.name, "not tried: the peer did not answer")
                return

    async def work(reactor: Any) -> None:
        for off in spools:
            if report.peer_down:
                return
            with off.locked():
                await queue_of(reactor, off)

    run_on_reactor(work)


def _orphans(cfg) -> list[OfflineSpool]:
    """With workers > 1, the queues no worker owns (the top spool's own
    ``queue/``, and ``w<k>`` for k >= workers, which the master moves into
    the workers' queues at its next start, relay.runtime.master.adopt_orphans):
    drained offline too, but only while no master holds the top spool."""
    if cfg.workers <= 1:
        return []
    top = OfflineSpool(cfg)
    try:
        top.check_not_running()
    except RelayRunning:
        return []
    extra = sorted(int(n[1:]) for n in (os.listdir(cfg.spool) if os.path.isdir(cfg.spool) else ())
                   if n.startswith("w") and n[1:].isdigit() and int(n[1:]) >= cfg.workers)
    out = []
    for off in [top] + [OfflineSpool(worker_config(cfg, k)) for k in extra]:
        if off.exists() and off.ids():
            out.append(off)
    return out


def cmd_drain(args) -> int:
    if not args.to:
        raise CtlError("queue drain: --to HOST:PORT is required", EXIT_USAGE)
    cfg = load_config(args)
    opts = Options(args, cfg.hostname)
    from relay.runtime.parts import own_listeners  # the listeners delivery's loop check knows

    if own_listeners(cfg).is_self(opts.address, opts.port):
        raise CtlError(f"--to {opts.name}: that is this relay's own SMTP listener (the messages would come "
                       "back into this queue): name another relay", EXIT_USAGE)
    ids = [i.strip().upper() for i in args.ids] if args.ids else None
    report = Report(bool(args.drain_json))
    relays = open_relays(cfg)
    try:
        stopped = []
        for relay in relays:
            if report.peer_down:
                break
            if isinstance(relay, Live):
                _drain_live(relay, opts, ids, report)
            else:
                stopped.append(relay.spool)
        stopped += offline(_orphans, cfg)
        if stopped and not report.peer_down:
            offline(_drain_offline, stopped, opts, ids, report)
    except NoSuchMessage as e:
        raise CtlError(str(e))
    finally:
        close_all(relays)
    for qid in ids or ():
        if qid not in report.found:
            err(f"{qid}: no such message in the queue")
            report.remaining.append(qid)
    if report.remaining:
        n = len(report.remaining)
        err(f"{n} message{'s' if n != 1 else ''} not (completely) handed over, kept here: "
            + " ".join(report.remaining[:20]) + (" ..." if n > 20 else ""))
        return EXIT_FAIL
    print(f"drained {report.done} message{'s' if report.done != 1 else ''} to {opts.name}", file=sys.stderr)
    return EXIT_OK


def add_parser(qs) -> None:
    """``queue drain`` in relay.admin.commands' queue sub-commands."""
    x = qs.add_parser("drain", help="hand every message (or the ones given) to another relay over SMTP, "
                                    "removing each after the peer's 250")
    x.add_argument("ids", metavar="ID", nargs="*", help="only these messages")
    x.add_argument("--to", metavar="HOST:PORT", help="the relay to hand the messages to (required)")
    x.add_argument("--ehlo", metavar="NAME", help="the EHLO name (default: this node's hostname)")
    x.add_argument("--tls", choices=("none", "may", "require"), default="may",
                   help="STARTTLS: none, may (when offered; the default), require (a verified certificate)")
    x.add_argument("--ca-file", metavar="FILE", help="with --tls require: the CAs to verify the peer with "
                                                     "(default: the system's)")
    x.add_argument("--auth", metavar="USER", help="AUTH as this user (over TLS only); with --password-file")
    x.add_argument("--password-file", metavar="FILE", help="the password for --auth (its first line)")
    x.add_argument("--held", action="store_true", help="drain messages on hold too (default: they stay)")
    x.add_argument("--wait", type=int, default=DEFAULT_WAIT, metavar="SECONDS",
                   help=f"how long to wait for a delivery attempt under way (default {DEFAULT_WAIT})")
    x.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"for each answer of the peer, and to connect (default {DEFAULT_TIMEOUT})")
    x.add_argument("--json", dest="drain_json", action="store_true", help="one JSON object per message")
