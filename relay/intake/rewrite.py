"""Sender rewriting for mail from trusted sources (issue 14): the map and the
address-list rewriting of a header block.  Pure: no I/O, no Twisted.

Like Postfix's ``sender_canonical_maps`` and ``masquerade_domains``:

* ``rewrite.senders``: exact addresses (``root@nas.lan`` -> ``alerts@example.org``),
  matched with the local part's case ignored;
* ``rewrite.masquerade``: domains, ``nas.lan`` (that domain only) or
  ``*.lan`` (every subdomain of lan, not lan itself) -> ``example.org``, the
  local part kept.  An exact domain wins over a wildcard, a longer wildcard
  over a shorter one; an exact address wins over any domain.

What is rewritten (the callers decide that the source is trusted): the
envelope sender (never the null sender) and, in the header block, the
addr-specs of From, Sender and Reply-To, and of Resent-From and Resent-Sender
(as Postfix's canonical maps do: a device that forwards mail on names
itself there; ``HeaderStage``'s set, ``REWRITTEN_HEADERS`` for
``rewrite_header_block`` alone).  Only the addr-spec that matches is
replaced: display names, comments, groups and encoded words stay byte for
byte, and every other header is never touched.  A header that does not
parse as an address list is left as it is and reported (``HeaderStage.problems``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from relay.common.address import AddressError, normalize_domain, parse_mailbox, quote_local
from relay.config.values import sender_key

REWRITTEN_HEADERS = (b"from", b"sender", b"reply-to")
# what the relay rewrites in mail from trusted sources: the originator fields and their Resent- twins
# (RFC 5322 3.6.6; Resent-Reply-To is obsolete syntax and not rewritten)
STAGE_HEADERS = REWRITTEN_HEADERS + (b"resent-from", b"resent-sender")
MAX_HEADER_BLOCK = 1 << 20  # a header block larger than this passes unchanged (and is reported)


@dataclass(frozen=True)
class Rewritten:
    address: str  # the new address
    rule: str  # what matched: "rewrite.senders" or 'rewrite.masquerade "*.lan"'
    domain: str | None = None  # masquerading: only the domain changes (to this)


def _key(local: str, domain: str) -> str:
    return sender_key(local, domain)


@dataclass(frozen=True)
class SenderMap:
    addresses: tuple[tuple[str, str], ...] = ()  # (lower-cased key, new address)
    domains: tuple[tuple[str, str], ...] = ()  # (exact domain or "*.suffix", new domain)
    _exact: dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    _needles: list[str] = field(default_factory=list, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        self._exact.update(self.addresses)
        self._needles.extend({"@" + k.rpartition("@")[2] for k, _ in self.addresses}
                             | {p[1:] if p.startswith("*.") else p for p, _ in self.domains})

    def may_match(self, text: str) -> bool:
        """False when no address of this (ASCII) text can match: a quick
        test before an address list is parsed (8-bit text may hold U-labels)."""
        if not text.isascii():
            return True
        low = text.lower()
        return any(n in low for n in self._needles)

    @property
    def empty(self) -> bool:
        return not self.addresses and not self.domains

    def lookup(self, local: str, domain: str) -> Rewritten | None:
        """What local@domain (the domain normalised) becomes, or None."""
        new = self._exact.get(_key(local, domain))
        if new is not None:
            return Rewritten(new, "rewrite.senders") if new != f"{quote_local(local)}@{domain}" else None
        best: tuple[int, str, str] | None = None
        for pattern, target in self.domains:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                if domain.endswith(suffix) and len(domain) > len(suffix):
                    rank = len(suffix)
                else:
                    continue
            elif domain == pattern:
                rank = 1 << 16
            else:
                continue
            if best is None or rank > best[0]:
                best = (rank, pattern, target)
        if best is None or best[2] == domain:
            return None
        return Rewritten(f"{quote_local(local)}@{best[2]}", f'rewrite.masquerade "{best[1]}"', best[2])

    def address(self, text: str) -> Rewritten | None:
        """An envelope address (as relay.common.address writes it): its
        rewriting, or None (the null sender "" and literals too)."""
        if not text or self.empty:
            return None
        try:
            a = parse_mailbox(text, utf8=True)  # a SMTPUTF8 sender is rewritten too
        except AddressError:
            return None
        return self.lookup(a.local, a.domain)


@functools.lru_cache(maxsize=8)
def sender_map(addresses: tuple[tuple[str, str], ...], domains: tuple[tuple[str, str], ...]) -> SenderMap:
    """The map of a config's [rewrite] (cached: a config is frozen)."""
    return SenderMap(addresses, domains)


# --------------------------------------------------------------------------- header addresses


class Unparsable(ValueError):
    pass


_SPECIALS = "<>@,;:.[]\"()"
_WS = " \t\r\n"


