"""The control socket: relayctl talks to the running relay over AMP.

Why a socket and not files: the scheduler keeps the queue in memory, so a
change made behind its back (a state file rewritten by another process)
would be overwritten or missed.  Over the socket every verb goes through
the QueueManager, which sees it at once: a retry is attempted within a
second, a hold stops the next delivery from starting, a delete of a message
being delivered waits for that attempt to end and then removes it, with no
half state.  Every action is on disk when relayctl gets its answer, or is
refused with the reason (relay.queue: an action on a busy message is
recorded in its state file and applied when the busy step ends, or at the
next start).  The log gets one line per action request, none per
connection (QuietAMP).

The socket is a UNIX socket (``control.socket``, default
``<spool>/control.sock``) with mode 0600 inside the 0700 spool: only the
relay's user (and root) can connect.  It is bound in startService, i.e.
after twistd dropped privileges, so it belongs to the relay's user.  A
socket file left by a crash is removed at start (nothing answers on it); a
live one, or a path that is not a socket, stops the start with a clear
error.

AMP values are limited to 64 KiB: big answers use ``BigString`` (one value
spread over several keys), and the queue listing is paged: the first page
takes a sorted snapshot of the queue ids for this connection, each next
page continues it (messages gone meanwhile are skipped), so 100,000
messages stream in a few dozen round trips without blocking the reactor
for long.  The client (relay.ctlclient) is a small blocking AMP
implementation without Twisted, for relayctl's start-up time.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger
from twisted.protocols import amp

import relay
from relay import queue as queuemod
from relay import queueview, routecheck
from relay import spool as spoolmod
from relay.flow import ReadOnlyWhileDrained
from relay.spool import is_queue_id

log = Logger(namespace="relay.control")

PAGE_BYTES = 1 << 20  # a listing page stops after about this much JSON
MAX_PAGE = 5000  # messages per listing page at most
ACTION_CONCURRENCY = 32  # spool writes in flight for one multi-message action
ACTIONS_PER_TURN = 256  # ids handled between two reactor turns
ACTIONS = ("delete", "hold", "release", "retry", "bounce")


class BigString(amp.Argument):
    """Bytes of any length: chunks in keys ``name``, ``name.2``, ``name.3``..."""

    CHUNK = amp.MAX_VALUE_LENGTH

    def fromBox(self, name, strings, objects, proto):
        parts = [strings.pop(name, b"")]
        i = 2
        while True:
            part = strings.pop(name + b".%d" % i, None)
            if part is None:
                break
            parts.append(part)
            i += 1
        objects[name.decode("ascii")] = b"".join(parts)

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(name.decode("ascii"))
        n = self.CHUNK
        strings[name] = value[:n]
        for i, start in enumerate(range(n, len(value), n), 2):
            strings[name + b".%d" % i] = value[start : start + n]


# -- errors (AMP error codes relayctl understands) -------------------------------


class NoSuchMessage(Exception):
    pass


class ReloadUnsupported(Exception):
    pass


class NoQueue(Exception):
    pass


class BadRequest(Exception):
    pass


_ERRORS = {NoQueue: b"NO_QUEUE", BadRequest: b"BAD_REQUEST"}


# -- commands -------------------------------------------------------------------------


class Hello(amp.Command):
    """Who answers: proves the relay is alive before a long call."""

    commandName = b"Hello"
    arguments: list = []
    response = [(b"version", amp.Unicode()), (b"pid", amp.Integer()), (b"spool", amp.Unicode())]


class Status(amp.Command):
    commandName = b"Status"
    arguments: list = []
    response = [(b"status", BigString())]  # JSON object


class QueueList(amp.Command):
    """One page of the listing: JSON lines as in ``relayctl queue --json``."""

    commandName = b"QueueList"
    arguments = [(b"start", amp.Boolean()), (b"limit", amp.Integer())]
    response = [(b"lines", BigString()), (b"more", amp.Boolean()), (b"total", amp.Integer()),
                (b"loading", amp.Boolean())]
    errors = _ERRORS


class QueueShow(amp.Command):
    commandName = b"QueueShow"
    arguments = [(b"id", amp.Unicode())]
    response = [(b"message", BigString())]  # JSON object, queueview.details()
    errors = {NoSuchMessage: b"NO_SUCH_MESSAGE", **_ERRORS}


class QueueAction(amp.Command):
    """delete | hold | release | retry | bounce, on ids or on every message."""

    commandName = b"QueueAction"
    arguments = [(b"action", amp.Unicode()), (b"ids", amp.ListOf(amp.Unicode())), (b"all", amp.Boolean())]
    response = [(b"result", BigString())]  # JSON object, see ControlProtocol._act
    errors = _ERRORS


class Route(amp.Command):
    commandName = b"Route"
    arguments = [(b"address", amp.Unicode()), (b"client", amp.Unicode(optional=True))]
    response = [(b"route", BigString())]  # JSON object, routecheck.explain()


class Metrics(amp.Command):
    """This relay's Prometheus text exposition: the master of a relay with
    workers serves the sum of its workers' (relay.metrics.WorkersMetrics)."""

    commandName = b"Metrics"
    arguments: list = []
    response = [(b"text", BigString())]


