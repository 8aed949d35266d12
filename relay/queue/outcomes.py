"""What the outcomes of an attempt make of each recipient, and the counts of it.

A job's attempt ends as one relay.delivery.attempt.Outcome per recipient:
delivered, bounced (a bounce.Failure kept for the DSN) or deferred (the
next attempt after a jittered exponential backoff; past
delivery.max_lifetime a deferral is a bounce, 5.4.7).  Each is logged as
``ID: to=<...>, relay=..., delay=..., status=...``.  Only memory changes
here: the runner makes it durable when the activation ends.

The client's NOTIFY (relay.common.dsn.wants) decides which outcomes become
a notice: a bounce only with FAILURE (or no NOTIFY), a delivery only with
SUCCESS: "delivered" for local delivery, "relayed" when the next hop does
not offer DSN (one that does got the request and reports itself).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from twisted.logger import Logger

from relay.common import dsn as dsnmod
from relay.common import logsafe
from relay.config import DeliveryConfig
from relay.delivery import bounce as bouncemod
from relay.delivery.attempt import Outcome
from relay.queue.envelope import BOUNCED, DEFERRED, DELIVERED, Recipient
from relay.queue.message import Job, Message

log = Logger(namespace="relay.queue")

MAX_HISTORY = 200
JITTER = 0.1


@dataclass
class Counters:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    dsn_sent: int = 0
    removed: int = 0
    attempts: int = 0


def backoff(delivery: DeliveryConfig, attempts: int, rng: random.Random) -> float:
    """Seconds until the next attempt after this many: doubling from
    retry_min up to retry_max, within +-JITTER, never under a second."""
    base = min(delivery.retry_max, delivery.retry_min * (2 ** max(0, attempts - 1)))
    return max(1.0, base * (1 + rng.uniform(-JITTER, JITTER)))


def suspended(job: Job, why: str) -> list[Outcome]:
    """A dead destination's job, deferred without an attempt."""
    reason = f"delivery temporarily suspended: {why}"
    return [Outcome(r.address, "deferred", "4.4.1", reason, suspended=True) for r in job.recipients]


def crashed(job: Job, error: str) -> list[Outcome]:
    """An attempt that raised: every recipient deferred."""
    return [Outcome(r.address, "deferred", "4.3.0", f"internal error: {error}") for r in job.recipients]


def record(msg: Message, recipients: Sequence[Recipient], outcomes: Sequence[Outcome], *, now: float,
           delivery: DeliveryConfig, counters: Counters, backoff: Callable[[int], float]) -> None:
    """Apply a job's outcomes to its recipients (those without one are left
    as they were: a job that ended without an attempt)."""
    by_addr = {o.address: o for o in outcomes}
    expires = msg.env.arrival + delivery.max_lifetime
    for r in recipients:
        o = by_addr.get(r.address)
        if o is not None:
            _record_one(msg, r, o, now=now, expires=expires, delivery=delivery, counters=counters,
                        backoff=backoff)


def _record_one(msg: Message, r: Recipient, o: Outcome, *, now: float, expires: float, delivery: DeliveryConfig,
                counters: Counters, backoff: Callable[[int], float]) -> None:
    if not o.suspended:
        msg.tried = True
    r.attempts += 1
    r.reply = o.reply
    kind = o.kind
    status = o.status
    if kind == "deferred" and now >= expires and not msg.deleted:
        kind = "bounced"
        status = "5.4.7"
        counters.expired += 1
    if not o.suspended or kind != "deferred":  # a suspension is not an attempt worth keeping
        r.history.append({"t": round(now, 3), "relay": o.relay, "status": kind, "reply": o.reply})
    if len(r.history) > MAX_HISTORY:
        del r.history[: len(r.history) - MAX_HISTORY]
    if kind in ("delivered", "bounced"):
        msg.settled = True
    if kind == "delivered":
        r.status = DELIVERED
        counters.delivered += 1
        _success(msg, r, o, now)
    elif kind == "bounced":
        r.status = BOUNCED
        counters.bounced += 1
        if status == "5.4.7":
            diag = f"message expired after {delivery.max_lifetime / 86400:g} days in the queue; last error: {o.reply}"
        else:
            diag = o.reply
        notify, orcpt = msg.env.dsn_of(r.address)
        if _wants(msg, notify, dsnmod.FAILURE):
            msg.failures.append(bouncemod.Failure(
                recipient=r.address, status=status, diagnostic=diag, original=r.orcpt,
                remote_mta=o.remote_mta, diagnostic_type="smtp" if o.remote else "x-unix",
                last_attempt=now, orcpt=orcpt,
            ))
        else:
            log.info("{queue_id}: <{to}>: no non-delivery notification (NOTIFY={notify})",
                     queue_id=msg.qid, to=r.address, notify=notify)
    else:
        r.status = DEFERRED
        counters.deferred += 1
        r.next_attempt = min(now + backoff(r.attempts), max(expires, now + 1.0))
    delay = now - msg.env.arrival
    log.info(
        "{queue_id}: to=<{to}>{_orig}, relay={relay}, delay={delay:.1f}, status={status} ({reply})",
        queue_id=msg.qid, to=r.address,
        orig_to=r.orcpt if r.orcpt and r.orcpt != r.address else None,
        _orig=f", orig_to=<{logsafe.address(r.orcpt)}>" if r.orcpt and r.orcpt != r.address else "",
        relay=o.relay, delay=delay, status="sent" if kind == "delivered" else kind,
        reply=o.reply, recipient=r.address, kind=kind, attempts=r.attempts,
    )


def _wants(msg: Message, notify: str | None, what: str) -> bool:
    d = msg.env.dsn
    return dsnmod.wants(notify, what, d.limited if d is not None else False)


def _success(msg: Message, r: Recipient, o: Outcome, now: float) -> None:
    """A success notice for a delivered recipient that asked NOTIFY=SUCCESS
    (none when the next hop took the request over: o.dsn_carried)."""
    notify, orcpt = msg.env.dsn_of(r.address)
    if notify is None or not _wants(msg, notify, dsnmod.SUCCESS) or o.dsn_carried:
        return
    local = o.relay == "local"
    msg.successes.append(bouncemod.Failure(
        recipient=r.address, status=status_of(o.reply, "2.0.0"),
        diagnostic=o.reply or ("delivered to mailbox" if local else "relayed"), original=r.orcpt,
        remote_mta=o.remote_mta, diagnostic_type="smtp" if o.remote else "x-unix", last_attempt=now,
        action=bouncemod.DELIVERED if local else bouncemod.RELAYED, orcpt=orcpt,
    ))


_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(reply: str, default: str) -> str:
    """The enhanced status code in a reply, or default."""
    m = _STATUS.search(reply or "")
    return m.group(1) if m else default
