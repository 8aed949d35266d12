"""Handing queued messages over to another relay (``relayctl queue drain``).

A node that goes away (planned maintenance, or a dead node's disk mounted
elsewhere) gives its spool to a peer relay over SMTP, message by message,
with the relay's own outbound client (relay.outbound.client.deliver: its TLS,
AUTH, timeouts, pipelining and CHUNKING), recipient by recipient exactly as
still open: a recipient delivered or bounced here is never sent again.  The
original envelope sender (also ``<>``) and the DSN request (ENVID, RET,
NOTIFY, ORCPT, relay.delivery.dsnout, when the peer offers DSN) go along.

What the peer cannot learn from the SMTP envelope, the message's place in
this node's history, goes in one trace header put on top::

    X-Relay-Drained: node=mx1.example.org; queue-id=4F3A9C21B0D1; arrived=Wed, 02 Dec 2026 14:00:00 +0000

Why a header and not a parameter: it survives any peer (ours or not), is
seen by the final recipient and by every later ``queue show``, and ties the
peer's copy to this node's log (``grep 4F3A9C21B0D1``) and history.  The
copy that is sent is made first (the header, then the spool file's message
octets, copied in the kernel by relay.queue.incoming.copy_range into
``incoming/``, which every start empties): the message is streamed from a
file, never read whole into memory, and the spool file itself is never
changed.

The outcome of each recipient (``apply``): accepted by the peer (the 250 to
the end of the data) -> delivered here, its history naming the peer and its
queue id; refused with 5xx -> kept here, open, its history saying so
(``relayctl queue show``); 4xx, or no answer -> kept as it was.  A message is
removed only when every recipient is final, i.e. only after the peer's 250.
The at-least-once window: a connection lost after the peer sent its 250
but before we read it leaves the message here, and a second drain sends it
again.

Two drivers: ``LiveDrain`` in the running relay (relay.control.server's
QueueDrain command), which takes the message away from the queue runner for
the time of the hand-over (a busy step, as relay.queue.actions does for a
delete), and relay.admin.drain for a stopped relay's spool.  Both use
``prepare``, ``hand_over`` and ``apply`` from here.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from relay.common import logsafe
from relay.common.fileio import unlink_quiet, write_all
from relay.delivery import dsnout
from relay.outbound import client as outclient
from relay.outbound.request import Hop, MessageFile, Outbound, Timeouts, TLSPolicy
from relay.queue.envelope import DELIVERED, Envelope, State
from relay.queue.incoming import copy_range
from relay.queue.message import Message

log = Logger(namespace="relay.queue")

TLS_CHOICES = ("none", "may", "require")
CLAIM_POLL = 0.05  # seconds between looks at a message whose attempt is under way
_QUEUED_AS = re.compile(r"queued as ([A-Za-z0-9][A-Za-z0-9._@-]{0,80})", re.IGNORECASE)
_REPLY_CODES = re.compile(r"^\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3}\s+)?")
_ID_EQUALS = re.compile(r"\bid=([A-Za-z0-9][A-Za-z0-9._@-]{0,80})", re.IGNORECASE)
_ID_AT_END = re.compile(r"([A-Za-z0-9._-]*\d[A-Za-z0-9._-]*)\s*$")  # a last word with a digit in it


@dataclass(frozen=True)
class Peer:
    """Where to drain to and how.  ``address`` is the IP to connect to
    (resolved by relayctl), ``host`` the name (EHLO peer, certificate check)."""

    host: str
    address: str
    port: int
    ehlo: str
    tls: str = "may"  # none | may | require (a verified certificate: ca_file, else the system CAs)
    ca_file: str | None = None
    auth: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    timeouts: Timeouts = field(default_factory=Timeouts)

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def policy(self) -> TLSPolicy:
        if self.tls == "none":
            return TLSPolicy(mode="none")
        if self.tls == "require":
            return TLSPolicy(mode="verify", hostname=self.host, trust_root=self.ca_file,
                             required_by="relayctl queue drain --tls require")
        return TLSPolicy(mode="may")


@dataclass
class Result:
    """What became of one message; ``as_json`` is relayctl's line."""

    queue_id: str
    node: str
    peer: str
    handed_over: list[str] = field(default_factory=list)
    peer_queue_id: str = ""
    refused: list[tuple[str, str]] = field(default_factory=list)  # 5xx: kept here, marked
    deferred: list[tuple[str, str]] = field(default_factory=list)  # 4xx or no answer: kept
    removed: bool = False  # every recipient final: the message left this queue
    error: str = ""  # nothing was tried (busy, gone, unreadable)
    down: bool = False  # no answer from the peer at all (connection refused, timeout)

    @property
    def complete(self) -> bool:
        return not self.error and not self.refused and not self.deferred

    def as_json(self) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id, "node": self.node, "peer": self.peer,
            "handed_over": self.handed_over, "peer_queue_id": self.peer_queue_id,
            "refused": [{"recipient": a, "reply": r} for a, r in self.refused],
            "kept": [{"recipient": a, "reply": r} for a, r in self.deferred],
            "removed": self.removed, "complete": self.complete, "error": self.error, "peer_down": self.down,
        }


