"""DANE for SMTP (RFC 7672, RFC 6698/7671): TLSA records and certificate matching.

Why a pure module: whether a certificate is authenticated by a TLSA RRset
is the whole security decision of DANE, so it is kept free of sockets,
DNS and Twisted, and tested with trustme certificates alone.  The DNS side
(is the RRset DNSSEC-validated?) is relay.delivery.mx.Resolver.tlsa; the
handshake side is relay.outbound.tls.OutboundTLS.

What is usable for SMTP (RFC 7672 section 3.1.3): usages DANE-TA(2) and
DANE-EE(3) only (PKIX-TA(0) and PKIX-EE(1) are not: MTAs have no common set
of CAs), selectors Cert(0) and SPKI(1), matching types Full(0), SHA2-256(1)
and SHA2-512(2); a digest of the wrong length is unusable too (RFC 7671
section 5.1 "malformed").

* DANE-EE(3): the leaf certificate (or its public key) matches; no name
  check and no validity-date check (RFC 7672 section 3.1.1).
* DANE-TA(2): some certificate the server presented, other than the leaf,
  matches; the chain from the leaf up to it is signed link by link, the
  certificates below the trust anchor are within their validity dates, and
  the leaf names one of the reference identifiers (the MX host name, or the
  next-hop domain; RFC 7672 sections 3.1.2 and 3.2).

No Twisted, no I/O.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import DNS_ID, verify_service_identity

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)
_DIGEST_SIZE = {0: None, 1: 32, 2: 64}


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 section 2.1): certificate usage, selector,
    matching type and the certificate association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP (module doc): usage 2 or 3, a known selector and
        matching type, data of the right length."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in _SELECTORS:
            return False
        if self.mtype not in _DIGEST_SIZE or not self.data:
            return False
        size = _DIGEST_SIZE[self.mtype]
        return size is None or len(self.data) == size

    def short(self) -> str:
        """For messages: "3 1 1 0123abcd...": the data cut at 16 hex digits."""
        h = self.data.hex()
        return f"{self.usage} {self.selector} {self.mtype} {h[:16]}{'...' if len(h) > 16 else ''}"

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @classmethod
    def parse(cls, text: str) -> Tlsa:
        """From presentation form "3 1 1 <hex>" (tests, zone files)."""
        parts = text.split()
        if len(parts) < 4:
            raise ValueError(f"TLSA record needs usage selector mtype data: {text!r}")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]), bytes.fromhex("".join(parts[3:])))


def usable(records: Iterable[Tlsa]) -> tuple[Tlsa, ...]:
    """The records usable for SMTP, in order (RFC 7672 section 2.2)."""
    return tuple(r for r in records if r.usable)


def selected(cert: x509.Certificate, selector: int) -> bytes:
    """The bytes a selector picks: the whole DER certificate (0) or its
    DER SubjectPublicKeyInfo (1)."""
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def association(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The certificate association data of ``cert`` for a selector and a
    matching type (what a TLSA record for it would hold)."""
    data = selected(cert, selector)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_for(cert: x509.Certificate, usage: int, selector: int, mtype: int) -> Tlsa:
    """The TLSA record that matches ``cert`` (tests, and `relayctl`-style tooling)."""
    return Tlsa(usage, selector, mtype, association(cert, selector, mtype))


def matches(record: Tlsa, cert: x509.Certificate) -> bool:
    """Whether one usable record matches one certificate (usage not considered)."""
    try:
        return association(cert, record.selector, record.mtype) == record.data
    except (ValueError, TypeError):  # a key type cryptography cannot encode
        return False


@dataclass(frozen=True)
class DaneResult:
    """The outcome: ``ok``; the record that matched; otherwise ``problem``."""

    ok: bool
    record: Tlsa | None = None
    problem: str | None = None


def _names_match(cert: x509.Certificate, names: Sequence[str]) -> bool:
    try:
        patterns = extract_patterns(cert)
    except Exception:  # noqa: BLE001 - an unparsable SAN names nothing
        return False
    for name in names:
        try:
            verify_service_identity(patterns, [DNS_ID(name)], [])
            return True
        except (VerificationError, CertificateError, ValueError):
            continue
    return False


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chain_to(chain: Sequence[x509.Certificate], top: int, now: datetime.datetime) -> str | None:
    """None when chain[0..top] is signed link by link and the certificates
    below ``top`` are in their validity dates; else what is wrong."""
    for i in range(top):
        cert, issuer = chain[i], chain[i + 1]
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception:  # noqa: BLE001 - any failure means: not issued by it
            return f"certificate at depth {i} is not signed by the one at depth {i + 1}"
        if not _valid_at(cert, now):
            return f"certificate at depth {i} is outside its validity dates"
    return None


def authenticate(
    chain: Sequence[x509.Certificate],
    records: Iterable[Tlsa],
    names: Sequence[str],
    now: datetime.datetime,
) -> DaneResult:
    """DANE authentication of the server's chain (leaf first, as presented)
    against the usable ``records``; ``names`` are the reference identifiers
    for DANE-TA (the MX host name first); ``now`` (UTC) for DANE-TA dates."""
    recs = usable(records)
    if not chain:
        return DaneResult(False, problem="the server presented no certificate")
    if not recs:
        return DaneResult(False, problem="no usable TLSA record")
    leaf = chain[0]
    for r in recs:
        if r.usage == DANE_EE and matches(r, leaf):
            return DaneResult(True, r)
    why: str | None = None
    for r in recs:
        if r.usage != DANE_TA:
            continue
        for depth in range(1, len(chain)):
            if not matches(r, chain[depth]):
                continue
            broken = _chain_to(chain, depth, now)
            if broken is not None:
                why = why or broken
                continue
            if not _names_match(leaf, names):
                why = why or f"the certificate does not name {' or '.join(names) or 'the host'}"
                continue
            return DaneResult(True, r)
    listed = ", ".join(f"({r.short()})" for r in recs)
    problem = f"no TLSA record matches the certificate {listed}"
    if why:
        problem += f"; a DANE-TA record matched, but {why}"
    return DaneResult(False, problem=problem)


def applies(records: Iterable[Tlsa], secure: bool) -> bool:
    """RFC 8461 section 2 / RFC 7672: DANE applies to a host (and MTA-STS does
    not) when its TLSA RRset is DNSSEC-validated and holds a usable record.

    The TLS decision (MTA-STS, the policy table) calls this per MX host:
    when True, the host is authenticated by DANE alone."""
    return secure and bool(usable(records))
