"""What relayctl shows of the queue: JSON records and their human formats.

Plain Python, no Twisted and no I/O: the running relay (relay.control.server) and
relayctl working on a stopped relay's spool (relay.admin.offline) build the very
same records from an envelope and a state, so the output does not depend on
whether the relay runs.  The listing record uses the field names of
Postfix's ``postqueue -j`` (queue_name, queue_id, arrival_time,
message_size, forced_expire, sender, recipients[address, delay_reason])
plus ours (recipient status, attempts, next_attempt); readers ignore keys
they do not know.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Iterable

from relay.common import logsafe
from relay.common.address import display_address
from relay.queue.spool import DEFERRED, FINAL, PENDING, Envelope, State

HOLD = "hold"
ACTIVE = "active"
QUEUE_NAMES = (ACTIVE, DEFERRED, HOLD)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def queue_name(state: State, delivering: bool = False) -> str:
    """hold | active | deferred (the same rule as relay.queue.manager.Message.queue_name)."""
    if state.hold:
        return HOLD
    if delivering:
        return ACTIVE
    for r in state.recipients:
        if r.status == PENDING:
            return ACTIVE
    return DEFERRED


def record(env: Envelope, state: State, size: int, name: str, delivering: bool = False,
           waiting: str = "") -> dict[str, Any]:
    """One message as in ``relayctl queue --json`` (waiting: why its deliveries wait, e.g. for
    delivery.pacing; the field is there only then)."""
    arrival = int(env.arrival)
    rcpts = []
    for r in state.recipients:
        final = r.status in FINAL
        rcpts.append({
            "address": r.address,
            "status": r.status,
            "attempts": r.attempts,
            "delay_reason": r.reply if r.status == DEFERRED else "",
            "next_attempt": None if final else int(max(r.next_attempt, env.arrival)),
        })
    d = {
        "queue_name": name,
        "queue_id": env.queue_id,
        "arrival_time": arrival,
        "message_size": size,
        "forced_expire": False,
        "sender": env.sender,
        "recipients": rcpts,
        "delivering": delivering,
    }
    if waiting:
        d["waiting"] = waiting
    if state.pending:
        # an administrator's action accepted while the message was busy,
        # applied when that step ends: "retry", "bounce" (or "delete")
        d["pending_action"] = state.pending
    return d


def record_line(env: Envelope, state: State, size: int, name: str, delivering: bool = False,
                waiting: str = "") -> bytes:
    return _dumps(record(env, state, size, name, delivering, waiting)).encode("utf-8") + b"\n"


def details(env: Envelope, state: State, size: int, name: str, headers: bytes, *,
            delivering: bool = False, deleting: bool = False, waiting: str = "") -> dict[str, Any]:
    """One message as in ``relayctl queue show ID --json``: the listing
    record, the whole envelope, every attempt of every recipient, the headers."""
    d = record(env, state, size, name, delivering, waiting)
    d["arrival_time_exact"] = env.arrival
    d["hold"] = state.hold
    d["deleting"] = deleting
    d["delay_notice_sent"] = state.warned
    d["client"] = env.client
    if env.extra:
        d["extra"] = env.extra
    if isinstance(env.extra.get("orig_from"), str):  # rewritten at intake (rewrite.senders, rewrite.masquerade)
        d["sender_rewritten_from"] = env.extra["orig_from"]
    req = env.dsn
    # the DSN request (relay.common.dsn): null where the client asked nothing
    d["dsn"] = {"ret": (req.ret or None) if req else None, "envid": (req.envid or None) if req else None,
                "limited": req.limited if req else False}
    for i, (out, r) in enumerate(zip(d["recipients"], state.recipients)):
        out["orig_address"] = r.orcpt or r.address
        out["notify"] = req.notify[i] if req else None
        out["orcpt"] = req.orcpt[i] if req else None
        out["last_reply"] = r.reply
        out["history"] = [
            {"time": h.get("t"), "relay": h.get("relay", ""), "status": h.get("status", ""),
             "reply": h.get("reply", "")}
            for h in r.history
        ]
    d["headers"] = headers.decode("utf-8", "replace")
    return d


# -- human formats ------------------------------------------------------------------

_ID_W = 17  # 16-character queue id and a mark: "*" being delivered, "!" on hold
_INDENT = " " * (_ID_W + 1 + 8 + 1 + 19 + 2)
HEADER = f"{'-Queue ID-':<{_ID_W}} {'--Size--':>8} {'----Arrival Time---':<19}  -Sender/Recipient-------"


def local_time(ts: float | None, *, with_date: bool = True) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", time.localtime(ts))


class _Clock:
    """Local-time formatting for many timestamps: strftime once per minute.

    Time-zone offsets change on whole minutes, so the "YYYY-mm-dd HH:MM:"
    part of a minute can be reused for every second in it.
    """

    def __init__(self, now: float):
        self.now = now
        lt = time.localtime(now)
        midnight = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
        self.today = (midnight, time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday + 1, 0, 0, 0, 0, 0, -1)))
        self._minutes: dict[int, str] = {}

    def full(self, ts: float) -> str:
        t = int(ts)
        m, sec = divmod(t, 60)
        prefix = self._minutes.get(m)
        if prefix is None:
            if len(self._minutes) > 100_000:
                self._minutes.clear()
            prefix = self._minutes[m] = time.strftime("%Y-%m-%d %H:%M:", time.localtime(m * 60))
        return f"{prefix}{sec:02d}"

    def when(self, ts: float) -> str:
        """A next-attempt time, short when it is today; "now" when it is due."""
        if ts <= self.now:
            return "now"
        text = self.full(ts)
        return text[11:] if self.today[0] <= ts < self.today[1] else text


def duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d {h}h" if h else f"{d}d"


@functools.lru_cache(maxsize=1024)  # a big queue repeats a few reasons many times
def _one_line(text: str, limit: int = 300) -> str:
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    t = " ".join(text.split())
    return t if len(t) <= limit else t[: limit - 3] + "..."


class Table:
    """The mailq-like table, fed one record at a time (a listing streams)."""

    def __init__(self, out, now: float | None = None):
        self.out = out
        self.now = time.time() if now is None else now
        self.count = 0
        self.size = 0
        self.by_name = dict.fromkeys(QUEUE_NAMES, 0)
        self.clock = _Clock(self.now)

    def add_page(self, page: bytes) -> None:
        """A page of JSON lines: parsed in one call (much faster than per line)."""
        body = page.strip(b"\n")
        if body:
            for rec in json.loads(b"[" + body.replace(b"\n", b",") + b"]"):
                self.add(rec)

    def add(self, rec: dict[str, Any]) -> None:
        if self.count == 0:
            self.out.write(HEADER + "\n")
        self.count += 1
        self.size += rec["message_size"]
        name = rec["queue_name"]
        self.by_name[name] = self.by_name.get(name, 0) + 1
        mark = "!" if name == HOLD else ("*" if rec.get("delivering") else "")
        sender = logsafe.address(rec["sender"]) or "MAILER-DAEMON"
        lines = [f"{rec['queue_id'] + mark:<{_ID_W}} {rec['message_size']:>8} "
                 f"{self.clock.full(rec['arrival_time'])}  {sender}"]
        # as in mailq: each reason once, in parentheses, above the recipients it holds back
        groups: dict[str, list[str]] = {}
        for r in rec["recipients"]:
            status = r["status"]
            if status in FINAL:
                continue
            if status == DEFERRED:
                n = r["attempts"]
                text = (f"{_INDENT}{logsafe.address(r['address'])}  (deferred, {n} attempt{'s' if n != 1 else ''}, "
                        f"next {self.clock.when(r['next_attempt'])})")
                groups.setdefault(r["delay_reason"], []).append(text)
            else:
                groups.setdefault("", []).append(f"{_INDENT}{logsafe.address(r['address'])}  ({status})")
        if rec.get("waiting"):
            lines.append(f"(waiting: {_one_line(rec['waiting'])})")
        for reason, rcpt_lines in groups.items():
            if reason:
                lines.append(f"({_one_line(reason)})")
            lines.extend(rcpt_lines)
        self.out.write("\n".join(lines) + "\n\n")

    def finish(self) -> None:
        if self.count == 0:
            self.out.write("Mail queue is empty\n")
            return
        kb = (self.size + 1023) // 1024
        parts = ", ".join(f"{self.by_name[n]} {'on hold' if n == HOLD else n}" for n in QUEUE_NAMES)
        self.out.write(f"-- {kb} Kbytes in {self.count} message{'s' if self.count != 1 else ''}"
                       f" ({parts}).\n")


def _dsn_lines(dsn: dict[str, Any]) -> list[str]:
    """The message's DSN request (RET, ENVID) in queue show."""
    if not (dsn.get("ret") or dsn.get("envid")):
        return []
    return ["DSN:       " + " ".join(f"{k.upper()}={_one_line(str(dsn[k]), 200)}" for k in ("ret", "envid")
                                     if dsn.get(k))
            + (" (from outside: only NEVER and FAILURE honoured)" if dsn.get("limited") else "")]


