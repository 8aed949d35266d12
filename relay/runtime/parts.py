"""The relay's parts made from a config, in one place.

Three callers make them: the running relay at start (relay.runtime.service),
its reload (the same parts from the new config, all or nothing), and
relayctl's offline ``route`` (relay.admin.commands), which answers from the
config as the relay would.  What the config names on disk (the users file,
the aliases file, the certificate, the DKIM keys) is read here; a file that cannot be used
is a :class:`PartError` whose text names the file and says why, the same
text at start, at a reload and for relayctl.

The parts that run (the queue, the deliverer, the pickup, the SMTP context,
the POP3 factories) are built by the service, each in its own ``_build_*``
method, from these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twisted.logger import Logger

from relay.common import endpoints as epmod
from relay.common import redislimits
from relay.common.netutil import Listeners
from relay.common.ratelimit import RateTable
from relay.common.redisurl import parse_redis_url
from relay.common.tls import ServerTLS, TLSConfigError, load_server_tls
from relay.config import Config
from relay.control.route import RouteContext
from relay.delivery import mtasts
from relay.delivery.mx import Resolver
from relay.intake import aliases as aliasesmod
from relay.intake.dkim import KeyFileError, SigningKey, load_key
from relay.intake.policy import Policy
from relay.intake.signing import Signer
from relay.mailbox import users as usersmod

log = Logger(namespace="relay.service")  # the service's namespace: its log lines are the service's

_T = TypeVar("_T")

ROUTE_DNS_LIFETIME = 10.0  # seconds per DNS query of ``relayctl route`` when no deliverer resolves


class PartError(Exception):
    """A file the config names cannot be used (the text names it and says why)."""


@dataclass(frozen=True)
class Files:
    """What the config names on disk, loaded: users, aliases, the certificate
    (None when TLS is not enabled)."""

    users: usersmod.UserDB
    aliases: aliasesmod.AliasFile
    tls: ServerTLS | None
    dkim: tuple[SigningKey, ...] = ()  # [[dkim.keys]], loaded
    sts_trust: Any = None  # the trust root of MTA-STS policy fetches (load_sts_trust)


def load_users(config: Config) -> usersmod.UserDB:
    try:
        return usersmod.UserDB(config.local.users)
    except usersmod.UsersFileError as e:
        raise PartError(str(e))


def load_aliases(config: Config) -> aliasesmod.AliasFile:
    try:
        return aliasesmod.AliasFile(config.local.aliases, config.local.domains)
    except aliasesmod.AliasesFileError as e:
        raise PartError(str(e))


def load_tls(config: Config) -> ServerTLS | None:
    """The server certificate, or None when [tls] is not enabled."""
    if not config.tls.enabled:
        return None
    try:
        return load_server_tls(config.tls.certificate, config.tls.key)
    except TLSConfigError as e:
        raise PartError(f"{config.source}: {e}")


def load_dkim_keys(config: Config) -> tuple[SigningKey, ...]:
    """The [[dkim.keys]] key files, loaded and checked (PartError naming the
    file and the key: missing, unreadable, open to group or others, not a key
    of its algorithm).  A key's warnings (a short RSA key) are in SigningKey.warnings."""
    keys = []
    for spec in config.dkim.keys:
        try:
            keys.append(load_key(spec.key, spec.domain, spec.selector, spec.algorithm))
        except (KeyFileError, ValueError) as e:
            raise PartError(f"{config.source}: dkim.keys ({spec.domain}, selector {spec.selector}): {e}")
    return tuple(keys)


def make_signer(config: Config, keys: tuple[SigningKey, ...]) -> Signer:
    return Signer(keys, headers=config.dkim.headers, canonicalization=config.dkim.canonicalization)