def trace_header(node: str, qid: str, arrival: float) -> bytes:
    """The X-Relay-Drained field (node and id are ours: a host name and a queue id)."""
    when = email.utils.format_datetime(datetime.datetime.fromtimestamp(arrival, datetime.timezone.utc))
    return f"X-Relay-Drained: node={node}; queue-id={qid}; arrived={when}\r\n".encode("ascii", "replace")


def prepare(incoming_dir: str, message_path: str, offset: int, size: int, header: bytes) -> str:
    """The copy to send: ``header`` then the message octets (blocking: a
    thread, or relayctl offline between sessions).  The caller unlinks it."""
    path = os.path.join(incoming_dir, f"drain-{secrets.token_hex(8)}")
    src = os.open(message_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            write_all(dst, header)
            copy_range(src, dst, offset, offset + size)
        except BaseException:
            os.close(dst)
            unlink_quiet(path)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return path


def open_recipients(state: State) -> list[str]:
    return [r.address for r in state.recipients if not r.final]


async def hand_over(reactor: Any, peer: Peer, env: Envelope, recipients: list[str], copy_path: str,
                    size: int, eight_bit: bool | None = None) -> outclient.DeliveryReport:
    """One SMTP transaction (or several, by the recipient limit) to the peer."""
    out = Outbound(
        sender=env.sender, recipients=tuple(recipients),
        message=MessageFile(copy_path, size, 0, None, eight_bit),
        helo=peer.ehlo, tls=peer.policy(), auth=peer.auth, connect_timeout=peer.connect_timeout,
        timeouts=peer.timeouts, queue_id=env.queue_id, auth_scope="drain:" + peer.name if peer.auth else "",
        dsn=dsnout.carried(env, recipients), smtputf8=env.smtputf8,
    )
    hop = Hop(peer.host, peer.address, peer.port)
    return await outclient.deliver(reactor, [hop], out)


def peer_queue_id(reply: str) -> str:
    """The peer's id from its 250 ("... queued as ID", else a last id-like word)."""
    text = _REPLY_CODES.sub("", " ".join(ln.strip() for ln in reply.splitlines()))
    m = _QUEUED_AS.search(text) or _ID_EQUALS.search(text)
    if m is None:
        m = _ID_AT_END.search(text)
        if m is not None and len(m.group(1)) < 6:
            m = None
    return logsafe.token(m.group(1)) if m else ""


def apply(result: Result, state: State, recipients: list[str], report: outclient.DeliveryReport,
          now: float) -> None:
    """Each recipient's outcome into ``state`` (its history) and ``result``."""
    by_address = {r.address: r for r in state.recipients}
    result.down = report.hop is None
    for address in recipients:
        res = report.results.get(address)
        rcpt = by_address[address]
        reply = res.text if res is not None else "no result for this recipient"
        one = " ".join(ln.strip() for ln in reply.splitlines())
        if res is not None and res.kind == "delivered":
            pid = peer_queue_id(reply)
            result.peer_queue_id = result.peer_queue_id or pid
            result.handed_over.append(address)
            rcpt.status = DELIVERED
            rcpt.reply = one
            rcpt.history.append({"t": round(now, 3), "relay": result.peer, "status": "drained",
                                 "reply": one, **({"peer_queue_id": pid} if pid else {})})
        elif res is not None and res.kind == "bounced":
            result.refused.append((address, one))
            rcpt.history.append({"t": round(now, 3), "relay": result.peer, "status": "drain refused",
                                 "reply": one})
        else:
            result.deferred.append((address, one))
            rcpt.history.append({"t": round(now, 3), "relay": result.peer, "status": "drain deferred",
                                 "reply": one})


def log_result(r: Result) -> None:
    """The lines that tell the message's story on this node (the peer logs
    its own arrival line, whose client is our EHLO name, the node)."""
    if r.handed_over:
        log.info("{queue_id}: drained from node {node} to {dest}: {count} recipient{s} handed over, "
                 "peer queue id {peer_id}", queue_id=r.queue_id, node=r.node, dest=r.peer,
                 count=len(r.handed_over), s="s" if len(r.handed_over) != 1 else "", peer_id=r.peer_queue_id or "?")
    for address, reply in r.refused:
        log.info("{queue_id}: to=<{to}>: drain to {dest} refused, kept here: {reply}", queue_id=r.queue_id,
                 to=address, dest=r.peer, reply=reply)
    for address, reply in r.deferred:
        log.info("{queue_id}: to=<{to}>: drain to {dest} not done, kept here: {reply}", queue_id=r.queue_id,
                 to=address, dest=r.peer, reply=reply)


class Runner(Protocol):
    """What LiveDrain uses of the queue runner (relay.queue.manager.QueueManager)."""

    messages: dict[str, Message]
    io: Any  # relay.queue.msgio.MessageIO
    config: Any

    def now(self) -> float: ...
    def withdraw(self, msg: Message) -> None: ...
    def forget(self, msg: Message, why: str) -> None: ...
    def after_finalize(self, msg: Message, retry: bool = False) -> None: ...


class Busy(Exception):
    """The message's delivery attempt did not end within the wait."""


class LiveDrain:
    """Drain in the running relay: the message is taken from the queue runner
    as a busy step of its own (``Message.busy``: the runner neither activates
    nor finalises a busy message, relay.queue.manager), so the relay never
    delivers it while it is handed over; an attempt under way is waited for
    (its outcome recorded first), a job waiting for a slot is withdrawn."""

    def __init__(self, runner: Runner, aspool: Any, reactor: Any, node: str):
        self.runner = runner
        self.aspool = aspool
        self.reactor = reactor
        self.node = node

    async def _claim(self, msg: Message, wait: float) -> bool:
        deadline = self.reactor.seconds() + wait
        while True:
            if self.runner.messages.get(msg.qid) is not msg:
                return False
            if not msg.in_progress and msg.io is None:
                msg.busy = True
                msg.token += 1  # its heap entry is stale: the runner does not activate it
                return True
            if msg.jobs and not msg.attempting:
                self.runner.withdraw(msg)  # only waiting for a slot: end it without an attempt
                continue
            if self.reactor.seconds() >= deadline:
                raise Busy(f"a delivery attempt is under way (waited {wait:g}s): try again")
            await task.deferLater(self.reactor, CLAIM_POLL, lambda: None)

    async def drain(self, qid: str, peer: Peer, wait: float = 60.0, held: bool = False) -> Result:
        """Hand one message over; its result (raises KeyError: not queued)."""
        result = Result(qid, self.node, peer.name)
        msg = self.runner.messages.get(qid)
        if msg is None or msg.leaving:
            raise KeyError(qid)
        try:
            claimed = await self._claim(msg, wait)
        except Busy as e:
            result.error = str(e)
            return result
        if not claimed:
            raise KeyError(qid)
        gone = False
        try:
            gone = await self._hand_over(msg, peer, result, held)
        finally:
            if not gone:
                self.runner.after_finalize(msg)
        log_result(result)
        return result

    async def _hand_over(self, msg: Message, peer: Peer, result: Result, held: bool) -> bool:
        """True: the message left the queue."""
        if msg.hold and not held:
            result.error = "on hold: not drained (release it, or drain it with --held)"
            return False
        rcpts = open_recipients(msg.state)
        if not rcpts:
            result.error = "no open recipient"
            return False
        spool = self.aspool.spool
        header = trace_header(self.node, msg.qid, msg.env.arrival)
        try:
            path = await self.aspool.run(prepare, spool.incoming_dir, spool.message_path(msg.qid), msg.offset,
                                         msg.size, header)
        except OSError as e:
            result.error = f"cannot read the message: {e.strerror or e}"
            return False
        try:
            report = await defer.ensureDeferred(
                hand_over(self.reactor, peer, msg.env, rcpts, path, len(header) + msg.size, msg.eight_bit))
        finally:
            await self.aspool.run(unlink_quiet, path)
        apply(result, msg.state, rcpts, report, self.runner.now())
        if msg.state.done:
            await self.runner.io.remove(msg)
            result.removed = True
            self.runner.forget(msg, f"drained to {peer.name}")
            return True
        await self.runner.io.write(msg, durable=True)
        return False
