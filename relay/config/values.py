"""The value checks of the config schema (relay.config declares which key uses which).

A ``Check`` turns a TOML value into the value the relay uses, or raises
``Bad(expected)``; the loader reports that as ``FILE: KEY: expected ..., got
VALUE``.  A ``Refine`` runs once every key has been read (for a value that
must be looked at beyond its type: a host:port, a duration above 0) and
raises ``Invalid(message)`` with the whole message after ``FILE: KEY: ``.
Each has a ``doc``, the kind of value it takes, shown in the generated
configuration reference.  Pure: no Twisted, no I/O besides what an endpoint
check needs (it loads an ssl: endpoint's own key files).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.common import endpoints
from relay.common.address import AddressError, fold_local, normalize_domain, parse_mailbox

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str], str]  # a relative path -> a path against the config file's directory


class Bad(Exception):
    """The value is not of the key's kind; str() is what was expected."""


class Invalid(Exception):
    """A refinement refused the value; str() is the whole message."""


def as_is(path: str) -> str:
    return path


@dataclass(frozen=True)
class Check:
    doc: str  # the kind of value, for the configuration reference
    fn: Callable[[Any, Resolve], Any]

    def __call__(self, value: Any, resolve: Resolve = as_is) -> Any:
        return self.fn(value, resolve)


@dataclass(frozen=True)
class Refine:
    doc: str  # what it adds to the check's kind ("above 0")
    fn: Callable[[Any], Any]
    whole_kind: bool = False  # doc is the whole kind of value, not an addition to the check's

    def __call__(self, value: Any) -> Any:
        return self.fn(value)


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"


# --------------------------------------------------------------------------- scalars

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_FORMS = 'a duration like "30s", "5m", "1h", "5d" or a number of seconds'


def parse_duration(value: Any) -> float:
    """"30s", "5m", "1h", "5d" or plain seconds (a number or digits)."""
    if isinstance(value, bool):
        raise Bad(_DURATION_FORMS)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:  # TOML has inf and nan
            raise Bad("a non-negative duration")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise Bad(_DURATION_FORMS)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise Bad("a string")
    return value


def _path(value: Any, resolve: Resolve) -> str:
    """A file or directory name that must be set (an empty one would mean the cwd)."""
    if not isinstance(value, str) or not value.strip():
        raise Bad("a non-empty path")
    return resolve(value)


def _optional_path(value: Any, resolve: Resolve) -> str:
    s = _str(value)
    return resolve(s) if s else s


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Bad("true or false")
    return value


def integer(lo: int, hi: int | None = None) -> Check:
    expected = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(value: Any, resolve: Resolve) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(expected)
        if value < lo or (hi is not None and value > hi):
            raise Bad(expected)
        return value

    return Check(expected, check)


def choice(*choices: str) -> Check:
    expected = "one of " + " | ".join(choices)

    def check(value: Any, resolve: Resolve) -> str:
        if value not in choices:
            raise Bad(expected)
        return value

    return Check(expected, check)


def list_of(item: Check, doc: str) -> Check:
    def check(value: Any, resolve: Resolve) -> tuple:
        if not isinstance(value, list):
            raise Bad("a list")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v, resolve))
            except Bad as e:
                raise Bad(f"a list whose items are {e} (item {i + 1}: {v!r})")
        return tuple(out)

    return Check(doc, check)


def _domain(value: Any, resolve: Resolve = as_is) -> str:
    if not isinstance(value, str):
        raise Bad("a domain name")
    try:
        return normalize_domain(value)
    except AddressError as e:
        raise Bad(f"a domain name ({e})")


_NETWORK_FORM = 'a network like "192.168.1.0/24" or "::1/128"'


def _network(value: Any, resolve: Resolve) -> IPNetwork:
    if not isinstance(value, str):
        raise Bad(_NETWORK_FORM)
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise Bad(_NETWORK_FORM)


# --------------------------------------------------------------------------- hosts and endpoints

_HOSTPORT_FORM = '"host:port" (like "smtp.example.org:587" or "[2001:db8::1]:25")'


