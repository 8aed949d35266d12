"""``relayctl route ADDRESS``: how the relay would treat a recipient right now
(and, with ``--sender``, what a sender would be rewritten to).

The answer is computed with the relay's own parts, in the order the relay
applies them: the RCPT syntax check and the policy decision (the reply a
client would get), alias expansion, routing (local, sender route, route, upstream, smarthost, MX: and why),
and for remote destinations the real DNS look-up with the relay's resolver
(its name servers, its loop detection).  The running relay answers over the
control socket with its live state; with the relay stopped, relayctl builds
the same parts from the config.  Blocking (DNS): run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from relay.common.address import Address, AddressError, parse_path
from relay.config import Config
from relay.delivery import routing, tlspolicy
from relay.delivery.local import mailbox_path
from relay.delivery.mx import DNSFailure
from relay.delivery.stspolicy import StsPolicy, StsSource
from relay.intake.policy import Client, Policy
from relay.intake.rewrite import sender_map

MAX_DESTINATIONS = 50  # an alias with more targets: the first ones are resolved


@dataclass
class RouteContext:
    config: Config
    policy: Policy
    expand: Callable[[str], list[tuple[str, str | None]]]
    user_exists: Callable[[str], bool]
    resolver: Any  # relay.delivery.mx.Resolver (its blocking resolve_mx / resolve_host)
    is_self: Callable[[str, int], bool]
    # a domain's MTA-STS policy, blocking (from the relay's StsSource); None: no MTA-STS
    sts: Callable[[str], StsPolicy | None] | None = None


def sts_lookup(reactor: Any, source: StsSource) -> Callable[[str], StsPolicy | None]:
    """RouteContext.sts for a live relay: the explanation runs in a thread,
    the StsSource (asynchronous) on the reactor."""
    from twisted.internet import defer, threads

    def lookup(domain: str) -> StsPolicy | None:
        def ask() -> defer.Deferred[Any]:
            return defer.ensureDeferred(source.policy(domain))

        result: Any = threads.blockingCallFromThread(reactor, ask)
        return result if isinstance(result, StsPolicy) else None

    return lookup


def parse_recipient(config: Config, text: str) -> Address:
    """As the SMTP server parses RCPT TO (a bare "postmaster" included)."""
    t = text.strip()
    if t.strip("<>").lower() == "postmaster" and config.local.domains:
        return Address("postmaster", config.local.domains[0])
    if not t.startswith("<"):
        t = f"<{t}>"
    addr = parse_path(t, utf8=True)  # relayctl route: what a SMTPUTF8 client may send
    assert addr is not None  # None is the null path, which only allow_null=True accepts
    return addr


def explain_sender(ctx: RouteContext, sender: str, client: Client) -> dict[str, Any]:
    """What the relay would make of this envelope sender (and of it in the
    From/Sender/Reply-To headers): rewrite.senders and rewrite.masquerade,
    for a trusted client only."""
    out: dict[str, Any] = {"address": sender, "trusted": ctx.policy.trusted(client), "rewritten_to": None}
    text = sender.strip()
    text = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    try:
        addr = parse_path(f"<{text}>", allow_null=True, utf8=True)
    except AddressError as e:
        out["error"] = f"not an address: {e}"
        return out
    if addr is None:
        out["null"] = True  # the null sender is never rewritten
        return out
    out["address"] = str(addr)
    rw = ctx.config.rewrite
    r = sender_map(rw.senders, rw.masquerade).lookup(addr.local, addr.domain)
    if r is not None:
        out["rule"] = r.rule
        if out["trusted"]:
            out["rewritten_to"] = r.address
    return out


def explain(ctx: RouteContext, address: str, client_ip: str | None = None,
            sender: str | None = None) -> dict[str, Any]:
    """A JSON-able answer; ``ok`` is True when the mail would be delivered
    (an empty address with a sender: only the sender's rewriting)."""
    out: dict[str, Any] = {"address": address, "ok": False}
    if client_ip:
        client = Client(client_ip)
        out["client"] = client_ip
    else:
        # a trusted client (relay.networks or authenticated): the LAN's view
        client = Client("", authenticated="relayctl")
        out["client"] = "trusted"
    if sender is not None:
        out["sender"] = explain_sender(ctx, sender, client)
        if not address:
            out["ok"] = "error" not in out["sender"]
            return out
    try:
        addr = parse_recipient(ctx.config, address)
    except AddressError as e:
        code = 553 if e.status == "5.6.7" else 501
        out.update(accepted=False, reply=f"{code} {e.status} Bad recipient address syntax: {e}")
        return out
    decision = ctx.policy.recipient(client, addr)
    out["accepted"] = decision.ok
    out["reply"] = decision.reply
    if not client_ip and decision.ok and decision.kind == "relay":
        other = ctx.policy.recipient(Client(""), addr)
        out["untrusted_reply"] = other.reply
    if not decision.ok:
        return out
    canonical = decision.address
    out["recipient"] = canonical
    finals = ctx.expand(canonical)
    out["alias"] = not (len(finals) == 1 and finals[0][0] == canonical)
    resolved: dict[str, dict[str, Any]] = {}
    deliveries = []
    env_sender = _envelope_sender(out.get("sender"))
    for final, _orig in finals:
        dest = routing.route(ctx.config, final, env_sender)
        entry: dict[str, Any] = {"recipient": final, "kind": dest.kind, **_why(ctx.config, dest)}
        if dest.kind == routing.LOCAL:
            local = final.rpartition("@")[0].lower()
            if local == "postmaster" or ctx.user_exists(final):
                entry.update(outcome="deliver",
                             mailbox=mailbox_path(ctx.config.local.mailboxes, final))
            else:
                entry.update(outcome="bounce", reason=f"550 5.1.1 <{final}>: no such user")
        else:
            if dest.key not in resolved:
                if len(resolved) >= MAX_DESTINATIONS:
                    entry.update(outcome="unknown", reason="not looked up (too many destinations)")
                    deliveries.append(entry)
                    continue
                resolved[dest.key] = _remote(ctx, dest)
            entry.update(resolved[dest.key])
        deliveries.append(entry)
    out["deliveries"] = deliveries
    out["ok"] = all(d["outcome"] == "deliver" for d in deliveries)
    return out


def _envelope_sender(s: dict[str, Any] | None) -> str | None:
    """The sender the queue would route by: after rewriting (None: none given
    or the null sender, which has no sender route)."""
    if not s or s.get("error") or s.get("null"):
        return None
    return s.get("rewritten_to") or s.get("address")


def _why(config: Config, dest: routing.Destination) -> dict[str, Any]:
    """Which rule chose the destination (issue 16), the upstream and its
    hosts, and whether AUTH is used (the user name, never the password)."""
    info: dict[str, Any] = {"via": dest.via}
    if dest.rule:
        info["rule"] = dest.rule
    rc = config.relay
    if dest.kind == routing.UPSTREAM:
        up = rc.upstream(dest.upstream)
        assert up is not None, dest.upstream
        info.update(upstream=up.name, hosts=[str(h) for h in up.hosts],
                    auth=bool(up.username), username=up.username or None)
    elif dest.kind == routing.SMARTHOST:
        info.update(hosts=[str(h) for h in rc.smarthost_hosts] or [f"{dest.host}:{dest.port}"],
                    auth=bool(rc.smarthost_username), username=rc.smarthost_username or None)
    elif dest.kind != routing.LOCAL:
        info["auth"] = False
    return info


def _resolve_hosts(ctx: RouteContext, dest: routing.Destination) -> list[Any]:
    """Every configured host's addresses, in the fail-over order; a host
    that does not resolve is left out while another one does."""
    rc = ctx.config.relay
    if dest.kind == routing.UPSTREAM:
        up = rc.upstream(dest.upstream)
        hosts = [(h.host, h.port) for h in up.hosts] if up else [(dest.host, dest.port)]
    elif dest.kind == routing.SMARTHOST and rc.smarthost_hosts:
        hosts = [(h.host, h.port) for h in rc.smarthost_hosts]
    else:
        hosts = [(dest.host, dest.port)]
    hops: list[Any] = []
    failure: DNSFailure | None = None
    for host, port in hosts:
        try:
            hops.extend(ctx.resolver.resolve_host(host, port))
        except DNSFailure as e:
            failure = failure if failure is not None and failure.temporary else e
    if not hops and failure is not None:
        raise failure
    return hops


def _remote(ctx: RouteContext, dest: routing.Destination) -> dict[str, Any]:
    info: dict[str, Any] = {"domain": dest.domain, "port": dest.port}
    if dest.kind != routing.MX:
        info["host"] = dest.host
    try:
        if dest.kind == routing.MX:
            hops = ctx.resolver.resolve_mx(dest.domain, dest.port, hostname=ctx.config.hostname,
                                           is_self=ctx.is_self)
        else:
            hops = _resolve_hosts(ctx, dest)
    except DNSFailure as e:
        info.update(outcome="defer" if e.temporary else "bounce", status=e.status, reason=e.reason)
        _tls(ctx, dest, info)
        return info
    info["outcome"] = "deliver"
    info["hops"] = [{"host": h.host, "address": h.address, "port": h.port, "preference": h.preference}
                    for h in hops]
    req = _tls(ctx, dest, info)
    if req.sts is not None:
        for h in info["hops"]:
            h["mta_sts_allowed"] = req.sts.matches(h["host"])
        if req.sts_enforce and not any(h["mta_sts_allowed"] for h in info["hops"]):
            info.update(outcome="defer", status="4.7.0", tls_defer=True,
                        reason=tlspolicy.no_allowed_mx(req, [h["host"] for h in info["hops"]]))
    if dest.kind in (routing.MX, routing.ROUTE) and ctx.config.delivery.tls in ("dane", "dane-only"):
        info["tlsa"] = _tlsa(ctx, hops, dest.port)
    return info


def _tls(ctx: RouteContext, dest: routing.Destination, info: dict[str, Any]) -> tlspolicy.TLSRequirement:
    """The TLS policy that applies (info["tls"]), as relay.delivery.attempt decides it."""
    policy = None
    if ctx.sts is not None and tlspolicy.wants_sts(ctx.config, dest):
        try:
            policy = ctx.sts(dest.domain)
        except Exception as e:  # noqa: BLE001 - shown, never fatal to the explanation
            info["mta_sts_error"] = f"MTA-STS look-up failed: {e}"
    req = tlspolicy.decide(ctx.config, dest, sts=policy)
    info["tls"] = {
        "level": req.level, "source": req.source, "required": req.required, "match": list(req.match),
        "mta_sts": None if policy is None else {"mode": policy.mode, "id": policy.id, "mx": list(policy.mx),
                                                "max_age": policy.max_age},
        "describe": req.describe(),
    }
    return req


def _tlsa(ctx: RouteContext, hops: list, port: int) -> dict[str, str]:
    """DANE: each MX host's TLSA RRset and whether it was DNSSEC-validated."""
    out: dict[str, str] = {}
    for host in dict.fromkeys(h.host for h in hops):
        if not any(h.secure for h in hops if h.host == host):
            out[host] = f"_{port}._tcp.{host}: not looked up (the MX or address records are not DNSSEC-validated)"
            continue
        try:
            out[host] = ctx.resolver.resolve_tlsa(host, port).describe()
        except DNSFailure as e:
            out[host] = e.reason
    return out


def _sender_line(s: dict[str, Any], who: str) -> str:
    head = f"sender <{s['address']}>"
    if s.get("error"):
        return f"{head}: {s['error']}"
    if s.get("null"):
        return "sender <>: the null sender is never rewritten"
    if s.get("rewritten_to"):
        return f"{head}: rewritten to <{s['rewritten_to']}> for {who} ({s['rule']}), in the From, Sender and " \
               "Reply-To headers too"
    if s.get("rule"):
        return f"{head}: not rewritten for {who} (only mail from trusted sources is; {s['rule']} would apply)"
    return f"{head}: not rewritten (no rewrite.senders or rewrite.masquerade entry matches)"


def format_text(r: dict[str, Any]) -> str:
    """The answer for a person."""
    addr = r.get("recipient") or r["address"]
    who = "trusted clients" if r.get("client") == "trusted" else f"client {r.get('client')}"
    sender = _sender_line(r["sender"], who) + "\n" if r.get("sender") else ""
    if not r["address"] and sender:
        return sender
    if not r.get("accepted"):
        return f"{sender}<{r['address']}>: refused for {who}: {r['reply']}\n"
    lines = [f"<{addr}>: accepted from {who} ({r['reply']})"]
    if r.get("untrusted_reply"):
        lines.append(f"  from other clients: {r['untrusted_reply']}")
    deliveries = r.get("deliveries", [])
    indent = "  "
    if r.get("alias"):
        lines.append(f"  alias, expands to {len(deliveries)} recipient{'s' if len(deliveries) != 1 else ''}:")
        indent = "    "
    for d in deliveries:
        lines.extend(indent + x for x in _delivery_lines(d, bool(r.get("alias"))))
    return sender + "\n".join(lines) + "\n"


def _delivery_lines(d: dict[str, Any], show_rcpt: bool) -> list[str]:
    who = f"<{d['recipient']}>: " if show_rcpt else ""
    kind = d["kind"]
    if kind == routing.LOCAL:
        if d["outcome"] == "deliver":
            return [f"{who}local delivery to the Maildir {d['mailbox']}"]
        return [f"{who}local delivery would bounce: {d['reason']}"]
    if kind == routing.MX:
        what = f"MX delivery for {d['domain']} on port {d['port']}"
    elif kind == routing.ROUTE:
        what = f"route for {d['domain']} to {d['host']}:{d['port']} (relay.routes)"
    elif kind == routing.UPSTREAM:
        what = f"upstream {d['upstream']} ({_via_text(d)})"
    else:
        what = f"smarthost {d['host']}:{d['port']} (relay.smarthost)"
    tls = [f"  TLS: {d['tls']['describe']}"] if d.get("tls") else []
    if d["outcome"] == "deliver":
        out = [f"{who}{what}, hosts in the order they would be tried:"]
        for i, h in enumerate(d["hops"], 1):
            pref = f" (preference {h['preference']})" if kind == routing.MX else ""
            addr = f"[{h['address']}]" if h["address"] != h["host"] else ""
            sts = " (not allowed by the MTA-STS policy)" if h.get("mta_sts_allowed") is False else ""
            out.append(f"  {i}. {h['host']}{addr}:{h['port']}{pref}{sts}")
        out += [f"  TLSA {t}" for t in d.get("tlsa", {}).values()]
        if "hosts" in d:
            out.append(f"  {_relay_text(d)}")
        return out + tls
    if d.get("tls_defer"):
        return [f"{who}{what}: mail would be deferred ({d['status']}):", f"  {d['reason']}", *tls]
    if d["outcome"] == "defer":
        return [f"{who}{what}: DNS look-up failed temporarily ({d['status']}), mail would be deferred:",
                f"  {d['reason']}"]
    if d["outcome"] == "bounce":
        return [f"{who}{what}: undeliverable ({d['status']}), mail would bounce:", f"  {d['reason']}"]
    return [f"{who}{what}: {d.get('reason', '')}"]


def _via_text(d: dict[str, Any]) -> str:
    via = d.get("via", "")
    if via == routing.VIA_SENDER:
        return f"sender route: relay.sender_routes {d.get('rule')!r}"
    if via == routing.VIA_RECIPIENT:
        return f"recipient route: relay.routes {d.get('rule')!r}"
    return "relay.smarthost" if via == routing.VIA_SMARTHOST else via


def _relay_text(d: dict[str, Any]) -> str:
    """The configured hosts, TLS and AUTH of an upstream or the smarthost."""
    auth = f"AUTH as {d['username']}" if d.get("auth") else "no AUTH"
    level = (d.get("tls") or {}).get("level", "?")
    return f"configured hosts {', '.join(d['hosts'])} (fail-over in this order); TLS {level}; {auth}"