class Reload(amp.Command):
    commandName = b"Reload"
    arguments: list = []
    response = [(b"ok", amp.Boolean()), (b"messages", amp.ListOf(amp.Unicode())),
                (b"restart_needed", amp.ListOf(amp.Unicode()))]
    errors = {ReloadUnsupported: b"NO_RELOAD"}


# -- the server side ----------------------------------------------------------------------


def normalize_id(text: str) -> str:
    return text.strip().upper()


def status_of(svc, listeners) -> dict:
    """The ``relayctl status`` data of a running RelayService."""
    q = svc.queue
    counts = dict.fromkeys(queueview.QUEUE_NAMES, 0)
    qc = {}
    if q is not None:
        for m in q.messages.values():
            if not m.deleted:
                counts[m.queue_name] += 1
        c = q.counters
        qc = {"delivered": c.delivered, "deferred": c.deferred, "bounced": c.bounced, "expired": c.expired,
              "dsn_sent": c.dsn_sent, "removed": c.removed, "attempts": c.attempts}
    sc = svc.smtp_ctx.counters
    now = time.time()
    return {
        "running": True,
        "pid": os.getpid(),
        "version": relay.__version__,
        "started_at": svc.started_at,
        "uptime": now - svc.started_at,
        "config": svc.config.source,
        "spool": svc.spool.root,
        "hostname": svc.config.hostname,
        "control_socket": svc.config.control_socket,
        "queue": {**counts, "total": sum(counts.values())},
        "queue_loaded": bool(q is not None and q.loaded),
        "counters": {"received": sc.received, "rejected": dict(sc.rejected), "smtp_sessions": sc.sessions,
                     **qc},
        "sessions": {"smtp": len(svc.smtp_ctx.open_sessions),
                     "pop3": sum(getattr(f, "open_sessions", 0) for f in svc.pop3_factories)},
        "listeners": [{"name": n, "host": h, "port": p} for n, h, p in listeners],
        "delivering": q is not None,
    }


def _loading(q) -> str:
    return "" if q.loaded else " (the relay is still reading its spool at start-up: try again)"


