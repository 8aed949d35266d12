"""RFC 5321 mailbox parsing and normalising.

Every address the relay acts on passes through here, so that "who may relay
what" (policy) and "where does it go" (routing) always see one canonical
form: the domain lower-cased, without a trailing dot, IDNA-encoded to
A-labels; the local part exactly as sent (only its needless quoting
removed; a UTF-8 one, RFC 6531, in Unicode NFC so that one name has one
spelling).  A non-ASCII address is only parsed when the caller says it may
be (``utf8``: the SMTP transaction said SMTPUTF8, or a local source); else
it is refused with 5.6.7 as RFC 6531 3.7.4.1 prescribes.  Sender-specified
routing is made visible (``has_routing``) so that policy can refuse it
instead of honouring it.  No Twisted here: this module
is plain Python and tested as such.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_ATOM = f"[{_ATEXT}]+"
DOT_STRING = re.compile(f"{_ATOM}(?:\\.{_ATOM})*\\Z")
# RFC 6531 3.3: atext =/ UTF8-non-ascii (the characters that are not allowed
# are refused before, by _bad_unicode)
_UTF8_ATOM = f"[\u0080-\U0010ffff{_ATEXT}]+"
UTF8_DOT_STRING = re.compile(f"{_UTF8_ATOM}(?:\\.{_UTF8_ATOM})*\\Z")
# RFC 6531 3.7.4.1 (and RFC 5248's X.6.7): the reply to a non-ASCII address
# in a transaction without SMTPUTF8
NOT_ASCII = "Non-ASCII addresses not permitted for that sender/recipient"
# Unicode categories never accepted in an address: controls (C0, DEL, C1),
# surrogates, private use, unassigned, separators other than the ASCII space
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
# bidirectional embedding, override and isolate controls: they make an
# address display as another one (the "Trojan Source" class)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# ESMTP parameter keyword and value (RFC 5321 4.1.2, esmtp-keyword/esmtp-value)
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")


class AddressError(ValueError):
    """An address that cannot be accepted; carries an enhanced status code."""

    def __init__(self, message: str, status: str = "5.1.3"):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Address:
    """A mailbox: local part and normalised domain.

    ``literal`` is set for an address-literal domain ("[192.0.2.1]"), whose
    ``domain`` holds the bracketed text with the IP in canonical form.
    """

    local: str
    domain: str
    literal: bool = False

    def __str__(self) -> str:
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def has_routing(self) -> bool:
        """True if the local part carries sender-specified routing (%, !, @)."""
        return any(c in self.local for c in "%!@")

    @property
    def literal_ip(self) -> str | None:
        if not self.literal:
            return None
        inner = self.domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        return inner

    def lower(self) -> str:
        """The form used for lookups of local users and aliases."""
        return f"{quote_local(fold_local(self.local))}@{self.domain}"

    @property
    def utf8(self) -> bool:
        """Whether the address needs SMTPUTF8 (its local part is not ASCII;
        the domain is always stored in A-labels)."""
        return not self.local.isascii()


def fold_local(local: str) -> str:
    """A local part lower-cased for lookups (ASCII: str.lower as always; a
    UTF-8 one NFC again afterwards, as lower-casing can undo it)."""
    low = local.lower()
    return low if low.isascii() else unicodedata.normalize("NFC", low)


def _bad_unicode(text: str) -> str | None:
    """The first non-ASCII character of ``text`` that no address may hold."""
    for c in text:
        if ord(c) > 127 and (unicodedata.category(c) in _BAD_CATEGORIES or c in _BIDI_CONTROLS):
            return c
    return None


def display_domain(domain: str) -> str:
    """A stored (A-label) domain in the form people read: U-labels where
    the A-labels decode, else as it is.  For display only, never for
    decisions."""
    if "xn--" not in domain:
        return domain
    try:
        return idna.decode(domain)
    except (idna.IDNAError, UnicodeError):
        return domain


def display_address(address: str) -> str:
    """"local@domain" with the domain shown in U-labels (display_domain)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{display_domain(domain)}" if at else address


def login_key(name: str) -> str:
    """The canonical user name of a login name (AUTH, POP3 USER): ASCII
    names lower-cased as always; a UTF-8 name NFC, lower-cased, its domain
    in A-labels, so "JÖRG@Bücher.example" logs in as the user
    "jörg@xn--bcher-kva.example" (RFC 6531 does not change SASL: PLAIN
    carries the name in UTF-8)."""
    s = name.strip()
    if s.isascii():
        return s.lower()
    s = unicodedata.normalize("NFC", s)
    local, at, domain = s.rpartition("@")
    if not at:
        return fold_local(s)
    try:
        domain = normalize_domain(domain)
    except AddressError:
        domain = domain.lower()
    return f"{fold_local(local)}@{domain}"