def load_files(config: Config) -> tuple[Files | None, list[str]]:
    """Every file at once, for a reload: (the files, []) or (None, every
    problem: the certificate's, the users file's, the aliases file's)."""
    problems: list[str] = []

    def attempt(load: Callable[[Config], _T]) -> _T | None:
        try:
            return load(config)
        except PartError as e:
            problems.append(str(e))
            return None

    tls = attempt(load_tls)
    users = attempt(load_users)
    aliases = attempt(load_aliases)
    dkim = attempt(load_dkim_keys)
    sts_trust = attempt(load_sts_trust)
    problems.extend(delivery_ca_problems(config))
    if problems or users is None or aliases is None or dkim is None:
        return None, problems
    return Files(users=users, aliases=aliases, tls=tls, dkim=dkim, sts_trust=sts_trust), []


def load_sts_trust(config: Config) -> Any:
    """The CAs trusted for MTA-STS policy fetches: delivery.mta_sts_ca_file,
    or the system's (PartError naming the key and the file)."""
    try:
        return mtasts.load_trust(config.delivery.mta_sts_ca_file)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PartError(f"{config.source}: delivery.mta_sts_ca_file: {config.delivery.mta_sts_ca_file}: {why}")


def delivery_ca_files(config: Config) -> list[tuple[str, str]]:
    """(key, file) for every CA file outbound TLS trusts: each
    delivery.tls_policy entry's ca_file, each relay.upstreams.NAME.ca_file
    and relay.smarthost_ca_file (those set)."""
    out = [(f'delivery.tls_policy."{dest}".ca_file', entry.ca_file)
           for dest, entry in config.delivery.tls_policy if entry.ca_file]
    out += [(f"relay.upstreams.{up.name}.ca_file", up.ca_file) for up in config.relay.upstreams if up.ca_file]
    if config.relay.smarthost_ca_file:
        out.append(("relay.smarthost_ca_file", config.relay.smarthost_ca_file))
    return out


def delivery_ca_problems(config: Config) -> list[str]:
    """Every outbound CA file that cannot be used (missing, unreadable, no
    certificate in it), checked as delivery.mta_sts_ca_file is: found at start
    and at a reload, naming the key and the file, rather than as a traceback
    and a deferred recipient at the delivery attempt."""
    problems = []
    for key, path in delivery_ca_files(config):
        try:
            mtasts.load_trust(path)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            problems.append(f"{config.source}: {key}: {path}: {why}")
    return problems


def check_delivery_ca_files(config: Config) -> None:
    """At start: PartError naming every outbound CA file that cannot be used."""
    problems = delivery_ca_problems(config)
    if problems:
        raise PartError("; ".join(problems))


def make_mta_sts(config: Config, reactor: Any, resolver: Resolver, disk: Any, cache_dir: str | None,
                 trust: Any) -> mtasts.MtaSts:
    """The MTA-STS source of MX delivery (relay.delivery.mtasts), its cache in cache_dir."""
    d = config.delivery
    return mtasts.MtaSts(reactor, resolver, disk, cache_dir, enabled=d.mta_sts, trust=trust,
                         connect_timeout=d.mta_sts_connect_timeout, fetch_timeout=d.mta_sts_fetch_timeout)


def reconfigure_mta_sts(sts: mtasts.MtaSts, config: Config, trust: Any) -> None:
    """A reload: the new settings (the cache is kept)."""
    d = config.delivery
    sts.configure(enabled=d.mta_sts, trust=trust, connect_timeout=d.mta_sts_connect_timeout,
                  fetch_timeout=d.mta_sts_fetch_timeout)


def own_listeners(config: Config) -> Listeners:
    """The (interface, port) pairs of the SMTP and submission listeners: which
    addresses are ours (policy) and which next hops would loop (delivery)."""
    listeners = Listeners()
    for desc in list(config.smtp.listen) + list(config.smtp.submission):
        spec = epmod.parse(desc)
        if spec.port is not None:
            listeners.add(spec.interface, spec.port)
    return listeners


