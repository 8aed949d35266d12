"""Configuration: one TOML file -> frozen dataclasses.

The schema is a contract (issue 2): every key below is accepted and
validated, whether or not the behaviour behind it exists yet, so that the
file format never changes under a user.  Every error names the file, the key
and what was expected; a bad config never starts the service.

Where the file is found (the same rule for ``twistd relay`` and ``relayctl``):
``--config FILE``, else ``$RELAY_CONFIG``, else ``./relay.toml`` if it exists,
else the built-in defaults.  Relative paths resolve against the directory of
the config file (the working directory when there is none).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from relay import endpoints
from relay.address import AddressError, normalize_domain

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config problem; str() names the file and the key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission: tuple[str, ...] = ()
    max_message_size: int = 36700160
    max_recipients: int = 1000
    timeout: float = 300.0
    max_connections_per_ip: int = 20
    junk_command_limit: int = 100  # NOOP/RSET/HELP/VRFY/HELO/EHLO per message before they count as errors; 0: off


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""
    key: str = ""
    auth_requires_tls: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.key)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    domains: tuple[str, ...] = ()
    smarthost: HostPort | None = None
    smarthost_username: str = ""
    smarthost_password_file: str = ""
    smarthost_tls: str = "may"
    smarthost_ca_file: str = ""  # PEM trust roots for smarthost_tls = "verify" ("": the system CAs)
    routes: tuple[tuple[str, HostPort], ...] = ()

    def route_for(self, domain: str) -> HostPort | None:
        for d, hp in self.routes:
            if d == domain:
                return hp
        return None


@dataclass(frozen=True)
class DeliveryConfig:
    nameservers: tuple[HostPort, ...] = ()
    port: int = 25
    tls: str = "may"
    retry_min: float = 300.0
    retry_max: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    connect_timeout: float = 30.0
    max_concurrency: int = 50
    max_per_destination: int = 10


@dataclass(frozen=True)
class LocalConfig:
    domains: tuple[str, ...] = ("localhost",)
    mailboxes: str = "mail"
    users: str = "users"
    aliases: str = ""


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[str, ...] = ("tcp:1100:interface=127.0.0.1",)
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class ControlConfig:
    socket: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text | json


@dataclass(frozen=True)
class Config:
    hostname: str
    spool: str
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    path: str | None = None  # the file this came from, None for built-in defaults
    workers: int = 1  # relay processes sharing the listeners, each with its own queue (spool/w<i>)

    @property
    def control_socket(self) -> str:
        return self.control.socket or os.path.join(self.spool, "control.sock")

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.local.domains

    @property
    def source(self) -> str:
        return self.path or "built-in defaults"


# ---------------------------------------------------------------------------
# value checkers: each returns the converted value or raises _Bad(expected)


class _Bad(Exception):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """"30s", "5m", "1h", "5d" or plain seconds (a number or digits)."""
    if isinstance(value, bool):
        raise _Bad('a duration like "30s", "5m", "1h", "5d" or a number of seconds')
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:  # TOML has inf and nan
            raise _Bad("a non-negative duration")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise _Bad('a duration like "30s", "5m", "1h", "5d" or a number of seconds')


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("a string")
    return value


def _path(value: Any) -> str:
    """A file or directory name that must be set (an empty one would mean the cwd)."""
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty path")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _int(lo: int, hi: int | None = None):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}")
        if value < lo or (hi is not None and value > hi):
            raise _Bad(f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}")
        return value

    return check


def _choice(*choices: str):
    def check(value: Any) -> str:
        if value not in choices:
            raise _Bad("one of " + " | ".join(choices))
        return value

    return check


def _list_of(item):
    def check(value: Any) -> tuple:
        if not isinstance(value, list):
            raise _Bad("a list")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Bad as e:
                raise _Bad(f"a list whose items are {e} (item {i + 1}: {v!r})")
        return tuple(out)

    return check


def _domain(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("a domain name")
    try:
        return normalize_domain(value)
    except AddressError as e:
        raise _Bad(f"a domain name ({e})")


def _hostname(value: Any) -> str:
    h = _domain(value)
    return h


def _network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise _Bad('a network like "192.168.1.0/24" or "::1/128"')
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _Bad('a network like "192.168.1.0/24" or "::1/128"')


def parse_hostport(value: Any, default_port: int | None = 25) -> HostPort:
    """ "host", "host:port", "[host]:port", "[v6addr]:port", "1.2.3.4"."""
    expected = '"host:port" (like "smtp.example.org:587" or "[2001:db8::1]:25")'
    if not isinstance(value, str) or not value.strip():
        raise _Bad(expected)
    v = value.strip()
    port: str | None = None
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise _Bad(expected)
        host, rest = v[1:end], v[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _Bad(expected)
            port = rest[1:]
    elif v.count(":") == 1:
        host, port = v.split(":")
    elif ":" in v:
        # a bare IPv6 address without port
        host = v
    else:
        host = v
    try:
        ip = ipaddress.ip_address(host)
        host = ip.compressed
    except ValueError:
        try:
            host = normalize_domain(host)
        except AddressError:
            raise _Bad(expected)
    if port is None:
        if default_port is None:
            raise _Bad(expected)
        p = default_port
    else:
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise _Bad(expected)
        p = int(port)
    return HostPort(host, p)


def _nameserver(value: Any) -> HostPort:
    expected = '"ip" or "ip:port" (like "127.0.0.1:5353")'
    try:
        hp = parse_hostport(value, default_port=53)
    except _Bad:
        raise _Bad(expected)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise _Bad(expected)
    return hp


class _Endpoint:
    """Validates an endpoint description and resolves its file arguments."""

    def __init__(self, resolve):
        self.resolve = resolve

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad('a Twisted endpoint description like "tcp:25"')
        try:
            spec = endpoints.parse(value)
            spec = endpoints.resolve_paths(spec, self.resolve)
            endpoints.check_server(spec)
        except ValueError as e:
            raise _Bad(f'a Twisted endpoint description like "tcp:25" ({value!r}: {e})')
        return spec.description


# ---------------------------------------------------------------------------


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

    def section(self, name: str | None, known: dict[str, Any]) -> dict[str, Any]:
        """Check one table: returns {key: converted} for the keys present."""
        table = self.data if name is None else self.data.get(name, {})
        prefix = "" if name is None else name + "."
        if not isinstance(table, dict):
            self.problem(name or "", f"expected a table [{name}]")
            return {}
        out: dict[str, Any] = {}
        for key, value in table.items():
            if name is None and key in _SECTIONS:
                continue
            if key not in known:
                hint = ", ".join(sorted(known) + ([f"[{s}]" for s in _SECTIONS] if name is None else []))
                what = "unknown key" if name is not None or not isinstance(value, dict) else "unknown section"
                self.problem(prefix + key, f"{what} (known: {hint})")
                continue
            try:
                out[key] = known[key](value)
            except _Bad as e:
                self.problem(prefix + key, f"expected {e}, got {value!r}")
        return out


def _routes(value: Any) -> tuple[tuple[str, HostPort], ...]:
    if not isinstance(value, dict):
        raise _Bad('a table of "domain" = "host:port"')
    out = []
    for d, hp in value.items():
        try:
            dom = normalize_domain(d)
        except AddressError as e:
            raise _Bad(f'a table of "domain" = "host:port" ({d!r}: {e})')
        try:
            out.append((dom, parse_hostport(hp)))
        except _Bad as e:
            raise _Bad(f"{e} for route {d!r}")
    return tuple(out)


_SECTIONS = ("smtp", "tls", "relay", "delivery", "local", "pop3", "control", "metrics", "log")


def load(path: str | None = None, *, data: dict | None = None) -> Config:
    """Load and validate a config file (None: built-in defaults)."""
    if data is None:
        if path is None:
            data = {}
        else:
            try:
                with open(path, "rb") as f:
                    data = tomllib.load(f)
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
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    ld = _Loader(data, os.path.abspath(path) if path else None, base)
    ep = _Endpoint(ld.resolve)

    top = ld.section(None, {"hostname": _hostname, "spool": _path, "workers": _int(1, 64)})

    smtp = ld.section(
        "smtp",
        {
            "listen": _list_of(ep),
            "submission": _list_of(ep),
            "max_message_size": _int(1024),
            "max_recipients": _int(1),
            "timeout": parse_duration,
            "max_connections_per_ip": _int(1),
            "junk_command_limit": _int(0),
        },
    )
    tls = ld.section("tls", {"certificate": _str, "key": _str, "auth_requires_tls": _bool})
    relay = ld.section(
        "relay",
        {
            "networks": _list_of(_network),
            "domains": _list_of(_domain),
            "smarthost": _str,
            "smarthost_username": _str,
            "smarthost_password_file": _str,
            "smarthost_tls": _choice("none", "may", "encrypt", "verify"),
            "smarthost_ca_file": _str,
            "routes": _routes,
        },
    )
    delivery = ld.section(
        "delivery",
        {
            "nameservers": _list_of(_nameserver),
            "port": _int(1, 65535),
            "tls": _choice("none", "may", "encrypt"),
            "retry_min": parse_duration,
            "retry_max": parse_duration,
            "max_lifetime": parse_duration,
            "delay_warning": parse_duration,
            "connect_timeout": parse_duration,
            "max_concurrency": _int(1),
            "max_per_destination": _int(1),
        },
    )
    local = ld.section(
        "local",
        {"domains": _list_of(_domain), "mailboxes": _path, "users": _path, "aliases": _str},
    )
    pop3 = ld.section("pop3", {"listen": _list_of(ep), "max_connections_per_ip": _int(1)})
    control = ld.section("control", {"socket": _str})
    metrics = ld.section("metrics", {"listen": _list_of(ep)})
    log = ld.section("log", {"format": _choice("text", "json")})

    # cross-field checks and conversions
    if "smarthost" in relay:
        if relay["smarthost"].strip():
            try:
                relay["smarthost"] = parse_hostport(relay["smarthost"])
            except _Bad as e:
                ld.problem("relay.smarthost", f"expected {e}, got {relay['smarthost']!r}")
                relay.pop("smarthost")
        else:
            relay["smarthost"] = None
    for key in ("smarthost_password_file", "smarthost_ca_file"):
        if relay.get(key):
            relay[key] = ld.resolve(relay[key])
    if relay.get("smarthost_username") and not relay.get("smarthost_password_file"):
        ld.problem("relay.smarthost_password_file", "required when relay.smarthost_username is set")
    if relay.get("smarthost_username") and relay.get("smarthost_tls") == "none":
        # the password is never sent in plaintext: every message would wait
        # in the queue and bounce after max_lifetime
        ld.problem("relay.smarthost_tls", '"none" with relay.smarthost_username: the login is only ever sent '
                   'over TLS; use "may", "encrypt" or "verify"')
    for key in ("certificate", "key"):
        if tls.get(key):
            tls[key] = ld.resolve(tls[key])
    if bool(tls.get("certificate")) != bool(tls.get("key")):
        ld.problem("tls.key" if tls.get("certificate") else "tls.certificate",
                   "tls.certificate and tls.key must be set together")
    for key in ("mailboxes", "users", "aliases"):
        if key in local:
            local[key] = ld.resolve(local[key])
    if "control" in data and control.get("socket"):
        control["socket"] = ld.resolve(control["socket"])
    dmin = delivery.get("retry_min", DeliveryConfig.retry_min)
    dmax = delivery.get("retry_max", DeliveryConfig.retry_max)
    if dmin <= 0:
        ld.problem("delivery.retry_min", "expected a duration above 0")
    if dmax < dmin:
        ld.problem("delivery.retry_max", f"must not be shorter than delivery.retry_min ({dmin:g}s)")
    for key in ("timeout",):
        if key in smtp and smtp[key] <= 0:
            ld.problem(f"smtp.{key}", "expected a duration above 0")
    if "connect_timeout" in delivery and delivery["connect_timeout"] <= 0:
        ld.problem("delivery.connect_timeout", "expected a duration above 0")
    if "max_lifetime" in delivery and delivery["max_lifetime"] <= 0:
        ld.problem("delivery.max_lifetime", "expected a duration above 0")
    ssl_needs_cert = [
        (f"{sect}.{key}", d)
        for sect, tab in (("smtp", smtp), ("pop3", pop3))
        for key in ("listen", "submission")
        for d in tab.get(key, ())
        if (s := endpoints.parse(d)).implicit_tls and not s.own_certificate
    ]
    if ssl_needs_cert and not (tls.get("certificate") and tls.get("key")):
        for key, d in ssl_needs_cert:
            ld.problem(key, f"{d!r} is an ssl: endpoint without privateKey=, so it needs "
                       "tls.certificate and tls.key")
    local_domains = local.get("domains", LocalConfig.domains)
    overlap = set(local_domains) & set(relay.get("domains", ()))
    if overlap:
        ld.problem("relay.domains", f"{', '.join(sorted(overlap))} also in local.domains")

    if ld.problems:
        raise ConfigError(ld.problems)

    spool = ld.resolve(top.get("spool", "spool"))
    if "mailboxes" not in local:
        local["mailboxes"] = ld.resolve(LocalConfig.mailboxes)
    if "users" not in local:
        local["users"] = ld.resolve(LocalConfig.users)
    workers = top.get("workers", 1)
    if workers > 1:
        for sect, tab in (("smtp", smtp), ("pop3", pop3)):
            for key in ("listen", "submission"):
                for d in tab.get(key, ()):
                    if endpoints.parse(d).kind not in ("tcp", "tcp6", "ssl", "systemd"):
                        ld.problem(f"{sect}.{key}", f"{d!r}: with workers > 1 only tcp:, tcp6:, ssl: and "
                                   "systemd: endpoints can be shared by the workers")
        if ld.problems:
            raise ConfigError(ld.problems)
    return Config(
        workers=workers,
        hostname=top.get("hostname") or _default_hostname(),
        spool=spool,
        smtp=SMTPConfig(**smtp),
        tls=TLSConfig(**tls),
        relay=RelayConfig(**relay),
        delivery=DeliveryConfig(**delivery),
        local=LocalConfig(**local),
        pop3=POP3Config(**pop3),
        control=ControlConfig(**control),
        metrics=MetricsConfig(**metrics),
        log=LogConfig(**log),
        path=ld.path,
    )


@functools.lru_cache(maxsize=1)
def _default_hostname() -> str:
    """socket.getfqdn(), once per process: it may ask DNS, which must not
    happen again on the reactor at every reload."""
    name = socket.getfqdn()
    try:
        return normalize_domain(name)
    except AddressError:
        return "localhost"


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
