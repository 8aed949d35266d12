"""Several relay processes on one machine: ``workers = N`` in the config.

One Python process runs on one core (the reactor thread does the protocol
work), so with ``workers > 1`` the ``twistd relay`` process becomes a small
master that:

* binds every SMTP and POP3 listener itself (as root when started as root,
  before twistd drops privileges), once, and hands the one listening socket
  of each listener to all N worker processes (``python -m relay.runtime.worker``),
  which all accept on it.  The connections waiting to be accepted are in one
  queue that only running workers take from: a worker that died (and waits
  for its restart) is given no connection, and none is lost with it.  (With
  a SO_REUSEPORT socket per worker, the kernel kept handing a dead worker's
  socket its share of new clients until the restart; and the master could
  not bind a new one after the privilege drop.)
* counts connections per client IP for the whole relay: a table in shared
  memory (relay.common.connlimit) that every worker maps, one column per worker;
  the column of a worker that died is zeroed before it restarts;
* gives worker i its own queue, ``<spool>/w<i>/`` (a complete spool:
  incoming, queue, lock, control socket), so no two processes ever touch the
  same message: what a worker acknowledged, it delivers; after a crash, the
  restarted worker finds it in its own directory;
* moves messages left in a directory no worker owns (``<spool>/queue`` from
  a single-process relay, ``w<j>`` after fewer workers) into an owned one
  before any worker starts (relay.runtime.queuemoves);
* checks the files every worker loads before starting any, and stops (exit
  status 1) when a worker refuses its first start: a config one process would
  refuse is not a restart loop;
* hands the queue of a worker that dies for good (more than RESTART_BURST
  deaths in RESTART_WINDOW) to a running worker, stopped meanwhile: the queue
  moves while neither runs, under both spool locks (docs/fleet.md);
* restarts a worker that dies, forwards SIGHUP (reload) and SIGTERM
  (graceful stop, 30 s bound) and re-emits the workers' log events in its
  own log (each marked with its worker), so the log is one story.

relayctl finds the workers' control sockets (``<spool>/w<i>/control.sock``)
and speaks to each; relay-sendmail's drop directory (``<spool>/drop``) is
picked up by worker 0.  With ``[metrics] listen``, the master serves the
metrics page: at each scrape it asks every worker for its figures over the
control socket and serves their sum (relay.runtime.metrics.WorkersMetrics).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol, threads
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay.common import connlimit
from relay.common import endpoints as epmod
from relay.common.errors import StartupError
from relay.common.ratelimit import RateTable
from relay.common.tls import load_server_tls
from relay.config import Config
from relay.config.workerpaths import worker_socket, worker_spool
from relay.queue import spool as spoolmod
from relay.runtime import parts
from relay.runtime.listen import server_endpoint
from relay.runtime.metrics import WorkersMetrics
from relay.runtime.process import exit_on_second_signal, raise_fd_limit
from relay.runtime.queuemoves import adopt_orphans, hand_over, queued_ids

log = Logger(namespace="relay.master")

RESTART_DELAY = 1.0
RESTART_BURST = 5  # restarts within RESTART_WINDOW before waiting longer
RESTART_WINDOW = 60.0
RESTART_BACKOFF = 30.0  # seconds before the next start of a worker that keeps dying
STOP_BOUND = 32.0


def listener_descriptions(config: Config) -> list[str]:
    return list(dict.fromkeys(list(config.smtp.listen) + list(config.smtp.submission) + list(config.pop3.listen)))


def bind(description: str, backlog_default: int = 1024) -> socket.socket:
    """The listening socket for a tcp:, tcp6:, ssl: or systemd: endpoint,
    shared by every worker (non-blocking: each worker is woken for a new
    connection, and all but one find nothing to accept)."""
    spec = epmod.parse(description)
    if spec.kind == "systemd":
        from twisted.python.systemd import ListenFDs

        fds = ListenFDs.fromEnvironment()
        if "index" in spec.kwargs:
            fd = fds.inheritedDescriptors()[int(spec.kwargs["index"])]
        else:
            fd = fds.inheritedNamedDescriptors()[spec.kwargs["name"]]
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        s.set_inheritable(True)
        return s
    port = int(spec.args[0])
    iface = spec.interface
    family = socket.AF_INET6 if (spec.kind == "tcp6" or ":" in iface) else socket.AF_INET
    if family == socket.AF_INET6 and not iface:
        iface = "::"
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((iface, port))
        s.listen(int(spec.kwargs.get("backlog", backlog_default)))
        s.set_inheritable(True)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class WorkerProcess(protocol.ProcessProtocol):
    """One worker: its log events come as JSON lines on its stdout."""

    # an IProcessTransport once spawned: Any, as mypy reads a zope interface's methods without self
    transport: Any

    def __init__(self, master: "RelayMaster", index: int):
        self.master = master
        self.index = index
        self.buf = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.pid: int | None = None
        self.refused = False  # it said it is not starting (relay.runtime.worker: bad config, a start-up error)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self._event(line)
        if len(self.buf) > 1 << 20:
            self._event(self.buf)
            self.buf = b""

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith(f"worker {self.index}: not starting: ") or \
                    line.startswith(f"worker {self.index}: bad config:"):
                self.refused = True
            if line.strip():
                log.error("[worker {worker}] {line}", worker=self.index, line=line)

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            level = LogLevel.levelWithName(event.pop("log_level", "info"))
        except (ValueError, KeyError, AttributeError, TypeError):
            log.info("[worker {worker}] {line}", worker=self.index, line=line.decode("utf-8", "replace"))
            return
        event["log_level"] = level
        event["worker"] = self.index
        ns = event.get("log_namespace", "-")
        event["log_system"] = f"w{self.index} {ns}#{level.name}"
        globalLogPublisher(event)

    def processEnded(self, reason) -> None:
        if self.buf:
            self._event(self.buf)
            self.buf = b""
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.master.worker_ended(self, code, sig)
        self.ended.callback(None)


class RelayMaster(service.Service):
    """The ``twistd relay`` process when workers > 1 (see the module docstring)."""

    def __init__(self, config: Config, reactor=None, log_target: str = "pipe"):
        from twisted.internet import reactor as default_reactor

        self.config = config
        # Any: the reactor's interfaces are zope interfaces, whose methods mypy reads without self
        self.reactor: Any = reactor or default_reactor
        # where the workers write their log lines: "stdout" (the master's, inherited),
        # a file's path (appended to, as the master does), or "pipe": sent to the
        # master as JSON events and logged by it (syslog, --logger)
        self.log_target = log_target
        self.sockets: dict[str, socket.socket] = {}
        self.conn_table: connlimit.SharedTable | None = None  # made before the first worker starts
        # the [limits] counts of every worker (relay.common.ratelimit); kept across a worker's
        # restart: what it counted was accepted, and still counts
        self.rate_table: RateTable | None = None
        self.procs: dict[int, WorkerProcess] = {}
        self.restarts: dict[int, list[float]] = {}
        self.handover: tuple[int, int] | None = None  # (dead worker, the one taking its queue)
        self.spawns: dict[int, int] = {}  # starts of each worker: a refused first one stops the relay
        self.stopping = False
        self.failed = False  # a worker refused its first start: the relay stops (_refused_at_start)
        self.exit_on_error = False
        self.handle_signals = False
        self._lock_fd: int | None = None
        self.metrics_ports: list = []

    def privilegedStartService(self) -> None:
        raise_fd_limit()
        for desc in listener_descriptions(self.config):
            try:
                self.sockets[desc] = bind(desc)
            except OSError as e:
                msg = f"{self.config.source}: cannot listen on {desc!r}: {e.strerror or e}"
                if self.exit_on_error:
                    raise SystemExit(f"twisted-relay: not starting: {msg}")
                raise StartupError(msg)
        try:
            self._listen_metrics()
        except StartupError as e:
            if self.exit_on_error:
                raise SystemExit(f"twisted-relay: not starting: {e}")
            raise
        super().privilegedStartService()

    def _listen_metrics(self) -> None:
        """[metrics] listen: the master's page, summing the workers'."""
        if not self.config.metrics.listen:
            return
        site = WorkersMetrics(self.reactor, [worker_socket(self.config, i)
                                             for i in range(self.config.workers)]).site()
        for desc in self.config.metrics.listen:
            factory: Any = site
            try:
                ep, wrap = server_endpoint(self.reactor, desc)
                if wrap:
                    if not self.config.tls.enabled:
                        raise StartupError(f"{self.config.source}: metrics.listen: {desc!r} is an ssl: endpoint "
                                           "without privateKey=, so it needs tls.certificate and tls.key")
                    tls = load_server_tls(self.config.tls.certificate, self.config.tls.key)
                    # CertificateOptions and Site provide their interfaces through zope's
                    # @implementer, which mypy does not read as base classes
                    factory = TLSMemoryBIOFactory(tls.options, False, site)  # type: ignore[arg-type]
                d = ep.listen(factory)
                failures: list = []
                d.addCallbacks(self.metrics_ports.append, failures.append)
                if failures:
                    failures[0].raiseException()
            except StartupError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad endpoint or a port in use: said, not a traceback
                raise StartupError(f"{self.config.source}: cannot listen on metrics endpoint {desc!r}: {e}")
            log.info("metrics on {endpoint} (the sum of the workers')", endpoint=desc)

    def startService(self) -> None:
        if not self.sockets:
            self.privilegedStartService()
        self._check_keys()
        top = spoolmod.Spool(self.config.spool)
        try:
            top.create()
            self._lock_fd = top.lock()
            adopt_orphans(self.config.spool, self.config.workers, lambda fmt, **kw: log.info(fmt, **kw))
        except (OSError, spoolmod.SpoolLocked) as e:
            msg = f"spool {self.config.spool}: {e}"
            if self.exit_on_error:
                raise SystemExit(f"twisted-relay: not starting: {msg}")
            raise StartupError(msg)
        try:
            self.conn_table = connlimit.SharedTable.create(self.config.workers)
            self.rate_table = RateTable.create_shared()
        except OSError as e:
            msg = f"cannot make the workers' connection table (memfd): {e.strerror or e}"
            if self.exit_on_error:
                raise SystemExit(f"twisted-relay: not starting: {msg}")
            raise StartupError(msg)
        super().startService()
        log.info("twisted-relay master starting {workers} workers: config {source}, spool {spool}",
                 workers=self.config.workers, source=self.config.source, spool=self.config.spool)
        for desc in self.sockets:
            log.info("listening on {endpoint} (shared by the workers)", endpoint=desc)
        if self.handle_signals:
            signal.signal(signal.SIGHUP, lambda *a: self.reactor.callFromThread(self.forward, signal.SIGHUP))
            if self.log_target not in ("stdout", "pipe"):
                # twistd rotates its log file on SIGUSR1: the workers reopen theirs
                old = signal.getsignal(signal.SIGUSR1)

                def usr1(signum, frame):
                    if callable(old):
                        old(signum, frame)
                    self.reactor.callFromThread(self.forward, signal.SIGUSR1)

                signal.signal(signal.SIGUSR1, usr1)
        for i in range(self.config.workers):
            self.spawn(i)

    def _check_keys(self) -> None:
        """The files a worker loads at start (users, aliases, the TLS certificate
        and key, the DKIM key files, the outbound CA files; as the service does),
        checked once here (as the user the workers run as) before any worker starts: a bad one is one
        line naming the file and a non-zero exit, not an error per worker and a
        restart loop."""
        try:
            parts.load_users(self.config)
            parts.load_aliases(self.config)
            parts.load_tls(self.config)
            parts.load_dkim_keys(self.config)
            parts.load_sts_trust(self.config)
            parts.check_delivery_ca_files(self.config)
        except parts.PartError as e:
            if self.exit_on_error:
                raise SystemExit(f"twisted-relay: not starting: {e}")
            raise StartupError(str(e))

    def spawn(self, i: int) -> None:
        fds = {}
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        n = 3
        for desc, sock in self.sockets.items():
            child_fds[n] = sock.fileno()
            fds[desc] = n
            n += 1
        table_fd = n
        assert self.conn_table is not None  # made in startService, before the first spawn
        child_fds[table_fd] = self.conn_table.fd
        assert self.rate_table is not None and self.rate_table.fd is not None
        rate_fd = table_fd + 1
        child_fds[rate_fd] = self.rate_table.fd
        if self.log_target == "stdout":
            child_fds[1] = 1  # the workers write their own lines where the master writes
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        args = [sys.executable, "-m", "relay.runtime.worker", "--index", str(i), "--count", str(self.config.workers),
                "--fds", json.dumps(fds), "--conn-table", str(table_fd),
                "--rate-table", str(rate_fd),
                "--log-target", self.log_target, "--log-format", self.config.log.format]
        if self.config.path:
            args += ["--config", self.config.path]
        else:
            args += ["--defaults-spool", self.config.spool]
        proto = WorkerProcess(self, i)
        self.procs[i] = proto
        self.spawns[i] = self.spawns.get(i, 0) + 1
        self.reactor.spawnProcess(proto, sys.executable, args, env=env, childFDs=child_fds)
        log.info("worker {worker} started (pid {pid})", worker=i, pid=proto.pid)

    def worker_ended(self, proto: WorkerProcess, code, sig) -> None:
        i = proto.index
        if self.procs.get(i) is proto:
            del self.procs[i]
        if self.conn_table is not None:
            # its connections died with it: they no longer count against anyone's limit
            self.conn_table.release_worker(i)
        how = code if sig is None else f"signal {sig}"
        if self.stopping:
            log.info("worker {worker} stopped (exit {code})", worker=i, code=how)
            return
        if self.handover is not None and self.handover[1] == i:
            self._take_over(*self.handover)  # stopped by us to take a dead worker's queue
            return
        if code == 1 and proto.refused and self.spawns.get(i) == 1 and not self.failed:
            self._refused_at_start(i)
            return
        log.error("worker {worker} ended unexpectedly (exit {code}); restarting it", worker=i, code=how)
        now = time.monotonic()
        recent = [t for t in self.restarts.get(i, []) if now - t < RESTART_WINDOW] + [now]
        self.restarts[i] = recent
        delay = RESTART_DELAY if len(recent) <= RESTART_BURST else RESTART_BACKOFF
        if delay > RESTART_DELAY:
            log.error("worker {worker} ended {count} times in {window:.0f} s: next start in {delay:.0f} s "
                      "(the other workers take its connections meanwhile)", worker=i, count=len(recent),
                      window=RESTART_WINDOW, delay=delay)
            self._dead_for_good(i)
        self.reactor.callLater(delay, self._restart, i)

    def _refused_at_start(self, i: int) -> None:
        """A worker's first start refused (what it said is logged above): every
        worker runs the same config, so the relay does not start, as one process
        would not; twistd then exits with status 1 (there is no other way to give
        it one once the reactor runs)."""
        import atexit

        self.failed = True
        log.critical("worker {worker} cannot start (see above): twisted-relay is not starting", worker=i)

        def exit_status() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        atexit.register(exit_status)
        self.reactor.callLater(0, self.reactor.stop)

    def _restart(self, i: int) -> None:
        if self.stopping or i in self.procs:
            return
        if self.handover is not None and i in self.handover:  # its queue is being moved: after that
            self.reactor.callLater(RESTART_DELAY, self._restart, i)
            return
        self.spawn(i)

    # ---------------------------------------------------------------- a worker that dies for good
    # It ended more than RESTART_BURST times within RESTART_WINDOW: what it had
    # accepted would wait for a start that may never succeed.  A running worker
    # is stopped (gracefully, as for SIGTERM), the dead one's queue is moved into
    # its queue while neither runs (both spool locks held by the master: no
    # message ever has two owners), and it starts again with the messages.

    def _dead_for_good(self, i: int) -> None:
        if self.handover is not None:
            return  # one at a time: the next death of a dead worker tries again
        d = threads.deferToThread(queued_ids, worker_spool(self.config.spool, i))
        d.addCallback(lambda ids: self._stop_for_handover(i, len(ids)))
        d.addErrback(lambda f: log.failure("worker {worker}: cannot read its queue", f, worker=i))

    def _stop_for_handover(self, dead: int, count: int) -> None:
        if not count or self.stopping or self.handover is not None or dead in self.procs:
            return  # nothing waits in it, or it came back meanwhile (it delivers its queue itself)
        live = [k for k in sorted(self.procs) if k != dead and k not in self._dead_workers()]
        if not live:
            log.error("worker {worker} died for good with {count} queued messages and no other worker runs: "
                      "they wait for one to start", worker=dead, count=count)
            return
        to = live[0]
        self.handover = (dead, to)
        log.error("worker {worker} died for good: worker {to} restarts to take its {count} queued messages",
                  worker=dead, to=to, count=count)
        proto = self.procs[to]
        for sig, after in ((signal.SIGTERM, 0.0), (signal.SIGKILL, STOP_BOUND)):  # as a stop: bounded
            self.reactor.callLater(after, self._signal_if_running, proto, sig)

    def _signal_if_running(self, proto: WorkerProcess, sig: int) -> None:
        if self.procs.get(proto.index) is proto:
            try:
                proto.transport.signalProcess(sig)
            except Exception:  # noqa: BLE001 - it has just ended: worker_ended takes over as well
                pass

    def _dead_workers(self) -> set[int]:
        now = time.monotonic()
        return {i for i, ts in self.restarts.items()
                if len([t for t in ts if now - t < RESTART_WINDOW]) > RESTART_BURST}

    def _take_over(self, dead: int, to: int) -> None:
        """Worker ``to`` has ended (stopped for the handover): move, then start it again."""
        log.info("worker {to} stopped for the hand-over of worker {worker}'s queue", to=to, worker=dead)

        def moved(count: int) -> None:
            if count < 0:
                log.error("worker {worker}'s queue is still locked by a process: left to it (not dead)",
                          worker=dead)
            else:
                log.info("moved {count} queued messages of worker {worker} into worker {to}'s queue",
                         count=count, worker=dead, to=to)

        def failed(f) -> None:
            log.failure("worker {worker}: cannot move its queue to worker {to}", f, worker=dead, to=to)

        def restart(_: object) -> None:
            self.handover = None
            if not self.stopping and to not in self.procs:
                self.spawn(to)

        d = threads.deferToThread(hand_over, self.config.spool, dead, to)
        d.addCallbacks(moved, failed)
        d.addBoth(restart)

    def forward(self, sig: int) -> None:
        for p in list(self.procs.values()):
            try:
                p.transport.signalProcess(sig)
            except Exception:  # noqa: BLE001 - it may have just ended
                pass
        if sig == signal.SIGHUP:
            log.info("SIGHUP forwarded to {count} workers (each reloads its config)", count=len(self.procs))

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True
        if self.handle_signals:
            exit_on_second_signal(before=lambda: self.forward(signal.SIGKILL))
        procs = list(self.procs.values())
        self.forward(signal.SIGTERM)
        if procs:
            kill = self.reactor.callLater(STOP_BOUND, self.forward, signal.SIGKILL)
            yield defer.DeferredList([p.ended for p in procs], consumeErrors=True)
            if kill.active():
                kill.cancel()
        for s in self.sockets.values():
            s.close()
        if self.conn_table is not None:
            self.conn_table.close()
            self.conn_table = None
        if self.rate_table is not None:
            self.rate_table.close()
            self.rate_table = None
        for port in self.metrics_ports:
            yield port.stopListening()
        self.metrics_ports = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        super().stopService()
        log.info("twisted-relay master stopped")