def make_policy(config: Config, *, user_exists: Callable[[str], bool], alias_exists: Callable[[str], bool],
                our_ips: Callable[[str], bool]) -> Policy:
    return Policy(
        local_domains=config.local.domains,
        relay_domains=config.relay.domains,
        networks=config.relay.networks,
        user_exists=user_exists,
        alias_exists=alias_exists,
        our_ips=our_ips,
    )


def route_resolver(config: Config) -> Resolver:
    """A resolver for ``relayctl route`` when no deliverer's is at hand."""
    return Resolver(nameservers=config.delivery.nameservers, lifetime=ROUTE_DNS_LIFETIME)


def offline_route_context(config: Config) -> RouteContext:
    """What ``relayctl route`` decides with when the relay is stopped: the
    parts the relay would build from this config.  PartError: a file that
    cannot be read."""
    users = load_users(config)
    aliases = load_aliases(config)
    listeners = own_listeners(config)
    policy = make_policy(config, user_exists=users.exists, alias_exists=lambda a: aliases.map.has(a),
                         our_ips=listeners.has_ip)
    expander = aliasesmod.Expander(local_domains=config.local.domains, aliases=aliases, users=users)
    return RouteContext(config=config, policy=policy, expand=expander.expand,
                        user_exists=users.exists, resolver=route_resolver(config), is_self=listeners.is_self)


def public_submissions(config: Config) -> list[str]:
    """The submission endpoints on a TCP address other than loopback (where,
    without a certificate, passwords would cross the network in plaintext)."""
    out = []
    for desc in config.smtp.submission:
        spec = epmod.parse(desc)
        if spec.kind in ("tcp", "tcp6") and not (spec.interface.startswith("127.") or spec.interface == "::1"):
            out.append(desc)
    return out


def refresh_files(users: usersmod.UserDB, aliases: aliasesmod.AliasFile) -> None:
    """Re-read the users and aliases files when they changed (every few
    seconds): a file that no longer loads keeps the previous contents, and
    nothing stops the watcher."""
    try:
        _refresh_files_once(users, aliases)
    except Exception:  # noqa: BLE001 - the watcher must survive anything
        log.failure("checking the users and aliases files failed")


def _refresh_files_once(users: usersmod.UserDB, aliases: aliasesmod.AliasFile) -> None:
    try:
        if users.refresh():
            log.info("users file {path} reloaded: {count} users", path=users.path, count=len(users))
    except usersmod.UsersFileError as e:
        log.error("users file not reloaded, keeping the previous users: {error}", error=str(e))
    try:
        if aliases.refresh():
            log.info("aliases file {path} reloaded: {count} aliases", path=aliases.path, count=len(aliases.map))
    except aliasesmod.AliasesFileError as e:
        log.error("aliases file not reloaded, keeping the previous aliases: {error}", error=str(e))


def warn_each(lines: list[str]) -> None:
    for w in lines:
        log.warn("{warning}", warning=w)


def limits_link(config: Config, reactor: Any, parent: Any) -> redislimits.RedisLink | None:
    """The connection to ``limits.redis`` (None: the limits are this relay's
    only), a child service of the relay: it connects when the relay starts.
    Each process has its own (each worker too: relay.common.redislimits)."""
    if not config.limits.redis:
        return None
    link = redislimits.RedisLink(parse_redis_url(config.limits.redis), prefix=config.limits.redis_prefix,
                                 timeout=config.limits.redis_timeout, reactor=reactor)
    link.setServiceParent(parent)
    return link


def fleet_counter(counter: Any, protocol: str, link: redislimits.RedisLink | None) -> Any:
    """A protocol's connection counter, counting across the fleet when there is a link."""
    return counter if link is None else redislimits.FleetCounter(counter, protocol, link)


def fleet_rates(table: RateTable, link: redislimits.RedisLink | None) -> Any:
    """The [limits] table the SMTP sessions ask, the fleet's when there is a link."""
    return table if link is None else redislimits.FleetRates(table, link)
