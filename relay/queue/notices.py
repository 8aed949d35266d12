"""The sender's notifications the queue sends: non-delivery, delay and success.

Each is an RFC 3464 report (relay.delivery.bounce.build_report) queued as a
new message from <> to the original sender, durably, before the outcome it
reports is recorded: a crash in between sends the notice again rather than
never.  A message from <> (a bounce itself) gets no notice: its failures
are logged and dropped.

The client's DSN request (relay.common.dsn) shapes them: NOTIFY picks the
recipients (relay.queue.outcomes for failures and successes, ``delayed``
here), ENVID and ORCPT go into the report, and RET=FULL returns the whole
message in a non-delivery notice while it is within
delivery.dsn_full_limit (else, as RET=HDRS and without RET, the headers).
A message that came with SMTPUTF8 gets RFC 6533's global report
(relay.delivery.bounce), and the notice is queued with SMTPUTF8 itself.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.logger import Logger

from relay.common import dsn as dsnmod
from relay.config import Config
from relay.delivery import bounce as bouncemod
from relay.queue.diskio import AsyncSpool
from relay.queue.envelope import DEFERRED, Envelope, QueueEntry
from relay.queue.layout import new_id
from relay.queue.message import Message
from relay.queue.outcomes import Counters, status_of

log = Logger(namespace="relay.queue")
_KIND_WORDS = {bouncemod.FAILED: "non-delivery", bouncemod.DELAYED: "delay", bouncemod.SUCCESS: "success"}


def notice_extra(kind: str, original: Envelope) -> dict[str, object]:
    """The ``extra`` of a notice's envelope: its kind, the message it is for,
    and SMTPUTF8 when the original came with it (RFC 6533: the notice may
    hold UTF-8 addresses and goes to a sender that may have one)."""
    extra: dict[str, object] = {"dsn": kind, "for": original.queue_id}
    if original.smtputf8:
        extra["smtputf8"] = True
    return extra


def _wants_delay(msg: Message, address: str) -> bool:
    d = msg.env.dsn
    return dsnmod.wants(msg.env.dsn_of(address)[0], dsnmod.DELAY, d.limited if d is not None else False)


class Notices:
    """Builds and queues the notices of one queue runner.

    ``config`` gives the current configuration (it changes at a reload),
    ``now`` the reactor's time, ``queue`` hands a queued notice to the
    runner (QueueManager.add).
    """

    def __init__(self, aspool: AsyncSpool, config: Callable[[], Config], now: Callable[[], float],
                 counters: Counters, queue: Callable[[QueueEntry], object]):
        self.aspool = aspool
        self.config = config
        self.now = now
        self.counters = counters
        self.queue = queue

    def delay_due(self, msg: Message, now: float) -> bool:
        """A delay notice is due: delivery.delay_warning passed, none sent yet,
        and a recipient is deferred."""
        dw = self.config().delivery.delay_warning
        return (dw > 0 and not msg.state.warned and now - msg.env.arrival >= dw
                and any(r.status == DEFERRED and _wants_delay(msg, r.address) for r in msg.state.recipients))

    def delayed(self, msg: Message, now: float) -> list[bouncemod.Failure]:
        """What a delay notice reports: each deferred recipient that wants one
        (NOTIFY with DELAY, or no NOTIFY)."""
        until = msg.env.arrival + self.config().delivery.max_lifetime
        return [
            bouncemod.Failure(r.address, status_of(r.reply, "4.0.0"), r.reply, original=r.orcpt,
                              last_attempt=now, will_retry_until=until, orcpt=msg.env.dsn_of(r.address)[1])
            for r in msg.state.recipients if r.status == DEFERRED and _wants_delay(msg, r.address)
        ]

    async def send(self, msg: Message, kind: str, failures: Sequence[bouncemod.Failure]) -> None:
        if not msg.env.sender:
            if kind == bouncemod.SUCCESS:
                return  # nobody to tell (RFC 3461 6.2: never a notice to <>)
            for f in failures:
                log.warn("{queue_id}: undeliverable message from <> (a bounce) to <{to}> discarded: "
                         "{reason}", queue_id=msg.qid, to=f.recipient, reason=f.diagnostic)
            return
        try:
            headers = await self.aspool.run(self.aspool.spool.read_headers, msg.qid)
        except OSError:
            headers = b""
        full, too_big = await self._full_message(msg, kind)
        now = self.now()
        data = bouncemod.build_report(
            kind=kind, reporting_mta=self.config().hostname, queue_id=msg.qid, sender=msg.env.sender,
            arrival=msg.env.arrival, failures=list(failures), original_headers=headers, now=now,
            envid=msg.env.dsn.envid if msg.env.dsn is not None else "", full_message=full, too_big=too_big,
            smtputf8=msg.env.smtputf8,
        )
        env = Envelope(
            queue_id=new_id(), sender="", recipients=[msg.env.sender], arrival=now,
            orcpts=[None], client={"proto": "dsn"}, extra=notice_extra(kind, msg.env),
        )
        entry = await self.aspool.inject(env, data)
        self.counters.dsn_sent += 1
        log.info("{queue_id}: sender {kind} notification: {dsn_id}", queue_id=msg.qid,
                 kind=_KIND_WORDS.get(kind, kind), dsn_id=env.queue_id)
        log.info("{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt} (delivery status notification for {orig})",
                 queue_id=env.queue_id, sender="", size=entry.size, nrcpt=1, orig=msg.qid, dsn=kind,
                 recipients=env.recipients)
        self.queue(entry)

    async def _full_message(self, msg: Message, kind: str) -> tuple[bytes | None, int | None]:
        """RET=FULL in a non-delivery notice: (the message, None) within
        delivery.dsn_full_limit, (None, the limit) over it; else (None, None)."""
        if kind != bouncemod.FAILED or msg.env.dsn is None or msg.env.dsn.ret != "FULL":
            return None, None
        limit = self.config().delivery.dsn_full_limit
        if msg.size > limit:
            return None, limit
        try:
            data: bytes = await self.aspool.run(_read_message, self.aspool.spool.message_path(msg.qid),
                                                msg.offset, msg.size)
        except OSError:
            return None, None
        return data, None


def _read_message(path: str, offset: int, size: int) -> bytes:
    """The message bytes after the envelope line (blocking: the disk pool)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
