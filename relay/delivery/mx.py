"""Next hops by DNS: MX (RFC 5321 section 5, RFC 7505) and plain host look-ups.

Why this module exists apart from the SMTP client: the decision "where may
this mail go, and is a failure to know temporary or permanent" is the part
of delivery that loses or loops mail when it is wrong, so it is kept small,
synchronous at its core (``Resolver.resolve_mx`` / ``Resolver.resolve_host``
can be called from a plain thread or a test) and wrapped for Twisted by
running that core in a thread pool (dnspython is blocking; the asyncio
resolver would force the asyncio reactor on twistd and on the tests).

Classification (what the scheduler does with a ``DNSFailure``):

* NXDOMAIN for the mail domain: permanent, 5.1.2.
* A null MX (a single MX with exchange ".", RFC 7505): permanent, 5.1.10.
* SERVFAIL, REFUSED, a timeout, no name server answering: temporary, 4.4.3.
* No MX host with an address: permanent 5.4.4, unless one of the failures was
  temporary (then temporary 4.4.3) - an MX host that does not resolve is
  skipped, as Postfix does.
* Mail that would loop back to us (an MX host that is our own hostname or
  resolves to an (address, port) we listen on) may only go to hosts with a
  strictly better preference; with none left it is a permanent 5.4.6 failure
  "mail for DOMAIN loops back to myself".

For a smarthost or a route (``resolve_host``) MX is not consulted.  By
default NXDOMAIN there is *temporary*: like Postfix ("don't bounce mail after
a host lookup problem with a relayhost"), a typo in ``relay.smarthost`` must
not bounce every message; pass ``permanent_nxdomain=True`` to change that.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from relay.common import endpoints
from relay.config.values import parse_hostport
from relay.outbound.dane import Tlsa, usable
from relay.outbound.request import Hop  # what a look-up gives: the SMTP client's next hops

IsSelf = Callable[[str, int], bool]


class DNSFailure(Exception):
    """A look-up that gives no hop.  ``temporary`` decides deferred vs bounced;
    ``status`` is the RFC 3463 enhanced code; ``reason`` the human text."""

    def __init__(self, temporary: bool, status: str, reason: str):
        super().__init__(reason)
        self.temporary = temporary
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        kind = "temporary" if self.temporary else "permanent"
        return f"DNSFailure({kind}, {self.status}, {self.reason!r})"


@dataclass(frozen=True)
class TlsaAnswer:
    """The TLSA RRset of ``owner`` (``_25._tcp.<host>``), and whether the
    resolver said it was DNSSEC-validated (the AD bit, RFC 6840 section 5.7).

    ``records`` are what the answer held, for display; only a ``secure``
    answer's usable records count (``usable``): an insecure answer is
    ignored, as RFC 7672 section 2.2 requires.  A secure empty answer is a
    secure denial (NXDOMAIN or NODATA: no DANE for this host)."""

    owner: str
    secure: bool
    records: tuple[Tlsa, ...] = ()

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return usable(self.records) if self.secure else ()

    def describe(self) -> str:
        """For `relayctl route` and logs: "secure: 3 1 1 0123... " etc."""
        what = "secure" if self.secure else "insecure (not DNSSEC-validated: ignored)"
        recs = ", ".join(r.short() for r in self.records) or "no records"
        return f"{self.owner}: {what}: {recs}"


class _HostLookup:
    """The outcome of the A/AAAA look-ups for one name."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.temporary: str | None = None  # reason of a temporary failure
        self.nxdomain: str | None = None
        self.nodata: str | None = None
        self.secure = True  # every answer with addresses had the AD bit


class _NoResolver(dns.exception.DNSException):
    """No name server configured (raised instead of querying)."""


