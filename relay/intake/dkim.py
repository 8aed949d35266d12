"""DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463), streaming.

Why our own signer and not dkimpy's ``sign``: dkimpy takes the whole message
as one bytes object, and the relay must sign a 100 MB message within the
memory bound it accepts it in.  So the body hash is computed from the spool
file in chunks (``CHUNK``, 64 KiB), the header block is read on its own (at
most ``MAX_HEADER_BYTES``: past that the message is refused with
MessageError), both by relay.intake.dkimcanon (the canonicalisations), and
only the ``DKIM-Signature:`` header comes back, as bytes (folded lines of at
most 78 characters, CRLF; only a tag value longer than a line, a very long
d=, is not cut) to be prepended to the stored message.

Pure code, blocking (it reads the file): the caller runs it in a thread.

- ``load_key`` reads and checks a PEM private key file (each problem a
  KeyFileError naming the file; an RSA key under 2048 bits signs but carries
  a warning for the caller to log).
- ``choose_keys`` decides from the From header whether and with which keys a
  message is signed; a message that cannot be (no From, several, one that
  does not parse, no key for its domain) gets a ``Choice`` with a reason,
  never an exception: such mail is sent unsigned, not lost.
- ``sign_message`` is intake's one call: keys chosen, signatures made.
  ``sign`` makes one signature; ``sign_many`` several (key rotation: two
  selectors of one domain) with one read of the body.  No signature covers
  another: DKIM-Signature is not in the signed set (``header_list`` refuses
  it), so the second, prepended above the first, breaks neither; verifiers
  check each signature on its own (RFC 6376 section 4.2).

No ``l=`` (a body length limit lets anyone append text under the signature)
and no ``x=``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import stat
import time
from base64 import b64encode
from dataclasses import dataclass, field
from email.errors import InvalidHeaderDefect
from email.headerregistry import HeaderRegistry
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence, Union

import idna
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relay.intake.dkimcanon import (
    CHUNK,
    FIELD_NAME,
    MAX_HEADER_BYTES,
    DKIMError,
    HeaderField,
    MessageError,
    body_hash,
    body_hash_of,
    canonicalize_header,
    header_block_of,
    parse_canonicalization,
    parse_header_fields,
    read_header_block,
)

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)
DEFAULT_CANONICALIZATION = "relaxed/relaxed"
# issue 14's set; From twice: a second From added below ours breaks the signature
DEFAULT_HEADERS = ("From", "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "MIME-Version",
                   "Content-Type", "Content-Transfer-Encoding", "In-Reply-To", "References")
MAX_KEY_FILE = 64 * 1024  # a PEM key is a few KiB; more is not a key (and not read into memory)
RSA_MIN_BITS = 1024  # RFC 8301: verifiers must not accept less
RSA_GOOD_BITS = 2048  # RFC 8301: signers should use at least this
LINE_WIDTH = 78
MAX_FROM = 16 * 1024  # a From header past this is not parsed (the stdlib's parser is slow on huge input)

# the reasons a message is not signed (Choice.reason), stable words for logs and counters
BAD_HEADER = "header block cannot be signed"
NO_FROM = "no From header"
SEVERAL_FROM = "several From headers"
BAD_FROM = "From header does not parse"
NO_KEY = "no signing key for the From domain"

PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]


class KeyFileError(DKIMError):
    """A key file that cannot be used; the message names the file (a config error at start and reload)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------- keys

