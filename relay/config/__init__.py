"""Configuration: one TOML file -> frozen dataclasses, from one declaration.

The schema is a contract (issue 2): every key below is accepted and
validated, whether or not the behaviour behind it exists yet, so that the
file format never changes under a user.  Every error names the file, the key
and what was expected; a bad config never starts the service.

Size: one job (the whole schema, one declaration per key); it grows by a few
lines per key, and splitting sections into modules would spread the one place
a user's key is declared.

Each key is declared once, as a field of the section dataclasses below made
with ``declare()``: its default (as written in the file), its check (from
relay.config.values), its doc line.  ``load`` iterates that declaration, and
``python -m relay.config.doc`` writes etc/relay.toml and docs/configuration.md
from it.  Rules between keys are the functions in ``_RULES``.

Where the file is found (the same rule for ``twistd relay`` and ``relayctl``):
``--config FILE``, else ``$RELAY_CONFIG``, else ``./relay.toml`` if it exists,
else the built-in defaults.  Relative paths resolve against the directory of
the config file (the working directory when there is none).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.common import endpoints
from relay.common.address import AddressError, normalize_domain
from relay.config import values as v
from relay.config.ratevalues import LIMIT_OVERRIDES, PACING, RATE, REDIS_PREFIX, REDIS_URL, Rate
from relay.config.tlsvalues import TLS_POLICY, TLSPolicyEntry
from relay.config.values import HostPort, IPNetwork, parse_duration, parse_hostport

__all__ = ["Config", "ConfigError", "HostPort", "IPNetwork", "load", "load_effective", "find_config_file",
           "parse_duration", "parse_hostport", "schema", "Key", "Declared"]


class ConfigError(Exception):
    """A config problem; str() names the file and the key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@functools.lru_cache(maxsize=1)
def _default_hostname() -> str:
    """socket.getfqdn(), once per process: it may ask DNS, which must not
    happen again on the reactor at every reload."""
    name = socket.getfqdn()
    try:
        return normalize_domain(name)
    except AddressError:
        return "localhost"


def default_workers() -> int:
    """workers = "auto": the cores this process may run on (its CPU affinity,
    which a container or taskset may narrow), at most 64."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(64, n))


_WORKERS_KIND = '"auto" or an integer from 1 to 64'
_WORKER_COUNT = v.integer(1, 64)


def _check_workers(value: Any, resolve: v.Resolve) -> Any:
    if value == "auto":
        return value
    try:
        return _WORKER_COUNT(value, resolve)
    except v.Bad:
        raise v.Bad(_WORKERS_KIND)


_WORKERS = v.Check(_WORKERS_KIND, _check_workers)


# --------------------------------------------------------------------------- the declaration


@dataclass(frozen=True)
class Key:
    """One key of the file: what the docs show and what the loader does."""

    default: Any  # the default as a TOML value, exactly as etc/relay.toml shows it (None: computed)
    check: v.Check
    doc: str
    refine: v.Refine | None = None  # run after every key is read, in the order of _RULES
    computed: Callable[[], Any] | None = None  # the default when default is None, made at load
    computed_doc: str = ""  # what the computed default is, in words
    example: Any = None  # a TOML value shown as an example

    def convert(self, value: Any, resolve: v.Resolve = v.as_is) -> Any:
        value = self.check(value, resolve)
        return self.refine(value) if self.refine else value


_KEY = "relay.config.key"
_SECTION = "relay.config.section"


def declare(default: Any, check: v.Check, doc: str, *, required: bool = False, **kw: Any) -> Any:
    """A dataclass field declaring a key; its dataclass default is the
    converted TOML default (paths not resolved: the loader resolves them)."""
    spec = Key(default, check, doc, **kw)
    if required or default is None:
        return field(metadata={_KEY: spec})
    return field(default=spec.convert(default), metadata={_KEY: spec})


def section(cls: type) -> Any:
    return field(default_factory=cls, metadata={_SECTION: cls})


@dataclass(frozen=True)
class SMTPConfig:
    """The SMTP server: where mail comes in, and the limits of a session."""

    listen: tuple[str, ...] = declare(
        ["tcp:2525:interface=127.0.0.1"], v.ENDPOINTS,
        "Where mail is accepted without authentication (the MX port: port 25 in production; ports below 1024 "
        'need root at start, see the README\'s "Privileges").')
    submission: tuple[str, ...] = declare(
        [], v.ENDPOINTS,
        'Where mail is accepted only after AUTH (MAIL before AUTH gets 530 5.7.0): e.g. ["tcp:587", "ssl:465"].  '
        "Needs users (`relayctl user add`) and, in practice, [tls].")
    max_message_size: int = declare(
        36700160, v.integer(1024), "Largest message in bytes, advertised with SIZE; bigger ones get 552 5.3.4.")
    max_recipients: int = declare(1000, v.integer(1), "Recipients per message; the extra ones get 452 4.5.3.")
    timeout: float = declare(
        "5m", v.DURATION, "How long a command line (or, in DATA, the next data) may take; then 421 4.4.2.",
        refine=v.ABOVE_ZERO)
    max_connections_per_ip: int = declare(
        20, v.integer(1),
        "Simultaneous connections from one IP address; more get 421 4.7.0.  One limit for the whole relay: with "
        "workers > 1 the connections every worker has open count together (SMTP and submission listeners "
        "together, too).")
    junk_command_limit: int = declare(
        100, v.integer(0),
        "Commands that move no mail forward (NOOP, RSET, HELP, VRFY, HELO, EHLO) a session may send before each "
        "further one also counts as an error (as Postfix's smtpd_junk_command_limit); 20 errors end the session "
        "with 421 4.7.0.  A message received starts the count afresh.  0: no limit.")
    hide_client_session: bool = declare(
        False, v.BOOL, "Mail from authenticated clients on `listen`: the Received header leaves out the "
        "client's IP address and HELO name (the log keeps them).  See docs/rewriting.md.")
    submission_hide_client_session: bool = declare(
        True, v.BOOL, "The same for `submission` listeners (implicit-TLS ones too), on by default as in "
        "chasquid and maddy.")


@dataclass(frozen=True)
class TLSConfig:
    """The certificate of the relay's servers (SMTP, submission, POP3)."""

    certificate: str = declare(
        "", v.OPTIONAL_PATH,
        "A PEM certificate chain (leaf first).  With it and `key` set, STARTTLS (SMTP) and STLS (POP3) are "
        "offered and ssl: endpoints without their own key use them.  TLS 1.2 and 1.3 only.")
    key: str = declare("", v.OPTIONAL_PATH, "The PEM private key of `certificate`; the two are set together.")
    auth_requires_tls: bool = declare(
        True, v.BOOL,
        "With a certificate: SMTP AUTH and POP3 logins only over TLS (as Dovecot's default), loopback included.  "
        "Without a certificate, logins work in plaintext (a warning is logged for every non-loopback login "
        "endpoint).")

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.key)


