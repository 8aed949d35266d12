"""The checks of rate values: ``[limits]`` and ``delivery.pacing`` ("300/1h" or "off").

Apart from relay.config.values because rates are one small family (a
count per window, per-endpoint override tables, pacing keyed by
destination) that relay.queue.pacing and relay.smtp.limits also read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.common.redisurl import parse_redis_url
from relay.config.values import Bad, Check, Resolve, _domain, parse_duration


@dataclass(frozen=True)
class Rate:
    """"300/1h": at most ``count`` per ``window`` seconds; ``text`` as written."""

    count: int
    window: float
    text: str

    @property
    def window_text(self) -> str:
        return self.text.partition("/")[2].strip()


_RATE_FORM = 'a rate like "300/1h" (a count from 1, a duration above 0) or "off"'


def parse_rate(value: Any) -> Rate | None:
    """"N/DURATION" or "off" (None)."""
    if not isinstance(value, str):
        raise Bad(_RATE_FORM)
    if value.strip().lower() == "off":
        return None
    count, slash, window = value.partition("/")
    if not slash or not count.strip().isdigit():
        raise Bad(_RATE_FORM)
    n = int(count.strip())
    try:
        secs = parse_duration(window)
    except Bad:
        raise Bad(_RATE_FORM)
    if n < 1 or secs <= 0 or n > 0xFFFFFFFF:
        raise Bad(_RATE_FORM)
    return Rate(n, secs, f"{n}/{window.strip()}")


LIMIT_NAMES = ("messages_per_ip", "recipients_per_ip", "messages_per_user", "recipients_per_user",
               "messages_per_sender", "recipients_per_sender")


def _limit_overrides(value: Any, resolve: Resolve) -> tuple[tuple[str, Rate | None], ...]:
    if not isinstance(value, dict):
        raise Bad(f"a table of limit = rate ({', '.join(LIMIT_NAMES)})")
    out = []
    for k, rate in value.items():
        if k not in LIMIT_NAMES:
            raise Bad(f"a table of limit = rate with limits among {', '.join(LIMIT_NAMES)} (not {k!r})")
        try:
            out.append((k, parse_rate(rate)))
        except Bad as e:
            raise Bad(f"{k} = {e}")
    return tuple(out)


def _pacing(value: Any, resolve: Resolve) -> tuple[tuple[str, Rate], ...]:
    """Destination key (or a bare domain: its MX, or "*": every MX domain) -> rate."""
    if not isinstance(value, dict):
        raise Bad('a table of "destination" = "N/duration"')
    out = []
    for k, rate in value.items():
        if not isinstance(k, str) or not k.strip():
            raise Bad("a table with non-empty destination names")
        key = k.strip().lower()
        if key != "*" and ":" not in key:
            key = "mx:" + _domain(key)
        try:
            r = parse_rate(rate)
        except Bad as e:
            raise Bad(f"{k} = {e}")
        if r is not None:
            out.append((key, r))
    return tuple(out)


RATE = Check('a rate "N/duration" ("300/1h") or "off"', lambda v, r: parse_rate(v))
LIMIT_OVERRIDES = Check('a table of limit = "N/duration" or "off"', _limit_overrides)
PACING = Check('a table of "destination" = "N/duration"', _pacing)


def _redis_url(value: Any, resolve: Resolve) -> str:
    """limits.redis: "" (in process) or a URL relay.common.redisurl reads."""
    if not isinstance(value, str):
        raise Bad('"" or a URL "redis://[:password@]host:port/db" or "unix:/path/to/socket"')
    text = value.strip()
    if text:
        try:
            parse_redis_url(text)
        except ValueError as e:
            raise Bad(f'"" or a URL "redis://[:password@]host:port/db" or "unix:/path/to/socket" ({e})')
    return text


def _redis_prefix(value: Any, resolve: Resolve) -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or any(c.isspace() for c in value):
        raise Bad("a key prefix of 1 to 64 characters without spaces")
    return value


REDIS_URL = Check('"" or a URL "redis://[:password@]host:port/db" or "unix:/path/to/socket"', _redis_url)
REDIS_PREFIX = Check("a key prefix of 1 to 64 characters without spaces", _redis_prefix)
