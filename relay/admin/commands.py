"""relayctl verbs for the queue, status, routing and reload.

Each verb first tries the running relay's control socket (relay.admin.control);
when nothing listens there and no relay holds the spool lock, the queue
verbs work on the spool directly (relay.admin.offline) and ``status`` says the
relay is not running.  A relay that holds the spool but does not answer
on its socket is reported as such, never silently bypassed: writing its
spool behind its back would race its scheduler.

Exit status: 0 done; 1 a failed action (an unknown queue id, a relay that
does not answer, ``status`` of a stopped relay, a refused ``route``); 2
usage.  Data goes to stdout, messages to stderr.  ``RELAYCTL_TIMEOUT``
(seconds, default 10) bounds the wait for the relay's answers.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import sys
import time
import tomllib

from relay import config as configmod
from relay.admin import client as cc
from relay.admin import proto
from relay.admin.offline import NoSuchMessage, OfflineError, OfflineSpool, RelayRunning
from relay.queue import view as queueview
from relay.runtime.workerpaths import worker_config, worker_socket_path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
PAGE = 2000  # messages per listing page asked of the relay
ID_BATCH = 1000  # queue ids per request (an AMP value holds 64 KiB)


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


def _err(msg: str) -> None:
    print(f"relayctl: {msg}", file=sys.stderr)


def _timeout() -> float:
    raw = os.environ.get("RELAYCTL_TIMEOUT", "")
    if not raw:
        return 10.0
    try:
        t = float(raw)
        if t <= 0:
            raise ValueError
        return t
    except ValueError:
        raise CtlError(f"RELAYCTL_TIMEOUT: expected a number of seconds, got {raw!r}", EXIT_USAGE)


def _verb(fn):
    """Run a verb: CtlError -> message on stderr and its exit status."""

    def run(args) -> int:
        try:
            return fn(args)
        except CtlError as e:
            _err(str(e))
            return e.code
        except BrokenPipeError:
            # the reader went away (relayctl queue | head): not an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK

    return run


def _config(args) -> configmod.Config:
    try:
        return configmod.load_effective(args.config)
    except configmod.ConfigError as e:
        raise CtlError("bad config:\n" + str(e))


# -- reaching the relay ----------------------------------------------------------------------


class Live:
    """The running relay, over its control socket."""

    def __init__(self, client: cc.Client, path: str):
        self.client = client
        self.path = path

    def close(self) -> None:
        self.client.close()


class Offline:
    """No relay runs: the spool itself."""

    def __init__(self, spool: OfflineSpool):
        self.spool = spool

    def close(self) -> None:
        pass


def open_relay(cfg: configmod.Config) -> Live | Offline:
    path = cfg.control_socket
    timeout = _timeout()
    off = OfflineSpool(cfg)
    # A relay starting up holds the spool lock a moment before its socket
    # listens: give it that moment before calling it unresponsive.
    deadline = time.monotonic() + min(timeout, 5.0)
    while True:
        try:
            client = cc.Client.connect(path, timeout)
        except cc.NotListening as e:
            reason = e
        except cc.PermissionDenied as e:
            raise CtlError(f"{e} (run relayctl as the user the relay runs as, or root)")
        except cc.ControlError as e:
            raise CtlError(str(e))
        else:
            try:
                client.call(proto.HELLO)
            except cc.ControlError as e:
                client.close()
                raise CtlError(str(e))
            return Live(client, path)
        try:
            off.check_not_running()
            return Offline(off)
        except RelayRunning as e:
            if time.monotonic() >= deadline:
                raise CtlError(f"{e} but does not answer on its control socket ({reason})")
            time.sleep(0.1)
        except OfflineError as e:
            raise CtlError(str(e))


def worker_configs(cfg: configmod.Config) -> list[configmod.Config]:
    """One config per queue: the relay's, or each worker's (workers > 1,
    relay.runtime.master): every worker has its own spool and control socket."""
    if cfg.workers <= 1:
        return [cfg]
    return [worker_config(cfg, i) for i in range(cfg.workers)]


def open_relays(cfg: configmod.Config) -> list[Live | Offline]:
    out: list[Live | Offline] = []
    try:
        for c in worker_configs(cfg):
            if cfg.workers > 1 and not os.path.isdir(c.spool):
                continue  # a worker that never ran has no queue
            out.append(open_relay(c))
    except BaseException:
        for r in out:
            r.close()
        raise
    return out


def _close_all(relays) -> None:
    for r in relays:
        r.close()


def _remote(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except cc.RemoteError as e:
        raise CtlError(e.description or e.code)
    except cc.ControlError as e:
        raise CtlError(str(e))


def _offline(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RelayRunning as e:
        raise CtlError(f"{e}: it started meanwhile; run the command again")
    except (OfflineError, NoSuchMessage) as e:
        raise CtlError(str(e))
    except PermissionError as e:
        raise CtlError(f"{e.filename or ''}: {e.strerror} (run relayctl as the relay's user or root)")
    except OSError as e:
        raise CtlError(f"{e.filename or ''}: {e.strerror or e}")


# -- queue ------------------------------------------------------------------------------------


def _live_pages(client: cc.Client):
    """JSON-lines pages from the relay; the next page is asked for before
    this one is handled, so the relay builds it while we print."""
    pending = client.send(proto.QUEUE_LIST, start=True, limit=PAGE)
    warned = False
    while True:
        box = client.result(pending)
        more = box["more"]
        if box["loading"] and not warned:
            warned = True
            _err("the relay is still reading its spool at start-up: this listing is incomplete")
        if more:
            pending = client.send(proto.QUEUE_LIST, start=False, limit=PAGE)
        yield box["lines"]
        if not more:
            return


def _offline_pages(off: OfflineSpool, problems: list[str]):
    buf: list[bytes] = []
    for line in off.lines(problems):
        buf.append(line)
        if len(buf) >= PAGE:
            yield b"".join(buf)
            buf = []
    if buf:
        yield b"".join(buf)


def _pages_of(relays, problems):
    for relay in relays:
        if isinstance(relay, Live):
            yield from _live_pages(relay.client)
        else:
            yield from _offline_pages(relay.spool, problems)


def queue_list(relay, as_json: bool) -> int:
    problems: list[str] = []
    relays = relay if isinstance(relay, list) else [relay]
    pages = _pages_of(relays, problems)
    out = sys.stdout
    if as_json:
        raw = out.buffer
        for page in _guard(pages):
            raw.write(page)
        raw.flush()
    else:
        table = queueview.Table(out)
        for page in _guard(pages):
            table.add_page(page)
        table.finish()
        out.flush()
    for p in problems:
        _err(p)
    return EXIT_OK


def _guard(pages):
    """Iterate pages, turning transport/offline errors into CtlError."""
    it = iter(pages)
    while True:
        try:
            page = next(it)
        except StopIteration:
            return
        except cc.RemoteError as e:
            raise CtlError(e.description or e.code)
        except cc.ControlError as e:
            raise CtlError(str(e))
        except (OfflineError, OSError) as e:
            raise CtlError(str(e))
        yield page


def queue_show(relay, qid: str, as_json: bool) -> int:
    qid = qid.strip().upper()
    relays = relay if isinstance(relay, list) else [relay]
    if not relays:  # workers > 1, none of which has run yet: no queue at all
        raise CtlError(f"{qid}: no such message in the queue")
    d = None
    for i, r in enumerate(relays):
        try:
            if isinstance(r, Live):
                box = _remote(r.client.call, proto.QUEUE_SHOW, id=qid)
                d = json.loads(box["message"])
            else:
                d = _offline(r.spool.details, qid)
            break
        except CtlError:
            if i == len(relays) - 1:
                raise
    if as_json:
        sys.stdout.write(json.dumps(d, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(queueview.format_details(d))
    return EXIT_OK


_DONE_WORDS = {"delete": "deleted", "hold": "put on hold", "release": "released", "retry": "retried",
               "bounce": "returned"}


def queue_action(relay, action: str, ids: list[str], every: bool) -> int:
    if isinstance(relay, list):
        return _queue_action_workers(relay, action, ids, every)
    results: list[dict] = []
    totals = {"done": 0, "failed": 0, "skipped": 0}
    if isinstance(relay, Live):
        timeout = _timeout()
        if every:
            box = _remote(relay.client.call, proto.QUEUE_ACTION, action=action, ids=[], all=True,
                          timeout=timeout * 60)
            res = json.loads(box["result"])
            _merge(res, results, totals)
        else:
            for i in range(0, len(ids), ID_BATCH):
                batch = ids[i : i + ID_BATCH]
                box = _remote(relay.client.call, proto.QUEUE_ACTION, action=action, ids=batch, all=False,
                              timeout=timeout * 6)
                _merge(json.loads(box["result"]), results, totals)
    else:
        off = relay.spool
        _offline(_offline_action, off, action, ids, every, results, totals)
    for r in results:
        if r["ok"]:
            print(f"{r['id']}: {r['text']}", file=sys.stderr)
        else:
            _err(f"{r['id']}: {r['text']}")
    if every:
        n = totals["done"]
        msg = f"{_DONE_WORDS[action]} {n} message{'s' if n != 1 else ''}"
        if totals["skipped"]:
            msg += f" ({totals['skipped']} skipped: on hold or being delivered)"
        print(msg, file=sys.stderr)
    return EXIT_FAIL if totals["failed"] else EXIT_OK


def _queue_action_workers(relays, action: str, ids: list[str], every: bool) -> int:
    """Several workers, each with its own queue: --all goes to each; an id is
    done by the worker that has it (only "no such message" everywhere fails)."""
    if len(relays) == 1:
        return queue_action(relays[0], action, ids, every)
    if every:
        code = EXIT_OK
        for r in relays:
            code = max(code, queue_action(r, action, ids, every))
        return code
    failed = False
    for qid in ids:
        # no relay (workers > 1, none of which has run yet): no queue has it
        outcome = (EXIT_FAIL, f"relayctl: {qid.strip().upper()}: no such message in the queue\n")
        for r in relays:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    rc = queue_action(r, action, [qid], False)
                except CtlError as e:
                    rc = EXIT_FAIL
                    err.write(f"relayctl: {e}\n")
            text = err.getvalue()
            if rc == EXIT_OK:
                outcome = (rc, text)
                break
            if r is relays[0] or "no such message" not in text:
                outcome = (rc, text)
        rc, text = outcome
        sys.stderr.write(text)
        failed = failed or rc != EXIT_OK
    return EXIT_FAIL if failed else EXIT_OK


def _merge(res: dict, results: list[dict], totals: dict) -> None:
    results.extend(res.get("results", []))
    for k in totals:
        totals[k] += int(res.get(k, 0))


def _offline_action(off: OfflineSpool, action: str, ids: list[str], every: bool,
                    results: list[dict], totals: dict) -> None:
    with off.locked():
        targets = off.ids() if every else [i.strip().upper() for i in ids]
        for qid in targets:
            if every and action == "retry":
                try:
                    if off.load(qid).state.hold:
                        totals["skipped"] += 1
                        continue
                except NoSuchMessage:
                    continue
            ok, text = off.act(action, qid)
            queueview.tally_action(results, totals, qid, ok, text, every)


@_verb
def cmd_queue(args) -> int:
    action = args.queue_cmd or "list"
    if action in proto.ACTIONS_ON_ALL:
        if args.all and args.ids:
            raise CtlError(f"queue {action}: give queue ids or --all, not both", EXIT_USAGE)
        if not args.all and not args.ids:
            raise CtlError(f"queue {action}: give one or more queue ids, or --all", EXIT_USAGE)
    cfg = _config(args)
    relays = open_relays(cfg)
    relay = relays if len(relays) != 1 else relays[0]
    try:
        if action == "list":
            return queue_list(relay, args.json)
        if action == "show":
            return queue_show(relay, args.id, getattr(args, "show_json", False) or args.json)
        return queue_action(relay, action, list(args.ids), bool(getattr(args, "all", False)))
    finally:
        _close_all(relays)


# -- status -------------------------------------------------------------------------------------


@_verb
def cmd_status(args) -> int:
    cfg = _config(args)
    relays = open_relays(cfg)
    parts = []
    try:
        for relay, wcfg in zip(relays, worker_configs(cfg)):
            if isinstance(relay, Live):
                box = _remote(relay.client.call, proto.STATUS)
                parts.append(json.loads(box["status"]))
            else:
                counts = _offline(relay.spool.counts)
                parts.append({"running": False, "config": cfg.source, "spool": relay.spool.spool.root,
                              "control_socket": wcfg.control_socket,
                              "queue": {**counts, "total": sum(counts.values())}})
    finally:
        _close_all(relays)
    s = _combine_status(parts, cfg) if len(parts) != 1 else parts[0]
    code = EXIT_OK if s.get("running") else EXIT_FAIL
    if args.json:
        sys.stdout.write(json.dumps(s) + "\n")
    else:
        sys.stdout.write(queueview.format_status(s))
    return code


def _combine_status(parts: list[dict], cfg: configmod.Config) -> dict:
    """The workers' statuses as one: counts added up, each worker listed."""
    if not parts:
        return {"running": False, "config": cfg.source, "spool": cfg.spool, "queue": {}}

    def add(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: add(a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b)}
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return a + b
        return a

    live = [p for p in parts if p.get("running")]
    base = dict(live[0] if live else parts[0])
    for key in ("queue", "counters", "sessions"):
        acc: dict = {}
        for p in parts:
            acc = add(acc, p.get(key) or {}) if acc else dict(p.get(key) or {})
        base[key] = acc
    base["running"] = bool(live)
    base["spool"] = cfg.spool
    base["workers"] = [{"index": i, "running": bool(p.get("running")), "pid": p.get("pid"),
                        "spool": p.get("spool"), "control_socket": p.get("control_socket")}
                       for i, p in enumerate(parts)]
    if live:
        base["uptime"] = max(p.get("uptime", 0) for p in live)
    return base


