"""A real authoritative DNS server for tests (twisted.names), on 127.0.0.1.

Tests that look up MX records talk to this server over real UDP/TCP sockets,
through dnspython, exactly as the relay does in production; only the zone is
made up.  The zone is changed while the server runs, so a test can turn a
name's behaviour from SERVFAIL to a good answer and watch recovery.

In a trial test (same reactor)::

    from tests.support.dns import DNSServer, Zone
    zone = Zone()
    zone.mx("example.test", 10, "mx1.example.test")
    zone.a("mx1.example.test", "127.0.0.2")
    server = DNSServer(zone).start()
    self.addCleanup(server.stop)
    resolver = Resolver(server.nameservers, lifetime=2)   # relay.delivery.mx.Resolver
    zone.behave("example.test", "servfail")                # or nxdomain/refused/drop
    zone.behave("example.test", None)                      # back to normal
    zone.delay("example.test", 0.5)                         # slow answers

Behaviours per name (optionally per type): "servfail", "nxdomain", "refused",
"drop" (never answer: the resolver times out).  Names not in the zone get
NXDOMAIN; a name with records but none of the asked type gets an empty
NOERROR answer (NODATA).  ``zone.queries`` logs every (name, type) asked.

As a subprocess (whole-system tests with relays in other processes)::

    python -m tests.support.dns --zone zone.json [--interface 127.0.0.1] [--port 0]

prints ``READY <port>`` on stdout once it listens, and re-reads zone.json
whenever its modification time changes (write a new file and rename it over
the old one to change the zone atomically).  The JSON form is
``{"records": [["example.test", "MX", 10, "mx1.example.test"],
["mx1.example.test", "A", "127.0.0.2"], ["null.test", "MX", 0, "."]],
"behaviour": {"name": "servfail", "name/AAAA": "drop"},
"delay": {"name": 0.5}}`` (see ``Zone.to_json``).

DANE: ``zone.tlsa("_25._tcp.mx1.example.test", "3 1 1 <hex>")`` adds a TLSA
record (type 52, sent as raw RDATA: twisted.names has no TLSA class), and
``zone.sign(name, ...)`` marks names as DNSSEC-signed: the server then plays
a validating resolver and sets the AD bit on answers (records, NXDOMAIN or
NODATA) about signed names only, and only when every name in a CNAME chain
is signed.  JSON: ``["_25._tcp.mx", "TLSA", "3 1 1 <hex>"]`` and
``"signed": ["name", ...]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from twisted.internet import defer
from twisted.names import dns, server

MODES = ("servfail", "nxdomain", "refused", "drop")
TLSA = 52  # RFC 6698; unknown to twisted.names


def _type_name(qtype: int) -> str:
    return "TLSA" if qtype == TLSA else dns.QUERY_TYPES.get(qtype, str(qtype))


def _n(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass(frozen=True)
class NameServerAddress:
    """Looks like relay.config.HostPort (``.host``, ``.port``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Zone:
    """Records and per-name behaviour; mutate from the reactor thread (or any
    thread in the subprocess, which reloads whole zones)."""

    def __init__(self, ttl: int = 60):
        self.ttl = ttl
        self.records: dict[str, list[tuple]] = {}
        self.behaviour: dict[tuple[str, str | None], str] = {}
        self.delays: dict[str, float] = {}
        self.queries: list[tuple[str, str]] = []
        self.signed: set[str] = set()

    # records
    def _add(self, name: str, rec: tuple) -> Zone:
        self.records.setdefault(_n(name), []).append(rec)
        return self

    def mx(self, name: str, preference: int, exchange: str) -> Zone:
        return self._add(name, ("MX", preference, _n(exchange)))

    def null_mx(self, name: str) -> Zone:
        """RFC 7505: a single MX 0 "."."""
        return self._add(name, ("MX", 0, ""))

    def a(self, name: str, *ips: str) -> Zone:
        for ip in ips:
            self._add(name, ("A", ip))
        return self

    def aaaa(self, name: str, *ips: str) -> Zone:
        for ip in ips:
            self._add(name, ("AAAA", ip))
        return self

    def cname(self, name: str, target: str) -> Zone:
        return self._add(name, ("CNAME", _n(target)))

    def txt(self, name: str, text: str, *more: str) -> Zone:
        """A TXT record (of one string, or of several: text and more, as a
        DKIM key record past 255 bytes); makes a name exist without addresses
        (NODATA for A/AAAA/MX)."""
        return self._add(name, ("TXT", text) if not more else ("TXT", [text, *more]))

    def tlsa(self, name: str, text: str) -> Zone:
        """A TLSA record in presentation form "usage selector mtype hex"."""
        parts = text.split()
        int(parts[0]), int(parts[1]), int(parts[2]), bytes.fromhex("".join(parts[3:]))  # check it
        return self._add(name, ("TLSA", " ".join([*parts[:3], "".join(parts[3:])])))

    def sign(self, *names: str) -> Zone:
        """Mark names DNSSEC-signed: answers about them carry the AD bit."""
        self.signed.update(_n(n) for n in names)
        return self

    def unsign(self, *names: str) -> Zone:
        self.signed.difference_update(_n(n) for n in names)
        return self

    def remove(self, name: str) -> Zone:
        self.records.pop(_n(name), None)
        return self

    def clear(self) -> Zone:
        self.records.clear()
        self.behaviour.clear()
        self.delays.clear()
        self.signed.clear()
        return self

    # behaviour
    def behave(self, name: str, mode: str | None, rtype: str | None = None) -> Zone:
        """Set (or with None clear) the behaviour of a name (optionally one type)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown DNS behaviour {mode!r}; one of {MODES}")
        key = (_n(name), rtype.upper() if rtype else None)
        if mode is None:
            self.behaviour.pop(key, None)
        else:
            self.behaviour[key] = mode
        return self

    def delay(self, name: str, seconds: float | None) -> Zone:
        if seconds:
            self.delays[_n(name)] = seconds
        else:
            self.delays.pop(_n(name), None)
        return self

    def mode_for(self, name: str, rtype: str) -> str | None:
        return self.behaviour.get((name, rtype)) or self.behaviour.get((name, None))

    def count(self, name: str, rtype: str | None = None) -> int:
        name = _n(name)
        return sum(1 for n, t in self.queries if n == name and (rtype is None or t == rtype))

    # serialisation for the subprocess
    def to_json(self) -> str:
        recs = []
        for name, items in self.records.items():
            for r in items:
                if r[0] == "MX":
                    recs.append([name, "MX", r[1], r[2] or "."])
                else:
                    recs.append([name, r[0], r[1]])
        beh = {(f"{n}/{t}" if t else n): m for (n, t), m in self.behaviour.items()}
        data = {"records": recs, "behaviour": beh, "delay": self.delays, "signed": sorted(self.signed)}
        return json.dumps(data, indent=1)

    def load_json(self, text: str) -> Zone:
        data = json.loads(text)
        self.records.clear()
        self.behaviour.clear()
        self.delays.clear()
        self.signed.clear()
        self.sign(*data.get("signed", []))
        for rec in data.get("records", []):
            name, rtype = rec[0], rec[1].upper()
            if rtype == "MX":
                if rec[3] in (".", ""):
                    self.null_mx(name)
                else:
                    self.mx(name, int(rec[2]), rec[3])
            elif rtype == "A":
                self.a(name, rec[2])
            elif rtype == "AAAA":
                self.aaaa(name, rec[2])
            elif rtype == "CNAME":
                self.cname(name, rec[2])
            elif rtype == "TLSA":
                self.tlsa(name, rec[2])
            elif rtype == "TXT":
                self.txt(*([name, *rec[2]] if isinstance(rec[2], list) else [name, rec[2]]))
            else:
                raise ValueError(f"unsupported record type {rtype}")
        for key, mode in data.get("behaviour", {}).items():
            name, _, t = key.partition("/")
            self.behave(name, mode, t or None)
        for name, secs in data.get("delay", {}).items():
            self.delay(name, float(secs))
        return self

    # answering
    def authentic(self, name: str, answers: list[dns.RRHeader]) -> bool:
        """The AD bit for an answer: the name asked and every name answered
        are signed."""
        names = {name} | {_n(rr.name.name.decode("ascii", "replace")) for rr in answers}
        return all(n in self.signed for n in names)

    def answer(self, name: str, qtype: int) -> tuple[int, list[dns.RRHeader]]:
        """(rcode, answers) for a query, following CNAMEs inside the zone."""
        tname = _type_name(qtype)
        answers: list[dns.RRHeader] = []
        seen = set()
        current = name
        while True:
            if current not in self.records:
                return (dns.ENAME if not answers else dns.OK), answers
            recs = self.records[current]
            cname = [r for r in recs if r[0] == "CNAME"]
            if cname and tname != "CNAME":
                target = cname[0][1]
                answers.append(self._rr(current, cname[0]))
                if target in seen:
                    return dns.OK, answers
                seen.add(current)
                current = target
                continue
            for r in recs:
                if r[0] == tname:
                    answers.append(self._rr(current, r))
            return dns.OK, answers

    def _rr(self, name: str, r: tuple) -> dns.RRHeader:
        kind = r[0]
        if kind == "MX":
            payload = dns.Record_MX(r[1], r[2].encode(), ttl=self.ttl)
            t = dns.MX
        elif kind == "A":
            payload, t = dns.Record_A(r[1], ttl=self.ttl), dns.A
        elif kind == "AAAA":
            payload, t = dns.Record_AAAA(r[1], ttl=self.ttl), dns.AAAA
        elif kind == "CNAME":
            payload, t = dns.Record_CNAME(r[1].encode(), ttl=self.ttl), dns.CNAME
        elif kind == "TLSA":
            u, sel, mt, data = r[1].split()
            rdata = bytes([int(u), int(sel), int(mt)]) + bytes.fromhex(data)
            payload, t = dns.UnknownRecord(rdata, ttl=self.ttl), TLSA
        else:
            strings = r[1] if isinstance(r[1], list) else [r[1]]
            payload, t = dns.Record_TXT(*[x.encode() for x in strings], ttl=self.ttl), dns.TXT
        return dns.RRHeader(name.encode(), t, dns.IN, self.ttl, payload, auth=True)


class _Factory(server.DNSServerFactory):
    def __init__(self, zone: Zone, reactor, reload=None):
        super().__init__(authorities=[], verbose=0)
        self.zone = zone
        self._reactor = reactor
        self._reload = reload
        self.pending: set = set()

    def handleQuery(self, message, protocol, address):
        if self._reload is not None:
            self._reload()
        zone = self.zone
        q = message.queries[0]
        name = _n(q.name.name.decode("ascii", "replace"))
        tname = _type_name(q.type)
        zone.queries.append((name, tname))
        mode = zone.mode_for(name, tname)
        if mode == "drop":
            return
        if mode == "servfail":
            rcode, answers = dns.ESERVER, []
        elif mode == "refused":
            rcode, answers = dns.EREFUSED, []
        elif mode == "nxdomain":
            rcode, answers = dns.ENAME, []
        else:
            rcode, answers = zone.answer(name, q.type)
        response = self._responseFromMessage(message=message, rCode=rcode, answers=answers)
        response.auth = True
        if rcode in (dns.OK, dns.ENAME) and zone.authentic(name, answers):
            response.authenticData = True
        delay = zone.delays.get(name)
        if delay:
            call = None

            def send():
                self.pending.discard(call)
                self.sendReply(protocol, response, address)

            call = self._reactor.callLater(delay, send)
            self.pending.add(call)
        else:
            self.sendReply(protocol, response, address)

    def sendReply(self, protocol, message, address):
        try:
            super().sendReply(protocol, message, address)
        except Exception:  # noqa: BLE001, S110 - a TCP client went away; not our test's concern
            pass


class DNSServer:
    """UDP and TCP on the same port of ``interface``."""

    def __init__(
        self, zone: Zone | None = None, interface: str = "127.0.0.1", port: int = 0, reactor=None, reload=None
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.zone = zone if zone is not None else Zone()
        self.interface = interface
        self.port = port
        self._reactor = reactor
        self.factory = _Factory(self.zone, reactor, reload)
        self._udp = None
        self._tcp = None

    def start(self) -> DNSServer:
        from twisted.internet.error import CannotListenError

        for _ in range(50):
            udp = self._reactor.listenUDP(
                self.port, dns.DNSDatagramProtocol(controller=self.factory), interface=self.interface
            )
            port = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(port, self.factory, interface=self.interface)
            except CannotListenError:
                udp.stopListening()
                if self.port:
                    raise
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return self
        raise RuntimeError("no free port for UDP and TCP together")

    @property
    def address(self) -> str:
        return f"{self.interface}:{self.port}"

    @property
    def nameservers(self) -> tuple[NameServerAddress, ...]:
        return (NameServerAddress(self.interface, self.port),)

    def stop(self) -> defer.Deferred:
        for call in list(self.factory.pending):
            if call.active():
                call.cancel()
        self.factory.pending.clear()
        ds = []
        for p in (self._udp, self._tcp):
            if p is not None:
                ds.append(defer.maybeDeferred(p.stopListening))
        for proto in list(self.factory.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()
        self._udp = self._tcp = None
        return defer.gatherResults(ds)


def start_process(directory: str, records: list) -> tuple[subprocess.Popen[str], int]:
    """This server as a child process serving records (written to
    <directory>/zone.json, which the caller may rewrite: it is re-read):
    the process and its port."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    zone = os.path.join(directory, "zone.json")
    with open(zone, "w") as f:
        json.dump({"records": records}, f)
    env = dict(os.environ, PYTHONPATH=root)
    p = subprocess.Popen([sys.executable, "-m", "tests.support.dns", "--zone", zone],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("READY "), line
    return p, int(line.split()[1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    from twisted.internet import reactor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zone", required=True, help="JSON zone file, re-read when it changes")
    ap.add_argument("--interface", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    zone = Zone()
    state = {"mtime": None}

    def reload() -> None:
        try:
            m = os.stat(args.zone).st_mtime_ns
        except OSError:
            return
        if m != state["mtime"]:
            with open(args.zone) as f:
                text = f.read()
            try:
                zone.load_json(text)
            except (ValueError, KeyError, IndexError) as e:
                print(f"bad zone file {args.zone}: {e}", file=sys.stderr, flush=True)
                return
            state["mtime"] = m

    reload()
    srv = DNSServer(zone, args.interface, args.port, reactor=reactor, reload=reload).start()
    print(f"READY {srv.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
