"""``relayctl route ADDRESS``: how the relay would treat a recipient right now.

The answer is computed with the relay's own parts, in the order the relay
applies them: the RCPT syntax check and the policy decision (the reply a
client would get), alias expansion, routing (local, route, smarthost, MX),
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
from relay.delivery import routing
from relay.delivery.local import mailbox_path
from relay.delivery.mx import DNSFailure
from relay.intake.policy import Client, Policy

MAX_DESTINATIONS = 50  # an alias with more targets: the first ones are resolved


@dataclass
class RouteContext:
    config: Config
    policy: Policy
    expand: Callable[[str], list[tuple[str, str | None]]]
    user_exists: Callable[[str], bool]
    resolver: Any  # relay.delivery.mx.Resolver (its blocking resolve_mx / resolve_host)
    is_self: Callable[[str, int], bool]


def parse_recipient(config: Config, text: str) -> Address:
    """As the SMTP server parses RCPT TO (a bare "postmaster" included)."""
    t = text.strip()
    if t.strip("<>").lower() == "postmaster" and config.local.domains:
        return Address("postmaster", config.local.domains[0])
    if not t.startswith("<"):
        t = f"<{t}>"
    addr = parse_path(t)
    assert addr is not None  # None is the null path, which only allow_null=True accepts
    return addr


def explain(ctx: RouteContext, address: str, client_ip: str | None = None) -> dict[str, Any]:
    """A JSON-able answer; ``ok`` is True when the mail would be delivered."""
    out: dict[str, Any] = {"address": address, "ok": False}
    if client_ip:
        client = Client(client_ip)
        out["client"] = client_ip
    else:
        # a trusted client (relay.networks or authenticated): the LAN's view
        client = Client("", authenticated="relayctl")
        out["client"] = "trusted"
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
    for final, _orig in finals:
        dest = routing.route(ctx.config, final)
        entry: dict[str, Any] = {"recipient": final, "kind": dest.kind}
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


def _remote(ctx: RouteContext, dest: routing.Destination) -> dict[str, Any]:
    info: dict[str, Any] = {"domain": dest.domain, "port": dest.port}
    if dest.kind != routing.MX:
        info["host"] = dest.host
    try:
        if dest.kind == routing.MX:
            hops = ctx.resolver.resolve_mx(dest.domain, dest.port, hostname=ctx.config.hostname,
                                           is_self=ctx.is_self)
        else:
            hops = ctx.resolver.resolve_host(dest.host, dest.port)
    except DNSFailure as e:
        info.update(outcome="defer" if e.temporary else "bounce", status=e.status, reason=e.reason)
        return info
    info["outcome"] = "deliver"
    info["hops"] = [{"host": h.host, "address": h.address, "port": h.port, "preference": h.preference}
                    for h in hops]
    return info


def format_text(r: dict[str, Any]) -> str:
    """The answer for a person."""
    addr = r.get("recipient") or r["address"]
    who = "trusted clients" if r.get("client") == "trusted" else f"client {r.get('client')}"
    if not r.get("accepted"):
        return f"<{r['address']}>: refused for {who}: {r['reply']}\n"
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
    return "\n".join(lines) + "\n"


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
    else:
        what = f"smarthost {d['host']}:{d['port']} (relay.smarthost)"
    if d["outcome"] == "deliver":
        out = [f"{who}{what}, hosts in the order they would be tried:"]
        for i, h in enumerate(d["hops"], 1):
            pref = f" (preference {h['preference']})" if kind == routing.MX else ""
            addr = f"[{h['address']}]" if h["address"] != h["host"] else ""
            out.append(f"  {i}. {h['host']}{addr}:{h['port']}{pref}")
        return out
    if d["outcome"] == "defer":
        return [f"{who}{what}: DNS look-up failed temporarily ({d['status']}), mail would be deferred:",
                f"  {d['reason']}"]
    if d["outcome"] == "bounce":
        return [f"{who}{what}: undeliverable ({d['status']}), mail would bounce:", f"  {d['reason']}"]
    return [f"{who}{what}: {d.get('reason', '')}"]
