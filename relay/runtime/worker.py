"""A worker process of a relay with ``workers > 1`` (started by relay.runtime.master).

It is a complete relay (relay.runtime.service.RelayService) whose queue is
``<spool>/w<index>/`` and whose listeners are sockets the master bound and
passed down (the same ones to every worker).  Connections per client IP are
counted in the master's shared table (``--conn-table``, relay.common.connlimit), so
a limit holds for the whole relay.  Its log events go to the master as JSON lines on stdout, so
the master's log (text or JSON) tells the whole story.  It dies with the
master (PR_SET_PDEATHSIG): a worker never outlives the process that owns
its listening sockets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Any


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


class EventPipe:
    """twisted.logger observer: one JSON object per event on a stream."""

    SKIP = frozenset(("log_logger", "log_source", "log_observer", "log_trace", "log_failure", "log_io",
                      "log_legacy", "log_system", "log_flattened"))

    def __init__(self, out):
        self.out = out

    def __call__(self, event: dict) -> None:
        d = {}
        for k, v in event.items():
            if k in self.SKIP:
                continue
            d[k] = _jsonable(v)
        level = event.get("log_level")
        d["log_level"] = level.name if level is not None else "info"
        fmt = event.get("log_format")
        if fmt is None:
            from twisted.logger import formatEvent

            d["log_format"] = "{log_text}"
            d["log_text"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            d["traceback"] = failure.getTraceback()
            d["log_format"] = (d.get("log_format") or "") + "\n{traceback}"
        try:
            self.out.write(json.dumps(d, separators=(",", ":")) + "\n")
            self.out.flush()
        except (ValueError, OSError):
            pass


def _start_logging(target: str, fmt: str, index: int) -> None:
    """Write log lines where the master writes its own (same format, each
    marked with the worker), or pipe events to the master."""
    from twisted.logger import FileLogObserver, globalLogBeginner

    if target == "pipe":
        # an observer is any callable taking the event; twisted types the list as
        # ILogObserver, a zope interface that a plain class cannot be to mypy
        globalLogBeginner.beginLoggingTo([EventPipe(sys.stdout)], redirectStandardIO=False)  # type: ignore[list-item]
        return
    from relay.runtime import logs  # late, once it dies with the master (see main)
    if fmt == "json":
        def formatter(event):
            event = dict(event)
            event["worker"] = index
            return logs.format_json_line(event)
    else:
        text = logs._TextFormatter()

        def formatter(event):
            if "log_system" not in event:
                level = event.get("log_level")
                event = dict(event)
                event["log_system"] = (f"w{index} {event.get('log_namespace', '-')}"
                                       f"#{level.name if level is not None else '-'}")
            return text(event)

    if target == "stdout":
        out = sys.stdout
    else:
        out = open(target, "a", buffering=1, encoding="utf-8")

        def reopen(signum, frame):  # the master's twistd rotated the file (SIGUSR1)
            observer._outFile = open(target, "a", buffering=1, encoding="utf-8")

        signal.signal(signal.SIGUSR1, reopen)
    observer = FileLogObserver(out, formatter)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)  # type: ignore[list-item]  # (as above)


CRASH_HOOK = "RELAY_TEST_WORKER_CRASH"


def _test_crash(index: int) -> bool:
    """A hook for tests only (docs/fleet.md): with $RELAY_TEST_WORKER_CRASH naming a
    file that lists this worker's index, the worker ends at start, before it takes
    its spool, as a worker that cannot start would (tests/integration/test_fleet_one_machine.py)."""
    path = os.environ.get(CRASH_HOOK)
    if not path:
        return False
    try:
        with open(path) as f:
            listed = f.read().split()
    except OSError:
        return False
    if str(index) not in listed:
        return False
    print(f"worker {index}: not starting: {CRASH_HOOK} lists it (a test hook)", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="relay.runtime.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--fds", required=True, help="JSON: endpoint description -> file descriptor")
    p.add_argument("--conn-table", type=int, help="descriptor of the per-IP connection table (relay.common.connlimit)")
    p.add_argument("--rate-table", type=int, help="descriptor of the [limits] table (relay.common.ratelimit)")
    p.add_argument("--config")
    p.add_argument("--defaults-spool")
    p.add_argument("--log-target", default="pipe", help="stdout, pipe, or a file path")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    args = p.parse_args(argv)
    _die_with_parent()
    if _test_crash(args.index):
        return 70
    _start_logging(args.log_target, args.log_format, args.index)

    # only now, once it dies with the master and logs where the master says: the
    # relay's modules (measured: 2.2 s, 596 modules, on a loaded 2-core machine)
    from relay import config as configmod
    from relay.common.connlimit import SharedTable
    from relay.common.ratelimit import RateTable
    from relay.config.workerpaths import worker_config
    from relay.runtime import fastpoll
    from relay.runtime.service import RelayService, StartupError

    def load_worker_config(path: str | None) -> configmod.Config:
        """The relay's config file as this worker runs it (at start and at each reload)."""
        cfg = configmod.load(path) if path else configmod.load(None, data={"spool": args.defaults_spool})
        return dataclasses.replace(
            worker_config(cfg, args.index),
            metrics=configmod.MetricsConfig(listen=()),  # the master serves the sum of the workers'
        )

    try:
        wcfg = load_worker_config(args.config)
    except configmod.ConfigError as e:
        print(f"worker {args.index}: bad config:\n{e}", file=sys.stderr)
        return 1
    os.makedirs(wcfg.spool, mode=0o700, exist_ok=True)
    fds = {desc: int(fd) for desc, fd in json.loads(args.fds).items()}

    from twisted.internet import reactor as default_reactor

    # Any: the reactor's interfaces are zope interfaces, whose methods mypy reads without self
    reactor: Any = default_reactor

    fastpoll.install(reactor)
    table = None
    if args.conn_table is not None:
        try:
            table = SharedTable(args.conn_table)
        except (OSError, ValueError) as e:
            print(f"worker {args.index}: not starting: connection table: {e}", file=sys.stderr)
            return 1
    rates = None
    if args.rate_table is not None:
        try:
            rates = RateTable.attach(args.rate_table)
        except (OSError, ValueError) as e:
            print(f"worker {args.index}: not starting: rate-limit table: {e}", file=sys.stderr)
            return 1
    try:
        svc = RelayService(wcfg, reactor, adopted=fds, worker=(args.index, args.count), conn_table=table,
                           rate_table=rates,
                           load_config=load_worker_config)
        svc.handle_signals = True
        svc.privilegedStartService()
        svc.startService()
    except StartupError as e:
        print(f"worker {args.index}: not starting: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