def quote_local(local: str) -> str:
    if DOT_STRING.match(local) or (not local.isascii() and UTF8_DOT_STRING.match(local)):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def normalize_domain(text: str) -> str:
    """Return the canonical A-label form of a domain name, or raise AddressError."""
    if not isinstance(text, str):
        raise AddressError("domain must be a string")
    d = text.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d:
        raise AddressError("empty domain")
    if any(ord(c) > 127 for c in d):
        try:
            d = idna.encode(d, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise AddressError(f"invalid international domain {text!r}: {e}")
    d = d.lower()
    if len(d) > MAX_DOMAIN - 2:
        raise AddressError(f"domain {text!r} is too long")
    for label in d.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"invalid domain {text!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as e:
                raise AddressError(f"invalid international domain {text!r}: {e}")
    return d


def _normalize_literal(text: str) -> str:
    inner = text[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            if "%" in inner:  # a scope id names an interface of the sender's host
                raise ValueError("scope id")
            ip = ipaddress.IPv6Address(inner[5:])
            return f"[IPv6:{ip.compressed}]"
        ip4 = ipaddress.IPv4Address(inner)
        return f"[{ip4}]"
    except ValueError:
        raise AddressError(f"invalid address literal {text!r}")


def _parse_local(text: str, utf8: bool = False) -> str:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise AddressError("unterminated quoted local part")
        out = []
        i = 1
        end = len(text) - 1
        while i < end:
            c = text[i]
            if c == "\\":
                if i + 1 >= end:
                    raise AddressError("bad quoted pair in local part")
                nxt = text[i + 1]
                if not (32 <= ord(nxt) <= 126):
                    raise AddressError("bad quoted pair in local part")
                out.append(nxt)
                i += 2
                continue
            if c == '"' or not (32 <= ord(c) <= 126 or (utf8 and ord(c) > 127)):
                raise AddressError("bad character in quoted local part")
            out.append(c)
            i += 1
        local = "".join(out)
    else:
        if not (DOT_STRING if not utf8 else UTF8_DOT_STRING).match(text):
            raise AddressError(f"invalid local part {text!r}")
        local = text
    if not local:
        raise AddressError("empty local part")
    if len(local) > MAX_LOCAL or (not local.isascii() and len(local.encode("utf-8")) > MAX_LOCAL):
        raise AddressError("local part longer than 64 octets")
    return local


def _split_mailbox(text: str) -> tuple[str, str]:
    """Split at the '@' that separates local part and domain (outside quotes)."""
    if text.startswith('"'):
        # find the closing quote, honouring quoted pairs
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        local, rest = text[: i + 1], text[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("missing @domain after the local part")
        return local, rest[1:]
    if text.count("@") != 1:
        if "@" not in text:
            raise AddressError("missing @domain")
        raise AddressError("more than one @ in address")
    local, domain = text.split("@")
    return local, domain


def parse_mailbox(text: str, utf8: bool = False) -> Address:
    """Parse "local@domain" (no angle brackets).  ``utf8``: a UTF-8 local
    part and U-label domain are accepted (RFC 6531; the local part NFC, the
    domain to A-labels); else a non-ASCII address is refused with 5.6.7."""
    if not text.isascii():
        if not utf8:
            raise AddressError(NOT_ASCII, "5.6.7")
        text = unicodedata.normalize("NFC", text)
        bad = _bad_unicode(text)
        if bad is not None:
            raise AddressError(f"character U+{ord(bad):04X} is not allowed in an address")
    if any(ord(c) < 33 or ord(c) == 127 for c in text if c != " ") or (
        " " in text and not text.startswith('"')
    ):
        raise AddressError("invalid character in address")
    local, domain = _split_mailbox(text)
    loc = _parse_local(local, utf8)
    if " " in domain:  # only a quoted local part may hold a space
        raise AddressError("invalid character in address")
    if domain.startswith("[") and domain.endswith("]"):
        return Address(loc, _normalize_literal(domain), literal=True)
    if not domain:
        raise AddressError("missing domain")
    return Address(loc, normalize_domain(domain))


def parse_path(text: str, *, allow_null: bool = False, utf8: bool = False) -> Address | None:
    """Parse an RFC 5321 path as found after "MAIL FROM:" or "RCPT TO:".

    Returns None for the null path "<>" when allow_null.  A source route
    ("<@a,@b:user@c>") is dropped: the address is the mailbox it names.
    Angle brackets are required, as in Postfix with strict envelopes off we
    also take a bare mailbox without them.
    """
    t = text.strip()
    if not t:
        # "MAIL FROM:" with nothing after it: a syntax error, not the null path
        raise AddressError("missing address")
    if t.startswith("<"):
        if not t.endswith(">"):
            raise AddressError("missing closing '>' in path")
        t = t[1:-1]
    if len(t) > MAX_PATH or (not t.isascii() and len(t.encode("utf-8")) > MAX_PATH):
        raise AddressError("path longer than 256 octets")
    if not t:
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if t.startswith("@"):
        colon = t.find(":")
        if colon < 0:
            raise AddressError("bad source route")
        for hop in t[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            if not utf8 and not hop.isascii():
                raise AddressError(NOT_ASCII, "5.6.7")
            normalize_domain(hop[1:])
        t = t[colon + 1 :]
    return parse_mailbox(t, utf8)


def split_command_argument(arg: str) -> tuple[str, dict[str, str | None]]:
    """Split "<path> KEY=VALUE KEY" into the path text and ESMTP parameters.

    Keys are upper-cased.  Raises AddressError for malformed parameters.
    """
    arg = arg.lstrip()
    if arg.startswith("<"):
        # the path ends at the first '>' outside a quoted string
        i, inq = 1, False
        while i < len(arg):
            c = arg[i]
            if inq and c == "\\":
                i += 2
                continue
            if c == '"':
                inq = not inq
            elif c == ">" and not inq:
                break
            i += 1
        else:
            raise AddressError("missing closing '>' in path", "5.5.4")
        path, rest = arg[: i + 1], arg[i + 1 :]
    else:
        # a bare mailbox (no brackets): it ends at the first space
        path, sep, rest = arg.partition(" ")
        rest = sep + rest
    params: dict[str, str | None] = {}
    if not rest.isascii():  # ESMTP parameters are ASCII (and str.split would split at U+00A0)
        raise AddressError("non-ASCII characters in parameters", "5.5.4")
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after path", "5.5.4")
    for tok in rest.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            if not _PARAM_VALUE.match(v):
                raise AddressError(f"bad value for parameter {k}", "5.5.4")
        else:
            k, v = tok, None
        if not _PARAM_KEY.match(k):
            raise AddressError(f"bad parameter {tok!r}", "5.5.4")
        params[k.upper()] = v
    return path, params