def _kind_lines(extra: dict[str, Any]) -> list[str]:
    """What kind of message it is, in queue show: a DSN of ours, SMTPUTF8."""
    out = []
    if extra.get("dsn"):
        out.append(f"Kind:      {extra['dsn']} delivery status notification for {extra.get('for', '?')}")
    if extra.get("smtputf8"):
        out.append("SMTPUTF8:  yes (internationalized addresses or headers: relayed only to a next hop that offers it)")
    return out


def _shown(address: str) -> str:
    """An address in queue show: neutralised as in a log line (a UTF-8 one,
    RFC 6531, stays readable; controls and bidi overrides are escaped), and
    in <...>, with U-labels after it when its domain is IDNA (stored in
    A-labels)."""
    safe = logsafe.address(address)
    readable = display_address(address)
    return f"<{safe}>" if readable == address else f"<{safe}> ({logsafe.address(readable)})"


def format_details(d: dict[str, Any], now: float | None = None) -> str:
    """``relayctl queue show ID``: envelope, each recipient's whole history, headers.

    History lines read like the relay's log lines about the same attempts
    (``to=<...>, relay=..., delay=..., status=... (reply)``), so the two
    tell the same story.
    """
    now = time.time() if now is None else now
    arrival = d.get("arrival_time_exact", d["arrival_time"])
    state = d["queue_name"]
    notes = []
    if d.get("waiting"):
        notes.append(f"waiting: {d['waiting']}")
    elif d.get("delivering"):
        notes.append("delivery in progress")
    if d.get("deleting"):
        notes.append("will be deleted when the delivery in progress ends")
    pending = d.get("pending_action")
    if pending:  # recorded while it was busy; the relay applies it at the end of that step or at its start
        notes.append(f"{pending} requested: done when the delivery in progress ends (or at the relay's next start)")
    out = [
        f"Queue ID:  {d['queue_id']}",
        f"Queue:     {state}" + (f" ({'; '.join(notes)})" if notes else ""),
        f"Arrival:   {local_time(arrival)} ({duration(now - arrival)} ago)",
        f"Size:      {d['message_size']} bytes",
        f"Sender:    {_shown(d['sender'])}" + ("  (null sender: a delivery status notification)"
                                          if not d["sender"] else ""),
    ]
    if d.get("sender_rewritten_from"):
        out[-1] += f"  (sender rewritten from {_shown(d['sender_rewritten_from'])})"
    c = d.get("client") or {}
    if c:
        parts = []
        if c.get("ip"):
            parts.append(str(c["ip"]))
        if c.get("helo"):
            parts.append(f"HELO {c['helo']}")
        if c.get("proto"):
            parts.append(str(c["proto"]))
        desc = ", ".join(parts)
        if c.get("auth"):
            desc += f", authenticated as {c['auth']}"
        if isinstance(c.get("tls"), dict):
            desc += f", {c['tls'].get('version', 'TLS')}"
        out.append(f"Client:    {desc}")
    out += _kind_lines(d.get("extra") or {})
    out += _dsn_lines(d.get("dsn") or {})
    if d.get("delay_notice_sent"):
        out.append("Notice:    a delay notice was sent to the sender")
    out.append("Recipients:")
    for r in d["recipients"]:
        head = f"  {_shown(r['address'])}"
        if r.get("orig_address") and r["orig_address"] != r["address"]:
            head += f" (from {_shown(r['orig_address'])})"
        n = r["attempts"]
        head += "".join(f" {k.upper()}={_one_line(str(r[k]), 200)}" for k in ("notify", "orcpt") if r.get(k))
        head += f": {r['status']}, {n} attempt{'s' if n != 1 else ''}"
        if r["next_attempt"] is not None and r["status"] not in FINAL:
            if d["queue_name"] == HOLD:
                head += ", on hold"
            elif r["next_attempt"] <= now:
                head += ", next attempt now"
            else:
                head += f", next attempt {local_time(r['next_attempt'])}"
        out.append(head)
        for h in r.get("history", []):
            t = h.get("time")
            status = "sent" if h["status"] == "delivered" else h["status"]
            delay = f", delay={t - arrival:.1f}" if isinstance(t, (int, float)) else ""
            out.append(f"    {local_time(t)}  to=<{logsafe.address(r['address'])}>, relay={h['relay']}{delay}, "
                       f"status={status} ({_one_line(h['reply'], 1000)})")
        if not r.get("history") and r.get("last_reply"):
            out.append(f"    last reply: {_one_line(r['last_reply'], 1000)}")
    out.append("Headers:")
    headers = d.get("headers", "")
    for line in headers.splitlines():
        out.append("  " + "".join(c if c.isprintable() or c == "\t" else "?" for c in line))
    return "\n".join(out) + "\n"


