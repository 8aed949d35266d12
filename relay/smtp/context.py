"""What the inbound SMTP server gets from the rest of the relay: one
``ServerContext`` shared by every listener and session, and the counters it
keeps for ``relayctl status`` and the metrics.

Its own module so that the parts of the server (relay.smtp.connection,
relay.smtp.server, relay.smtp.transfer, relay.smtp.auth) and the service that
builds it share the types without importing each other.  The structural
types here (``Reactor``, ``DelayedCall``, ``Limiter``, ``Session``, ``Checker``) say what
the server uses of Twisted's and the relay's objects, which zope's interfaces
cannot say to mypy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from relay.common.connlimit import LocalCounter
from relay.common.ratelimit import RateTable
from relay.common.redislimits import FleetRates
from relay.common.tls import ServerTLS
from relay.config import Config
from relay.intake.accept import Intake
from relay.intake.policy import Policy


class DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Reactor(Protocol):
    """What the server uses of the reactor (IReactorTime)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], /, *args: Any, **kw: Any) -> DelayedCall: ...


class Limiter(Protocol):
    """Connections per client IP (relay.common.connlimit)."""

    def acquire(self, key: str, limit: int) -> tuple[bool, int]: ...

    def release(self, key: str) -> None: ...

    def counts(self) -> dict[str, int]: ...


class Session(Protocol):
    """An open session, as the service's shutdown sees it (relay.smtp.server.SMTPServer)."""

    def begin_shutdown(self) -> None: ...

    def force_shutdown(self) -> None: ...


class Checker(Protocol):
    """A twisted.cred checker of user names and passwords (relay.mailbox.users)."""

    def requestAvatarId(self, credentials: Any) -> Any: ...


@dataclass
class Counters:
    received: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    tls: int = 0  # sessions that completed a TLS handshake (STARTTLS or implicit)
    rate_limited: dict[str, int] = field(default_factory=dict)  # refusals per limit ("limits.messages_per_ip")

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def rate_limit(self, limit: str) -> None:
        """A MAIL or RCPT refused by a [limits] limit (counted in rejected too)."""
        self.rate_limited[limit] = self.rate_limited.get(limit, 0) + 1
        self.reject("rate_limit")


class ServerContext:
    """What the SMTP server needs from the rest of the relay.

    The service owns it; a reload hands it the new config, policy, checker
    and certificate (``reconfigure``), and every new session and command
    reads the current values.
    """

    def __init__(
        self,
        *,
        config: Config,
        policy: Policy,
        intake: Intake,  # where a received message goes (relay.intake.accept)
        reactor: Reactor,
        checker: Checker | None = None,  # for AUTH
        tls: ServerTLS | None = None,
        limiter: Limiter | None = None,  # connections per IP for the whole relay
        rates: RateTable | FleetRates | None = None,  # [limits] counts, for the whole relay (or fleet)
    ):
        self.config = config
        self.policy = policy
        self.intake = intake
        self.checker = checker
        self.tls = tls
        self.reactor = reactor
        self.auth_failure_delay = 2.0
        self.limiter: Limiter = limiter if limiter is not None else LocalCounter()
        self.rates: RateTable | FleetRates = rates if rates is not None else RateTable.local()
        self.counters = Counters()
        self.accepting = True  # False while shutting down
        self.open_sessions: set[Session] = set()

    def reconfigure(self, *, config: Config, policy: Policy, checker: Checker | None,
                    tls: ServerTLS | None) -> None:
        """A reload: new sessions and commands use these."""
        self.config = config
        self.policy = policy
        self.checker = checker
        self.tls = tls

    @property
    def connections(self) -> dict[str, int]:
        """This process's counted sessions per client IP."""
        return self.limiter.counts()
