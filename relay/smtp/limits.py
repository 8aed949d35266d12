"""The inbound rate limits ([limits]) as an SMTP session applies them.

Why here and not in the policy: a limit counts (it has state, in the
relay-wide ``relay.common.ratelimit.RateTable``), while the policy only
decides.  A message counts when its MAIL command is accepted (as Postfix's
anvil counts MAIL FROM requests), a recipient when its RCPT is accepted;
a command refused for another reason counts nothing, and a refusal by a
limit counts nothing either, so a client that waits gets through as the
window moves.  What was accepted before is never affected: a limit only
ever refuses the next MAIL or RCPT, with ``450 4.7.1``.

With ``limits.redis`` the table is the fleet's (relay.common.redislimits):
its answer is a Deferred the session waits for, holding later pipelined
commands, as it does for AUTH.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred

from relay.common.ratelimit import RateTable, Refusal, Want
from relay.common.redislimits import FleetRates
from relay.config import Config

_WHAT = {"messages": "messages", "recipients": "recipients"}
_WHO = {"ip": "from", "user": "from user", "sender": "from sender"}


def client_network(ip: str, cfg: Config) -> str:
    """The client's address grouped by limits.ipv4_prefix / ipv6_prefix ("10.1.2.3", "2001:db8:1:2::/64")."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = cfg.limits.ipv4_prefix if addr.version == 4 else cfg.limits.ipv6_prefix
    if prefix == addr.max_prefixlen:
        return str(addr)
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def wants(cfg: Config, kind: str, *, submission: bool, ip: str, user: str | None,
          sender: str | None, trusted_network: bool) -> list[Want]:
    """The limits of one MAIL (kind "messages") or RCPT ("recipients")."""
    limits = cfg.limits
    keys: list[tuple[str, str]] = []
    if limits.networks or not trusted_network:
        keys.append(("ip", client_network(ip, cfg)))
    if user:
        keys.append(("user", user))
    if sender:
        keys.append(("sender", sender.lower()))
    out = []
    for who, key in keys:
        name, rate = limits.rate(f"{kind}_per_{who}", submission)
        if rate is not None:
            out.append(Want(name, key, rate.count, rate.window))
    return out


def reply_text(r: Refusal, cfg: Config) -> str:
    """'too many messages from 127.0.0.9: limit 300 per 1h (limits.messages_per_ip)'."""
    name = r.want.limit
    leaf = name.rsplit(".", 1)[1]
    kind, _, who = leaf.partition("_per_")
    rate = cfg.limits.rate(leaf, name.startswith("limits.submission."))[1]
    window = rate.window_text if rate is not None else f"{r.want.window:g}s"
    return f"too many {_WHAT[kind]} {_WHO[who]} {r.want.key}: limit {r.want.max} per {window} ({name})"


def check(table: RateTable | FleetRates, want_list: list[Want], now: float) -> Refusal | None | Deferred:
    """A refusal or None, at once from this relay's table; a Deferred of one
    from the fleet's (limits.redis, relay.common.redislimits): the session
    waits for it before its reply (it fires within limits.redis_timeout,
    with the local answer when Redis is slow or away)."""
    return table.check(want_list, now)
