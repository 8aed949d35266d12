"""The aliases file and alias expansion (plain Python, no I/O but reading it).

Format, like /etc/aliases::

    # comment
    info: alice, bob@example.org        # a local part: in every local domain
    sales@example.org: carol, partner@elsewhere.net
    team: alice,
        bob                               # continuation lines start with blanks

A name is a local part (it applies to every local domain) or a full address
in a local domain.  A target is a full address (local or remote) or a bare
local part, which means that name in the domain of the address being
expanded.  Expansion is recursive with loop protection: an address that
reappears on its own expansion path is delivered as itself (so
``alice: alice, archive`` keeps a copy for alice), and expansion stops at
MAX_DEPTH levels.  Pipes, files and :include: are not supported and are
refused with the line number.

``postmaster`` always resolves: its alias, else the user postmaster@domain,
else the first user of that domain, else the first user, else the
postmaster mailbox itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

from relay.common.address import DOT_STRING, UTF8_DOT_STRING, AddressError, fold_local, parse_mailbox

MAX_DEPTH = 20
MAX_EXPANSION = 1000


class AliasesFileError(Exception):
    pass


@dataclass(frozen=True)
class Expansion:
    address: str  # a final recipient
    original: str  # the recipient it came from


class AliasMap:
    def __init__(self, by_address: dict[str, list[str]] | None = None, by_local: dict[str, list[str]] | None = None):
        self.by_address = by_address or {}
        self.by_local = by_local or {}

    def __len__(self) -> int:
        return len(self.by_address) + len(self.by_local)

    @classmethod
    def parse(cls, text: str, path: str, local_domains: tuple[str, ...]) -> "AliasMap":
        by_address: dict[str, list[str]] = {}
        by_local: dict[str, list[str]] = {}
        logical: list[tuple[int, str]] = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            if line[0] in " \t":
                if not logical:
                    raise AliasesFileError(f"{path}: line {n}: continuation line without an alias")
                ln, prev = logical[-1]
                logical[-1] = (ln, prev + " " + line.strip())
            else:
                logical.append((n, line.strip()))
        for n, line in logical:
            name, sep, rest = line.partition(":")
            name = name.strip()
            if not sep or not name:
                raise AliasesFileError(f"{path}: line {n}: expected 'name: target, target'")
            targets = [t.strip() for t in rest.split(",") if t.strip()]
            if not targets:
                raise AliasesFileError(f"{path}: line {n}: alias {name!r} has no targets")
            for t in targets:
                if t.startswith(("|", "/", ":include:")) or t.startswith('"|'):
                    raise AliasesFileError(
                        f"{path}: line {n}: target {t!r}: pipes, files and :include: are not supported"
                    )
                if "@" in t:
                    try:
                        parse_mailbox(t, utf8=True)
                    except AddressError as e:
                        raise AliasesFileError(f"{path}: line {n}: target {t!r}: {e}")
                elif not _plain_local(t):
                    raise AliasesFileError(f"{path}: line {n}: target {t!r} is not an address")
            if "@" in name:
                try:
                    a = parse_mailbox(name, utf8=True)
                except AddressError as e:
                    raise AliasesFileError(f"{path}: line {n}: name {name!r}: {e}")
                if a.domain not in local_domains:
                    raise AliasesFileError(
                        f"{path}: line {n}: name {name!r} is not in a local domain "
                        f"(local.domains: {', '.join(local_domains)})"
                    )
                key = a.lower()
                if key in by_address:
                    raise AliasesFileError(f"{path}: line {n}: alias {name!r} defined twice")
                by_address[key] = targets
            else:
                if not _plain_local(name):
                    raise AliasesFileError(f"{path}: line {n}: name {name!r} is not a local part or address")
                key = fold_local(name)
                if key in by_local:
                    raise AliasesFileError(f"{path}: line {n}: alias {name!r} defined twice")
                by_local[key] = targets
        return cls(by_address, by_local)

    def lookup(self, address: str) -> list[str] | None:
        """Targets of a local address (lower-cased form), or None."""
        t = self.by_address.get(address)
        if t is not None:
            return t
        local, _, _ = address.rpartition("@")
        return self.by_local.get(local)

    def has(self, address: str) -> bool:
        return self.lookup(address) is not None


def _plain_local(s: str) -> bool:
    """A bare local part (ASCII, or UTF-8 as RFC 6531 allows: aliases may
    name UTF-8 mailboxes, compared in NFC)."""
    if s.isascii():
        return bool(DOT_STRING.match(s))
    try:
        parse_mailbox(s + "@invalid", utf8=True)
    except AddressError:
        return False
    return bool(UTF8_DOT_STRING.match(s))


def _norm_target(t: str, domain: str) -> str:
    if "@" not in t:
        return f"{fold_local(t)}@{domain}"
    a = parse_mailbox(t, utf8=True)
    return str(a)


def expand(
    address: str,
    aliases: AliasMap,
    *,
    is_local_domain: Callable[[str], bool],
    user_exists: Callable[[str], bool],
    first_user_in: Callable[[str], str | None],
) -> list[Expansion]:
    """Final recipients for one accepted recipient (deduplicated, in order)."""
    out: list[Expansion] = []
    seen: set[str] = set()
    # aliases already expanded: a name reached again by another path (a
    # diamond, or a target listed twice) adds nothing new, and walking it
    # again would make the work exponential in the depth
    expanded: set[str] = set()

    def emit(a: str) -> None:
        key = fold_local(a) if is_local_domain(a.rpartition("@")[2]) else a
        if key not in seen:
            seen.add(key)
            out.append(Expansion(a, address))

    def walk(a: str, path: tuple[str, ...], depth: int) -> None:
        if len(out) >= MAX_EXPANSION:
            return
        local, _, domain = a.rpartition("@")
        if not is_local_domain(domain):
            emit(a)
            return
        key = f"{fold_local(local)}@{domain}"
        if key in path or depth > MAX_DEPTH:
            emit(key)
            return
        if key in expanded:
            return
        targets = aliases.lookup(key)
        if targets is None:
            if local.lower() == "postmaster" and not user_exists(key):
                first = first_user_in(domain)
                emit(first if first else key)
            else:
                emit(key)
            return
        for t in targets:
            nt = _norm_target(t, domain)
            if nt.lower() == key:
                emit(key)
            else:
                walk(nt, path + (key,), depth + 1)
        expanded.add(key)

    walk(address, (), 0)
    return out


class AliasFile:
    """The aliases file, reloaded when it changes (stat on refresh())."""

    def __init__(self, path: str, local_domains: tuple[str, ...]):
        self.path = path
        self.local_domains = local_domains
        self.map = AliasMap()
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[int, int, int] | None = None  # a version that failed to parse: reported once
        if path:
            self.refresh()

    def refresh(self) -> bool:
        """Reload if the file changed; True if the aliases changed.

        A bad file raises AliasesFileError (once per version of the file:
        the relay polls and logs each error) and the previous aliases stay.
        """
        if not self.path:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            if self._stamp is None and not len(self.map):
                self._stamp = None
                return False
            self.map, self._stamp = AliasMap(), None
            return True
        except OSError as e:
            raise AliasesFileError(f"{self.path}: cannot read: {e.strerror}")
        if stamp == self._stamp or stamp == self._bad_stamp:
            return False
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            new = AliasMap.parse(text, self.path, self.local_domains)
        except (OSError, UnicodeDecodeError) as e:
            self._bad_stamp = stamp
            raise AliasesFileError(f"{self.path}: cannot read: {e}")
        except AliasesFileError:
            self._bad_stamp = stamp
            raise
        self.map = new
        self._stamp = stamp
        return True


class Users(Protocol):
    """What expansion asks of the users file (relay.mailbox.users.UserDB)."""

    def exists(self, address: str) -> bool: ...

    def first_user_in(self, domain: str) -> str | None: ...


class Expander:
    """The running relay's alias expansion: the final recipients of an
    accepted recipient, as (address, the recipient it came from) pairs.

    It holds the local domains, the aliases file and the users file of the
    running config; a reload hands it the new ones (``reconfigure``).  The
    aliases file reloads itself in place (``AliasFile.refresh``).
    """

    def __init__(self, *, local_domains: tuple[str, ...], aliases: AliasFile, users: Users):
        self.local_domains = local_domains
        self.aliases = aliases
        self.users = users

    def reconfigure(self, *, local_domains: tuple[str, ...], aliases: AliasFile, users: Users) -> None:
        self.local_domains = local_domains
        self.aliases = aliases
        self.users = users

    def expand(self, address: str) -> list[tuple[str, str | None]]:
        """Final recipients of an accepted recipient; a remote one is itself."""
        domains = self.local_domains
        if address.rpartition("@")[2] not in domains:
            return [(address, address)]
        exp = expand(
            address,
            self.aliases.map,
            is_local_domain=lambda d: d in domains,
            user_exists=self.users.exists,
            first_user_in=self.users.first_user_in,
        )
        return [(e.address, e.original) for e in exp] or [(address, address)]