@functools.lru_cache(maxsize=1024)
def _literal(text: str) -> str | None:
    """The IP of "1.2.3.4", "[1.2.3.4]", "[IPv6:::1]", "::1"; else None."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
        if t[:5].lower() == "ipv6:":
            t = t[5:]
    try:
        return ipaddress.ip_address(t).compressed
    except ValueError:
        return None


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


class Resolver:
    """dnspython look-ups with a bounded lifetime, run off the reactor thread.

    ``nameservers``: HostPort-like objects (``.host``, ``.port``) or "ip" /
    "ip:port" strings; empty means the system resolver (/etc/resolv.conf).
    ``lifetime`` bounds each DNS query (all retries and servers included);
    ``deadline`` bounds one whole MX resolution (the MX query plus the A/AAAA
    queries of every MX host), default 3 x lifetime.
    """

    def __init__(
        self,
        nameservers: Iterable = (),
        lifetime: float = 10.0,
        reactor=None,
        threadpool=None,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        rng: random.Random | None = None,
    ):
        self.lifetime = lifetime
        self.deadline = deadline if deadline is not None else 3 * lifetime
        self._reactor = reactor
        self._threadpool = threadpool
        self._rng = rng or random.Random()
        self._config_error: str | None = None
        self._inflight: dict[tuple, list[defer.Deferred]] = {}
        servers = [_nameserver(ns) for ns in nameservers]
        if servers:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = servers
        else:
            try:
                r = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration as e:
                # Every look-up will be a temporary failure naming the cause;
                # mail waits in the queue instead of bouncing.
                r = dns.resolver.Resolver(configure=False)
                self._config_error = f"no DNS resolver configured: {e}"
        # One try per server lasts at most `timeout`; dnspython retries until
        # the lifetime is spent.
        r.timeout = timeout if timeout is not None else min(2.0, lifetime)
        r.lifetime = lifetime
        r.cache = None
        # the AD bit asked for (RFC 6840 section 5.7): DANE needs to know
        # whether the MX and address answers were DNSSEC-validated
        r.flags = dns.flags.RD | dns.flags.AD
        self._resolver = r
        # TLSA queries ask for the AD bit (RFC 6840 section 5.7) with EDNS0
        # (DNSSEC answers are big): the validating resolver the admin
        # configured tells us whether the answer is authentic.
        t = dns.resolver.Resolver(configure=False)
        t.nameservers = r.nameservers
        t.timeout, t.lifetime, t.cache = r.timeout, r.lifetime, None
        t.flags = dns.flags.RD | dns.flags.AD
        t.use_edns(0, 0, 1232)
        self._tlsa_resolver = t

    # ------------------------------------------------------------------ Twisted

    def _run(self, f, *args, **kwargs) -> defer.Deferred:
        if self._reactor is None:
            from twisted.internet import reactor
        else:
            reactor = self._reactor
        pool = self._threadpool or reactor.getThreadPool()
        return threads.deferToThreadPool(reactor, pool, f, *args, **kwargs)

    def _shared(self, key: tuple, f, *args, **kwargs) -> defer.Deferred:
        """One look-up in flight per key; concurrent callers share its answer.

        Many queued messages for one slow or silent domain then hold one
        thread, not the whole pool, so other destinations are not starved.
        Nothing is cached once the answer is in.
        """
        d: defer.Deferred = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[key] = waiters = [d]

        def done(result):
            for w in self._inflight.pop(key, waiters):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(list(result))

        self._run(f, *args, **kwargs).addBoth(done)
        return d

    def mx_hops(self, domain: str, port: int, *, hostname: str = "", is_self: IsSelf | None = None) -> defer.Deferred:
        """Deferred[list[Hop]] for mail to ``domain``; fails with DNSFailure."""
        key = ("mx", _norm(domain), port, _norm(hostname), is_self)
        return self._shared(key, self.resolve_mx, domain, port, hostname=hostname, is_self=is_self)

    def host_hops(self, host: str, port: int, *, permanent_nxdomain: bool = False) -> defer.Deferred:
        """Deferred[list[Hop]] for a smarthost/route host; fails with DNSFailure."""
        ip = _literal(host)
        if ip is not None:  # no look-up, no thread
            return defer.succeed([Hop(ip, ip, port, 0)])
        key = ("host", _norm(host), port, permanent_nxdomain)
        return self._shared(key, self.resolve_host, host, port, permanent_nxdomain=permanent_nxdomain)

    def tlsa(self, host: str, port: int = 25) -> defer.Deferred:
        """Deferred[TlsaAnswer] for ``_<port>._tcp.<host>``; fails with a
        temporary DNSFailure (4.7.5) when the look-up fails (SERVFAIL, which
        a validating resolver also answers for bogus data, or a timeout)."""
        key = ("tlsa", _norm(host), port)
        d = self._shared(key, lambda: [self.resolve_tlsa(host, port)])
        return d.addCallback(lambda answers: answers[0])

    def resolve_tlsa(self, host: str, port: int = 25) -> TlsaAnswer:
        """Blocking: the TLSA RRset of one MX host (see ``tlsa``).

        CNAMEs: dnspython follows a CNAME chain in the answer and the AD bit
        covers all of it; the TLSA base domain is always the MX host name as
        given (RFC 7672 section 2.2.3's look-up at the expanded name first is
        simplified away)."""
        owner = f"_{port}._tcp.{_norm(host)}"
        if self._config_error:
            raise DNSFailure(True, "4.7.5", f"DANE: TLSA lookup for {owner} failed: {self._config_error}")
        try:
            ans = self._tlsa_resolver.resolve(
                dns.name.from_text(owner), "TLSA", search=False, lifetime=self.lifetime, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            return TlsaAnswer(owner, _ad(_nx_response(e)))
        except dns.exception.DNSException as e:
            what = self._temp_reason(e, owner, "TLSA")
            raise DNSFailure(True, "4.7.5", f"DANE: TLSA lookup for {owner} failed: {what}")
        secure = _ad(ans.response)
        records = tuple(Tlsa(rr.usage, rr.selector, rr.mtype, bytes(rr.cert)) for rr in (ans.rrset or ()))
        return TlsaAnswer(owner, secure, records)

    def txt(self, name: str) -> defer.Deferred:
        """Deferred[list[str]]: the TXT records of ``name`` (each record's
        strings joined, RFC 7208 / 8461 style; undecodable bytes replaced);
        [] for NXDOMAIN or no TXT; a temporary failure is a DNSFailure."""
        return self._shared(("txt", _norm(name)), self.resolve_txt, name)

    # ------------------------------------------------------------ blocking core

    def resolve_txt(self, name: str) -> list[str]:
        """Blocking: see ``txt``."""
        n = _norm(name)
        try:
            ans = self._query(n, "TXT", self.lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as e:
            raise DNSFailure(True, "4.4.3", self._temp_reason(e, n, "TXT"))
        return [b"".join(rr.strings).decode("utf-8", "replace") for rr in ans]


    def _query(self, name: str, rdtype: str, lifetime: float):
        """dnspython answer, or raise the dnspython exception."""
        if self._config_error:
            raise _NoResolver(self._config_error)
        return self._resolver.resolve(dns.name.from_text(name), rdtype, search=False, lifetime=max(lifetime, 0.05))

    def _temp_reason(self, e: Exception, name: str, rdtype: str) -> str:
        if self._config_error:
            return self._config_error
        if isinstance(e, dns.exception.Timeout):
            what = "timed out"
        elif isinstance(e, dns.resolver.NoNameservers):
            what = "no name server answered (SERVFAIL or refused)"
        else:
            what = f"{e.__class__.__name__}: {e}"
        return f"Host or domain name not found. Name service error for name={name} type={rdtype}: {what}, try again"

    def _lookup_addresses(self, name: str, until: float) -> _HostLookup:
        out = _HostLookup()
        for rdtype in ("A", "AAAA"):
            remaining = until - time.monotonic()
            if remaining <= 0:
                out.temporary = out.temporary or (
                    f"Host or domain name not found. Name service error for name={name} "
                    f"type={rdtype}: look-up deadline passed, try again"
                )
                continue
            try:
                ans = self._query(name, rdtype, min(self.lifetime, remaining))
            except dns.resolver.NXDOMAIN:
                out.nxdomain = (
                    f"Host or domain name not found. Name service error for name={name} type={rdtype}: Host not found"
                )
                break  # the AAAA answer would be NXDOMAIN too
            except dns.resolver.NoAnswer:
                out.nodata = out.nodata or (
                    f"Host or domain name not found. Name service error for name={name} type={rdtype}: "
                    "Host found but no data record of requested type"
                )
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
                out.temporary = out.temporary or self._temp_reason(e, name, rdtype)
            except dns.exception.DNSException as e:
                out.temporary = out.temporary or self._temp_reason(e, name, rdtype)
            else:
                out.secure = out.secure and _ad(ans.response)
                for rr in ans:
                    a = ipaddress.ip_address(rr.address).compressed
                    if a not in out.addresses:
                        out.addresses.append(a)
        return out

    def resolve_host(self, host: str, port: int, *, permanent_nxdomain: bool = False) -> list[Hop]:
        """Blocking: the hops of a smarthost or route host (no MX look-up)."""
        ip = _literal(host)
        if ip is not None:
            return [Hop(ip, ip, port, 0)]
        name = _norm(host)
        res = self._lookup_addresses(name, time.monotonic() + self.deadline)
        if res.addresses:
            return [Hop(name, a, port, 0, secure=res.secure) for a in res.addresses]
        if res.temporary:
            raise DNSFailure(True, "4.4.3", res.temporary)
        reason = res.nxdomain or res.nodata or f"Host or domain name not found: {name}"
        if permanent_nxdomain:
            raise DNSFailure(False, "5.4.4", reason)
        raise DNSFailure(True, "4.4.4", reason)

    def resolve_mx(self, domain: str, port: int, *, hostname: str = "", is_self: IsSelf | None = None) -> list[Hop]:
        """Blocking: the ordered hops for mail to ``domain`` (see module doc)."""
        until = time.monotonic() + self.deadline
        ip = _literal(domain)
        if ip is not None and domain.strip().startswith("["):
            hop = Hop(ip, ip, port, 0)
            if is_self is not None and is_self(ip, port):
                raise DNSFailure(False, "5.4.6", f"mail for {domain} loops back to myself")
            return [hop]
        name = _norm(domain)
        try:
            ans = self._query(name, "MX", self.lifetime)
        except dns.resolver.NXDOMAIN:
            raise DNSFailure(
                False,
                "5.1.2",
                f"Host or domain name not found. Name service error for name={name} type=MX: Host not found",
            )
        except dns.resolver.NoAnswer as e:
            mx: list[tuple[int, str]] | None = None
            mx_secure = _ad(e.kwargs.get("response"))
        except dns.exception.DNSException as e:
            raise DNSFailure(True, "4.4.3", self._temp_reason(e, name, "MX"))
        else:
            mx_secure = _ad(ans.response)
            records = [(rr.preference, rr.exchange) for rr in ans]
            if len(records) == 1 and records[0][1] == dns.name.root:
                raise DNSFailure(False, "5.1.10", f"Domain {name} does not accept mail (nullMX)")
            mx = [(p, _norm(x.to_text())) for p, x in records if x != dns.name.root]
            if not mx:  # several records, all "." - treat as null MX too
                raise DNSFailure(False, "5.1.10", f"Domain {name} does not accept mail (nullMX)")

        if mx is None:
            # RFC 5321 5.1: no MX, the domain itself is the implicit MX.
            res = self._lookup_addresses(name, until)
            if res.addresses:
                hosts = [(0, name, res.addresses)]
                secure = {name} if mx_secure and res.secure else set()
            elif res.temporary:
                raise DNSFailure(True, "4.4.3", res.temporary)
            elif res.nxdomain:
                raise DNSFailure(False, "5.1.2", res.nxdomain)
            else:
                raise DNSFailure(False, "5.4.4", res.nodata or f"no address for {name}")
        else:
            secure = set()
            hosts = self._resolve_exchanges(name, mx, until, secure if mx_secure else None)

        return self._order_and_check_loops(name, hosts, port, hostname, is_self, secure)

    def _resolve_exchanges(self, domain: str, mx: list[tuple[int, str]], until: float, secure: set[str] | None):
        """(preference, host, addresses) per MX host; the hosts whose address
        records were DNSSEC-validated are added to ``secure`` (None: the MX
        RRset was not, so no host is)."""
        # One entry per host, at its best preference.
        best: dict[str, int] = {}
        for pref, host in mx:
            if host not in best or pref < best[host]:
                best[host] = pref
        ordered = self._shuffle_by_preference([(p, h) for h, p in best.items()])
        hosts: list[tuple[int, str, list[str]]] = []
        temp: str | None = None
        perm: str | None = None
        for pref, host in ordered:
            ip = _literal(host)
            if ip is not None:
                # Not allowed by RFC 5321, but harmless to honour.
                hosts.append((pref, host, [ip]))
                continue
            res = self._lookup_addresses(host, until)
            if res.addresses:
                hosts.append((pref, host, res.addresses))
                if secure is not None and res.secure:
                    secure.add(host)
            elif res.temporary:
                temp = temp or res.temporary
                hosts.append((pref, host, []))
            else:
                perm = perm or res.nxdomain or res.nodata
                hosts.append((pref, host, []))
        if not any(addrs for _, _, addrs in hosts):
            if temp:
                raise DNSFailure(True, "4.4.3", temp)
            raise DNSFailure(
                False,
                "5.4.4",
                f"no MX host for {domain} has a valid address record" + (f" ({perm})" if perm else ""),
            )
        return hosts

    def _shuffle_by_preference(self, items: list[tuple[int, str]]) -> list[tuple[int, str]]:
        items = list(items)
        self._rng.shuffle(items)
        items.sort(key=lambda x: x[0])  # stable: random among equals
        return items

    def _order_and_check_loops(self, domain, hosts, port, hostname, is_self, secure=frozenset()) -> list[Hop]:
        me = _norm(hostname) if hostname else ""
        self_pref: int | None = None
        for pref, host, addrs in hosts:
            mine = bool(me) and host == me
            if not mine and is_self is not None:
                mine = any(is_self(a, port) for a in addrs)
            if mine and (self_pref is None or pref < self_pref):
                self_pref = pref
        if self_pref is not None:
            hosts = [h for h in hosts if h[0] < self_pref]
            if not any(addrs for _, _, addrs in hosts):
                raise DNSFailure(False, "5.4.6", f"mail for {domain} loops back to myself")
        hops: list[Hop] = []
        for pref, host, addrs in hosts:
            v4 = [a for a in addrs if ":" not in a]
            v6 = [a for a in addrs if ":" in a]
            for a in v4 + v6:
                hops.append(Hop(host, a, port, pref, secure=host in secure))
        return hops


def _ad(response: dns.message.Message | None) -> bool:
    """Whether the resolver marked the answer authentic (the AD bit)."""
    return response is not None and bool(response.flags & dns.flags.AD)


def _nx_response(e: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    try:
        qnames = e.qnames()
        return e.responses().get(qnames[-1]) if qnames else None
    except Exception:  # noqa: BLE001 - no response kept: not secure
        return None


def _nameserver(ns) -> dns.nameserver.Nameserver:
    if isinstance(ns, str):
        ns = parse_hostport(ns, default_port=53)
    return dns.nameserver.Do53Nameserver(ns.host, ns.port)


# ------------------------------------------------------------------ is_self


def is_local_address(ip: str) -> bool:
    """True if ``ip`` is an address of this machine (binding to it works).

    Every 127.0.0.0/8 address is local on Linux; for others the kernel knows.
    A UDP bind with port 0 has no side effect beyond the syscall.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_unspecified:
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((addr.compressed, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def make_is_self(
    listeners: Iterable[tuple[str, int]], *, local_address: Callable[[str], bool] = is_local_address
) -> IsSelf:
    """A predicate ``is_self(ip, port)`` from the (interface, port) pairs we listen on.

    An interface of "" or "0.0.0.0" is every local IPv4 address, "::" every
    local address (Linux dual-stack sockets also take IPv4); otherwise the
    exact address.  Only the port matters beyond the address, so several
    relays on one machine (different ports) do not mistake each other for
    themselves.
    """
    exact: set[tuple[str, int]] = set()
    wild4: set[int] = set()
    wild6: set[int] = set()
    for iface, port in listeners:
        i = (iface or "").strip()
        if i.startswith("[") and i.endswith("]"):
            i = i[1:-1]
        if i in ("", "0.0.0.0"):
            wild4.add(port)
        elif i == "::":
            wild6.add(port)
        else:
            try:
                exact.add((ipaddress.ip_address(i).compressed, port))
            except ValueError:
                continue
    cache: dict[str, bool] = {}

    def is_self(ip: str, port: int) -> bool:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        key = a.compressed
        if (key, port) in exact:
            return True
        wild = port in wild6 or (a.version == 4 and port in wild4)
        if not wild:
            return False
        if key not in cache:
            cache[key] = local_address(key)
        return cache[key]

    return is_self


def listeners_from_endpoints(descriptions: Iterable[str]) -> list[tuple[str, int]]:
    """(interface, port) of the tcp:/tcp6:/ssl: endpoint descriptions given.

    tcp6: without an interface listens on "::"; systemd: and unix: sockets
    are skipped (their address is not in the description).
    """
    out: list[tuple[str, int]] = []
    for d in descriptions:
        try:
            spec = endpoints.parse(d)
        except ValueError:
            continue
        if spec.port is None:
            continue
        iface = spec.interface
        if not iface and spec.kind == "tcp6":
            iface = "::"
        out.append((iface, spec.port))
    return out