def counts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    c = dict.fromkeys(QUEUE_NAMES, 0)
    for r in records:
        c[r["queue_name"]] += 1
    return c


def format_status(s: dict[str, Any]) -> str:
    """``relayctl status``."""
    q = s.get("queue") or {}
    total = sum(q.get(n, 0) for n in QUEUE_NAMES)
    queue_line = (f"Queue:      {total} message{'s' if total != 1 else ''} "
                  f"({q.get('active', 0)} active, {q.get('deferred', 0)} deferred, {q.get('hold', 0)} on hold)")
    if s.get("running") and not s.get("queue_loaded", True):
        queue_line += ", still reading the spool at start-up"
    if not s.get("running"):
        return "\n".join([
            "Relay:      not running",
            f"Config:     {s.get('config', '')}",
            f"Spool:      {s.get('spool', '')}",
            queue_line,
        ]) + "\n"
    c = s.get("counters") or {}
    sess = s.get("sessions") or {}
    rejected = sum((c.get("rejected") or {}).values())
    out = [
        f"Relay:      running, pid {s.get('pid')}, up {duration(s.get('uptime', 0))} "
        f"(since {local_time(s.get('started_at'))})",
        f"Config:     {s.get('config', '')}",
        f"Spool:      {s.get('spool', '')}",
        queue_line,
        f"Since start: {c.get('received', 0)} messages received, {rejected} rejected; recipients "
        f"{c.get('delivered', 0)} delivered, {c.get('deferred', 0)} deferred, {c.get('bounced', 0)} bounced "
        f"({c.get('expired', 0)} expired) in {c.get('attempts', 0)} delivery attempts",
        f"Sessions:   {sess.get('smtp', 0)} SMTP, {sess.get('pop3', 0)} POP3",
        "Listeners:",
    ]
    for li in s.get("listeners") or []:
        where = f"{li['host']}:{li['port']}" if li.get("port") else li.get("host", "")
        out.append(f"  {li['name']}  ({where})" if where else f"  {li['name']}")
    if s.get("control_socket"):
        out.append(f"  control {s['control_socket']}")
    near = s.get("limits") or []
    if near:
        out.append("Rate limits (at or near):")
        for u in near:
            out.append(f"  {u['limit']}  {u['key']}  {u['count']}/{u['max']} per {duration(u['window'])}"
                       + ("  (at the limit)" if u["count"] >= u["max"] else ""))
    return "\n".join(out) + "\n"


def tally_action(results: list[dict], totals: dict[str, int], qid: str, ok: bool | None, text: str,
                 every: bool) -> None:
    """Count one id's outcome of a queue action (ok None: nothing to do).
    With --all only the failures are listed: the counts say the rest."""
    if ok is None:
        totals["skipped"] += 1
        if not every:
            results.append({"id": qid, "ok": True, "text": text})
        return
    totals["done" if ok else "failed"] += 1
    if not every or not ok:
        results.append({"id": qid, "ok": ok, "text": text})
