"""DKIM keys: making them, the DNS record to publish, and checking a published one.

What ``relayctl dkim keygen`` and ``relayctl dkim check`` stand on, without
Twisted and without DNS: the caller looks the record up (the relay's
nameservers) and hands the TXT strings in, so what is said about a record
is tested without a network.

- ``keygen`` writes a new private key (RSA 2048 bits by default, or Ed25519)
  through relay.common.fileio's durable write: mode 0600 whatever the umask,
  optionally chowned to the relay's user before it gets its name, fsynced,
  renamed into place, the directory fsynced; a key is never half written,
  nor, unless asked, written over an existing one (that would break mail
  signed with a published key).
- ``public_record`` is the TXT record's text (``v=DKIM1; k=rsa; p=...``);
  ``txt_strings`` cuts it into the strings of at most 255 bytes DNS needs
  (RFC 1035 3.3.14; a 2048-bit RSA key's record is ~410 bytes) and
  ``zone_line`` writes them as a zone-file line.
- ``check_record`` compares what is published with a key and says, in
  words a user can act on, whether it is missing, malformed, revoked
  (empty p=), for another key, or matches.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Sequence, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.common import fileio
from relay.intake.dkim import ED25519_SHA256, RSA_GOOD_BITS, RSA_SHA256, PrivateKey, SigningKey

RSA_MAX_BITS = 4096
PublicKey = Union[rsa.RSAPublicKey, ed25519.Ed25519PublicKey]

# check_record's verdicts
MATCHES = "matches"
MISSING = "missing"
MISMATCH = "does not match"
REVOKED = "revoked"
MALFORMED = "malformed"
SEVERAL = "several records"


def generate_key(algorithm: str = RSA_SHA256, bits: int = RSA_GOOD_BITS) -> PrivateKey:
    """A new private key for algorithm (RSA of bits bits, 2048 to 4096; Ed25519)."""
    if algorithm == ED25519_SHA256:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != RSA_SHA256:
        raise ValueError(f"unknown algorithm {algorithm!r} (expected {RSA_SHA256} or {ED25519_SHA256})")
    if not RSA_GOOD_BITS <= bits <= RSA_MAX_BITS:
        raise ValueError(f"an RSA key for DKIM has {RSA_GOOD_BITS} to {RSA_MAX_BITS} bits, not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what relay.intake.dkim.load_key reads)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: str, key: PrivateKey, *, owner: tuple[int, int] | None = None, replace: bool = False) -> None:
    """Write key to path durably, mode 0600 (owner: (uid, gid) to chown it to
    before it is renamed into place: the relay's user when root runs keygen).

    An existing path is refused (FileExistsError) unless replace: the old key
    may be the one published and signing now."""
    if not replace and os.path.lexists(path):
        raise FileExistsError(f"{path}: a key file is already there; remove it, or choose another selector"
                              f" (a new selector lets the old key sign while the new record propagates)")

    def setup(fd: int) -> None:
        if owner is not None:
            os.fchown(fd, *owner)

    fileio.write_atomic(path, private_pem(key), mode=0o600, chmod=True, setup=setup)


def keygen(path: str, domain: str, selector: str, algorithm: str = RSA_SHA256, bits: int = RSA_GOOD_BITS, *,
           owner: tuple[int, int] | None = None, replace: bool = False) -> str:
    """Make and write a key (write_key) and return the zone-file line to publish for it."""
    key = generate_key(algorithm, bits)
    write_key(path, key, owner=owner, replace=replace)
    return zone_line(domain, selector, public_record(key))


def public_key_bytes(key: PrivateKey | PublicKey) -> bytes:
    """What p= carries: an RSA key's DER SubjectPublicKeyInfo, an Ed25519 key's 32 raw bytes (RFC 8463 4.2)."""
    pub = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)) else key
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _kind(key: PrivateKey | PublicKey) -> str:
    return "ed25519" if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)) else "rsa"


def public_record(key: PrivateKey | PublicKey) -> str:
    """The TXT record's text for key: ``v=DKIM1; k=rsa; p=<base64>`` (k=ed25519 for Ed25519)."""
    return f"v=DKIM1; k={_kind(key)}; p={base64.b64encode(public_key_bytes(key)).decode('ascii')}"


def record_name(domain: str, selector: str) -> str:
    """Where the record goes: ``selector._domainkey.domain`` (RFC 6376 3.6.2.1)."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def txt_strings(record: str, size: int = 255) -> list[str]:
    """record cut into strings of at most size bytes (a TXT string's limit;
    a verifier joins them without a separator, RFC 6376 3.6.2.2)."""
    data = record.encode("ascii")
    return [data[i:i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_line(domain: str, selector: str, record: str) -> str:
    """A zone-file line publishing record: ``name. IN TXT ( "..." "..." )``."""
    parts = " ".join(f'"{s}"' for s in txt_strings(record))
    return f"{record_name(domain, selector)}. IN TXT ( {parts} )"


def parse_record(text: str | bytes) -> dict[str, str]:
    """The tags of a DKIM key record (ValueError if it is none): names in
    lower case, values with their white space removed (RFC 6376 3.2: FWS may
    be anywhere in a base64 value)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    tags: dict[str, str] = {}
    for i, spec in enumerate(text.split(";")):
        if not spec.strip():
            continue
        name, eq, value = spec.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise ValueError(f"{spec.strip()!r} is not a tag=value pair")
        if name in tags:
            raise ValueError(f"the tag {name}= is there twice")
        if name == "v" and (i != 0 or value.strip() != "DKIM1"):
            raise ValueError(f"v={value.strip()} is not DKIM1" if i == 0 else "v= must be the first tag")
        tags[name] = "".join(value.split())
    if "p" not in tags:
        raise ValueError("no p= tag (the public key)")
    return tags


@dataclass(frozen=True)
class Check:
    """check_record's answer: a verdict (MATCHES, MISSING, ...) and what to do."""

    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == MATCHES


def _as_text(record: str | bytes | Sequence[str | bytes]) -> str:
    """One TXT record as the verifier sees it: its strings joined."""
    if isinstance(record, (str, bytes)):
        record = [record]
    return "".join(s if isinstance(s, str) else s.decode("ascii", "replace") for s in record)


def _compare(tags: dict[str, str], key: PrivateKey, name: str, path: str) -> Check:
    """One parsed record against the key."""
    want = _kind(key)
    if tags.get("k", "rsa").lower() != want:
        return Check(MISMATCH, f"{name} publishes a k={tags.get('k', 'rsa')} key but {path} is an {want} key:"
                               f" publish the record for this key")
    if "h" in tags and "sha256" not in tags["h"].lower().split(":"):
        return Check(MALFORMED, f"{name} allows only h={tags['h']}: add sha256 or drop h=")
    if "s" in tags and not {"email", "*"} & set(tags["s"].lower().split(":")):
        return Check(MALFORMED, f"{name} is for service s={tags['s']}, not email: drop s= or make it s=email")
    if tags["p"] == "":
        return Check(REVOKED, f"{name} has an empty p=: the key is revoked and mail signed with this selector"
                              f" fails; publish a new selector's record, or this key's: {public_record(key)}")
    try:
        published = base64.b64decode(tags["p"], validate=True)
    except (binascii.Error, ValueError):
        return Check(MALFORMED, f"{name}: p= is not base64 (cut or quoted wrongly?); publish: {public_record(key)}")
    if published != public_key_bytes(key):
        return Check(MISMATCH, f"{name} publishes another key than {path}: publish this key's record"
                               f" ({public_record(key)}), or sign with the key the record belongs to")
    testing = "y" in tags.get("t", "").lower().split(":")
    return Check(MATCHES, f"{name} matches {path}" + (
        " (t=y: verifiers treat a failing signature as none; remove t=y once mail verifies)" if testing else ""))


def check_record(key: SigningKey | PrivateKey, published: Sequence[str | bytes | Sequence[str | bytes]] | None, *,
                 name: str = "", path: str = "") -> Check:
    """What the TXT records published at the key's name say about it.

    published: the TXT records the caller found there (each one string, or
    its strings), [] or None for none (NXDOMAIN, no TXT).  TXT records that
    are no DKIM record (no p=, another v=) are ignored unless there is nothing
    else; several DKIM records are an error (RFC 6376 3.6.2.2: which one a
    verifier takes is undefined)."""
    if isinstance(key, SigningKey):
        name = name or record_name(key.domain, key.selector)
        path = path or key.path
        private = key.private_key
    else:
        private = key
    name = name or "the selector's name"
    path = path or "the key"
    texts = [_as_text(r) for r in published or ()]
    parsed, problems = [], []
    for text in texts:
        try:
            parsed.append(parse_record(text))
        except ValueError as e:
            problems.append(f"{text[:40]!r}...: {e}" if len(text) > 40 else f"{text!r}: {e}")
    if not texts:
        return Check(MISSING, f"no DKIM record at {name}: mail signed with this key fails to verify until you"
                              f" publish a TXT record there: {public_record(private)}")
    if not parsed:
        return Check(MALFORMED, f"the TXT record at {name} is not a DKIM key record ({'; '.join(problems)});"
                                f" publish: {public_record(private)}")
    if len(parsed) > 1:
        return Check(SEVERAL, f"{name} has {len(parsed)} DKIM records; verifiers may take any: keep only"
                              f" {public_record(private)}")
    return _compare(parsed[0], private, name, path)
