"""``relayctl --fleet queue`` and ``relayctl --fleet status``: several relays at once.

A fleet is relays that each own a spool (shared-nothing, issue 18); the
operator still wants one view.  ``control.fleet`` names each node's control
socket (a local path: the node's own, or a socket reached on a mounted or
forwarded path) or its authenticated TCP endpoint (``tls:host:port``, a
node's control.tcp_listen: TLS verified against control.fleet_ca_file, then
the shared secret of control.secret_file), and relayctl asks every node the same question it asks one
relay: the listing (QueueList) merged into one queue, each message with its
node (a ``node`` column, a ``node`` JSON field), or each node's status.

A node that does not answer is shown as down (with the reason) and the
others are still listed; the exit status is then 1.  Nothing here writes:
a fleet view never acts on a node's spool behind its relay, and a stopped
node's spool is not read (it may be on a dead host's disk; ``relayctl
queue`` with that node's config reads it offline).  Without ``--fleet``
every verb is exactly what it was.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from relay.admin import client as cc
from relay.admin.reach import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CtlError, answer_timeout, err, load_config
from relay.control import proto
from relay.queue import view as queueview

PAGE = 2000


class Fleet:
    """The nodes of control.fleet and how to reach each."""

    def __init__(self, args):
        cfg = load_config(args)
        if not cfg.control.fleet:
            raise CtlError(f"--fleet: no nodes: set control.fleet in {cfg.source} "
                           '(a table of "node name" = "control socket path")', EXIT_USAGE)
        self.nodes = cfg.control.fleet
        self.config = cfg
        self._secret: str | None = None

    def secret(self) -> str:
        """control.secret_file's first line, read once (for the "tls:" nodes)."""
        if self._secret is None:
            path = self.config.control.secret_file
            if not path:
                raise CtlError(f'--fleet: a "tls:" node needs control.secret_file in {self.config.source}')
            try:
                with open(path, encoding="utf-8") as f:
                    self._secret = f.readline().rstrip("\r\n")
            except OSError as e:
                raise CtlError(f"control.secret_file: {path}: {e.strerror}")
        return self._secret

    def connect(self, where: str) -> cc.Client:
        if where.startswith("tls:"):
            host, _, port = where[4:].rpartition(":")
            client = cc.Client.connect_tls(host.strip("[]"), int(port), answer_timeout(), secret=self.secret(),
                                           ca_file=self.config.control.fleet_ca_file or None)
        else:
            client = cc.Client.connect(where, answer_timeout())
        try:
            client.call(proto.HELLO)
        except BaseException:
            client.close()
            raise
        return client


def _why(e: Exception) -> str:
    if isinstance(e, cc.RemoteError):
        return e.description or e.code
    return str(e)


def _records(client: cc.Client) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    start = True
    while True:
        box = client.call(proto.QUEUE_LIST, start=start, limit=PAGE)
        start = False
        body = box["lines"].strip(b"\n")
        if body:
            out.extend(json.loads(b"[" + body.replace(b"\n", b",") + b"]"))
        if not box["more"]:
            return out


def cmd_queue(args) -> int:
    if (args.queue_cmd or "list") != "list":
        raise CtlError("--fleet: only the listing (relayctl --fleet queue) and status; act on one node "
                       "with its own config", EXIT_USAGE)
    fleet = Fleet(args)
    merged: list[dict[str, Any]] = []
    down = []
    for name, path in fleet.nodes:
        try:
            client = fleet.connect(path)
        except cc.ControlError as e:
            down.append(name)
            err(f"node {name}: down ({_why(e)})")
            continue
        try:
            for rec in _records(client):
                rec["node"] = name
                merged.append(rec)
        except cc.ControlError as e:
            down.append(name)
            err(f"node {name}: down ({_why(e)})")
        finally:
            client.close()
    merged.sort(key=lambda r: (r.get("arrival_time", 0), r["node"], r["queue_id"]))
    if args.json:
        for rec in merged:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        width = max([len("Node")] + [len(n) for n, _ in fleet.nodes])
        out = _NodeColumn(sys.stdout, width)
        table = queueview.Table(out)
        for rec in merged:
            out.node = rec["node"]
            table.add(rec)
        table.finish()
    sys.stdout.flush()
    return EXIT_FAIL if down else EXIT_OK


class _NodeColumn(io.TextIOBase):
    """The mailq table (relay.queue.view.Table) with the node in front of
    each message's first line (and of the header)."""

    def __init__(self, out, width: int):
        self.out = out
        self.width = width
        self.node = ""

    def write(self, text: str) -> int:
        if text.startswith(queueview.HEADER):
            self.out.write(f"{'Node':<{self.width}} {text}")
        elif text.endswith("\n\n"):
            first, _, rest = text.partition("\n")
            pad = " " * (self.width + 1)
            lines = [f"{self.node:<{self.width}} {first}"] + [pad + ln if ln else ln for ln in rest.split("\n")]
            self.out.write("\n".join(lines))
        else:
            self.out.write(text)
        return len(text)


def cmd_status(args) -> int:
    fleet = Fleet(args)
    parts: list[dict[str, Any]] = []
    for name, path in fleet.nodes:
        try:
            client = fleet.connect(path)
            try:
                status = json.loads(client.call(proto.STATUS)["status"])
            finally:
                client.close()
            parts.append({"node": name, "control_socket": path, "up": True, "status": status})
        except cc.ControlError as e:
            parts.append({"node": name, "control_socket": path, "up": False, "error": _why(e)})
    down = [p["node"] for p in parts if not p["up"]]
    if args.json:
        sys.stdout.write(json.dumps({"nodes": parts, "up": len(parts) - len(down), "down": down}) + "\n")
    else:
        chunks = []
        for p in parts:
            if p["up"]:
                chunks.append(f"Node:       {p['node']} (up)\n" + queueview.format_status(p["status"]))
            else:
                chunks.append(f"Node:       {p['node']} (down: {p['error']})\n"
                              f"Control:    {p['control_socket']}\n")
        sys.stdout.write("\n".join(chunks))
        sys.stdout.write(f"\nFleet:      {len(parts) - len(down)} of {len(parts)} nodes up"
                         + (f"; down: {', '.join(down)}" if down else "") + "\n")
    return EXIT_FAIL if down else EXIT_OK