# -- route --------------------------------------------------------------------------------------


def _offline_route(cfg: configmod.Config, address: str, client: str | None) -> dict:
    """The answer built from the config, with the parts the relay would build
    (relay.runtime.parts)."""
    # only here: relay.runtime.parts imports relay.admin.route, relay.delivery.mx (dnspython,
    # Twisted's threads) and relay.runtime.tls (OpenSSL) (measured: 0.30 s, 459 modules, against
    # 0.07 s for all of this module), which no other verb needs
    from relay.admin import route as routecheck
    from relay.runtime import parts

    try:
        ctx = parts.offline_route_context(cfg)
    except parts.PartError as e:
        raise CtlError(str(e))
    return routecheck.explain(ctx, address, client)


@_verb
def cmd_route(args) -> int:
    from relay.admin import route as routecheck  # 0.16 s of imports, for this verb only (see _offline_route)

    if args.client:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            raise CtlError(f"--client: not an IP address: {args.client!r}", EXIT_USAGE)
    cfg = _config(args)
    relay = open_relay(worker_configs(cfg)[0])
    try:
        if isinstance(relay, Live):
            box = _remote(relay.client.call, proto.ROUTE, address=args.address, client=args.client or None,
                          timeout=max(_timeout(), 60.0))
            r = json.loads(box["route"])
        else:
            r = _offline_route(cfg, args.address, args.client)
    finally:
        relay.close()
    if args.json:
        sys.stdout.write(json.dumps(r) + "\n")
    else:
        sys.stdout.write(routecheck.format_text(r))
    return EXIT_OK if r.get("ok") else EXIT_FAIL


