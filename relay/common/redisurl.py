"""``limits.redis``: where the fleet's shared limits are kept (a Redis server).

Apart from relay.common.redislimits so that the config can check a URL
without importing Twisted or the Redis client (relay.config is pure).

Forms: ``redis://[[user]:password@]host[:port][/db]`` (port 6379, db 0),
``unix:/path/to/redis.sock[?db=N][&password=...]`` (or ``unix:///path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class RedisTarget:
    host: str  # "" for a UNIX socket
    port: int
    db: int
    password: str | None
    username: str | None
    path: str = ""  # a UNIX socket

    def __str__(self) -> str:
        """The address without the password (for logs)."""
        where = f"unix:{self.path}" if self.path else (f"[{self.host}]" if ":" in self.host else self.host) + \
            f":{self.port}"
        return f"{where}/{self.db}"


def parse_redis_url(text: str) -> RedisTarget:
    """A RedisTarget, or ValueError saying what is wrong."""
    if text.startswith("unix:"):
        return _unix(text)
    u = urlsplit(text)
    if u.scheme != "redis":
        raise ValueError('a URL "redis://[:password@]host:port/db" or "unix:/path/to/socket"')
    try:
        port = u.port or 6379
    except ValueError:
        raise ValueError("a port from 1 to 65535")
    if not u.hostname:
        raise ValueError("a host in the URL")
    path = u.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("a database number after the host (redis://host:port/0)")
    if u.query or u.fragment:
        raise ValueError("no query or fragment in a redis:// URL")
    db = int(path) if path else 0
    return RedisTarget(u.hostname, port, db, unquote(u.password) if u.password is not None else None,
                       unquote(u.username) if u.username else None)


def _unix(text: str) -> RedisTarget:
    rest = text[len("unix:"):]
    if rest.startswith("//"):
        rest = rest[2:]
    path, _, query = rest.partition("?")
    if not path.startswith("/"):
        raise ValueError("an absolute socket path (unix:/run/redis/redis.sock)")
    q = parse_qs(query, keep_blank_values=True)
    bad = set(q) - {"db", "password"}
    if bad:
        raise ValueError(f"only db= and password= after a socket path (not {', '.join(sorted(bad))})")
    db_text = q.get("db", ["0"])[-1]
    if not db_text.isdigit():
        raise ValueError("a database number (db=0)")
    password = q.get("password", [None])[-1]
    return RedisTarget("", 0, int(db_text), password, None, path)