def _tokens(s: str) -> list[tuple[str, int, int]]:
    """(kind, start, end): kind is "a" (atom), "q" (quoted string), "d"
    (domain literal) or the special character; blanks and comments skipped."""
    out: list[tuple[str, int, int]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in _WS:
            i += 1
        elif c == "(":
            depth, i = 1, i + 1
            while depth:
                if i >= n:
                    raise Unparsable("unterminated comment")
                if s[i] == "\\":
                    i += 1
                elif s[i] == "(":
                    depth += 1
                elif s[i] == ")":
                    depth -= 1
                i += 1
        elif c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and s[j] != close:
                j += 2 if s[j] == "\\" else 1
            if j >= n:
                raise Unparsable("unterminated quoted string" if c == '"' else "unterminated domain literal")
            out.append(("q" if c == '"' else "d", i, j + 1))
            i = j + 1
        elif c in _SPECIALS:
            if c in ")]":
                raise Unparsable(f"stray {c!r}")
            out.append((c, i, i + 1))
            i += 1
        else:
            j = i
            while j < n and s[j] not in _SPECIALS and s[j] not in _WS:
                j += 1
            out.append(("a", i, j))
            i = j
    return out


def _unquote(q: str) -> str:
    inner, out, i = q[1:-1], [], 0
    while i < len(inner):
        if inner[i] == "\\" and i + 1 < len(inner):
            i += 1
        elif inner[i] in "\r\n":
            i += 1
            continue
        out.append(inner[i])
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Spec:
    start: int
    end: int
    local_end: int  # the end of the local part as written
    local: str
    domain: str  # as written (not normalised)


def _addr_spec(s: str, toks: list[tuple[str, int, int]]) -> Spec:
    """local-part "@" domain, with the obsolete forms (words and dots)."""
    at = [i for i, t in enumerate(toks) if t[0] == "@"]
    if len(at) != 1 or at[0] == 0 or at[0] == len(toks) - 1:
        raise Unparsable("not an address")
    left, right = toks[: at[0]], toks[at[0] + 1 :]
    for k, t in enumerate(left):
        if (t[0] == ".") != (k % 2 == 1) or t[0] not in "aq.":
            raise Unparsable("bad local part")
    if left[-1][0] == ".":
        raise Unparsable("bad local part")
    if right[0][0] == "d":
        if len(right) != 1:
            raise Unparsable("bad domain")
    else:
        for k, t in enumerate(right):
            if (t[0] == ".") != (k % 2 == 1) or t[0] not in "a.":
                raise Unparsable("bad domain")
        if right[-1][0] == ".":
            raise Unparsable("bad domain")
    local = "".join(_unquote(s[a:b]) if kind == "q" else s[a:b] for kind, a, b in left)
    domain = "".join(s[a:b] for _, a, b in right)
    return Spec(toks[0][1], toks[-1][2], left[-1][2], local, domain)


def _mailbox(s: str, toks: list[tuple[str, int, int]]) -> Spec | None:
    """One mailbox; None for an empty angle address "<>" (nothing to rewrite)."""
    kinds = [t[0] for t in toks]
    if "<" not in kinds:
        return _addr_spec(s, toks)
    lt = kinds.index("<")
    if kinds.count("<") != 1 or kinds[-1] != ">" or kinds.count(">") != 1:
        raise Unparsable("bad angle address")
    if any(k in ",;:" for k in kinds[:lt]):
        raise Unparsable("bad display name")
    inner = toks[lt + 1 : -1]
    if not inner:
        return None
    ik = [t[0] for t in inner]
    if ik[0] == "@":  # obs-route: "@a,@b:" before the address
        if ":" not in ik:
            raise Unparsable("bad route")
        inner = inner[ik.index(":") + 1 :]
    return _addr_spec(s, inner)


def address_specs(value: str) -> list[Spec]:
    """The addr-specs of an address list (groups included); Unparsable if it is not one."""
    toks = _tokens(value)
    specs: list[Spec] = []
    cur: list[tuple[str, int, int]] = []
    in_angle = in_group = False

    def flush() -> None:
        if cur:
            m = _mailbox(value, cur)
            if m is not None:
                specs.append(m)
            cur.clear()

    for t in toks:
        k = t[0]
        if in_angle:
            cur.append(t)
            in_angle = k != ">"
        elif k == "<":
            cur.append(t)
            in_angle = True
        elif k == ",":
            flush()
        elif k == ":" and not in_group:
            if not cur or any(c[0] not in "aq." for c in cur):
                raise Unparsable("bad group name")
            cur.clear()
            in_group = True
        elif k == ";" and in_group:
            flush()
            in_group = False
        elif k in ":;":
            raise Unparsable(f"stray {k!r}")
        else:
            cur.append(t)
    if in_angle or in_group:
        raise Unparsable("unterminated angle address or group")
    flush()
    return specs


@dataclass
class Change:
    header: str  # the header name as written
    old: str
    new: str


def rewrite_value(value: str, smap: SenderMap) -> tuple[str, list[tuple[str, str]]]:
    """An address-list value (bytes read as latin-1) with matching addr-specs replaced."""
    changes: list[tuple[str, str]] = []
    if not smap.may_match(value):
        return value, changes
    out, pos = [], 0
    for spec in address_specs(value):
        if spec.domain.startswith("["):
            continue
        try:
            local = spec.local.encode("latin-1").decode("utf-8")
            domain = normalize_domain(spec.domain.encode("latin-1").decode("utf-8"))
        except (UnicodeError, AddressError):
            continue
        r = smap.lookup(local, domain)
        if r is None:
            continue
        # masquerading keeps the local part as it is written (quoting, 8-bit)
        new = f"{value[spec.start : spec.local_end]}@{r.domain}" if r.domain else r.address
        out.append(value[pos : spec.start])
        out.append(new)
        pos = spec.end
        changes.append((value[spec.start : spec.end], new))
    out.append(value[pos:])
    return "".join(out), changes


def _fields(block: bytes) -> list[bytes]:
    """The header block cut into fields (each with its folded lines and CRLF)."""
    lines = block.split(b"\r\n")
    last = lines.pop()  # b"" when the block ends with CRLF
    fields: list[list[bytes]] = []
    for line in lines:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    out = [b"\r\n".join(f) + b"\r\n" for f in fields]
    if last:
        if last[:1] in (b" ", b"\t") and out:
            out[-1] += last
        else:
            out.append(last)
    return out


def rewrite_header_block(block: bytes, smap: SenderMap,
                         names: tuple[bytes, ...] = REWRITTEN_HEADERS) -> tuple[bytes, list[Change], list[str]]:
    """The header block with the addresses of the headers names (lower case;
    From/Sender/Reply-To unless told) rewritten; the
    changes, and the problems (headers left as they are).  A header whose
    text cannot hold an address of the map (``SenderMap.may_match``) is not
    parsed: it is left as it is, and not reported even if malformed."""
    changes: list[Change] = []
    problems: list[str] = []
    out: list[bytes] = []
    for f in _fields(block):
        name, colon, value = f.partition(b":")
        if not colon or name.strip().lower() not in names:
            out.append(f)
            continue
        shown = name.decode("latin-1").strip()
        try:
            new, done = rewrite_value(value.decode("latin-1"), smap)
        except Unparsable as e:
            problems.append(f"{shown} header not rewritten: it does not parse as an address list ({e})")
            out.append(f)
            continue
        out.append(name + b":" + new.encode("latin-1") if done else f)
        changes.extend(Change(shown, old, n) for old, n in done)
    return b"".join(out), changes, problems


class HeaderStage:
    """The streaming stage both writers put the message through (the SMTP
    DATA in relay.smtp.transfer, the pickup's copy): the header block is held
    (up to MAX_HEADER_BLOCK) and rewritten, the body passes untouched.
    names: the headers rewritten (STAGE_HEADERS: Resent-From and
    Resent-Sender too)."""

    __slots__ = ("smap", "limit", "buf", "done", "changes", "problems", "names")

    def __init__(self, smap: SenderMap, limit: int = MAX_HEADER_BLOCK, names: tuple[bytes, ...] = STAGE_HEADERS):
        self.smap = smap
        self.names = names
        self.limit = limit
        self.buf = bytearray()
        self.done = False
        self.changes: list[Change] = []
        self.problems: list[str] = []

    def feed(self, data: bytes) -> bytes:
        """What may be written now."""
        if self.done:
            return data
        buf = self.buf
        seen = len(buf)
        buf += data
        if buf.startswith(b"\r\n"):
            end = 0
        else:
            # searched from where the last chunk ended (less a separator's length):
            # a header block fed a line at a time costs linear time
            i = buf.find(b"\r\n\r\n", max(0, seen - 3))
            end = i + 2 if i >= 0 else -1
        if end < 0:
            if len(buf) > self.limit:
                self.done, self.buf = True, bytearray()
                self.problems.append(f"headers not rewritten: the header block is larger than {self.limit} octets")
                return bytes(buf)
            return b""
        self.done, self.buf = True, bytearray()
        return self._rewrite(bytes(buf[:end])) + bytes(buf[end:])

    def finish(self) -> bytes:
        """At the end of the message: what is still held (a message without a body)."""
        if self.done:
            return b""
        self.done, buf, self.buf = True, self.buf, bytearray()
        return self._rewrite(bytes(buf))

    def _rewrite(self, block: bytes) -> bytes:
        new, changes, problems = rewrite_header_block(block, self.smap, self.names)
        self.changes.extend(changes)
        self.problems.extend(problems)
        return new


def log_rewrites(log: Any, queue_id: str, stage: HeaderStage) -> None:
    """The log lines of what a HeaderStage did (a twisted.logger.Logger)."""
    for c in stage.changes:
        log.info("{queue_id}: {header} header <{orig_address}> rewritten to <{address}>", queue_id=queue_id,
                 header=c.header, orig_address=c.old, address=c.new)
    for p in stage.problems:
        log.warn("{queue_id}: {problem}", queue_id=queue_id, problem=p)