# -- reload -------------------------------------------------------------------------------------


def _raw_socket_path(explicit: str | None) -> str | None:
    """The control socket named by a config file that does not load: a bad
    config must still reach the running relay, which refuses it and logs why."""
    path = configmod.find_config_file(explicit)
    if path is None:
        return None
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        data = {}
    control = data.get("control")
    sock = control.get("socket") if isinstance(control, dict) else None
    spool = data.get("spool")
    spool = os.path.join(base, spool if isinstance(spool, str) and spool else "spool")
    workers = data.get("workers")
    if isinstance(workers, int) and not isinstance(workers, bool) and 1 < workers <= 64:
        named = os.path.join(base, sock) if isinstance(sock, str) and sock else ""
        return [worker_socket_path(spool, named, i) for i in range(workers)]
    if isinstance(sock, str) and sock:
        return os.path.join(base, sock)
    return os.path.join(spool, "control.sock")


def _reload_targets(args) -> list[Live]:
    try:
        cfg = _config(args)
    except CtlError as bad:
        socks = _raw_socket_path(args.config)
        if socks is None:
            raise
        out = []
        for sock in socks if isinstance(socks, list) else [socks]:
            try:
                client = cc.Client.connect(sock, _timeout())
                client.call(proto.HELLO)
            except cc.ControlError:
                continue
            out.append(Live(client, sock))
        if not out:
            raise bad
        return out
    relays = open_relays(cfg)
    live = [r for r in relays if isinstance(r, Live)]
    if not live:
        _close_all(relays)
        raise CtlError("the relay is not running: nothing to reload (it reads the config when it starts)")
    for r in relays:
        if not isinstance(r, Live):
            r.close()
    return live


