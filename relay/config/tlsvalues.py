"""The check of ``delivery.tls_policy`` values: the per-destination TLS table.

Kept apart from relay.config.values (the checks of the other kinds of
values) because the table is a small language of its own: keys naming a
domain, its subdomains or a next hop, and values that are a level or a
table of level, certificate names and CA file; every error names the part
of the value that is wrong (``BadAt``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from relay.common.address import AddressError, normalize_domain
from relay.config.values import Bad, BadAt, Check, Resolve

TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane", "dane-only")
_TLS_POLICY_DOC = ('a table of "domain", ".domain" (its subdomains) or "[host]" (a route or the smarthost) = '
                   'a level (' + " | ".join(TLS_LEVELS) + ') or { level, match = [names], ca_file }')
_MATCH_NAME = re.compile(r"(\*\.)?[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*")


@dataclass(frozen=True)
class TLSPolicyEntry:
    """One delivery.tls_policy entry: the level, the names the certificate
    may carry (verify only; empty: the MX host, or the route's host), and a
    PEM file of trusted CAs (verify only; "": the system CAs)."""

    level: str
    match: tuple[str, ...] = ()
    ca_file: str = ""


def _tls_policy_key(k: Any) -> str:
    """"example.com", ".example.com" or "[host]", normalised (lower case)."""
    at = f'."{k}"'
    if not isinstance(k, str) or not k:
        raise BadAt(at, 'a "domain", ".domain" or "[host]" key', k)
    try:
        if k.startswith("[") and k.endswith("]") and len(k) > 2:
            inner = k[1:-1]
            try:
                return f"[{ipaddress.ip_address(inner)}]"
            except ValueError:
                return f"[{normalize_domain(inner)}]"
        if k.startswith("."):
            return "." + normalize_domain(k[1:])
        return normalize_domain(k)
    except AddressError as e:
        raise BadAt(at, f'a "domain", ".domain" or "[host]" key ({e})', k)


def _tls_policy_entry(key: str, value: Any, resolve: Resolve) -> TLSPolicyEntry:
    at = f'."{key}"'
    if isinstance(value, str):
        value = {"level": value}
    if not isinstance(value, dict):
        raise BadAt(at, "a level (" + " | ".join(TLS_LEVELS) + ") or a table { level, match, ca_file }", value)
    for extra in sorted(set(value) - {"level", "match", "ca_file"}):
        raise BadAt(f"{at}.{extra}", "no such key (known: level, match, ca_file)", value[extra])
    level = value.get("level")
    if level not in TLS_LEVELS:
        raise BadAt(f"{at}.level", "one of " + " | ".join(TLS_LEVELS), level)
    match = value.get("match", [])
    if not isinstance(match, list) or not all(isinstance(m, str) and _MATCH_NAME.fullmatch(m.lower().rstrip("."))
                                               for m in match):
        raise BadAt(f"{at}.match", 'a list of host names or "*.domain" patterns', match)
    if match and level != "verify":
        raise BadAt(f"{at}.match", 'nothing: match is only for level = "verify"', match)
    ca_file = value.get("ca_file", "")
    if not isinstance(ca_file, str):
        raise BadAt(f"{at}.ca_file", "a path (a PEM file of trusted CA certificates)", ca_file)
    if ca_file and level != "verify":
        raise BadAt(f"{at}.ca_file", 'nothing: ca_file is only for level = "verify"', ca_file)
    return TLSPolicyEntry(level, tuple(m.lower().rstrip(".") for m in match), resolve(ca_file) if ca_file else "")


def _tls_policy(value: Any, resolve: Resolve) -> tuple[tuple[str, TLSPolicyEntry], ...]:
    if not isinstance(value, dict):
        raise Bad(_TLS_POLICY_DOC)
    out: dict[str, TLSPolicyEntry] = {}
    for k, entry in value.items():
        key = _tls_policy_key(k)
        if key in out:
            raise BadAt(f'."{k}"', "one entry per destination (another key names the same one)", entry)
        out[key] = _tls_policy_entry(k, entry, resolve)
    return tuple(out.items())


TLS_POLICY = Check(_TLS_POLICY_DOC, _tls_policy)
