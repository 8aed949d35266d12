"""What the parts of one POP3 connection share, written down once.

The connection (relay.mailbox.pop3protocol.POP3Server) is one object whose
commands live in two modules by RFC 1939 state (relay.mailbox.pop3auth for
AUTHORIZATION, relay.mailbox.pop3transaction for TRANSACTION).  This module
holds what all three use, so none of them imports another's module:

* ``FactoryView``: what a connection reads from its factory
  (relay.mailbox.pop3.POP3Factory), as a typing.Protocol.  The settings are
  read at the moment they are needed, so a reload that reassigns them
  (``pop3.apply_config``) reaches connections already open.
* ``Transport``: the transport calls a connection makes.
* ``Session``: the state of a logged-in session: the fixed listing and the
  marks.
* ``CommandError``: the -ERR a command raises.
* ``Connection``: the connection's state and output calls, declared for
  the two command mixins (POP3Server defines them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer

from relay.common.idle import IdleTimer
from relay.mailbox import maildir
from relay.mailbox.users import UserDB


class ConnectionCounter(Protocol):
    """Connections per client address (relay.common.connlimit counters)."""

    def acquire(self, key: str, limit: int) -> tuple[bool, int]: ...

    def release(self, key: str) -> None: ...

    def counts(self) -> dict[str, int]: ...


class FactoryView(Protocol):
    """What a POP3 connection reads from its factory (see POP3Factory)."""

    hostname: str
    mailbox_root: str
    local_domains: tuple[str, ...]
    userdb: UserDB
    tls_options: Any  # a Twisted TLS context factory, or None
    auth_requires_tls: bool
    reactor: Any  # IReactorTime (+ IReactorThreads for the default pool)
    login_failure_delay: float
    idle_timeout: float
    max_login_failures: int
    max_bad_commands: int
    max_connections_per_ip: int
    limiter: ConnectionCounter
    close_grace: float
    open_sessions: int
    logged_in: int

    def run_blocking(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]: ...

    def run_auth(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]: ...


class Transport(Protocol):
    """The transport calls a POP3 connection makes (a TCP, TLS or test transport)."""

    connected: int
    disconnecting: bool

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> Any: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def startTLS(self, contextFactory: Any) -> None: ...

    def doWrite(self) -> Any: ...  # tcp.Connection only (POP3Server._can_flush)


class CommandError(Exception):
    """Reply with this -ERR line; counts as a bad command if bad is set."""

    def __init__(self, reply: bytes, bad: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.bad = bad


def cmd_error(text: str, bad: bool = False) -> CommandError:
    return CommandError(b"-ERR " + text.encode("ascii", "replace") + b"\r\n", bad)


def no_args(arg: bytes, name: str) -> None:
    """Refuse arguments to a command that takes none."""
    if arg.strip(b" "):
        raise cmd_error(f"{name} takes no arguments", bad=True)


class Session:
    """The state of a logged-in session: the fixed listing and the marks."""

    def __init__(self, user: str, path: str, lock: maildir.MailboxLock, msgs: list[maildir.Message]):
        self.user = user
        self.path = path
        self.lock = lock
        self.msgs = msgs
        self.deleted: set[int] = set()
        self.retrieved = 0
        self.seen_queue: list[maildir.Message] = []
        self.next_read: int | None = None  # message index to read ahead
        self.seen_job: defer.Deferred[None] | None = None

    def stat(self) -> tuple[int, int]:
        n = size = 0
        for i, m in enumerate(self.msgs):
            if i not in self.deleted:
                n += 1
                size += m.size
        return n, size


class Connection:
    """The state and calls of a POP3 connection that its command mixins use.

    Declarations only: relay.mailbox.pop3protocol.POP3Server sets the state
    and defines the calls.
    """

    factory: FactoryView
    transport: Transport
    peer: str
    session: Session | None
    _lost: bool
    _closing: bool
    _out_paused: bool
    _idle: IdleTimer | None

    @property
    def secure(self) -> bool:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _touch(self) -> None:
        raise NotImplementedError