@dataclass(frozen=True)
class SigningKey:
    """One selector's key: what signs for ``domain`` as ``s=selector``."""

    domain: str  # d=, lower case, A-labels
    selector: str
    algorithm: str  # RSA_SHA256 or ED25519_SHA256
    private_key: PrivateKey = field(repr=False, compare=False)
    path: str = ""
    warnings: tuple[str, ...] = ()  # for the caller to log (a short RSA key)

    def sign(self, data: bytes) -> bytes:
        """The b= bytes for data: RSASSA-PKCS1-v1_5 over SHA-256, or, for
        Ed25519, PureEdDSA over the SHA-256 of data (RFC 8463 section 3)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.private_key.sign(hashlib.sha256(data).digest())


def read_key_file(path: str) -> bytes:
    """The bytes of a private key file, refused (KeyFileError) when it is
    missing, unreadable, not a regular file, too large or open to the group or
    others: a key others can read is a key others can sign with.  A symbolic
    link is followed (keys are often linked into place); the mode checked is
    that of the file opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(path, "no such file (make one with `relayctl dkim keygen`)")
    except PermissionError:
        raise KeyFileError(path, f"not readable by this user (uid {os.getuid()}); it must belong to the relay's user")
    except OSError as e:
        raise KeyFileError(path, f"cannot be opened: {e.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(path, "not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(path, f"mode {stat.S_IMODE(st.st_mode):04o} lets the group or others at the private key;"
                                     f" chmod 600 it")
        data = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(path, f"cannot be read: {e.strerror}")
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(path, f"not a key (larger than {MAX_KEY_FILE} bytes)")
    return data


def parse_private_key(path: str, data: bytes, algorithm: str) -> tuple[PrivateKey, tuple[str, ...]]:
    """The key in PEM data (PKCS#8 or traditional RSA) and its warnings,
    checked against the algorithm it is configured for."""
    if algorithm not in ALGORITHMS:
        raise KeyFileError(path, f"unknown algorithm {algorithm!r} (expected one of {', '.join(ALGORITHMS)})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(path, "the key is encrypted with a passphrase; the relay needs an unencrypted PEM key")
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(path, "not a PEM private key (expected PKCS#8 'BEGIN PRIVATE KEY'"
                                 " or 'BEGIN RSA PRIVATE KEY')")
    if isinstance(key, rsa.RSAPrivateKey):
        kind = RSA_SHA256
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kind = ED25519_SHA256
    else:
        raise KeyFileError(path, f"not an RSA or Ed25519 key ({type(key).__name__}); DKIM signs with"
                                 f" {RSA_SHA256} or {ED25519_SHA256}")
    if kind != algorithm:
        raise KeyFileError(path, f"an {'RSA' if kind == RSA_SHA256 else 'Ed25519'} key, configured for {algorithm}")
    warnings: tuple[str, ...] = ()
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise KeyFileError(path, f"an RSA key of {key.key_size} bits: verifiers refuse keys under {RSA_MIN_BITS}"
                                     f" bits (RFC 8301); make a {RSA_GOOD_BITS}-bit one")
        if key.key_size < RSA_GOOD_BITS:
            warnings = (f"{path}: an RSA key of {key.key_size} bits; some verifiers ignore keys under"
                        f" {RSA_GOOD_BITS} bits (RFC 8301): rotate to a {RSA_GOOD_BITS}-bit key",)
    return key, warnings


def load_key(path: str, domain: str, selector: str, algorithm: str = RSA_SHA256) -> SigningKey:
    """A checked SigningKey from a PEM file (KeyFileError naming the file
    otherwise; ValueError for a domain or selector that is no DNS name)."""
    d = normalize_domain(domain)
    if d is None:
        raise ValueError(f"{domain!r} is not a domain name")
    sel = selector.strip().lower()
    if not sel or normalize_domain(sel) != sel:
        raise ValueError(f"{selector!r} is not a selector (DNS labels: letters, digits, hyphens)")
    key, warnings = parse_private_key(path, read_key_file(path), algorithm)
    return SigningKey(d, sel, algorithm, key, path, warnings)


@functools.lru_cache(maxsize=16)
def _checked(names: tuple[str, ...]) -> tuple[str, ...]:
    return header_list(names)


def header_list(names: Iterable[str]) -> tuple[str, ...]:
    """A configured set of headers to sign, checked (ValueError): field
    names, From among them (RFC 6376 5.4: it must be signed), no
    DKIM-Signature (a signature covering another breaks with it)."""
    out = tuple(n.strip() for n in names)
    for n in out:
        if not n.isascii() or not FIELD_NAME.fullmatch(n.encode("ascii")) or ";" in n:
            raise ValueError(f"{n!r} is not a header field name")
    lowered = [n.lower() for n in out]
    if "from" not in lowered:
        raise ValueError("the signed headers must include From (RFC 6376 section 5.4)")
    if "dkim-signature" in lowered:
        raise ValueError("DKIM-Signature is not signed: a second signature would break the first")
    return out


@functools.lru_cache(maxsize=16)
def _wanted(names: tuple[str, ...]) -> tuple[tuple[bytes, str, int], ...]:
    """(name in lower case, its first spelling, times configured), in the configured order."""
    wanted: dict[bytes, tuple[str, int]] = {}
    for n in names:
        key = n.lower().encode("ascii")
        spelling, times = wanted.get(key, (n, 0))
        wanted[key] = (spelling, times + 1)
    return tuple((key, spelling, times) for key, (spelling, times) in wanted.items())


def headers_to_sign(fields: Sequence[HeaderField], names: Sequence[str]) -> list[tuple[str, HeaderField | None]]:
    """(name for h=, the field it covers, None where it oversigns), in RFC 6376 5.4.2's order.

    Each configured name that the message has is signed in every instance,
    the last first (a verifier takes them bottom up); a name configured k
    times is listed at least k times, the entries past its instances
    covering nothing: a header of that name added later breaks the signature
    (From twice).  Names the message lacks are left out, but From, which h=
    must name (RFC 6376 3.5): a message without one is still signed right."""
    present: dict[bytes, list[HeaderField]] = {}
    for fld in fields:
        present.setdefault(fld.name.lower(), []).append(fld)
    out: list[tuple[str, HeaderField | None]] = []
    for key, spelling, times in _wanted(tuple(names)):
        instances = present.get(key)
        if instances is None and key != b"from":
            continue
        n = 0
        for fld in reversed(instances or ()):
            out.append((spelling, fld))
            n += 1
        if times > n:
            out.extend([(spelling, None)] * (times - n))
    return out


# ---------------------------------------------------------------- which key signs

@dataclass(frozen=True)
class Choice:
    """What to sign a message with: keys, or a reason (BAD_HEADER, NO_FROM,
    SEVERAL_FROM, BAD_FROM, NO_KEY) and a detail for the log when it is not signed."""

    keys: tuple[SigningKey, ...] = ()
    domain: str | None = None  # the From address's domain
    reason: str | None = None
    detail: str = ""

    @property
    def signed(self) -> bool:
        return bool(self.keys)


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_domain(domain: str) -> str | None:
    """A domain in lower case A-labels without a final dot, None if it is no domain name."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        try:
            d = idna.encode(d, uts46=True).decode("ascii")
        except (idna.IDNAError, ValueError):
            return None
    labels = d.split(".")
    if not d or len(d) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return d


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_WORD = rf'(?:{_ATEXT}|"[^"\\\r\n]*")'
# the common forms, ``addr@domain`` and ``Words "or quoted" <addr@domain>`` (no comments, no obsolete
# syntax): a subset of RFC 5322's mailbox that the full parser reads alike, at a tenth of its cost
_PLAIN_FROM = re.compile(rf"[ \t]*(?:(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<{_DOT_ATOM}@({_DOT_ATOM})>"
                         rf"|{_DOT_ATOM}@({_DOT_ATOM}))[ \t]*")
_FROM_HEADER = HeaderRegistry()["from"]  # the class, made once (the registry makes one per lookup)


def from_domain(value: bytes) -> str:
    """The domain of a From header's value (ValueError saying why there is none)."""
    if len(value) > MAX_FROM:
        raise ValueError(f"longer than {MAX_FROM} bytes")
    text = value.replace(b"\r\n", b"").decode("utf-8", "replace")
    m = _PLAIN_FROM.fullmatch(text)
    if m:
        d = normalize_domain(m.group(1) or m.group(2))
        if d is not None:
            return d
    try:
        header = _FROM_HEADER("from", text)
        addresses = header.addresses  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - the stdlib parser fails in many ways on bad input
        raise ValueError(f"unparsable ({type(e).__name__})")
    if any(isinstance(d, InvalidHeaderDefect) for d in header.defects):
        raise ValueError("not an address list")
    if not addresses:
        raise ValueError("no address")
    domains = set()
    for a in addresses:
        d = normalize_domain(a.domain) if a.username and a.domain else None
        if d is None:
            raise ValueError(f"no domain name in {a.addr_spec!r}")
        domains.add(d)
    if len(domains) > 1:
        raise ValueError(f"addresses in several domains ({', '.join(sorted(domains))})")
    return domains.pop()


MAX_CACHED_FROM = 256  # From values up to this length have their domain remembered


def _domain_or_error(value: bytes) -> tuple[str | None, str]:
    """from_domain's answer as (domain, "") or (None, why there is none)."""
    try:
        return from_domain(value), ""
    except ValueError as e:
        return None, str(e)


# the same for a From value seen before: a device sends the same From with each message, and
# parsing it is a sizable part of the job's Python (issue 14)
_cached_domain_or_error = functools.lru_cache(maxsize=1024)(_domain_or_error)


def choose_keys(fields: Sequence[HeaderField], keys: Mapping[str, Sequence[SigningKey]]) -> Choice:
    """Which keys sign a message, from its From header (never raises).

    keys: the signing domains (normalize_domain's form) and their keys.  The
    From domain's own keys, else those of the nearest parent configured
    (mail from nas.example.org signs as example.org: aligned for DMARC's
    relaxed mode)."""
    froms = [f for f in fields if f.name.lower() == b"from"]
    if not froms:
        return Choice(reason=NO_FROM)
    if len(froms) > 1:
        return Choice(reason=SEVERAL_FROM, detail=f"{len(froms)} From headers")
    value = froms[0].value
    parsed, error = (_cached_domain_or_error if len(value) <= MAX_CACHED_FROM else _domain_or_error)(value)
    if parsed is None:
        return Choice(reason=BAD_FROM, detail=error)
    domain = parsed
    labels = domain.split(".")
    for i in range(len(labels)):
        found = keys.get(".".join(labels[i:]))
        if found:
            return Choice(keys=tuple(found), domain=domain)
    return Choice(domain=domain, reason=NO_KEY, detail=domain)


# ---------------------------------------------------------------- the signature

class _Folder:
    """Lines of at most LINE_WIDTH characters, folded where the tag syntax allows FWS."""

    def __init__(self, first: str):
        self.lines = [first]

    def add(self, atom: str, sep: str = " ") -> None:
        if len(self.lines[-1]) + len(sep) + len(atom) <= LINE_WIDTH:
            self.lines[-1] += sep + atom
        else:
            self.lines.append("\t" + atom)

    def add_base64(self, text: str) -> None:
        """base64 folds anywhere (RFC 6376 2.4: FWS is allowed in it)."""
        while text:
            room = LINE_WIDTH - len(self.lines[-1])
            if room <= 0:
                self.lines.append("\t")
                continue
            self.lines[-1] += text[:room]
            text = text[room:]


def _header_fields(tags: tuple[str, str, str], c: tuple[str, str], timestamp: str, names: Sequence[str],
                   bh: str) -> _Folder:
    """The DKIM-Signature header up to its empty b= (tags: a=, d=, s=; bh: in base64)."""
    algorithm, domain, selector = tags
    out = _Folder("DKIM-Signature:")
    for atom in ("v=1;", f"a={algorithm};", f"c={c[0]}/{c[1]};", f"d={domain};", f"s={selector};",
                 f"t={timestamp};"):
        out.add(atom)
    for i, name in enumerate(names):
        out.add(("h=" if i == 0 else ":") + name + (";" if i == len(names) - 1 else ""), " " if i == 0 else "")
    out.add("bh=")
    out.add_base64(bh)
    out.lines[-1] += ";"
    out.add("b=")
    return out


# The header's layout depends only on lengths: of t= (10 digits until 2286), of bh= (44 base64
# characters), of b= (fixed by the key) and of the rest, which is the same for every message of
# a key and h= list.  So it is folded once, with marks in place of those three values
# (``_Template``), and each message's values are put in the marks' places: the same bytes as
# folding each header anew, at a fraction of the cost (issue 14: signing under 15% of the
# accept rate).  Marks are control characters no tag value holds (d=, s=, h= are checked
# names), kept as they are by both canonicalisations.
_T, _BH, _B = 0, 1, 2
_MARKS = (b"\x01", b"\x02", b"\x03")
_Piece = tuple[bytes, int, int]  # (literal, -1, 0) or (b"", which value, how many of its bytes)


def _pieces(text: bytes) -> tuple[_Piece, ...]:
    """text cut into literals and runs of marks."""
    out: list[_Piece] = []
    for part in re.split(rb"(\x01+|\x02+|\x03+)", text):
        if part[:1] in _MARKS:
            out.append((b"", _MARKS.index(part[:1]), len(part)))
        elif part:
            out.append((part, -1, 0))
    return tuple(out)


def _fill(pieces: tuple[_Piece, ...], values: tuple[bytes, ...]) -> bytes:
    pos = [0, 0, 0]
    out = []
    for literal, which, n in pieces:
        if which < 0:
            out.append(literal)
        else:
            p = pos[which]
            out.append(values[which][p:p + n])
            pos[which] = p + n
    return b"".join(out)


@dataclass(frozen=True)
class _Template:
    own: tuple[_Piece, ...]  # this header canonicalised, b= empty, no final CRLF: the end of the signed data
    header: tuple[_Piece, ...]  # the header as stored, CRLF-ended


def _signature_length(key: SigningKey) -> int:
    """The length of b= in base64: an RSA signature has the modulus' bytes, an Ed25519 one 64."""
    n = (key.private_key.key_size + 7) // 8 if isinstance(key.private_key, rsa.RSAPrivateKey) else 64
    return (n + 2) // 3 * 4


@functools.lru_cache(maxsize=256)  # by names, not SigningKey: no private key outlives a reload here
def _template(tags: tuple[str, str, str], c: tuple[str, str], names: tuple[str, ...],
              lengths: tuple[int, int, int]) -> _Template:
    """tags: (a=, d=, s=); lengths: of t=, bh= and b=."""
    folder = _header_fields(tags, c, "\x01" * lengths[_T], names, "\x02" * lengths[_BH])
    unsigned = "\r\n".join(folder.lines).encode("ascii") + b"\r\n"
    own = canonicalize_header(HeaderField(b"DKIM-Signature", unsigned), c[0])[:-2]
    folder.add_base64("\x03" * lengths[_B])
    return _Template(_pieces(own), _pieces("\r\n".join(folder.lines).encode("ascii") + b"\r\n"))


def signature_header(key: SigningKey, fields: Sequence[HeaderField], bh: bytes, *, timestamp: int,
                     headers: Sequence[str] = DEFAULT_HEADERS,
                     canonicalization: str = DEFAULT_CANONICALIZATION) -> bytes:
    """The DKIM-Signature header (CRLF-ended bytes) over fields and the body hash bh (RFC 6376 3.7).

    The signed data: each signed field canonicalised, in h= order, then this
    header with b= empty and without its final CRLF; b= is then added to
    exactly the text that was hashed."""
    c = parse_canonicalization(canonicalization)
    chosen = headers_to_sign(fields, _checked(tuple(headers)))
    t, bh64, b_len = str(timestamp).encode("ascii"), b64encode(bh), _signature_length(key)
    tpl = _template((key.algorithm, key.domain, key.selector), c, tuple(n for n, _ in chosen),
                    (len(t), len(bh64), b_len))
    data = b"".join(canonicalize_header(f, c[0]) for _, f in chosen if f is not None) + _fill(tpl.own, (t, bh64))
    b = b64encode(key.sign(data))
    if len(b) != b_len:  # cannot be (see _signature_length); never a wrong header over it
        raise DKIMError(f"a signature of {len(b)} base64 characters, expected {b_len}")
    return _fill(tpl.header, (t, bh64, b))


def _sign_file(path: str, offset: int, pick: Callable[[list[HeaderField]], Choice], timestamp: int | None,
               headers: Sequence[str], canonicalization: str, chunk_size: int,
               max_header: int) -> tuple[Choice, list[bytes]]:
    """The header block read once, the keys pick gives, the body hashed once, a signature per key."""
    with open(path, "rb", buffering=0) as f:
        return _sign_open(f, offset, pick, timestamp, headers, canonicalization, chunk_size, max_header)


def _sign_open(f: BinaryIO, offset: int, pick: Callable[[list[HeaderField]], Choice], timestamp: int | None,
               headers: Sequence[str], canonicalization: str, chunk_size: int,
               max_header: int) -> tuple[Choice, list[bytes]]:
    c = parse_canonicalization(canonicalization)
    t = int(time.time()) if timestamp is None else timestamp
    data = f.getvalue() if isinstance(f, io.BytesIO) else None  # held in memory: no reads, no copies
    if data is not None:
        block, body_start = header_block_of(data, offset, max_header)
    else:
        block, body_start = read_header_block(f, offset, max_header)
    fields = parse_header_fields(block)
    choice = pick(fields)
    if not choice.signed:
        return choice, []
    bh = body_hash_of(data, body_start, c[1]) if data is not None else body_hash(f, body_start, c[1], chunk_size)
    return choice, [signature_header(k, fields, bh, timestamp=t, headers=headers, canonicalization=canonicalization)
                    for k in choice.keys]


def sign_message(path: str, offset: int, keys: Mapping[str, Sequence[SigningKey]], *, timestamp: int | None = None,
                 headers: Sequence[str] = DEFAULT_HEADERS, canonicalization: str = DEFAULT_CANONICALIZATION,
                 chunk_size: int = CHUNK, max_header: int = MAX_HEADER_BYTES) -> tuple[Choice, list[bytes]]:
    """Intake's one call for a trusted message in path from offset to its end
    (CRLF line ends, as it will be sent): the keys chosen (choose_keys), a
    signature per key.  A message that is not signed, a header block that
    cannot be (BAD_HEADER) included, is a Choice with its reason and no
    signatures: never an exception for what the message holds (OSError as
    the file gives it)."""
    try:
        return _sign_file(path, offset, lambda fields: choose_keys(fields, keys), timestamp, headers,
                          canonicalization, chunk_size, max_header)
    except MessageError as e:
        return Choice(reason=BAD_HEADER, detail=str(e)), []


def sign_open(f: BinaryIO, offset: int, keys: Mapping[str, Sequence[SigningKey]], *, timestamp: int | None = None,
              headers: Sequence[str] = DEFAULT_HEADERS, canonicalization: str = DEFAULT_CANONICALIZATION,
              chunk_size: int = CHUNK, max_header: int = MAX_HEADER_BYTES) -> tuple[Choice, list[bytes]]:
    """sign_message for a file already open (seekable, binary; an io.BytesIO
    for a message held in memory)."""
    try:
        return _sign_open(f, offset, lambda fields: choose_keys(fields, keys), timestamp, headers,
                          canonicalization, chunk_size, max_header)
    except MessageError as e:
        return Choice(reason=BAD_HEADER, detail=str(e)), []


def sign_many(path: str, offset: int, keys: Sequence[SigningKey], *, timestamp: int | None = None,
              headers: Sequence[str] = DEFAULT_HEADERS, canonicalization: str = DEFAULT_CANONICALIZATION,
              chunk_size: int = CHUNK, max_header: int = MAX_HEADER_BYTES) -> list[bytes]:
    """One DKIM-Signature header per key (the body read once), whatever the
    From header says.  Prepend them in any order: none covers another.
    MessageError when the header block cannot be signed."""
    return _sign_file(path, offset, lambda fields: Choice(keys=tuple(keys)), timestamp, headers,
                      canonicalization, chunk_size, max_header)[1]


def sign(path: str, offset: int, key: SigningKey, *, timestamp: int | None = None,
         headers: Sequence[str] = DEFAULT_HEADERS, canonicalization: str = DEFAULT_CANONICALIZATION,
         chunk_size: int = CHUNK, max_header: int = MAX_HEADER_BYTES) -> bytes:
    """The DKIM-Signature header for one key (see sign_many)."""
    return sign_many(path, offset, [key], timestamp=timestamp, headers=headers,
                     canonicalization=canonicalization, chunk_size=chunk_size, max_header=max_header)[0]
