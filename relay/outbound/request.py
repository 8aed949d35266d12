"""What one outbound delivery is asked to do, as one frozen value.

``Outbound`` holds everything relay.outbound.client.deliver needs to know about
one message for one destination: the envelope, where the message lies in
the spool (``MessageFile``), the TLS policy (``TLSPolicy``), the AUTH
credentials, the timeouts and the per-transaction recipient limit.  The
caller (relay.delivery.attempt) builds it once; every step of the
conversation reads from it, so the list of settings is written down only
here.  ``Hop`` is where to go: one address of a next hop (relay.delivery.mx
finds them).  No Twisted, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from relay.outbound.dane import Tlsa

TLS_MODES = ("none", "may", "encrypt", "verify", "dane", "dane-only")
DANE_MODES = ("dane", "dane-only")
# what TLSPolicy.observe is told: (MX or next-hop host name, reason, what failed,
# enforced: the hop was refused for it; False: only reported, MTA-STS "testing")
Observer = Callable[[str, str, str, bool], None]


@dataclass(frozen=True)
class Hop:
    """One address to try: ``host`` is the name (for logs, SNI and certificate
    checks), ``address`` the IP to connect to; ``secure`` see below."""

    host: str
    address: str
    port: int
    preference: int = 0
    # DANE (RFC 7672 section 2.2): the MX RRset and this host's address
    # records were DNSSEC-validated (AD bit), so the host name may be the
    # TLSA base domain and reference identifier.  Not part of equality.
    secure: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        addr = f"[{self.address}]"
        return f"{self.host}{addr}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """Seconds.  Defaults: RFC 5321 section 4.5.3.2 (EHLO, STARTTLS, AUTH and
    RSET like MAIL); ``session`` caps one whole connection, ``quit`` is short
    because nothing depends on the answer to QUIT."""

    greeting: float = 300.0
    helo: float = 300.0
    starttls: float = 300.0  # the reply to STARTTLS, then the handshake
    auth: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 300.0
    quit: float = 30.0
    session: float = 3600.0

    @classmethod
    def uniform(cls, seconds: float, session: float | None = None) -> Timeouts:
        """Every per-reply timeout the same (tests use short ones)."""
        names = [f for f in cls.__dataclass_fields__ if f != "session"]
        t = cls(**{n: seconds for n in names})
        return replace(t, session=session if session is not None else max(seconds * 20, 10.0))


@dataclass(frozen=True)
class MessageFile:
    """Where the message (CRLF line endings, not dot-stuffed) lies in its
    spool file: ``size`` bytes from ``offset``.  ``data``: those bytes when
    the caller holds them in memory (just received; used only when its
    length is ``size``).  ``eight_bit``: whether they hold 8-bit bytes (None:
    scanned in a thread when the server offers 8BITMIME)."""

    path: str
    size: int
    offset: int = 0
    data: bytes | None = None
    eight_bit: bool | None = None

    @property
    def in_memory(self) -> bytes | None:
        """The message bytes when the caller's copy is the whole message."""
        return self.data if self.data is not None and len(self.data) == self.size else None


@dataclass(frozen=True)
class TLSPolicy:
    """``mode``: none | may | encrypt | verify | dane | dane-only.  "verify"
    checks the chain against ``trust_root`` (None for the system CAs, a PEM
    file path, or an IOpenSSLTrustRoot such as ``ssl.Certificate``) and the
    name ``hostname``, or the hop's host name, with service-identity; with
    ``match`` (names or "*.domain" patterns), the certificate must be valid
    for one of those instead.

    The rest comes from relay.delivery.tlspolicy (the defaults are the old
    behaviour): ``required_by`` words a failure of a required policy that an
    explicit policy set ("TLS is required by the policy for example.com
    (mta-sts enforce)"; None: the old messages); ``would_verify``: MTA-STS
    "testing", check as "verify" would and only tell ``observe``;
    ``observe(host, reason, failure, enforced)`` hears of every failure the
    policy cares about (the metric, the MTA-STS report).

    "dane" / "dane-only" (RFC 7672, as Postfix): ``tlsa`` holds, by MX host
    name, the usable records of a DNSSEC-validated TLSA RRset (the caller
    leaves out insecure answers); a host with records must pass DANE
    authentication, one without is "may" ("dane") or deferred
    ("dane-only").  ``tlsa_errors``: hosts whose TLSA look-up failed, with
    the reason (that hop is deferred, never tried without DANE).
    ``dane_names``: further DANE-TA reference identifiers (the next-hop
    domain)."""

    mode: str = "may"
    hostname: str | None = None
    trust_root: Any = None  # None | str | IOpenSSLTrustRoot
    match: tuple[str, ...] = ()
    required_by: str | None = None
    would_verify: bool = False
    observe: Observer | None = field(default=None, compare=False, repr=False)
    tlsa: Mapping[str, tuple[Tlsa, ...]] = field(default_factory=dict, hash=False)
    tlsa_errors: Mapping[str, str] = field(default_factory=dict, hash=False)
    dane_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {TLS_MODES}, not {self.mode!r}")


@dataclass(frozen=True)
class DsnParams:
    """The DSN request carried to a next hop that offers DSN (RFC 3461):
    ``ret`` and ``envid`` (decoded) for MAIL; per recipient address its
    NOTIFY (None: not given) and ORCPT ("addr-type;xtext")."""

    ret: str = ""
    envid: str = ""
    rcpts: dict[str, tuple[str | None, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Outbound:
    """One message for one destination.  ``sender``: "" for the null
    sender; ``recipients`` in order, duplicates sent once.  ``auth``:
    (username, password) for AUTH PLAIN/LOGIN, only ever sent over TLS.
    ``queue_id`` goes in the log lines.  ``auth_scope`` and ``stop_on_5xx``:
    see below (issue 16: upstreams)."""

    sender: str
    recipients: tuple[str, ...]
    message: MessageFile
    helo: str
    tls: TLSPolicy = field(default_factory=TLSPolicy)
    auth: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_rcpts_per_txn: int = 50
    queue_id: str | None = None
    # issue 16: the route the credentials belong to (the destination key),
    # part of the connection cache's key so that a session logged in for one
    # route never serves another; "" without AUTH
    auth_scope: str = ""
    # a list of relay hosts (an upstream, a smarthost list): a 5xx greeting or
    # EHLO/HELO from one ends the attempt (bounced) instead of trying the next
    stop_on_5xx: bool = False
    dsn: DsnParams | None = None  # sent only to a hop that offers DSN
    # the message came with SMTPUTF8 (Envelope.smtputf8): MAIL says SMTPUTF8
    # to a hop that offers it; to one that does not only when it need not
    # (relay.outbound.smtputf8)
    smtputf8: bool = False

    @property
    def log_id(self) -> str:
        """The queue id as the log lines show it."""
        return self.queue_id or "-"
