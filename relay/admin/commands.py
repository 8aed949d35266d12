"""relayctl verbs for status, routing and reload, and the parser of every
relayctl verb that talks to a relay (the queue verbs: relay.admin.queueverbs;
how a verb reaches the relay: relay.admin.reach).

Each verb first tries the running relay's control socket (relay.control.server);
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

import ipaddress
import json
import os
import sys
import tomllib

from relay import config as configmod
from relay.admin import client as cc
from relay.admin import dkimverbs, fleet
from relay.admin import drain as drainverb
from relay.admin.queueverbs import cmd_queue
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
    open_relay,
    open_relays,
    remote,
    verb,
    worker_configs,
)
from relay.config.workerpaths import worker_socket_path
from relay.control import proto
from relay.queue import view as queueview

# -- status -------------------------------------------------------------------------------------


@verb
def cmd_status(args) -> int:
    if getattr(args, "fleet", False):
        return fleet.cmd_status(args)
    cfg = load_config(args)
    relays = open_relays(cfg)
    parts = []
    try:
        for relay, wcfg in zip(relays, worker_configs(cfg)):
            if isinstance(relay, Live):
                box = remote(relay.client.call, proto.STATUS)
                parts.append(json.loads(box["status"]))
            else:
                counts = offline(relay.spool.counts)
                parts.append({"running": False, "config": cfg.source, "spool": relay.spool.spool.root,
                              "control_socket": wcfg.control_socket,
                              "queue": {**counts, "total": sum(counts.values())}})
    finally:
        close_all(relays)
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


def _offline_route(cfg: configmod.Config, address: str, client: str | None, sender: str | None = None) -> dict:
    """The answer built from the config, with the parts the relay would build
    (relay.runtime.parts)."""
    # only here: relay.runtime.parts imports relay.control.route, relay.delivery.mx (dnspython,
    # Twisted's threads) and relay.common.tls (OpenSSL) (measured: 0.30 s, 459 modules, against
    # 0.07 s for all of this module), which no other verb needs
    from relay.control import route as routecheck
    from relay.runtime import parts

    try:
        ctx = parts.offline_route_context(cfg)
    except parts.PartError as e:
        raise CtlError(str(e))
    return routecheck.explain(ctx, address, client, sender)


@verb
def cmd_route(args) -> int:
    from relay.control import route as routecheck  # 0.16 s of imports, for this verb only (see _offline_route)

    if args.client:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            raise CtlError(f"--client: not an IP address: {args.client!r}", EXIT_USAGE)
    if args.address is None and args.sender is None:
        raise CtlError("route: give an ADDRESS, --sender ADDRESS, or both", EXIT_USAGE)
    address = args.address or ""
    cfg = load_config(args)
    relay = open_relay(worker_configs(cfg)[0])
    try:
        if isinstance(relay, Live):
            extra = {"sender": args.sender} if args.sender is not None else {}
            box = remote(relay.client.call, proto.ROUTE, address=address, client=args.client or None,
                         timeout=max(answer_timeout(), 60.0), **extra)
            r = json.loads(box["route"])
        else:
            r = _offline_route(cfg, address, args.client, args.sender)
    finally:
        relay.close()
    if args.json:
        sys.stdout.write(json.dumps(r) + "\n")
    else:
        sys.stdout.write(routecheck.format_text(r))
    return EXIT_OK if r.get("ok") else EXIT_FAIL


# -- reload -------------------------------------------------------------------------------------


def _raw_socket_path(explicit: str | None) -> str | list[str] | None:
    """The control socket named by a config file that does not load (each
    worker's, when it names workers > 1): a bad config must still reach the
    running relay, which refuses it and logs why."""
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
        cfg = load_config(args)
    except CtlError as bad:
        socks = _raw_socket_path(args.config)
        if socks is None:
            raise
        out = []
        for sock in socks if isinstance(socks, list) else [socks]:
            try:
                client = cc.Client.connect(sock, answer_timeout())
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
        close_all(relays)
        raise CtlError("the relay is not running: nothing to reload (it reads the config when it starts)")
    for r in relays:
        if not isinstance(r, Live):
            r.close()
    return live


@verb
def cmd_reload(args) -> int:
    relays = _reload_targets(args)
    all_ok = True
    try:
        for i, relay in enumerate(relays):
            box = remote(relay.client.call, proto.RELOAD, timeout=max(answer_timeout(), 60.0))
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
                    err(f"{prefix}reload refused; the relay keeps its running config")
            elif not messages:
                print(f"{prefix}config reloaded", file=sys.stderr)
    finally:
        close_all(relays)
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
    drainverb.add_parser(qs)
    q.set_defaults(func=cmd_queue, queue_cmd=None, all=False, ids=[])

    r = sub.add_parser("route", help="how an address would be delivered now (does the DNS look-up)")
    r.add_argument("address", metavar="ADDRESS", nargs="?")
    r.add_argument("--sender", metavar="ADDRESS",
                   help="also show what this sender would be rewritten to (rewrite.senders, rewrite.masquerade), "
                        "and route its mail by relay.sender_routes")
    r.add_argument("--client", metavar="IP",
                   help="decide as for a client at this IP (default: a trusted client)")
    r.add_argument("--json", action="store_true", help="as one JSON object")
    r.set_defaults(func=cmd_route)

    s = sub.add_parser("status", help="uptime, queue counts, counters, sessions, listeners")
    s.add_argument("--json", action="store_true", help="as one JSON object")
    s.set_defaults(func=cmd_status)

    rl = sub.add_parser("reload", help="make the running relay re-read its config")
    rl.set_defaults(func=cmd_reload)

    dkimverbs.add_commands(sub)  # dkim keygen, dkim check