class QuietAMP(amp.AMP):
    """AMP without its "connection established" / "connection lost" lines:
    every relayctl call (and every metrics scrape of a master with workers)
    would write two lines about the transport into the relay's log, where an
    operator greps for what happened.  What a command did is logged instead
    (ControlProtocol._log_action, the reload's own lines)."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ControlProtocol(ReadOnlyWhileDrained, QuietAMP):
    """One relayctl connection, bound to the running RelayService."""

    def __init__(self, svc, factory: "ControlFactory"):
        super().__init__()
        self.svc = svc
        self.factory = factory
        self._snapshot: list[str] | None = None
        self._pos = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.protocols.add(self)

    def connectionLost(self, reason) -> None:
        self.factory.protocols.discard(self)
        self._snapshot = None
        super().connectionLost(reason)

    def _queue(self):
        q = self.svc.queue
        if q is None:
            raise NoQueue("this relay runs without its queue runner")
        return q

    @Hello.responder
    def hello(self):
        return {"version": relay.__version__, "pid": os.getpid(), "spool": self.svc.spool.root}

    @Metrics.responder
    def metrics(self):
        m = getattr(self.svc, "metrics", None)
        return {"text": m.render() if m is not None else b""}

    @Status.responder
    def status(self):
        d = self.svc.listening()
        d.addCallback(lambda ls: {"status": json.dumps(status_of(self.svc, ls)).encode("utf-8")})
        return d

    @QueueList.responder
    def queue_list(self, start: bool, limit: int):
        q = self._queue()
        if start:
            self._snapshot = sorted(q.messages)
            self._pos = 0
        snap = self._snapshot or []
        msgs = q.messages
        limit = max(1, min(limit, MAX_PAGE))
        parts: list[bytes] = []
        size = 0
        pos = self._pos
        end = len(snap)
        line = queueview.record_line
        while pos < end and len(parts) < limit and size < PAGE_BYTES:
            m = msgs.get(snap[pos])
            pos += 1
            if m is None or m.deleted:
                continue
            b = line(m.env, m.state, m.size, m.queue_name, bool(m.active))
            parts.append(b)
            size += len(b)
        self._pos = pos
        return {"lines": b"".join(parts), "more": pos < end, "total": end, "loading": not q.loaded}

    @QueueShow.responder
    def queue_show(self, id: str):  # noqa: A002 - the AMP argument name
        return defer.ensureDeferred(self._show(normalize_id(id)))

    async def _show(self, qid: str) -> dict:
        q = self._queue()
        m = q.messages.get(qid)
        if m is None or m.deleted:
            raise NoSuchMessage(f"{qid}: no such message in the queue{_loading(q)}")
        try:
            headers = await self.svc.aspool.run(self.svc.spool.read_headers, qid)
        except FileNotFoundError:
            raise NoSuchMessage(f"{qid}: no such message in the queue")
        # the history and the client details live on disk; memory holds what
        # is not written yet
        env = m.env
        try:
            env = (await self.svc.aspool.run(self.svc.spool.read_envelope, qid))[0]
            disk = await self.svc.aspool.run(self.svc.spool.read_state, qid, env)
        except (FileNotFoundError, spoolmod.CorruptEntry):
            disk = None
        state = m.state
        if disk is not None:
            state = spoolmod.State(
                [spoolmod.Recipient(r.address, r.orcpt, r.status, r.attempts, r.reply, r.next_attempt,
                                    d.history + r.history)
                 for r, d in zip(m.state.recipients, disk.recipients)],
                m.state.hold, m.state.warned)
        d = queueview.details(env, state, m.size, m.queue_name, headers,
                              delivering=bool(m.active or m.busy), deleting=m.deleted)
        return {"message": json.dumps(d).encode("utf-8")}

    @QueueAction.responder
    def queue_action(self, action: str, ids: list[str], all: bool):  # noqa: A002
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}")
        if all and action not in ("delete", "retry"):
            raise BadRequest(f"{action} needs queue ids")
        return defer.ensureDeferred(self._act(action, ids, all))

    async def _act(self, action: str, ids: list[str], every: bool) -> dict:
        """Apply an action; answer {action, done, failed, skipped, results}.

        ``results`` has one {id, ok, text} per id given; with ``all`` only
        the failures (the count of 100,000 deletions is enough).
        """
        q = self._queue()
        if every:
            targets = [qid for qid, m in q.messages.items() if not m.deleted]
        else:
            targets = [normalize_id(i) for i in ids]
        results: list[dict] = []
        totals = {"done": 0, "failed": 0, "skipped": 0}
        it = iter(targets)
        handled = [0]
        reactor = self.svc.reactor

        async def worker() -> None:
            for qid in it:
                handled[0] += 1
                if handled[0] % ACTIONS_PER_TURN == 0:
                    # actions that finish at once (retry, release) would run
                    # 100,000 ids in one reactor turn: let the others in
                    await task.deferLater(reactor, 0, lambda: None)
                try:
                    ok, text = await self._one(q, action, qid, every)
                except Exception as e:  # noqa: BLE001 - reported per id, never a dead connection
                    log.failure("relayctl {action} {queue_id} failed", action=action, queue_id=qid)
                    ok, text = False, f"failed: {e}"
                queueview.tally_action(results, totals, qid, ok, text, every)

        await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(ACTION_CONCURRENCY)])
        order = {qid: i for i, qid in enumerate(targets)}
        results.sort(key=lambda r: order.get(r["id"], 0))
        self._log_action(action, targets, every, totals, results)
        out = {"action": action, "all": every, **totals, "results": results}
        return {"result": json.dumps(out).encode("utf-8")}

    async def _one(self, q, action: str, qid: str, every: bool) -> tuple[bool | None, str]:
        """(ok, text) for one message; ok None: nothing to do (not a failure)."""
        if not is_queue_id(qid):
            return False, "no such message in the queue (not a queue id)"
        m = q.messages.get(qid)
        if m is None or (m.deleted and action != "delete"):
            return False, f"no such message in the queue{_loading(q)}"
        try:
            if action == "delete":
                return True, await q.delete(qid)
            if action == "hold":
                if m.hold:
                    return None, "already on hold"
                return True, await q.hold(qid)
            if action == "release":
                if not m.hold:
                    return None, "was not on hold"
                return True, await q.release(qid)
            if action == "retry":
                if m.hold and every:
                    return None, "on hold"
                return True, await q.retry(qid)
            if action == "bounce":
                text = await q.bounce(qid)
                if not m.env.sender and not text.startswith("already"):
                    return True, "removed (a null-sender message cannot be returned)"
                return True, text
        except queuemod.ActionFailed as e:
            return False, str(e)
        except queuemod.UnknownMessage:
            return False, "no such message in the queue (gone meanwhile)"
        raise BadRequest(action)

    @staticmethod
    def _log_action(action: str, targets: list[str], every: bool, totals: dict, results: list[dict]) -> None:
        """One line per state-changing request: the verb, what it was for,
        what came of it (each message's own line carries its queue id)."""
        if every:
            what = f"--all ({len(targets)} message{'s' if len(targets) != 1 else ''})"
        else:
            shown = [t if is_queue_id(t) else repr(t[:20]) for t in targets[:5]]
            what = " ".join(shown) + (f" (+{len(targets) - 5} more)" if len(targets) > 5 else "")
        result = f"{totals['done']} done, {totals['skipped']} skipped, {totals['failed']} failed"
        if len(results) == 1 and not every:
            result += f": {results[0]['text']}"
        log.info("relayctl queue {action} {targets}: {result}", action=action, targets=what, result=result,
                 done=totals["done"], skipped=totals["skipped"], failed=totals["failed"],
                 queue_ids=None if every else targets[:100])

    @Route.responder
    def route(self, address: str, client: str | None = None):
        svc = self.svc
        ctx = routecheck.RouteContext(
            config=svc.config, policy=svc.smtp_ctx.policy, expand=svc.expand,
            user_exists=svc.users.exists, resolver=self._resolver(), is_self=svc.listeners.is_self,
        )
        d = svc.dns_pool.run(routecheck.explain, ctx, address, client or None)
        d.addCallback(lambda r: {"route": json.dumps(r).encode("utf-8")})
        return d

    def _resolver(self):
        q = self.svc.queue
        r = getattr(getattr(q, "deliverer", None), "resolver", None)
        if r is None or not hasattr(r, "resolve_mx"):
            from relay.mx import Resolver

            r = Resolver(nameservers=self.svc.config.delivery.nameservers, lifetime=10.0)
        return r

    @Reload.responder
    def reload(self):
        fn = getattr(self.svc, "reload", None)
        if fn is None:
            raise ReloadUnsupported("this relay cannot reload its config while it runs (no reload "
                                    "support in this version): restart it to apply changes")
        d = defer.maybeDeferred(fn)

        def answer(r: dict) -> dict:
            return {"ok": bool(r.get("ok")), "messages": [str(x) for x in r.get("messages") or []],
                    "restart_needed": [str(x) for x in r.get("restart_needed") or []]}

        return d.addCallback(answer)


class ControlFactory(protocol.Factory):
    noisy = False

    def __init__(self, svc):
        self.svc = svc
        self.protocols: set[ControlProtocol] = set()

    def buildProtocol(self, addr):
        return ControlProtocol(self.svc, self)


def clear_stale_socket(path: str) -> bool:
    """Remove a socket file nothing listens on (left by a crash); True if removed.

    Raises ValueError with the reason when the path is in use or is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path} exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return True
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}")
    finally:
        s.close()
    raise ValueError(f"{path} is in use by another running process")


class ControlService(service.Service):
    """Listens on the control socket while the relay runs."""

    def __init__(self, svc, path: str, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.svc = svc
        self.path = path
        self.reactor = reactor
        self.factory = ControlFactory(svc)
        self.port = None

    def startService(self) -> None:
        from relay.service import StartupError

        super().startService()
        where = f"{self.svc.config.source}: control.socket"
        try:
            try:
                if clear_stale_socket(self.path):
                    log.info("removed stale control socket {path} (left by a relay that did not stop "
                             "cleanly)", path=self.path)
            except ValueError as e:
                raise StartupError(f"{where}: cannot use {e}")
            try:
                self.port = self.reactor.listenUNIX(self.path, self.factory, mode=0o600)
            except error.CannotListenError as e:
                reason = getattr(e.socketError, "strerror", None) or e.socketError
                raise StartupError(f"{where}: cannot listen on {self.path}: {reason}")
        except StartupError as e:
            if getattr(self.svc, "exit_on_error", False):  # under twistd: a clear message, no traceback
                raise SystemExit(f"twisted-relay: not starting: {e}")
            raise
        log.info("control socket for relayctl: {path}", path=self.path)

    def stopService(self):
        super().stopService()
        for p in list(self.factory.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening)