@_verb
def cmd_reload(args) -> int:
    relays = _reload_targets(args)
    all_ok = True
    try:
        for i, relay in enumerate(relays):
            box = _remote(relay.client.call, proto.RELOAD, timeout=max(_timeout(), 60.0))
            prefix = f"worker {i}: " if len(relays) > 1 else ""
            ok = box["ok"]
            messages = box["messages"]
            for m in messages:
                print(prefix + m, file=sys.stderr)
            for key in box["restart_needed"]:
                if not any(key in m for m in messages):
                    print(f"{prefix}{key} changed: takes effect after a restart", file=sys.stderr)
            if not ok:
                all_ok = False
                if not messages:
                    _err(f"{prefix}reload refused; the relay keeps its running config")
            elif not messages:
                print(f"{prefix}config reloaded", file=sys.stderr)
    finally:
        _close_all(relays)
    return EXIT_OK if all_ok else EXIT_FAIL


# -- the parser -----------------------------------------------------------------------------------


def add_commands(sub) -> None:
    """Called by relay.admin.cli with its sub-command parsers."""
    q = sub.add_parser("queue", help="list the queue (like mailq); show, delete, hold, release, retry, "
                                     "bounce messages")
    parser_class = type(q)
    q.add_argument("--json", action="store_true",
                   help="one JSON object per line per message (postqueue -j fields plus ours)")
    qs = q.add_subparsers(dest="queue_cmd", metavar="ACTION", parser_class=parser_class)
    x = qs.add_parser("show", help="one message: envelope, recipients with every attempt, headers")
    x.add_argument("id", metavar="ID")
    x.add_argument("--json", dest="show_json", action="store_true", help="as one JSON object")
    for name, helptext in (("delete", "delete messages (no bounce)"),
                           ("retry", "deliver now: attempted within a second")):
        x = qs.add_parser(name, help=helptext)
        x.add_argument("ids", metavar="ID", nargs="*")
        x.add_argument("--all", action="store_true", help="every message in the queue")
    for name, helptext in (("hold", "no delivery and no expiry until released"),
                           ("release", "release held messages"),
                           ("bounce", "return to the sender now, with a delivery status notification")):
        x = qs.add_parser(name, help=helptext)
        x.add_argument("ids", metavar="ID", nargs="+")
    q.set_defaults(func=cmd_queue, queue_cmd=None, all=False, ids=[])

    r = sub.add_parser("route", help="how an address would be delivered now (does the DNS look-up)")
    r.add_argument("address", metavar="ADDRESS")
    r.add_argument("--client", metavar="IP",
                   help="decide as for a client at this IP (default: a trusted client)")
    r.add_argument("--json", action="store_true", help="as one JSON object")
    r.set_defaults(func=cmd_route)

    s = sub.add_parser("status", help="uptime, queue counts, counters, sessions, listeners")
    s.add_argument("--json", action="store_true", help="as one JSON object")
    s.set_defaults(func=cmd_status)

    rl = sub.add_parser("reload", help="make the running relay re-read its config")
    rl.set_defaults(func=cmd_reload)
