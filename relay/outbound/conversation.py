"""One command and its reply, and the two ways a conversation step fails.

Every step of an outbound session (relay.outbound.handshake, relay.outbound.transactions,
relay.outbound.client) sends a command and awaits the reply through ``command``
/ ``reply``, which turn a dead connection (relay.outbound.replies.ConversationError)
into ``Down`` worded as Postfix words it ("lost connection with host[ip]
while sending RCPT TO").  ``HopFailed``: this hop cannot take the mail now,
try the next one.  ``Down``: the connection died, and the caller decides
whether that is a failure of the hop (nothing decided yet) or a deferral
of the recipients still open.
"""

from __future__ import annotations

from twisted.internet import defer

from relay.outbound.clientproto import ClientProtocol
from relay.outbound.replies import ConversationError, Reply
from relay.outbound.request import Hop


class StepFailed(Exception):
    """A step failed: the enhanced ``status``, the ``reason`` for the log and
    the recipients, the server's ``reply`` if it gave one, the ``stage``."""

    def __init__(self, status: str, reason: str, *, reply: Reply | None = None, stage: str = ""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.reply = reply
        self.stage = stage


class HopFailed(StepFailed):
    """This hop cannot take the mail now: try the next one
    (``plaintext_retry``: the same hop again, without STARTTLS)."""

    def __init__(
        self, status: str, reason: str, *, reply: Reply | None = None, stage: str = "", plaintext_retry: bool = False
    ):
        super().__init__(status, reason, reply=reply, stage=stage)
        self.plaintext_retry = plaintext_retry


class NeedsUtf8(HopFailed):
    """This hop does not offer SMTPUTF8 and every recipient left needs it
    (5.6.7): the next hop may; a reconnection to this one would not help."""


class Down(StepFailed):
    """The connection died (or said 421); ``data_started``: message data had
    been sent in this transaction."""

    def __init__(
        self, status: str, reason: str, *, reply: Reply | None = None, stage: str = "", data_started: bool = False
    ):
        super().__init__(status, reason, reply=reply, stage=stage)
        self.data_started = data_started

    def hop_failed(self) -> HopFailed:
        """The same failure, as a failure of the hop."""
        return HopFailed(self.status, self.reason, reply=self.reply, stage=self.stage)


STAGE_WORDS = {
    "greeting": "receiving the initial server greeting",
    "EHLO": "performing the EHLO handshake",
    "HELO": "performing the HELO handshake",
    "STARTTLS": "sending STARTTLS",
    "TLS handshake": "performing the TLS handshake",
    "AUTH": "authenticating",
    "MAIL FROM": "sending MAIL FROM",
    "RCPT TO": "sending RCPT TO",
    "DATA": "sending DATA command",
    "message body": "sending message body",
    "end of DATA": "sending end of data -- message may be sent more than once",
    "RSET": "sending RSET",
    "QUIT": "sending QUIT",
    "session": "delivering (session time limit reached)",
}


def where(hop: Hop) -> str:
    """The hop as the log lines name it: host[address]."""
    return f"{hop.host}[{hop.address}]"


def conv_failure(hop: Hop, e: ConversationError) -> tuple[str, str]:
    """(status, reason) for a conversation that died, Postfix wording."""
    words = STAGE_WORDS.get(e.stage, f"in stage {e.stage}")
    w = where(hop)
    if e.kind == "timeout":
        return "4.4.2", f"conversation with {w} timed out while {words}"
    if e.kind == "protocol":
        return "4.5.0", f"protocol error with {w} while {words}: {e.detail}"
    if e.kind == "local":
        return "4.3.0", f"local problem while delivering to {w}: {e.detail}"
    extra = f" ({e.detail})" if e.detail else ""
    return "4.4.2", f"lost connection with {w} while {words}{extra}"


def down(hop: Hop, e: ConversationError, *, data_started: bool = False) -> Down:
    """The Down for a ConversationError on this hop."""
    status, reason = conv_failure(hop, e)
    return Down(status, reason, stage=e.stage, data_started=data_started)


async def reply(d: defer.Deferred[Reply], hop: Hop) -> Reply:
    """Await a reply; turn a dead connection into Down (callers decide
    whether that is a hop failure)."""
    try:
        return await d
    except ConversationError as e:
        raise down(hop, e)


async def command(proto: ClientProtocol, hop: Hop, line: bytes, stage: str, timeout: float) -> Reply:
    """Send one command and await its reply."""
    proto.stage = stage
    return await reply(proto.command(line, stage, timeout), hop)


async def quit_session(proto: ClientProtocol, hop: Hop, timeout: float) -> None:
    """QUIT, whatever the answer (or none)."""
    try:
        await command(proto, hop, b"QUIT", "QUIT", timeout)
    except Down:
        pass
