"""Where a new message is accepted: the one path from "a message was handed
in" to "the queue has it".

Two sources hand messages in: the SMTP server at the end of DATA
(relay.smtp.transfer) and the pickup of relay-sendmail's drop directory
(relay.intake.pickup).  Both go through an ``Intake``, so that what a new
message goes through is written once (and what comes later, such as
signing, has one place to hook in):

1. ``envelope``: the recipients expanded (aliases), duplicates dropped, a
   queue id (a new one, or the drop file's), the arrival time;
2. the message written into an ``IncomingMessage`` (streamed from the
   reactor with ``receive``, or written in the disk pool by the pickup);
3. ``accept``: signed with DKIM when the source is trusted and a key fits
   (relay.intake.signing, in the commit's disk-pool job: the signature goes
   first in the stored message, so every attempt sends the same bytes),
   made durable (``AsyncSpool.commit``: fdatasync, rename into
   queue/, grouped fsync of queue/), then what the source must do once it is
   (``settle``: the pickup removes its drop file), then the source says so
   (``announce``: its log line, the 250 reply), and only then the entry is
   handed to the queue (``queued``).  A hand-off that fails is logged and
   never undoes the acceptance: the message is durable, the next start
   loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from relay.common.dsn import DsnRequest
from relay.intake.rewrite import SenderMap
from relay.intake.signing import Signer, SignJob
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool

Expand = Callable[[str], list[tuple[str, str | None]]]


class Clock(Protocol):
    """The reactor's time (IReactorTime, which mypy cannot read as a type)."""

    def seconds(self) -> float: ...


@dataclass(frozen=True)
class Source:
    """A source of new messages, as the intake treats it."""

    log: Logger  # the source's logger: its lines keep the source's namespace
    handoff_failed: str  # the failure line (with {queue_id}) when the queue does not take an entry
    state_file: bool  # QueueEntry.state_file: a state file may exist under the queue id


class Intake:
    """Accepts new messages into the queue (see the module docstring)."""

    def __init__(self, *, spool: AsyncSpool, expand: Expand,
                 queued: Callable[[spoolmod.QueueEntry], object] | None, clock: Clock,
                 signer: Signer | None = None):
        self.spool = spool
        self.expand = expand
        self.queued = queued
        self.clock = clock
        self.signer = signer  # DKIM (relay.intake.signing): trusted mail only

    def envelope(self, sender: str, recipients: Iterable[str], client: dict[str, Any], *,
                 queue_id: str | None = None, arrival: float | None = None,
                 rewrite: SenderMap | None = None, dsn: DsnRequest | None = None,
                 smtputf8: bool = False) -> spoolmod.Envelope:
        """The envelope of a new message: every recipient expanded, each final
        recipient once (the first recipient it came from is its ORCPT); with
        ``rewrite`` (a trusted source), the sender rewritten, the original
        kept in the envelope's extra field ``orig_from``.  ``dsn``: the DSN
        request, its NOTIFY and ORCPT parallel to ``recipients``; each
        recipient an alias expands to inherits them.  ``smtputf8``: the
        client's MAIL said SMTPUTF8; an envelope with a non-ASCII address
        (from a local source, or an alias's target) is marked so too
        (Envelope.smtputf8: it needs SMTPUTF8 to be relayed)."""
        qid = queue_id if queue_id is not None else spoolmod.new_id()
        extra: dict[str, Any] = {"smtputf8": True} if smtputf8 else {}
        rewritten = rewrite.address(sender) if rewrite is not None else None
        if rewritten is not None:
            extra["orig_from"], sender = sender, rewritten.address
        rcpts: list[str] = []
        orcpts: list[str | None] = []
        notify: list[str | None] = []
        dorcpt: list[str | None] = []
        seen: set[str] = set()
        for i, rcpt in enumerate(recipients):
            for addr, orig in self.expand(rcpt):
                if addr in seen:
                    continue
                seen.add(addr)
                rcpts.append(addr)
                orcpts.append(orig if orig != addr else None)
                if dsn is not None:
                    notify.append(dsn.notify[i] if i < len(dsn.notify) else None)
                    dorcpt.append(dsn.orcpt[i] if i < len(dsn.orcpt) else None)
        stored = (DsnRequest(dsn.ret, dsn.envid, notify, dorcpt, dsn.limited)
                  if dsn is not None and not dsn.empty() else None)
        if not smtputf8 and not (sender.isascii() and all(r.isascii() for r in rcpts)):
            extra["smtputf8"] = True  # a local source's UTF-8 address, or an alias's UTF-8 target
        return spoolmod.Envelope(
            queue_id=qid, sender=sender, recipients=rcpts, orcpts=orcpts,
            arrival=self.clock.seconds() if arrival is None else arrival, client=client, extra=extra,
            dsn=stored,
        )

    def receive(self, envelope: spoolmod.Envelope) -> spoolmod.IncomingMessage:
        """A message to be written from the reactor (SMTP DATA): held in
        memory while small (``AsyncSpool.incoming``)."""
        return self.spool.incoming(envelope)

    def accept(self, incoming: spoolmod.IncomingMessage, source: Source, *,
               announce: Callable[[spoolmod.QueueEntry], None],
               failed: Callable[[Any], None] | None = None,
               eight_bit: bool | None = None,
               settle: Callable[[], object] | None = None,
               trusted: bool = False) -> defer.Deferred[spoolmod.QueueEntry | None]:
        """Make a written message durable and queue it; fires with its entry.

        ``settle`` (blocking, run in the disk pool once the message is
        durable, before the queue has it); ``announce`` (on the reactor, then);
        ``failed`` gets the failure of the durable part (without it the
        Deferred fails), never one of ``announce``.  ``trusted``: from an
        authenticated client, relay.networks or the pickup: signed with DKIM
        (in the commit's disk-pool job) when a key fits its From domain.
        """
        job = self.signer.job() if trusted and self.signer is not None and self.signer.enabled else None
        d: defer.Deferred[Any] = self.spool.commit(incoming, job)
        if settle is not None:
            d.addCallback(lambda _: self.spool.run(settle))

        def durable(_: object) -> spoolmod.QueueEntry:
            env = incoming.envelope
            if job is not None:
                _log_signing(source, env.queue_id, job)
            if "orig_from" in env.extra:
                source.log.info("{queue_id}: sender <{orig_sender}> rewritten to <{sender}>",
                                queue_id=env.queue_id, orig_sender=env.extra["orig_from"], sender=env.sender)
            entry = spoolmod.QueueEntry(env, spoolmod.State.fresh(env), incoming.size, len(incoming.header),
                                        eight_bit=eight_bit, data=incoming.data, state_file=source.state_file)
            announce(entry)
            self._hand_off(entry, source)
            return entry

        if failed is None:
            return d.addCallback(durable)
        return d.addCallbacks(durable, failed)

    def _hand_off(self, entry: spoolmod.QueueEntry, source: Source) -> None:
        if self.queued is None:
            return
        try:
            self.queued(entry)
        except Exception:  # noqa: BLE001 - it is durable: never lose the acceptance over the queue
            source.log.failure(source.handoff_failed, queue_id=entry.envelope.queue_id)


def _log_signing(source: Source, queue_id: str, job: SignJob) -> None:
    signed, what = job.outcome()
    if signed:
        source.log.info("{queue_id}: dkim: signed {signature}", queue_id=queue_id, signature=what)
    else:
        source.log.info("{queue_id}: dkim: not signed: {reason}", queue_id=queue_id, reason=what)
