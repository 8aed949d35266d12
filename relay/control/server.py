"""The control socket: relayctl talks to the running relay over AMP.

Why a socket and not files: the scheduler keeps the queue in memory, so a
change made behind its back (a state file rewritten by another process)
would be overwritten or missed.  Over the socket every verb goes through
the QueueManager, which sees it at once: a retry is attempted within a
second, a hold stops the next delivery from starting, a delete of a message
being delivered waits for that attempt to end and then removes it, with no
half state.  Every action is on disk when relayctl gets its answer, or is
refused with the reason (relay.queue.manager: an action on a busy message is
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
for long.  The client (relay.admin.client) is a small blocking AMP
implementation without Twisted, for relayctl's start-up time; the commands
are declared once, in relay.control.proto (their AMP classes: relay.control.amp).

The control socket reaches the relay's parts only through what the service
that assembled them hands over (ControlContext): the queue, the spool, and
callables for what changes with a reload (the status, the routing context,
the reload itself).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

import relay
from relay.common.errors import StartupError
from relay.common.flow import ReadOnlyWhileDrained
from relay.control import route as routecheck
from relay.control.amp import (
    Hello,
    Login,
    Metrics,
    QueueAction,
    QueueDrain,
    QueueList,
    QueueShow,
    QuietAMP,
    Reload,
    Route,
    Status,
)
from relay.control.proto import (
    ACTIONS,
    ACTIONS_ON_ALL,
    BadRequest,
    NoQueue,
    NoSuchMessage,
    NotAuthenticated,
    ReloadUnsupported,
)
from relay.outbound.request import Timeouts
from relay.queue import drain as drainmod
from relay.queue import manager as queuemod
from relay.queue import spool as spoolmod
from relay.queue import view as queueview
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.queue.spool import is_queue_id

log = Logger(namespace="relay.control")

PAGE_BYTES = 1 << 20  # a listing page stops after about this much JSON
MAX_PAGE = 5000  # messages per listing page at most
ACTION_CONCURRENCY = 32  # spool writes in flight for one multi-message action
ACTIONS_PER_TURN = 256  # ids handled between two reactor turns
MIN_SECRET = 16  # characters of control.secret_file at least
WRONG_SECRET_DELAY = 1.0  # seconds before a wrong secret is answered (and the connection closed)


# -- the server side ----------------------------------------------------------------------


def normalize_id(text: str) -> str:
    return text.strip().upper()


LIMITS_LISTED = 100  # keys near a limit listed in a status, the fullest first


def status_of(*, config, spool_root: str, started_at: float, queue, smtp, pop3_factories,
              listeners: list[tuple[str, str, int]]) -> dict:
    """The ``relayctl status`` data of a running relay: its config, its
    queue (None: no queue runner), its SMTP server context (counters, open
    sessions), its POP3 factories and its bound listeners."""
    q = queue
    counts = dict.fromkeys(queueview.QUEUE_NAMES, 0)
    qc = {}
    if q is not None:
        for m in q.messages.values():
            if not m.deleted:
                counts[m.queue_name] += 1
        c = q.counters
        qc = {"delivered": c.delivered, "deferred": c.deferred, "bounced": c.bounced, "expired": c.expired,
              "dsn_sent": c.dsn_sent, "removed": c.removed, "attempts": c.attempts}
    sc = smtp.counters
    now = time.time()
    return {
        "running": True,
        "pid": os.getpid(),
        "version": relay.__version__,
        "started_at": started_at,
        "uptime": now - started_at,
        "config": config.source,
        "spool": spool_root,
        "hostname": config.hostname,
        "control_socket": config.control_socket,
        "queue": {**counts, "total": sum(counts.values())},
        "queue_loaded": bool(q is not None and q.loaded),
        "counters": {"received": sc.received, "rejected": dict(sc.rejected), "smtp_sessions": sc.sessions,
                     **qc},
        "sessions": {"smtp": len(smtp.open_sessions),
                     "pop3": sum(getattr(f, "open_sessions", 0) for f in pop3_factories)},
        "listeners": [{"name": n, "host": h, "port": p} for n, h, p in listeners],
        "delivering": q is not None,
        # who is at or near (>= 80 %) a [limits] limit: the relay-wide table, the same from every worker
        "limits": [{"limit": u.limit, "key": u.key, "count": u.count, "max": u.max, "window": u.window}
                   for u in smtp.rates.usage(smtp.reactor.seconds())[:LIMITS_LISTED]],
    }


@dataclass
class ControlContext:
    """What the control socket serves, handed over by the service that built
    the parts (relay.runtime.service); nothing here reaches back into that service.

    What a reload replaces (the config, the policy, the users) is reached
    through the callables, so every request sees the current one.
    """

    reactor: Any  # IReactorTime: long actions yield to it between batches
    spool: AsyncSpool  # the spool, read off the reactor thread
    queue: Any  # relay.queue.manager.QueueManager; None: a relay without its queue runner
    status: Callable[[], defer.Deferred]  # fires with status_of()'s dict
    route_context: Callable[[], routecheck.RouteContext]  # relayctl route decides with this
    dns: DiskPool  # routecheck.explain runs there (it blocks on DNS look-ups)
    metrics: Callable[[], bytes] | None = None  # this relay's Prometheus exposition
    reload: Callable[[], dict] | None = None  # None: no reload support (ReloadUnsupported)


def _loading(q) -> str:
    return "" if q.loaded else " (the relay is still reading its spool at start-up: try again)"


class ControlProtocol(ReadOnlyWhileDrained, QuietAMP):
    """One relayctl connection."""

    def __init__(self, ctx: ControlContext, factory: "ControlFactory"):
        super().__init__()
        self.ctx = ctx
        self.factory = factory
        self._snapshot: list[str] | None = None
        self._pos = 0
        # the UNIX socket's file mode is its authentication; the TCP endpoint asks the secret first
        self.authenticated = factory.secret is None

    def locateResponder(self, name: bytes):
        if not self.authenticated and name != Login.commandName:
            return lambda box: defer.fail(amp.RemoteAmpError(
                NotAuthenticated.code.encode("ascii"), "log in first (Login with the fleet's shared secret)"))
        return super().locateResponder(name)

    @Login.responder
    def login(self, secret: str):
        expected = self.factory.secret
        if expected is None:
            return {"ok": True}
        given = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        if hmac.compare_digest(given, hashlib.sha256(expected).digest()):
            self.authenticated = True
            return {"ok": True}
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        log.warn("control endpoint: wrong secret from {client}; connection closed",
                 client=getattr(peer, "host", "?"))

        def refuse() -> None:
            if transport is not None:  # after the answer is written
                self.ctx.reactor.callLater(0, transport.loseConnection)
            raise NotAuthenticated("wrong secret")

        return task.deferLater(self.ctx.reactor, WRONG_SECRET_DELAY, refuse)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.protocols.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.protocols.discard(self)
        self._snapshot = None
        super().connectionLost(reason)

    def _queue(self):
        q = self.ctx.queue
        if q is None:
            raise NoQueue("this relay runs without its queue runner")
        return q

    @Hello.responder
    def hello(self):
        return {"version": relay.__version__, "pid": os.getpid(), "spool": self.ctx.spool.spool.root}

    @Metrics.responder
    def metrics(self):
        render = self.ctx.metrics
        return {"text": render() if render is not None else b""}

    @Status.responder
    def status(self):
        d = self.ctx.status()
        d.addCallback(lambda s: {"status": json.dumps(s).encode("utf-8")})
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
            b = line(m.env, m.state, m.size, m.queue_name, bool(m.active), q.pacer.waiting_for(m.jobs))
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
        aspool = self.ctx.spool
        sp = aspool.spool
        try:
            headers = await aspool.run(sp.read_headers, qid)
        except FileNotFoundError:
            raise NoSuchMessage(f"{qid}: no such message in the queue")
        # the history and the client details live on disk; memory holds what
        # is not written yet
        env = m.env
        try:
            env = (await aspool.run(sp.read_envelope, qid))[0]
            disk = await aspool.run(sp.read_state, qid, env)
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
                              delivering=bool(m.active or m.busy), deleting=m.deleted,
                              waiting=q.pacer.waiting_for(m.jobs))
        return {"message": json.dumps(d).encode("utf-8")}

    @QueueAction.responder
    def queue_action(self, action: str, ids: list[str], all: bool):  # noqa: A002
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}")
        if all and action not in ACTIONS_ON_ALL:
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
        reactor = self.ctx.reactor

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

    @QueueDrain.responder
    def queue_drain(self, id: str, host: str, address: str, port: int, ehlo: str, tls: str,  # noqa: A002
                    ca_file: str | None = None, auth_user: str | None = None, auth_password: str | None = None,
                    held: bool = False, wait: int | None = None, reply_timeout: int | None = None):
        if tls not in drainmod.TLS_CHOICES:
            raise BadRequest(f"--tls: one of {', '.join(drainmod.TLS_CHOICES)}, not {tls!r}")
        if not 0 < port < 65536:
            raise BadRequest(f"bad port {port}")
        auth = (auth_user, auth_password or "") if auth_user else None
        kw: dict[str, Any] = {}
        if reply_timeout:
            kw = {"connect_timeout": float(reply_timeout), "timeouts": Timeouts.uniform(float(reply_timeout))}
        peer = drainmod.Peer(host, address, port, ehlo, tls, ca_file or None, auth, **kw)
        return defer.ensureDeferred(self._drain(normalize_id(id), peer, held, wait))

    async def _drain(self, qid: str, peer: drainmod.Peer, held: bool, wait: int | None) -> dict:
        q = self._queue()
        if not is_queue_id(qid):
            raise NoSuchMessage(f"{qid}: no such message in the queue (not a queue id)")
        drainer = drainmod.LiveDrain(q, self.ctx.spool, self.ctx.reactor, q.config.hostname)
        try:
            r = await drainer.drain(qid, peer, wait=float(wait if wait is not None else 60), held=held)
        except KeyError:
            raise NoSuchMessage(f"{qid}: no such message in the queue{_loading(q)}")
        return {"result": json.dumps(r.as_json()).encode("utf-8")}

    @Route.responder
    def route(self, address: str, client: str | None = None, sender: str | None = None):
        ctx = self.ctx.route_context()
        d = self.ctx.dns.run(routecheck.explain, ctx, address, client or None, sender)
        d.addCallback(lambda r: {"route": json.dumps(r).encode("utf-8")})
        return d

    @Reload.responder
    def reload(self):
        fn = self.ctx.reload
        if fn is None:
            raise ReloadUnsupported()
        d = defer.maybeDeferred(fn)

        def answer(r: dict) -> dict:
            return {"ok": bool(r.get("ok")), "messages": [str(x) for x in r.get("messages") or []],
                    "restart_needed": [str(x) for x in r.get("restart_needed") or []]}

        return d.addCallback(answer)


class ControlFactory(protocol.Factory):
    noisy = False

    def __init__(self, ctx: ControlContext, secret: bytes | None = None):
        self.ctx = ctx
        self.secret = secret  # None: the UNIX socket; else the TCP endpoint's shared secret
        self.protocols: set[ControlProtocol] = set()

    def buildProtocol(self, addr):
        return ControlProtocol(self.ctx, self)


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
    """Listens on the control socket while the relay runs.

    A socket that cannot be used stops the start with StartupError (the
    service that owns this one says it under twistd, without a traceback).
    """

    def __init__(self, ctx: ControlContext, path: str, *, source: str, tcp: Any = None, secret_file: str = "",
                 tls: Callable[[], Any] | None = None):
        self.ctx = ctx
        self.path = path
        self.reactor = ctx.reactor
        self.source = source
        self.where = f"{source}: control.socket"  # how errors name the setting
        self.factory = ControlFactory(ctx)
        self.port = None
        self.tcp = tcp  # control.tcp_listen (a HostPort) or None
        self.secret_file = secret_file
        self.tls = tls  # the relay's current ServerTLS ([tls]), for the TCP endpoint
        self.tcp_factory: ControlFactory | None = None
        self.tcp_port = None

    def startService(self) -> None:
        super().startService()
        where = self.where
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
        log.info("control socket for relayctl: {path}", path=self.path)
        if self.tcp is not None:
            self._listen_tcp()

    def _listen_tcp(self) -> None:
        """control.tcp_listen: TLS always, the shared secret before any command."""
        where = f"{self.source}: control.tcp_listen"
        try:
            with open(self.secret_file, "rb") as f:
                secret = f.readline().rstrip(b"\r\n")
        except OSError as e:
            raise StartupError(f"{self.source}: control.secret_file: {self.secret_file}: {e.strerror}")
        if len(secret) < MIN_SECRET:
            raise StartupError(f"{self.source}: control.secret_file: {self.secret_file}: the secret is shorter "
                               f"than {MIN_SECRET} characters")
        tls = self.tls() if self.tls is not None else None
        if tls is None:
            raise StartupError(f"{where}: needs tls.certificate and tls.key")
        self.tcp_factory = ControlFactory(self.ctx, secret)
        try:
            self.tcp_port = self.reactor.listenSSL(self.tcp.port, self.tcp_factory, tls.options,
                                                   interface=self.tcp.host)
        except error.CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            raise StartupError(f"{where}: cannot listen on {self.tcp}: {reason}")
        log.info("control endpoint for relayctl --fleet: {where} (TLS, shared secret)", where=str(self.tcp))

    def stopService(self):
        super().stopService()
        for f in (self.factory, self.tcp_factory):
            for p in list(f.protocols if f is not None else ()):
                if p.transport is not None:
                    p.transport.abortConnection()
        ports = [p for p in (self.port, self.tcp_port) if p is not None]
        self.port = self.tcp_port = None
        if not ports:
            return None
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
