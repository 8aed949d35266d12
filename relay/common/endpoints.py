"""Parsing of Twisted endpoint description strings, without listening.

The config names listeners as Twisted endpoint descriptions ("tcp:25",
"ssl:465:privateKey=key.pem", "systemd:domain=INET:index=0").  We need to
look inside them before anything listens: to validate them at config time,
to resolve relative key paths against the config file's directory, to know
the addresses we listen on (MX loop detection) and to tell an implicit TLS
endpoint that should use ``[tls] certificate`` from one carrying its own key.
The grammar is Twisted's: ':' separates parameters, '=' assigns, and a
backslash escapes the next character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Keyword arguments of the "ssl:" endpoint that name files.
SSL_PATH_ARGS = ("privateKey", "certKey", "extraCertChain", "dhParameters")


@dataclass(frozen=True)
class EndpointSpec:
    """A parsed server endpoint description."""

    description: str
    kind: str  # lower-cased prefix: tcp, tcp6, ssl, unix, systemd, ...
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int | None:
        if self.kind in ("tcp", "tcp6", "ssl") and self.args:
            try:
                return int(self.args[0])
            except ValueError:
                return None
        return None

    @property
    def interface(self) -> str:
        return self.kwargs.get("interface", "")

    @property
    def implicit_tls(self) -> bool:
        return self.kind == "ssl"

    @property
    def own_certificate(self) -> bool:
        """True when an ssl: endpoint names its own key (else [tls] serves it)."""
        return self.kind == "ssl" and "privateKey" in self.kwargs


def tokenize(description: str) -> list[list[str]]:
    """Split a description into parameters, each a list of '='-separated parts."""
    params: list[list[str]] = []
    current = ""
    sofar: list[str] = []
    ops = ":="
    chars = iter(description)
    for ch in chars:
        if ch in ops:
            sofar.append(current)
            current = ""
            if ch == ":":
                params.append(sofar)
                sofar = []
                ops = ":="
            else:
                ops = ":"
        elif ch == "\\":
            try:
                current += next(chars)
            except StopIteration:
                raise ValueError("description ends with a lone backslash")
        else:
            current += ch
    sofar.append(current)
    params.append(sofar)
    return params


def quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse(description: str) -> EndpointSpec:
    if not isinstance(description, str) or not description.strip():
        raise ValueError("an endpoint description must be a non-empty string")
    params = tokenize(description)
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for p in params:
        if len(p) == 1:
            args.append(p[0])
        else:
            kwargs[p[0]] = p[1]
    if not args or not args[0]:
        raise ValueError("missing endpoint type (like tcp: or ssl:)")
    kind = args[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and len(args) == 1 and "port" in kwargs:
        # Twisted also takes the port as a keyword: "tcp:port=25"
        args.append(kwargs.pop("port"))
    return EndpointSpec(description, kind, tuple(args[1:]), kwargs)


def unparse(spec: EndpointSpec) -> str:
    parts = [spec.kind] + [quote(a) for a in spec.args]
    parts += [f"{quote(k)}={quote(v)}" for k, v in spec.kwargs.items()]
    return ":".join(parts)


def resolve_paths(spec: EndpointSpec, resolve) -> EndpointSpec:
    """Return spec with the ssl: file arguments passed through resolve()."""
    if spec.kind != "ssl":
        return spec
    kwargs = dict(spec.kwargs)
    changed = False
    for key in SSL_PATH_ARGS:
        if key in kwargs and kwargs[key]:
            new = resolve(kwargs[key])
            if new != kwargs[key]:
                kwargs[key] = new
                changed = True
    if not changed:
        return spec
    s = EndpointSpec("", spec.kind, spec.args, kwargs)
    return EndpointSpec(unparse(s), spec.kind, spec.args, kwargs)


def check_server(spec: EndpointSpec) -> None:
    """Raise ValueError if Twisted could not build a listener from spec.

    ssl: endpoints without their own key are checked as the tcp: endpoint
    they will become (the [tls] certificate is checked on its own).
    Twisted's endpoints module (and with it a reactor) is imported only when
    a description has to be built to be checked: it costs relayctl ~0.3 s.
    """
    kind = spec.kind
    if kind in ("tcp", "tcp6", "ssl"):
        if not spec.args:
            raise ValueError("missing port number")
        try:
            port = int(spec.args[0])
        except ValueError:
            raise ValueError(f"port {spec.args[0]!r} is not a number")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0-65535")
        if len(spec.args) > 1:
            # Twisted would take them as interface and backlog; we read only the
            # keywords (and an unescaped ':' in an IPv6 interface lands here).
            raise ValueError("give interface= and backlog= as keywords, and escape ':' in values "
                             "as '\\:' (like tcp6:25:interface=\\:\\:1)")
        if "backlog" in spec.kwargs:
            try:
                int(spec.kwargs["backlog"])
            except ValueError:
                raise ValueError(f"backlog {spec.kwargs['backlog']!r} is not a number")
        if "interface" in spec.kwargs:
            import ipaddress

            iface = spec.kwargs["interface"]
            try:
                ipaddress.ip_address(iface)
            except ValueError:
                raise ValueError(f"interface {iface!r} is not an IP address")
        allowed = {"interface", "backlog"}
        if kind == "ssl":
            allowed |= set(SSL_PATH_ARGS) | {"sslmethod"}
        unknown = set(spec.kwargs) - allowed
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} for {kind}:")
        if kind == "ssl" and not spec.own_certificate:
            orphans = sorted(set(SSL_PATH_ARGS) & set(spec.kwargs))
            if orphans:
                raise ValueError(f"{', '.join(orphans)} without privateKey= (give privateKey=, or "
                                 "neither and let [tls] serve this endpoint)")
        if kind == "ssl" and spec.own_certificate:
            from twisted.internet import endpoints, reactor

            try:
                endpoints.serverFromString(reactor, spec.description)
            except Exception as e:  # noqa: BLE001 - any failure is a config error
                raise ValueError(f"cannot load the TLS key/certificate: {e}")
        return
    if kind == "systemd":
        # Needs the LISTEN_FDS environment only when it listens; check syntax.
        if "domain" not in spec.kwargs or not ("index" in spec.kwargs or "name" in spec.kwargs):
            raise ValueError("systemd: needs domain=INET|INET6|UNIX and index=N or name=NAME")
        return
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, spec.description)
    except Exception as e:  # noqa: BLE001
        raise ValueError(str(e) or e.__class__.__name__)
