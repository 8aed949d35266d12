"""What a reload may change in a running relay, and what it says.

A reload (SIGHUP, ``relayctl reload``) applies a new config live, except
what the running process is built around: its spool, its listeners, its
control socket, its metrics page, its log format, its number of workers.
A change of those is reported as needing a restart, and the relay keeps
running with the value it started with.  Pure decisions on two configs (no
I/O), kept apart from the service that applies them (relay.runtime.service).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from relay.common import endpoints as epmod
from relay.common.tls import ServerTLS
from relay.config import Config

# (the key as the config file names it, how to read it): what cannot change live
RESTART_KEYS: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("spool", lambda c: c.spool),
    ("smtp.listen", lambda c: c.smtp.listen),
    ("smtp.submission", lambda c: c.smtp.submission),
    ("pop3.listen", lambda c: c.pop3.listen),
    ("control.socket", lambda c: c.control_socket),
    ("metrics.listen", lambda c: c.metrics.listen),
    ("log.format", lambda c: c.log.format),
    ("workers", lambda c: c.workers),
)

# keys of sections added since (kept apart: RESTART_KEYS is the list its
# tests and callers know); they need a restart in the same way
LATER_RESTART_KEYS: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("proxy.listeners", lambda c: c.proxy.listeners),
    ("limits.redis", lambda c: c.limits.redis),  # the fleet's link is made at start
    ("limits.redis_prefix", lambda c: c.limits.redis_prefix),
    ("control.tcp_listen", lambda c: c.control.tcp_listen),  # [control] is kept as it runs
    ("control.secret_file", lambda c: c.control.secret_file),
)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The RESTART_KEYS (and LATER_RESTART_KEYS) the new config changes."""
    return [key for key, get in RESTART_KEYS + LATER_RESTART_KEYS if get(old) != get(new)]


def keep_running(old: Config, new: Config) -> Config:
    """The new config with what cannot change live (RESTART_KEYS) as it runs."""
    return dataclasses.replace(
        new, spool=old.spool, workers=old.workers,
        smtp=dataclasses.replace(new.smtp, listen=old.smtp.listen, submission=old.smtp.submission),
        pop3=dataclasses.replace(new.pop3, listen=old.pop3.listen),
        proxy=dataclasses.replace(new.proxy, listeners=old.proxy.listeners),
        control=old.control, metrics=old.metrics, log=old.log,
    )


def certificate_still_needed(old: Config, new: Config, running_tls: ServerTLS | None) -> list[str]:
    """The problem of a reload that drops the certificate a running listener uses."""
    if new.tls.enabled or running_tls is None:
        return []
    if new.smtp.submission or any(epmod.parse(d).implicit_tls and not epmod.parse(d).own_certificate
                                  for d in old.smtp.listen + old.smtp.submission + old.pop3.listen):
        return [f"{new.source}: tls: the certificate is still needed by implicit TLS listeners"]
    return []


def reload_messages(old: Config, new: Config, tls: ServerTLS | None, restart: list[str]) -> list[str]:
    """What an accepted reload says (its log lines and relayctl's output)."""
    changed = [f.name for f in dataclasses.fields(new)
               if f.name != "path" and getattr(new, f.name) != getattr(old, f.name)]
    msgs = [f"config reloaded from {new.source}"
            + (f"; changed: {', '.join(changed)}" if changed else "; no changes")]
    if tls is not None:
        msgs.append(f"TLS certificate {new.tls.certificate} loaded ({tls.subject}, "
                    f"expires {tls.not_after.date().isoformat()})")
    for key in restart:
        msgs.append(f"{key} changed: takes effect after a restart")
    return msgs
