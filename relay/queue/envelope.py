"""What the spool's files hold: the envelope line and the per-recipient state.

A message file starts with one envelope line (``RELAYQ1 <json>\\n``), fixed
at queueing; its state file (``queue/<id>.state``) holds what changes: each
recipient's status, attempts, last reply and history, the hold flag, the
delay notice and an administrator's pending action.  This module turns them
into bytes and back, checking what it reads (CorruptEntry); it does no I/O.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from relay.common.dsn import DsnRequest

MAGIC = b"RELAYQ1 "

PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
FINAL = (DELIVERED, BOUNCED)
_STATUSES = frozenset((PENDING, DEFERRED, DELIVERED, BOUNCED))
PENDING_ACTIONS = frozenset(("", "retry", "delete", "bounce"))  # State.pending
_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=...) builds one per call
NO_CLIENT: dict[str, Any] = {}  # shared by the lean in-memory envelopes (never modified)


class SpoolError(Exception):
    pass


class CorruptEntry(SpoolError):
    pass


@dataclass(slots=True)
class Recipient:
    """One envelope recipient and its delivery state."""

    address: str
    orcpt: str | None = None  # the address as the client gave it, if expanded
    status: str = PENDING
    attempts: int = 0
    reply: str = ""  # last reply or reason
    next_attempt: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(slots=True)
class Envelope:
    """What the message file's first line holds (immutable after queueing)."""

    queue_id: str
    sender: str  # "" for the null sender
    recipients: list[str]
    arrival: float
    orcpts: list[str | None] = field(default_factory=list)
    client: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # kind (bounce...), etc.
    # the DSN request (RET, ENVID, NOTIFY, ORCPT: relay.common.dsn); None
    # when the client asked nothing, and in spool files older than DSN
    dsn: DsnRequest | None = None

    def __post_init__(self) -> None:
        if len(self.orcpts) != len(self.recipients):
            self.orcpts = (list(self.orcpts) + [None] * len(self.recipients))[: len(self.recipients)]
        if self.dsn is not None:
            self.dsn.fit(len(self.recipients))

    @property
    def smtputf8(self) -> bool:
        """The client's MAIL said SMTPUTF8 (RFC 6531): the addresses (local
        parts in UTF-8, NFC; domains always stored as A-labels) or the header
        fields may be UTF-8.  Kept in ``extra`` ("smtputf8": true), so older
        spool files read as False."""
        return bool(self.extra.get("smtputf8"))

    def dsn_of(self, address: str) -> tuple[str | None, str | None]:
        """(NOTIFY, ORCPT) of one recipient, None for what it did not give."""
        d = self.dsn
        if d is None or not (any(d.notify) or any(d.orcpt)):
            return None, None
        try:
            i = self.recipients.index(address)
        except ValueError:
            return None, None
        return d.notify[i], d.orcpt[i]

    def to_line(self) -> bytes:
        d = {
            "id": self.queue_id,
            "from": self.sender,
            "rcpt": self.recipients,
            "t": self.arrival,
            "client": self.client,
        }
        if any(self.orcpts):
            d["orcpt"] = self.orcpts
        if self.extra:
            d["x"] = self.extra
        if self.dsn is not None and (self.dsn.to_json()):
            d["dsn"] = self.dsn.to_json()
        line = MAGIC + _encode(d).encode("utf-8") + b"\n"
        return line

    @classmethod
    def from_line(cls, line: bytes) -> "Envelope":
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise CorruptEntry("no envelope line")
        try:
            d = json.loads(line[len(MAGIC) :].decode("utf-8"))
            rcpts = d["rcpt"]
            orcpts = d.get("orcpt") or [None] * len(rcpts)
            if (
                not isinstance(rcpts, list)
                or not rcpts
                or not all(isinstance(r, str) and r for r in rcpts)
                or not isinstance(orcpts, list)
                or len(orcpts) != len(rcpts)
                or not all(o is None or isinstance(o, str) for o in orcpts)
            ):
                raise CorruptEntry("bad envelope: bad recipient list")
            if not isinstance(d["id"], str) or not isinstance(d["from"], str):
                raise CorruptEntry("bad envelope: bad id or sender")
            dsn = DsnRequest.from_json(d["dsn"], len(rcpts)) if "dsn" in d else None
            arrival = float(d["t"])
            if not math.isfinite(arrival):
                raise CorruptEntry("bad envelope: bad arrival time")
            return cls(
                queue_id=d["id"],
                sender=d["from"],
                recipients=rcpts,
                arrival=arrival,
                orcpts=orcpts,
                client=dict(d.get("client") or {}),
                extra=dict(d.get("x") or {}),
                dsn=dsn,
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptEntry(f"bad envelope: {e.__class__.__name__}: {e}")


@dataclass(slots=True)
class State:
    """The mutable part: per-recipient status, hold flag, notices sent."""

    recipients: list[Recipient]
    hold: bool = False
    warned: bool = False  # delay notice sent
    # an administrator's action accepted while the message was busy (an
    # attempt, or the recording of its outcome), applied when that step ends
    # or at the next start: "" (none), "retry", "delete" or "bounce"
    pending: str = ""

    def to_bytes(self) -> bytes:
        d = {
            "hold": self.hold,
            "warned": self.warned,
            **({"admin": self.pending} if self.pending else {}),
            "rcpt": [
                {
                    "a": r.address,
                    "s": r.status,
                    "n": r.attempts,
                    "r": r.reply,
                    "t": r.next_attempt,
                    "h": r.history,
                }
                for r in self.recipients
            ],
        }
        return _encode(d).encode("utf-8")

    @classmethod
    def fresh(cls, env: Envelope) -> "State":
        return cls([Recipient(a, o) for a, o in zip(env.recipients, env.orcpts)])

    @classmethod
    def from_bytes(cls, env: Envelope, data: bytes, history: bool = True) -> "State":
        try:
            d = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
            rs = d["rcpt"]
            if len(rs) != len(env.recipients):
                raise CorruptEntry("state does not match the envelope")
            recipients = []
            for a, o, x in zip(env.recipients, env.orcpts, rs):
                if x["a"] != a:
                    raise CorruptEntry("state does not match the envelope")
                status = x["s"]
                if status not in _STATUSES:
                    raise CorruptEntry(f"unknown status {status!r}")
                h = x.get("h")
                if h is not None and not isinstance(h, list):
                    raise CorruptEntry("bad state file: history is not a list")
                reply = str(x.get("r", ""))
                recipients.append(Recipient(
                    a, o, status, int(x.get("n", 0)), reply if history else sys.intern(reply),
                    float(x.get("t", 0.0)), h if (history and isinstance(h, list)) else [],
                ))
            pending = d.get("admin", "")
            if pending not in PENDING_ACTIONS:
                raise CorruptEntry(f"unknown pending action {pending!r}")
            return cls(recipients, bool(d.get("hold", False)), bool(d.get("warned", False)), pending)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CorruptEntry(f"bad state file: {e.__class__.__name__}: {e}")

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)


@dataclass
class QueueEntry:
    """What a scan finds for one queued message."""

    envelope: Envelope
    state: State
    size: int  # message bytes (without the envelope line)
    offset: int  # where the message starts in the file
    eight_bit: bool | None = None  # known when it was just received; None: scan when it matters
    data: bytes | None = None  # the message bytes, when just received and small (no need to read the file)
    state_file: bool = True  # False: no state file was ever written (nothing to unlink at removal)


