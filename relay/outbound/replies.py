"""What an outbound SMTP conversation yields: replies and results.

A server's ``Reply``; ``ConversationError`` when no reply came (timeout,
lost connection, a broken reply, a local problem); one ``RcptResult`` per
recipient and the ``DeliveryReport`` that holds them; and the reading of
an EHLO reply's extensions.  No Twisted, no I/O: every other client module
(protocol, producer, session steps, connection cache) and the caller in
relay.delivery.attempt share these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from relay.outbound.request import Hop


@dataclass(frozen=True)
class Reply:
    """A complete server reply: ``lines`` are the texts after "ddd-"/"ddd "."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as sent (all lines, joined by newlines)."""
        n = len(self.lines)
        return "\n".join(f"{self.code}{'-' if i < n - 1 else ' '}{ln}" for i, ln in enumerate(self.lines))

    @property
    def one_line(self) -> str:
        """For logs and Diagnostic-Code: all lines on one line."""
        return f"{self.code} " + " ".join(ln.strip() for ln in self.lines if ln.strip())

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) the server gave, else derived."""
        first = self.lines[0].split(" ", 1)[0] if self.lines and self.lines[0] else ""
        parts = first.split(".")
        if (
            len(parts) == 3
            and all(p.isdigit() for p in parts)
            and parts[0] == str(self.code // 100)
            and parts[0] in "245"
            and len(parts[1]) <= 3
            and len(parts[2]) <= 3
        ):
            return first
        return f"{self.code // 100}.0.0" if self.code // 100 in (2, 4, 5) else "4.0.0"

    @property
    def kind(self) -> str:
        c = self.code // 100
        return "delivered" if c == 2 else "bounced" if c == 5 else "deferred"


class ConversationError(Exception):
    """The connection ended or stalled while we waited: kind is "timeout",
    "lost", "protocol" or "local"."""

    def __init__(self, kind: str, stage: str, detail: str = ""):
        super().__init__(f"{kind} {stage} {detail}".strip())
        self.kind = kind
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True)
class RcptResult:
    """What happened to one recipient in this attempt.

    ``code`` is the remote reply code, None when the result is ours (no hop
    answered, a local problem); ``text`` the full remote reply or our reason;
    ``stage`` the command it answered ("RCPT TO", "MAIL FROM", "DATA", "end of
    DATA", ...) or the step that failed ("connect", "greeting", "TLS", ...).
    """

    kind: str  # delivered | deferred | bounced
    status: str
    text: str
    code: int | None = None
    hop: Hop | None = None
    stage: str = ""
    dsn_carried: bool = False  # accepted by a hop that offers DSN: it sends any notice from now on

    @property
    def remote(self) -> bool:
        return self.code is not None

    @property
    def diagnostic(self) -> str | None:
        """An RFC 3464 Diagnostic-Code value, for remote replies."""
        if self.code is None:
            return None
        return "smtp; " + " ".join(ln.strip() for ln in self.text.splitlines())

    def describe(self) -> str:
        """Postfix-like one line for the log: who said what to which command."""
        if self.code is not None and self.hop is not None and self.text.startswith(str(self.code)):
            one = " ".join(ln.strip() for ln in self.text.splitlines())
            return f"host {self.hop.host}[{self.hop.address}] said: {one} (in reply to {self.stage} command)"
        return self.text


@dataclass
class DeliveryReport:
    """Per-recipient results plus what the log wants to know."""

    results: dict[str, RcptResult]
    hop: Hop | None = None  # the hop that answered (None: every hop failed)
    tls: dict[str, Any] | None = None  # version, cipher, bits, trusted, verified, hostname
    attempts: list[tuple[Hop, str]] = field(default_factory=list)  # hops that failed, why

    def recipients(self, kind: str) -> list[str]:
        return [r for r, res in self.results.items() if res.kind == kind]


def extensions(reply: Reply) -> dict[str, str]:
    """The EHLO keywords (upper case) and their parameters."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        kw, _, params = line.strip().partition(" ")
        if kw:
            ext[kw.upper()] = params.strip()
    # Old servers say "AUTH=LOGIN PLAIN".
    for line in reply.lines[1:]:
        if line.upper().startswith("AUTH=") and "AUTH" not in ext:
            ext["AUTH"] = line[5:].strip()
    return ext


def size_limit(ext: dict[str, str]) -> int:
    """The server's SIZE limit, 0 when it gives none."""
    v = ext.get("SIZE", "").strip()
    return int(v) if v.isdigit() else 0