def _split_hostport(v: str) -> tuple[str, str | None]:
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise Bad(_HOSTPORT_FORM)
        host, rest = v[1:end], v[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise Bad(_HOSTPORT_FORM)
        return host, rest[1:]
    if v.count(":") == 1:
        host, port = v.split(":")
        return host, port
    return v, None  # a name, an IPv4 address, or a bare IPv6 address without port


def parse_hostport(value: Any, default_port: int | None = 25) -> HostPort:
    """ "host", "host:port", "[host]:port", "[v6addr]:port", "1.2.3.4"."""
    if not isinstance(value, str) or not value.strip():
        raise Bad(_HOSTPORT_FORM)
    host, port = _split_hostport(value.strip())
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        try:
            host = normalize_domain(host)
        except AddressError:
            raise Bad(_HOSTPORT_FORM)
    if port is None:
        if default_port is None:
            raise Bad(_HOSTPORT_FORM)
        return HostPort(host, default_port)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise Bad(_HOSTPORT_FORM)
    return HostPort(host, int(port))


def _nameserver(value: Any, resolve: Resolve) -> HostPort:
    expected = '"ip" or "ip:port" (like "127.0.0.1:5353")'
    try:
        hp = parse_hostport(value, default_port=53)
    except Bad:
        raise Bad(expected)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise Bad(expected)
    return hp


def _endpoint(value: Any, resolve: Resolve) -> str:
    """Validates an endpoint description and resolves its file arguments."""
    if not isinstance(value, str):
        raise Bad('a Twisted endpoint description like "tcp:25"')
    try:
        spec = endpoints.parse(value)
        spec = endpoints.resolve_paths(spec, resolve)
        endpoints.check_server(spec)
    except ValueError as e:
        raise Bad(f'a Twisted endpoint description like "tcp:25" ({value!r}: {e})')
    return spec.description


def _routes(value: Any, resolve: Resolve) -> tuple[tuple[str, HostPort], ...]:
    if not isinstance(value, dict):
        raise Bad('a table of "domain" = "host:port"')
    out = []
    for d, hp in value.items():
        try:
            dom = normalize_domain(d)
        except AddressError as e:
            raise Bad(f'a table of "domain" = "host:port" ({d!r}: {e})')
        try:
            out.append((dom, parse_hostport(hp)))
        except Bad as e:
            raise Bad(f"{e} for route {d!r}")
    return tuple(out)



FLEET_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_FLEET_DOC = 'a table of "node name" = "control socket path"'


def _fleet(value: Any, resolve: Resolve) -> tuple[tuple[str, str], ...]:
    """control.fleet: the nodes relayctl --fleet asks, each by its control
    socket or by "tls:host:port" (a node's control.tcp_listen; never plaintext)."""
    if not isinstance(value, dict):
        raise Bad(_FLEET_DOC)
    out = []
    for name, path in value.items():
        if not isinstance(name, str) or not FLEET_NODE.fullmatch(name):
            raise Bad(f"{_FLEET_DOC} (node name {name!r}: letters, digits, '.', '_', '-')")
        if not isinstance(path, str) or not path.strip():
            raise Bad(f"{_FLEET_DOC} (node {name}: not a path)")
        if path.startswith("tls:"):
            hp = parse_hostport(path[4:], default_port=None)
            out.append((name, f"tls:{hp}"))
        elif path.startswith(("tcp:", "ssl:")):
            raise Bad(f'{_FLEET_DOC} or "tls:host:port" (node {name}: {path.split(":")[0]}: is not one)')
        else:
            out.append((name, resolve(path)))
    return tuple(out)


def _optional_hostport(value: Any, resolve: Resolve) -> HostPort | None:
    if value == "":
        return None
    return parse_hostport(value, default_port=None)

# --------------------------------------------------------------------------- upstreams and sender routes

UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # no "." and no ":": never a host or host:port
UPSTREAM_TLS = ("none", "may", "encrypt", "verify")
_UPSTREAMS_DOC = ('a table of upstream tables { hosts ("host:port" or a list, tried in order), tls '
                  '(none | may | encrypt | verify), ca_file, username, password_file }')


@dataclass(frozen=True)
class Upstream:
    """One [relay.upstreams.NAME] table: a named relay with its own hosts,
    TLS and credentials (only ever used for mail routed to it by name)."""

    name: str
    hosts: tuple[HostPort, ...]
    tls: str = "verify"
    ca_file: str = ""
    username: str = ""
    password_file: str = ""


def host_list(value: Any) -> tuple[HostPort, ...]:
    """ "host:port" or a non-empty list of them (fail-over order)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise Bad(f"{_HOSTPORT_FORM} or a non-empty list of them")
    out = tuple(parse_hostport(h) for h in items)
    if len(set(out)) != len(out):
        raise Bad(f"{_HOSTPORT_FORM} or a list of them, each once")
    return out


def _upstream(name: Any, t: Any, resolve: Resolve) -> Upstream:
    if not isinstance(name, str) or not UPSTREAM_NAME.fullmatch(name):
        raise Bad(f"{_UPSTREAMS_DOC}; name {name!r}: lower-case letters, digits, '-' and '_' (no '.' or ':')")
    if not isinstance(t, dict):
        raise Bad(f"{_UPSTREAMS_DOC}; {name}: not a table")
    extra = sorted(set(t) - {"hosts", "tls", "ca_file", "username", "password_file"})
    if extra:
        raise Bad(f"{_UPSTREAMS_DOC}; {name}: unknown " + ", ".join(extra))
    if "hosts" not in t:
        raise Bad(f"{_UPSTREAMS_DOC}; {name}: missing hosts")
    try:
        hosts = host_list(t["hosts"])
    except Bad as e:
        raise Bad(f"{_UPSTREAMS_DOC}; {name}.hosts: {e}")
    tls = t.get("tls", "verify")
    if tls not in UPSTREAM_TLS:
        raise Bad(f"{_UPSTREAMS_DOC}; {name}.tls: one of " + " | ".join(UPSTREAM_TLS))
    fields = {}
    for k in ("ca_file", "username", "password_file"):
        val = t.get(k, "")
        if not isinstance(val, str):
            raise Bad(f"{_UPSTREAMS_DOC}; {name}.{k}: a string")
        fields[k] = resolve(val) if val and k != "username" else val
    if fields["username"] and not fields["password_file"]:
        raise Bad(f"{_UPSTREAMS_DOC}; {name}.password_file: required with {name}.username")
    if fields["username"] and tls == "none":
        raise Bad(f'{_UPSTREAMS_DOC}; {name}.tls: "none" with {name}.username (the login is only ever sent over TLS)')
    return Upstream(name, hosts, tls, **fields)


def _upstreams(value: Any, resolve: Resolve) -> tuple[Upstream, ...]:
    if not isinstance(value, dict):
        raise Bad(_UPSTREAMS_DOC)
    return tuple(_upstream(n, t, resolve) for n, t in value.items())


_SENDER_ROUTES_DOC = ('a table of "address", "domain" or ".domain" (its subdomains) = "upstream name"')


def _sender_routes(value: Any, resolve: Resolve) -> tuple[tuple[str, str], ...]:
    """relay.sender_routes: keys normalised to "local@domain" (local part
    lower-cased, as rewrite.senders), "domain" or ".domain"."""
    if not isinstance(value, dict):
        raise Bad(_SENDER_ROUTES_DOC)
    out = []
    for k, name in value.items():
        if not isinstance(name, str) or not UPSTREAM_NAME.fullmatch(name):
            raise Bad(f"{_SENDER_ROUTES_DOC} (entry {k!r}: {name!r} is not an upstream name)")
        key = str(k).strip()
        try:
            if "@" in key:
                a = parse_mailbox(key, utf8=True)
                key = sender_key(a.local, a.domain)
            elif key.startswith("."):
                key = "." + normalize_domain(key[1:])
            else:
                key = normalize_domain(key)
        except AddressError as e:
            raise Bad(f"{_SENDER_ROUTES_DOC} (entry {k!r}: {e})")
        out.append((key, name))
    return tuple(out)


def _smarthost_value(value: Any, resolve: Resolve) -> tuple[str, ...]:
    """relay.smarthost as written: "" (none), one string, or a list of
    "host:port" strings; made into hosts or an upstream name by a rule."""
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, list) and value and all(isinstance(x, str) and x.strip() for x in value):
        return tuple(x.strip() for x in value)
    raise Bad('a string (or a list of strings: "host:port" hosts tried in order)')


@dataclass(frozen=True)
class DKIMKey:
    """One [[dkim.keys]] table: a selector's key file for a signing domain."""

    domain: str
    selector: str
    key: str  # the PEM file, resolved against the config file's directory
    algorithm: str = "rsa-sha256"


DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_DKIM_KEYS_DOC = 'a list of tables { domain, selector, key (a file), algorithm ("rsa-sha256" or "ed25519-sha256") }'
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


def _dkim_key(t: Any, resolve: Resolve) -> DKIMKey:
    if not isinstance(t, dict):
        raise Bad(_DKIM_KEYS_DOC)
    extra = sorted(set(t) - {"domain", "selector", "key", "algorithm"})
    missing = [k for k in ("domain", "selector", "key") if not isinstance(t.get(k), str) or not t[k].strip()]
    if extra or missing:
        raise Bad(f"{_DKIM_KEYS_DOC}; " + ("unknown " + ", ".join(extra) if extra else "missing " + ", ".join(missing)))
    try:
        domain = _domain(t["domain"])
    except Bad as e:
        raise Bad(f"{_DKIM_KEYS_DOC}; domain: {e}")
    selector = t["selector"].strip().lower()
    if not _SELECTOR.fullmatch(selector):
        raise Bad(f"{_DKIM_KEYS_DOC}; selector {t['selector']!r}: DNS labels (letters, digits, hyphens)")
    algorithm = t.get("algorithm", "rsa-sha256")
    if algorithm not in DKIM_ALGORITHMS:
        raise Bad(f"{_DKIM_KEYS_DOC}; algorithm {algorithm!r}")
    return DKIMKey(domain, selector, _path(t["key"], resolve), algorithm)


def _dkim_keys(value: Any, resolve: Resolve) -> tuple[DKIMKey, ...]:
    if not isinstance(value, list):
        raise Bad(_DKIM_KEYS_DOC)
    out = tuple(_dkim_key(t, resolve) for t in value)
    seen: set[tuple[str, str]] = set()
    for k in out:
        if (k.domain, k.selector) in seen:
            raise Bad(f"{_DKIM_KEYS_DOC}; selector {k.selector!r} of {k.domain} twice")
        seen.add((k.domain, k.selector))
    return out


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _dkim_headers(value: Any, resolve: Resolve) -> tuple[str, ...]:
    doc = "a list of header field names with From, without DKIM-Signature"
    if not isinstance(value, list) or not all(isinstance(n, str) and _FIELD_NAME.fullmatch(n) for n in value):
        raise Bad(doc)
    lowered = [n.lower() for n in value]
    if "from" not in lowered or "dkim-signature" in lowered:
        raise Bad(doc)
    return tuple(value)


def sender_key(local: str, domain: str) -> str:
    """How rewrite.senders matches an address: the local part's case ignored
    (a UTF-8 one compared in NFC, relay.common.address.fold_local)."""
    return f"{fold_local(local)}@{domain}"


def _rewrite_table(table: object, shape: str, old_is: str, new_name: str, new_is: str,
                   parse_old: Callable[[str], str], parse_new: Callable[[str], str], *,
                   show_str: bool) -> tuple[tuple[str, str], ...]:
    """The [rewrite] tables' one reader: {old: new} checked entry by entry,
    (parse_old(old), parse_new(new)) pairs; Bad names the entry (its key as
    written, or as a string with show_str) and says what it should be."""
    if not isinstance(table, dict):
        raise Bad(shape)
    out = []
    for old, new in table.items():
        entry = repr(str(old)) if show_str else repr(old)
        try:
            key = parse_old(str(old))
        except AddressError as e:
            raise Bad(f"{shape} (entry {entry}: {old_is}: {e})")
        if not isinstance(new, str):
            raise Bad(f"{shape} (entry {entry}: the new {new_name} must be a string)")
        try:
            value = parse_new(new)
        except AddressError as e:
            raise Bad(f"{shape} (entry {entry}: {new!r} is not {new_is}: {e})")
        out.append((key, value))
    return tuple(out)


def _sender_old(text: str) -> str:
    a = parse_mailbox(text, utf8=True)
    return sender_key(a.local, a.domain)


def _masquerade_old(text: str) -> str:
    if text.startswith("*."):
        return "*." + normalize_domain(text[2:])
    return normalize_domain(text)


def parse_senders(table: object) -> tuple[tuple[str, str], ...]:
    """rewrite.senders: {"old@domain": "new@domain"}; Bad names the entry."""
    return _rewrite_table(table, 'a table of "address" = "address"', "not an address", "address", "an address",
                          _sender_old, lambda new: str(parse_mailbox(new, utf8=True)), show_str=False)


def parse_masquerade(table: object) -> tuple[tuple[str, str], ...]:
    """rewrite.masquerade: {"*.lan": "example.org", "nas.local": "example.org"}."""
    return _rewrite_table(table, 'a table of "domain" or "*.domain" = "domain"', "not a domain or *.domain",
                          "domain", "a domain", _masquerade_old, normalize_domain, show_str=True)


def _smarthost(value: tuple[str, ...]) -> HostPort | None:
    """The first host of relay.smarthost as the check gave it (the rule
    relay.config._smarthost does the whole job once the upstreams are known)."""
    if not value:
        return None
    try:
        return parse_hostport(value[0])
    except Bad as e:
        raise Invalid(f"expected {e}, got {value[0]!r}")


def _above_zero(value: float) -> float:
    if value <= 0:
        raise Invalid("expected a duration above 0")
    return value


# --------------------------------------------------------------------------- a part of a value

class BadAt(Bad):
    """Bad, for a part of the value: the loader names the key ``KEY`` +
    ``at`` (``delivery.tls_policy."example.com".level``) and shows ``got``."""

    def __init__(self, at: str, expected: str, got: Any):
        super().__init__(expected)
        self.at = at
        self.got = got


# --------------------------------------------------------------------------- the kinds the schema uses

STRING = Check("a string", lambda v, r: _str(v))
BOOL = Check("true or false", lambda v, r: _bool(v))
PATH = Check("a non-empty path", _path)
OPTIONAL_PATH = Check('a path or ""', _optional_path)
DURATION = Check('a duration ("30s", "5m", "1h", "5d", "2w" or a number of seconds)',
                 lambda v, r: parse_duration(v))
DOMAIN = Check("a domain name", _domain)
DOMAINS = list_of(DOMAIN, "a list of domain names")
NETWORKS = list_of(Check("a network", _network), 'a list of networks ("192.168.1.0/24", "::1/128")')
NAMESERVERS = list_of(Check("an IP address", _nameserver), 'a list of "ip" or "ip:port"')
ENDPOINTS = list_of(Check("an endpoint description", _endpoint), "a list of Twisted endpoint descriptions")
ROUTES = Check('a table of "domain" = "host:port"', _routes)
FLEET = Check(_FLEET_DOC + ' or "tls:host:port"', _fleet)
OPTIONAL_HOSTPORT = Check('"" or ' + _HOSTPORT_FORM, _optional_hostport)
DKIM_KEYS = Check(_DKIM_KEYS_DOC, _dkim_keys)
DKIM_HEADERS = Check("a list of header field names (From among them, DKIM-Signature not)", _dkim_headers)
DKIM_CANONICALIZATION = choice("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")
SENDERS = Check('a table of "address" = "address"', lambda v, r: parse_senders(v))
MASQUERADE = Check('a table of "domain" or "*.domain" = "domain"', lambda v, r: parse_masquerade(v))

UPSTREAMS = Check(_UPSTREAMS_DOC, _upstreams)
SENDER_ROUTES = Check(_SENDER_ROUTES_DOC, _sender_routes)
SMARTHOST_VALUE = Check('"host:port", "[host]:port" or "host" (port 25), a list of them (tried in order), the name '
                        'of an upstream, or "" for none', _smarthost_value)

SMARTHOST = Refine('"host:port", "[host]:port" or "host" (port 25), a list of them (tried in order), an upstream\'s '
                   'name, or "" for none', _smarthost, whole_kind=True)
ABOVE_ZERO = Refine("above 0", _above_zero)