@dataclass(frozen=True)
class RelayConfig:
    """Who may relay through us, and where non-local mail goes."""

    networks: tuple[IPNetwork, ...] = declare(
        ["127.0.0.0/8", "::1/128"], v.NETWORKS, "Clients allowed to relay to any domain without AUTH (your LAN).")
    domains: tuple[str, ...] = declare(
        [], v.DOMAINS, "Domains accepted from anyone and relayed onward: we are their backup MX.")
    smarthost: HostPort | None = declare(
        "", v.SMARTHOST_VALUE,
        '"host:port" (or "[host]:port"): all non-local mail goes there instead of to the MX hosts.  A list of '
        "them: tried in order (fail-over, docs/routing.md); the name of a relay.upstreams entry: that upstream.  "
        "Empty: deliver by MX lookup.", refine=v.SMARTHOST)
    smarthost_username: str = declare(
        "", v.STRING,
        'AUTH PLAIN/LOGIN to the smarthost with this name, never over plaintext (so a username with '
        'smarthost_tls = "none" is a config error).  Needs smarthost_password_file.')
    smarthost_password_file: str = declare(
        "", v.OPTIONAL_PATH,
        "The smarthost password is the first line of this file (keep it mode 0600).")
    smarthost_tls: str = declare(
        "may", v.choice("none", "may", "encrypt", "verify"),
        "TLS to the smarthost: none | may (STARTTLS if offered) | encrypt (TLS or defer) | verify (TLS with "
        "the certificate checked against the system CAs, or smarthost_ca_file, and the host name).")
    smarthost_ca_file: str = declare(
        "", v.OPTIONAL_PATH,
        'With smarthost_tls = "verify": a PEM file of trusted CA certificates (for a smarthost with a private '
        "CA).  Empty: the system's trusted CAs.")
    routes: tuple[tuple[str, HostPort], ...] = declare(
        {}, v.ROUTES, "Per-domain next hops, overriding MX and smarthost.",
        example={"example.com": "10.0.0.5:25", "lab.example": "[192.0.2.7]:2525"})
    upstreams: tuple[v.Upstream, ...] = declare(
        {}, v.UPSTREAMS,
        "Named upstream relays, one [relay.upstreams.NAME] table each (the tables replace an `upstreams = {}` "
        'line): hosts ("host:port" or a list, tried in order on connection failure, 421 or timeout), tls '
        '(none | may | encrypt | verify, default "verify": '
        "the password goes there), ca_file, username and password_file (a username needs a password file and "
        "TLS).  Used only where relay.sender_routes, relay.routes or relay.smarthost name them; each uses only "
        "its own credentials.  See docs/routing.md.",
        example={"office": {"hosts": ["smtp1.example.net:587", "smtp2.example.net:587"], "tls": "verify",
                            "username": "office@example.org", "password_file": "office.pw"}})
    sender_routes: tuple[tuple[str, str], ...] = declare(
        {}, v.SENDER_ROUTES,
        'Envelope sender -> upstream name: an "address" (case ignored), a "domain", or ".domain" for its '
        "subdomains; the most specific entry wins.  Wins over relay.routes and relay.smarthost, never over "
        "local.domains.", example={"alice@example.org": "office", "shop.example": "shop"})
    # made by the rules from relay.smarthost and relay.routes (not keys of the file)
    smarthost_hosts: tuple[HostPort, ...] = ()
    smarthost_upstream: str = ""
    route_upstreams: tuple[tuple[str, str], ...] = ()

    def route_for(self, domain: str) -> HostPort | None:
        for d, hp in self.routes:
            if d == domain:
                return hp
        return None

    def upstream(self, name: str) -> v.Upstream | None:
        for u in self.upstreams:
            if u.name == name:
                return u
        return None

    def upstream_route_for(self, domain: str) -> str | None:
        """The upstream a relay.routes entry names for this domain."""
        for d, name in self.route_upstreams:
            if d == domain:
                return name
        return None

    def sender_route_for(self, sender: str) -> tuple[str, str] | None:
        """(upstream name, the relay.sender_routes entry) for an envelope
        sender: the address, then its domain, then ".parent" entries from
        the nearest; None for the null sender or no match."""
        local, at, domain = sender.rpartition("@")
        if not at or not domain:
            return None
        domain = domain.lower()
        table = dict(self.sender_routes)
        labels = domain.split(".")
        keys = [v.sender_key(local, domain), domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        for k in keys:
            if k in table:
                return table[k], k
        return None


@dataclass(frozen=True)
class RewriteConfig:
    """Sender rewriting of mail from trusted sources (docs/rewriting.md)."""

    senders: tuple[tuple[str, str], ...] = declare(
        {}, v.SENDERS, "Exact envelope and From/Sender/Reply-To addresses to replace; wins over masquerade.",
        example={"root@nas.lan": "alerts@example.org"})
    masquerade: tuple[tuple[str, str], ...] = declare(
        {}, v.MASQUERADE, 'Domains to replace, the local part kept: "*.lan" is every subdomain of lan '
        '(not lan itself: list "lan" too), "nas.local" that domain only.', example={"*.lan": "example.org"})


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbound delivery: DNS, TLS, retries and concurrency."""

    nameservers: tuple[HostPort, ...] = declare(
        [], v.NAMESERVERS, 'DNS servers for MX lookups, "ip" or "ip:port".  Empty: the system resolver.')
    port: int = declare(25, v.integer(1, 65535), "TCP port of MX hosts (25; another port only for tests and labs).")
    tls: str = declare(
        "may", v.choice("none", "may", "encrypt", "dane", "dane-only"),
        "STARTTLS to MX hosts: none | may (try; fall back to plaintext on a new connection if the handshake "
        "fails) | encrypt (no TLS: defer).  MX certificates are not verified (as Postfix), the outcome is logged.  "
        "dane | dane-only (RFC 7672, docs/dane.md; needs delivery.nameservers = a local validating resolver): "
        "an MX host with DNSSEC-validated TLSA records must pass DANE authentication, else defer; without "
        "usable records dane acts as may, dane-only defers.  The default for domains without a tls_policy entry.")
    tls_policy: tuple[tuple[str, TLSPolicyEntry], ...] = declare(
        {}, TLS_POLICY,
        'TLS per destination (docs/tls-policy.md): "example.com" that domain, ".example.com" its subdomains, '
        '"[host]" a relay.routes host or the smarthost; a level, or { level = "verify", match = [names], '
        "ca_file = PEM file }.  An entry wins over MTA-STS; domains without one get delivery.tls.",
        example={"example.com": "encrypt", ".bank.example": {"level": "verify", "match": ["*.bank.example"]},
                 "[smtp.example.net]": "verify"})
    retry_min: float = declare(
        "5m", v.DURATION,
        "The first retry comes after retry_min, then the wait doubles up to retry_max (with a little random "
        "jitter).", refine=v.ABOVE_ZERO)
    retry_max: float = declare("1h", v.DURATION, "The longest wait between two tries; not shorter than retry_min.")
    max_lifetime: float = declare(
        "5d", v.DURATION, "After this long in the queue, the remaining recipients are bounced (5.4.7).",
        refine=v.ABOVE_ZERO)
    delay_warning: float = declare(
        "4h", v.DURATION, 'After this long, the sender gets one delay notice.  "0" disables it.')
    dsn_full_limit: int = declare(
        50000, v.integer(0),
        "Bytes of the message a non-delivery notice returns whole when the sender asked RET=FULL (Postfix's "
        "bounce_size_limit); a bigger message is returned as its headers only, and the notice says so.")
    connect_timeout: float = declare(
        "30s", v.DURATION, "How long to wait for a TCP connection to a next hop.", refine=v.ABOVE_ZERO)
    max_concurrency: int = declare(
        50, v.integer(1),
        "At most this many outbound connections at once (sessions kept open a moment for reuse by the next "
        "message to the same host count too).")
    max_per_destination: int = declare(
        10, v.integer(1),
        "At most this many outbound connections to one destination (a domain, smarthost or route), and to one "
        "host (address and port), whatever the domains it serves.")
    mta_sts: bool = declare(
        True, v.BOOL,
        "MTA-STS (RFC 8461) for MX delivery: a recipient domain's published policy (enforce: only its MX hosts, "
        "with verified TLS) is fetched over HTTPS, cached in the spool and refreshed (docs/mta-sts.md).")
    mta_sts_ca_file: str = declare(
        "", v.OPTIONAL_PATH,
        "A PEM file of the CAs trusted under MTA-STS: for policy fetches, and for the MX certificates an "
        "enforce policy requires to be verified (a private CA, or the test CA).  Empty: the system's trusted CAs.")
    mta_sts_connect_timeout: float = declare(
        "30s", v.DURATION, "How long to wait for the TCP and TLS connection to an MTA-STS policy server.",
        refine=v.ABOVE_ZERO)
    mta_sts_fetch_timeout: float = declare(
        "60s", v.DURATION, "The longest an MTA-STS policy fetch may take in all (RFC 8461 suggests 60 s or more).",
        refine=v.ABOVE_ZERO)
    pacing: tuple[tuple[str, Rate], ...] = declare(
        {}, PACING,
        'At most N deliveries (messages) per window to a destination: a key is a destination ("mx:DOMAIN", '
        '"smarthost:HOST:PORT", "upstream:NAME", as `relayctl route` shows it), a bare domain (its MX), or "*" '
        "(every MX domain without its own entry).  The others wait in the queue, without an attempt or a "
        "retry counted (`relayctl queue show` says why).  Empty: no pacing.",
        example={"gmail.com": "20/1m", "*": "60/1m"})


@dataclass(frozen=True)
class LimitsConfig:
    """Inbound rate limits: messages and recipients per window (docs/limits.md)."""

    messages_per_ip: Rate | None = declare(
        "1000/1h", RATE,
        'Messages (MAIL commands accepted) from one client network (see ipv4_prefix, ipv6_prefix) per window; '
        'more get 450 4.7.1 at MAIL.  "off": no limit.  One limit for the whole relay, with workers too.')
    recipients_per_ip: Rate | None = declare(
        "10000/1h", RATE, "Recipients (RCPT commands accepted) from one client network per window; more get "
        "450 4.7.1 at RCPT.")
    messages_per_user: Rate | None = declare(
        "300/1h", RATE, "Messages from one authenticated user per window (a stolen password is the threat).")
    recipients_per_user: Rate | None = declare(
        "3000/1h", RATE, "Recipients from one authenticated user per window.")
    messages_per_sender: Rate | None = declare(
        "500/1h", RATE, "Messages with one envelope sender per window (the null sender <> is not counted).")
    recipients_per_sender: Rate | None = declare(
        "5000/1h", RATE, "Recipients of messages with one envelope sender per window.")
    ipv4_prefix: int = declare(32, v.integer(8, 32), "IPv4 clients are counted per network of this prefix length.")
    ipv6_prefix: int = declare(
        64, v.integer(16, 128), "IPv6 clients are counted per network of this prefix length (a /64 is one site).")
    networks: bool = declare(
        True, v.BOOL, "Whether clients in relay.networks are limited too (a compromised LAN host is the threat); "
        "false: they are exempt (authenticated users still count per user).")
    mx: tuple[tuple[str, Rate | None], ...] = declare(
        {}, LIMIT_OVERRIDES, "Overrides of the limits above for sessions on smtp.listen (the MX port).",
        example={"messages_per_sender": "off"})
    submission: tuple[tuple[str, Rate | None], ...] = declare(
        {}, LIMIT_OVERRIDES, "Overrides of the limits above for sessions on smtp.submission.",
        example={"messages_per_user": "100/1h", "recipients_per_user": "1000/1h"})
    redis: str = declare(
        "", REDIS_URL,
        'Keep the limits above and the per-IP connection limits (smtp. and pop3.max_connections_per_ip) in '
        'this Redis, so that they hold for a whole fleet of relays (docs/limits.md): "redis://[:password@]'
        'host:port/db" or "unix:/path/to/socket".  Redis down: each relay goes on with its local limits.  '
        'Empty: counted in this relay only.', example="redis://127.0.0.1:6379/0")
    redis_prefix: str = declare(
        "relay:", REDIS_PREFIX, "Prefix of every key the relay writes in limits.redis (several fleets can "
        "share one Redis with different prefixes).")
    redis_timeout: float = declare(
        "0.5s", v.DURATION, "How long a session waits for limits.redis to answer before it decides with the "
        "local limits (Redis slow or gone).", refine=v.ABOVE_ZERO)

    def rate(self, name: str, submission: bool) -> tuple[str, Rate | None]:
        """(the key that sets it, the rate) of one limit for one kind of endpoint."""
        sub = "submission" if submission else "mx"
        for k, r in getattr(self, sub):
            if k == name:
                return f"limits.{sub}.{name}", r
        return f"limits.{name}", getattr(self, name)


@dataclass(frozen=True)
class DKIMConfig:
    """DKIM signing of mail from trusted sources (docs/dkim.md)."""

    keys: tuple[v.DKIMKey, ...] = declare(
        [], v.DKIM_KEYS,
        "The signing keys, one [[dkim.keys]] table each: mail from an authenticated client, relay.networks or "
        "relay-sendmail whose From domain (or a parent of it) is a domain here is signed at intake with each of "
        "its keys (two selectors while a key is rotated).  Make one with `relayctl dkim keygen`.  Empty: no "
        "signing.", example=[{"domain": "example.org", "selector": "s2026", "key": "dkim/example.org.s2026.pem",
                              "algorithm": "rsa-sha256"}])
    headers: tuple[str, ...] = declare(
        ["From", "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "MIME-Version", "Content-Type",
         "Content-Transfer-Encoding", "In-Reply-To", "References"], v.DKIM_HEADERS,
        "The header fields signed (h=); a name listed twice also covers a second instance added later (From "
        "twice: no From can be added under the signature).")
    canonicalization: str = declare(
        "relaxed/relaxed", v.DKIM_CANONICALIZATION, "Header/body canonicalization (c=, RFC 6376 3.4).")


@dataclass(frozen=True)
class LocalConfig:
    """Local delivery: the domains that end here, their Maildirs, users and aliases."""

    domains: tuple[str, ...] = declare(
        ["localhost"], v.DOMAINS, "Final destinations: mail for these domains goes to Maildirs here.")
    mailboxes: str = declare("mail", v.PATH, "Maildir root: `<mailboxes>/<domain>/<localpart>/{tmp,new,cur}`.")
    users: str = declare(
        "users", v.PATH,
        "Credentials file (salted scrypt hashes, mode 0600), managed with `relayctl user` (add, passwd, delete, list); "
        "a running relay sees changes within a few seconds.")
    aliases: str = declare(
        "", v.OPTIONAL_PATH,
        'An aliases file: lines "name: target, target" where name is a local part (in every local domain) or a '
        "full address, and targets are local parts or addresses (local or remote).  Reloaded within seconds "
        "when edited.  postmaster always resolves: its alias, else the user postmaster@domain, else the first "
        "user of the domain, else a postmaster mailbox.")


@dataclass(frozen=True)
class POP3Config:
    """The POP3 server users fetch local mail from."""

    listen: tuple[str, ...] = declare(
        ["tcp:1100:interface=127.0.0.1"], v.ENDPOINTS,
        'Where users fetch local mail ("tcp:110", "ssl:995"); [] disables POP3.')
    max_connections_per_ip: int = declare(
        20, v.integer(1),
        'Simultaneous POP3 connections from one IP address; more get "-ERR [SYS/TEMP] Too many connections '
        'from your address" and are closed.')


@dataclass(frozen=True)
class ControlConfig:
    """The control socket of relayctl."""

    socket: str = declare(
        "", v.OPTIONAL_PATH, "The UNIX socket relayctl talks to (mode 0600).  Empty: `<spool>/control.sock`.")
    fleet: tuple[tuple[str, str], ...] = declare(
        {}, v.FLEET, "The relays of a fleet that `relayctl --fleet queue` and `relayctl --fleet status` ask, "
        'each by its control socket (a node with workers > 1: one entry per worker\'s socket) or by "tls:host:port", '
        "a node's `tcp_listen` (with `secret_file` and `fleet_ca_file`); the relay itself does not use it.",
        example={"mx1": "/var/spool/relay/control.sock", "mx2": "tls:mx2.example.org:9026"})
    tcp_listen: v.HostPort | None = declare(
        "", v.OPTIONAL_HOSTPORT,
        'An authenticated control endpoint over TCP for `relayctl --fleet` from another host: "host:port", '
        "always TLS with the [tls] certificate (required), and the shared secret of `secret_file` before any "
        "command.  Not with workers > 1 (\"auto\" then means one process).  Empty: none (only the UNIX socket).")
    secret_file: str = declare(
        "", v.OPTIONAL_PATH,
        "The shared secret of the fleet's control endpoints (its first line, at least 16 characters; mode 0600): "
        "the relay asks it on `tcp_listen`, relayctl sends it to a \"tls:\" node of `fleet`.")
    fleet_ca_file: str = declare(
        "", v.OPTIONAL_PATH, 'The CAs relayctl verifies a "tls:" node\'s certificate with.  Empty: the system\'s.')


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics."""

    listen: tuple[str, ...] = declare(
        [], v.ENDPOINTS,
        'Prometheus metrics over HTTP, e.g. ["tcp:9025:interface=127.0.0.1"].  Empty: off.')


@dataclass(frozen=True)
class ProxyConfig:
    """Listeners behind a load balancer that speaks the PROXY protocol (docs/proxy.md)."""

    listeners: tuple[str, ...] = declare(
        [], v.ENDPOINTS,
        "Endpoints of smtp.listen, smtp.submission and pop3.listen, written as there, that a load balancer "
        "connects to with a PROXY protocol header (v1 or v2, haproxy's send-proxy / send-proxy-v2): the client "
        "address it carries is the one relay.networks, the limits, the logs and Received headers use.  Such a "
        "listener refuses a connection without a valid header and any connection not from proxy.trusted.")
    trusted: tuple[IPNetwork, ...] = declare(
        [], v.NETWORKS, "The load balancers' addresses or networks: the only peers whose PROXY header is "
        "believed (required with proxy.listeners).")
    header_timeout: float = declare(
        "10s", v.DURATION, "How long a balancer's connection may take to send its complete header; then it is "
        "closed (a peer that sends nothing holds no slot).", refine=v.ABOVE_ZERO)


@dataclass(frozen=True)
class LogConfig:
    """The log format."""

    format: str = declare(
        "text", v.choice("text", "json"), '"text" (human-readable lines) or "json" (one JSON object per line).')


@dataclass(frozen=True)
class Config:
    hostname: str = declare(
        None, v.DOMAIN,
        "The name of this host: in the SMTP banner, in EHLO when we deliver, in the Received headers we add "
        "and in bounces.", computed=_default_hostname, computed_doc="the machine's FQDN",
        example="mx.example.org")
    spool: str = declare(
        "spool", v.PATH,
        "The queue and state directory (created with mode 0700).  It holds the queue (queue/), half-received "
        "mail (incoming/, cleaned at start), unreadable entries moved aside (quarantine/), a lock file and the "
        "control socket.", required=True)
    smtp: SMTPConfig = section(SMTPConfig)
    tls: TLSConfig = section(TLSConfig)
    relay: RelayConfig = section(RelayConfig)
    rewrite: RewriteConfig = section(RewriteConfig)
    delivery: DeliveryConfig = section(DeliveryConfig)
    limits: LimitsConfig = section(LimitsConfig)
    dkim: DKIMConfig = section(DKIMConfig)
    local: LocalConfig = section(LocalConfig)
    pop3: POP3Config = section(POP3Config)
    control: ControlConfig = section(ControlConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    proxy: ProxyConfig = section(ProxyConfig)
    log: LogConfig = section(LogConfig)
    path: str | None = None  # the file this came from, None for built-in defaults
    # a field of its own, not declare(): the file's default is "auto" (resolved by _workers_share_listeners
    # into a number), so a Config made in code says how many (keyword-only: after fields with defaults)
    workers: int = field(kw_only=True, metadata={_KEY: Key(
        "auto", _WORKERS,
        "Relay processes (1 to 64, or \"auto\").  One Python process works on one core; with workers = N the "
        "`twistd relay` process becomes a master that binds the listeners and runs N workers accepting on the "
        "same sockets, each with its own queue in `<spool>/w<i>/` (what a worker accepted, it delivers; a worker "
        "that dies is restarted and finds its queue; meanwhile the others take every new connection; one that "
        "keeps dying has its queue delivered by another, see docs/fleet.md).  relayctl covers all of them.  "
        "\"auto\" (or no `workers` line): one per core, except with a `unix:` listener, which workers cannot "
        "share, or with `control.tcp_listen`: then one process, and a log line at start says "
        "so.  With [metrics], the master serves the sum "
        "of the workers' figures.",
        computed_doc="one per core this process may run on (its CPU affinity), at most 64")})
    # why workers is not what "auto" would have made (a unix: listener), for the log at start; "" otherwise
    workers_note: str = ""

    @property
    def control_socket(self) -> str:
        return self.control.socket or os.path.join(self.spool, "control.sock")

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.local.domains

    @property
    def source(self) -> str:
        return self.path or "built-in defaults"


@dataclass(frozen=True)
class Declared:
    """A key where it is declared: its section ("" at the top level) and name."""

    section: str
    name: str
    spec: Key

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


@dataclass(frozen=True)
class Section:
    name: str  # "" for the top level
    cls: type
    keys: tuple[Declared, ...]


def _declared(name: str, cls: type) -> Section:
    keys = tuple(Declared(name, f.name, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata)
    return Section(name, cls, keys)


@functools.lru_cache(maxsize=1)
def schema() -> tuple[Section, ...]:
    """The top level, then each [section], in the order of the file."""
    subs = [_declared(f.name, f.metadata[_SECTION]) for f in dataclasses.fields(Config) if _SECTION in f.metadata]
    return (_declared("", Config), *subs)


@functools.lru_cache(maxsize=1)
def declared_keys() -> dict[str, Declared]:
    return {k.dotted: k for s in schema() for k in s.keys}


# --------------------------------------------------------------------------- loading


class _Loader:
    def __init__(self, data: dict, path: str | None, base: str):
        self.data = data
        self.path = path
        self.base = base
        self.problems: list[str] = []

    @property
    def where(self) -> str:
        return self.path or "built-in defaults"

    def resolve(self, p: str) -> str:
        if not p:
            return p
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.base, p))

    def problem(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.where}: {key}: {msg}")

    def section(self, sec: Section, subs: tuple[str, ...], out: dict[str, Any]) -> None:
        """Check one table: the converted value of each key present goes to out["section.key"]."""
        name = sec.name
        table = self.data if not name else self.data.get(name, {})
        if not isinstance(table, dict):
            self.problem(name, f"expected a table [{name}]")
            return
        known = {k.name: k for k in sec.keys}
        for key, value in table.items():
            if not name and key in subs:
                continue
            dotted = f"{name}.{key}" if name else key
            if key not in known:
                hint = ", ".join(sorted(known) + ([] if name else [f"[{s}]" for s in subs]))
                what = "unknown key" if name or not isinstance(value, dict) else "unknown section"
                self.problem(dotted, f"{what} (known: {hint})")
                continue
            try:
                out[dotted] = known[key].spec.check(value, self.resolve)
            except v.BadAt as e:  # a part of the value: named after the key
                self.problem(dotted + e.at, f"expected {e}, got {e.got!r}")
            except v.Bad as e:
                self.problem(dotted, f"expected {e}, got {value!r}")


def _read_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"])
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"])
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"])
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not valid UTF-8: {e}"])


def load(path: str | None = None, *, data: dict | None = None) -> Config:
    """Load and validate a config file (None: built-in defaults)."""
    if data is None:
        data = {} if path is None else _read_file(path)
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    ld = _Loader(data, os.path.abspath(path) if path else None, base)
    sections = schema()
    subs = tuple(s.name for s in sections if s.name)
    values: dict[str, Any] = {}
    for sec in sections:
        ld.section(sec, subs, values)
    for k in declared_keys().values():  # absent (or refused) keys: their default, checked the same way
        if k.dotted not in values and k.spec.default is not None:
            values[k.dotted] = k.spec.check(k.spec.default, ld.resolve)
    for rule in _RULES:
        rule(ld, values)
    if ld.problems:
        raise ConfigError(ld.problems)
    for rule in _RULES_OF_A_VALID_FILE:
        rule(ld, values)
    if ld.problems:
        raise ConfigError(ld.problems)
    return _build(values, ld.path)


def _build(values: dict[str, Any], path: str | None) -> Config:
    parts: dict[str, Any] = {}
    for sec in schema():
        kw = {}
        for k in sec.keys:
            if k.dotted in values:
                kw[k.name] = values[k.dotted]
            else:  # no default in the file: made now, once the file is known to be good
                assert k.spec.computed is not None, k.dotted
                kw[k.name] = k.spec.computed()
        if sec.name:
            for f in dataclasses.fields(sec.cls):  # the values the rules made (not keys of the file)
                if _KEY not in f.metadata and f"{sec.name}.{f.name}" in values:
                    kw[f.name] = values[f"{sec.name}.{f.name}"]
            parts[sec.name] = sec.cls(**kw)
        else:
            parts.update(kw)
    return Config(**parts, path=path, workers_note=values.get("workers_note", ""))


# --------------------------------------------------------------------------- rules between keys
# Each is rule(loader, values) with values["section.key"] for every key
# (its default when absent); they run in this order, after every key is read.

Rule = Callable[[_Loader, dict[str, Any]], None]

# The listeners of the mail servers (not metrics): ssl: ones need a
# certificate, and workers > 1 share them.
_MAIL_LISTENERS = ("smtp.listen", "smtp.submission", "pop3.listen")


def _refine(dotted: str) -> Rule:
    """The key's own refinement (Key.refine), at this point of the order."""

    def rule(ld: _Loader, values: dict[str, Any]) -> None:
        spec = declared_keys()[dotted].spec
        assert spec.refine is not None, dotted
        try:
            values[dotted] = spec.refine(values[dotted])
        except v.Invalid as e:
            ld.problem(dotted, str(e))

    rule.refines = dotted  # type: ignore[attr-defined]
    return rule


def _smarthost_login(ld: _Loader, values: dict[str, Any]) -> None:
    if values["relay.smarthost_username"] and not values["relay.smarthost_password_file"]:
        ld.problem("relay.smarthost_password_file", "required when relay.smarthost_username is set")
    if values["relay.smarthost_username"] and values["relay.smarthost_tls"] == "none":
        # the password is never sent in plaintext: every message would wait
        # in the queue and bounce after max_lifetime
        ld.problem("relay.smarthost_tls", '"none" with relay.smarthost_username: the login is only ever sent '
                   'over TLS; use "may", "encrypt" or "verify"')


def _smarthost(ld: _Loader, values: dict[str, Any]) -> None:
    """relay.smarthost as written (a tuple of strings) -> the first host,
    every host in order, or the upstream it names."""
    raw: tuple[str, ...] = values["relay.smarthost"]
    names = [u.name for u in values["relay.upstreams"]]
    values["relay.smarthost"] = None
    if len(raw) == 1 and raw[0] in names:
        up = next(u for u in values["relay.upstreams"] if u.name == raw[0])
        values["relay.smarthost_upstream"] = up.name
        values["relay.smarthost_hosts"] = up.hosts
        values["relay.smarthost"] = up.hosts[0]
        for k in ("relay.smarthost_username", "relay.smarthost_password_file", "relay.smarthost_ca_file"):
            if values[k]:
                ld.problem(k, f"not used when relay.smarthost names the upstream {up.name!r}: set it in "
                           f"[relay.upstreams.{up.name}]")
        return
    hosts = []
    for h in raw:
        if _unknown_upstream(h, names):
            ld.problem("relay.smarthost", f"{h!r} is not a defined upstream (relay.upstreams: {', '.join(names)}); "
                       f'for a host on port 25 write "{h}:25"')
            return
        try:
            hosts.append(v.parse_hostport(h))
        except v.Bad as e:
            ld.problem("relay.smarthost", f"expected {e}, got {h!r}")
            return
    if len(set(hosts)) != len(hosts):
        ld.problem("relay.smarthost", "a host is listed twice")
        return
    values["relay.smarthost_hosts"] = tuple(hosts)
    values["relay.smarthost"] = hosts[0] if hosts else None


_smarthost.refines = "relay.smarthost"  # type: ignore[attr-defined]  # it does the key's refinement too


def _unknown_upstream(value: str, names: list[str]) -> bool:
    """A bare name (no "." or ":") when upstreams are defined: a typo of an
    upstream's name, not a host on port 25."""
    return bool(names) and value not in names and v.UPSTREAM_NAME.fullmatch(value) is not None


def _routes_upstreams(ld: _Loader, values: dict[str, Any]) -> None:
    """relay.routes values that name an upstream move to route_upstreams."""
    raw = ld.data.get("relay", {}).get("routes", {}) if isinstance(ld.data.get("relay"), dict) else {}
    routes = values["relay.routes"]
    if not isinstance(raw, dict) or len(raw) != len(routes):
        return  # the check refused it (reported) or it is the default
    names = [u.name for u in values["relay.upstreams"]]
    hosts, ups = [], []
    for (dom, hp), text in zip(routes, raw.values()):
        t = text.strip()
        if t in names:
            ups.append((dom, t))
        elif _unknown_upstream(t, names):
            ld.problem("relay.routes", f"{dom}: {t!r} is not a defined upstream (relay.upstreams: "
                       f'{", ".join(names)}); for a host on port 25 write "{t}:25"')
        else:
            hosts.append((dom, hp))
    values["relay.routes"] = tuple(hosts)
    values["relay.route_upstreams"] = tuple(ups)


def _sender_routes_known(ld: _Loader, values: dict[str, Any]) -> None:
    names = [u.name for u in values["relay.upstreams"]]
    for key, name in values["relay.sender_routes"]:
        if name not in names:
            ld.problem("relay.sender_routes", f"{key}: {name!r} is not a defined upstream (relay.upstreams: "
                       f"{', '.join(names) or 'none'})")


def _tls_pair(ld: _Loader, values: dict[str, Any]) -> None:
    cert, key_ = values["tls.certificate"], values["tls.key"]
    if bool(cert) != bool(key_):
        ld.problem("tls.key" if cert else "tls.certificate", "tls.certificate and tls.key must be set together")


def _retry_order(ld: _Loader, values: dict[str, Any]) -> None:
    dmin, dmax = values["delivery.retry_min"], values["delivery.retry_max"]
    if dmax < dmin:
        ld.problem("delivery.retry_max", f"must not be shorter than delivery.retry_min ({dmin:g}s)")


def _ssl_needs_certificate(ld: _Loader, values: dict[str, Any]) -> None:
    needs = [(k, d) for k in _MAIL_LISTENERS for d in values[k]
             if (s := endpoints.parse(d)).implicit_tls and not s.own_certificate]
    if needs and not (values["tls.certificate"] and values["tls.key"]):
        for k, d in needs:
            ld.problem(k, f"{d!r} is an ssl: endpoint without privateKey=, so it needs tls.certificate and tls.key")


def _control_tcp(ld: _Loader, values: dict[str, Any]) -> None:
    """The TCP control endpoint is TLS with a shared secret, never plaintext."""
    if values["control.tcp_listen"] is None:
        return
    if not (values["tls.certificate"] and values["tls.key"]):
        ld.problem("control.tcp_listen", "needs tls.certificate and tls.key (the endpoint is always TLS)")
    if not values["control.secret_file"]:
        ld.problem("control.tcp_listen", "needs control.secret_file (the shared secret asked before any command)")
    # "auto" becomes 1 with such an endpoint (_workers_share_listeners); an explicit number > 1 is refused
    if isinstance(values["workers"], int) and values["workers"] > 1:
        ld.problem("control.tcp_listen", "not with workers > 1 (each worker has its own queue and UNIX socket)")


def _domains_disjoint(ld: _Loader, values: dict[str, Any]) -> None:
    overlap = set(values["local.domains"]) & set(values["relay.domains"])
    if overlap:
        ld.problem("relay.domains", f"{', '.join(sorted(overlap))} also in local.domains")


def _proxy_listeners(ld: _Loader, values: dict[str, Any]) -> None:
    ours = {d for k in _MAIL_LISTENERS for d in values[k]}
    for d in values["proxy.listeners"]:
        if d not in ours:
            ld.problem("proxy.listeners", f"{d!r} is not an endpoint of smtp.listen, smtp.submission or "
                       "pop3.listen (name it exactly as written there)")
    if values["proxy.listeners"] and not values["proxy.trusted"]:
        ld.problem("proxy.trusted", "empty, but proxy.listeners expect a PROXY header: name the load "
                   "balancers' addresses")


def _workers_share_listeners(ld: _Loader, values: dict[str, Any]) -> None:
    """workers = "auto" (or absent): the cores, or 1 when a listener cannot be
    shared (the reason kept for the log); an explicit number > 1 with such a
    listener is refused, as the operator asked for something that cannot run."""
    unshared = [(k, d) for k in _MAIL_LISTENERS for d in values[k]
                if endpoints.parse(d).kind not in ("tcp", "tcp6", "ssl", "systemd")]
    if values["workers"] == "auto":
        cores = default_workers()
        tcp_control = values.get("control.tcp_listen")
        values["workers"] = 1 if unshared or tcp_control else cores
        if unshared and cores > 1:
            k, d = unshared[0]
            values["workers_note"] = (f"workers = 1, not one per core ({cores}): {k} {d!r} cannot be shared by "
                                      "workers (only tcp:, tcp6:, ssl: and systemd: endpoints can)")
        elif tcp_control and cores > 1:
            values["workers_note"] = (f"workers = 1, not one per core ({cores}): control.tcp_listen serves one "
                                      "process's queue (each worker has its own queue and UNIX socket)")
        return
    if values["workers"] <= 1:
        return
    for k, d in unshared:
        ld.problem(k, f"{d!r}: with workers > 1 only tcp:, tcp6:, ssl: and systemd: endpoints can be "
                   "shared by the workers")


_RULES: tuple[Rule, ...] = (
    _smarthost,
    _routes_upstreams,
    _sender_routes_known,
    _smarthost_login,
    _tls_pair,
    _refine("delivery.retry_min"),
    _retry_order,
    _refine("smtp.timeout"),
    _refine("delivery.connect_timeout"),
    _refine("delivery.max_lifetime"),
    _refine("delivery.mta_sts_connect_timeout"),
    _refine("delivery.mta_sts_fetch_timeout"),
    _refine("limits.redis_timeout"),
    _ssl_needs_certificate,
    _control_tcp,
    _domains_disjoint,
    _refine("proxy.header_timeout"),
    _proxy_listeners,
)
_RULES_OF_A_VALID_FILE: tuple[Rule, ...] = (_workers_share_listeners,)


# --------------------------------------------------------------------------- finding the file


def find_config_file(explicit: str | None) -> str | None:
    """--config FILE, else $RELAY_CONFIG, else ./relay.toml if it exists, else None."""
    if explicit:
        return explicit
    env = os.environ.get("RELAY_CONFIG")
    if env:
        return env
    if os.path.exists("relay.toml"):
        return os.path.abspath("relay.toml")
    return None


def load_effective(explicit: str | None = None) -> Config:
    return load(find_config_file(explicit))
