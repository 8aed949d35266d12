"""Outbound TLS: the client context and the certificate check.

One OpenSSL client context per trust root (TLS 1.2 or later; loading the
system CAs is not free, so contexts are kept).  ``OutboundTLS`` always
checks the server's certificate (chain, and name with service-identity)
and records the outcome; with ``enforce`` ("verify") a failure fails the
handshake, without it ("may", "encrypt") the connection goes on and the
log says whether the certificate would have been verified, as in Postfix.

With ``tlsa`` (the usable, DNSSEC-validated TLSA records of the hop, RFC
7672) the PKIX result is ignored: the handshake is accepted only when DANE
authentication (relay.outbound.dane.authenticate) succeeds, checked in the
verify callback at the leaf with the chain the server presented, so a
failure fails the handshake before anything is sent over it.
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from relay.outbound import dane

_X509_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}

# trust root (a path, or id() of an object) -> (that trust root, its context)
_CONTEXTS: dict[object, tuple[Any, SSL.Context]] = {}


def _cert_names(cert: crypto.X509) -> list[str]:
    """DNS names and IP addresses in the subjectAltName, for messages."""
    try:
        san = cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # noqa: BLE001 - no SAN or unparsable: only for a message
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(a) for a in san.get_values_for_type(x509.IPAddress))][:10]


def _subject(cert: crypto.X509) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string() or "?"
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def client_context(trust_root: Any) -> SSL.Context:
    """One context per trust root (loading the system CAs is not free);
    raises TypeError for a trust root of another kind."""
    key = trust_root if isinstance(trust_root, str) else id(trust_root)
    cached = _CONTEXTS.get(key)
    if cached is not None and cached[0] is trust_root:
        return cached[1]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    if trust_root is None:
        ctx.set_default_verify_paths()
    elif isinstance(trust_root, str):
        ctx.load_verify_locations(trust_root)
    else:
        try:
            # ssl.Certificate adapts to it; typed Any: mypy reads a zope
            # interface's methods as lacking self
            root: Any = IOpenSSLTrustRoot(trust_root)
        except TypeError:
            raise TypeError(f"trust_root must be None, a PEM file path or an IOpenSSLTrustRoot, not {trust_root!r}")
        root._addCACertsToContext(ctx)
    _CONTEXTS[key] = (trust_root, ctx)  # the reference keeps id() unique
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class OutboundTLS:
    """A client TLS connection that always checks the certificate (chain and
    name) and records the outcome; with ``enforce`` a failure fails the
    handshake ("verify"), without it the connection goes on ("may",
    "encrypt": MX certificates are not verified, as in Postfix, but the
    log says whether they would have been)."""

    def __init__(
        self,
        hostname: str,
        *,
        enforce: bool,
        trust_root: Any = None,
        tlsa: Sequence[dane.Tlsa] = (),
        dane_names: Sequence[str] = (),
        tlsa_owner: str = "",
        clock: Callable[[], float] = time.time,
    ):
        self.hostname = hostname.rstrip(".")
        self.enforce = enforce
        self.trust_root = trust_root
        self.chain_error: str | None = None
        self.name_error: str | None = None
        self.saw_leaf = False
        # DANE (RFC 7672): the usable records, the reference identifiers for
        # DANE-TA (the host name, then e.g. the next-hop domain), the outcome
        self.tlsa = dane.usable(tlsa)
        self.dane_names = tuple(n.rstrip(".").lower() for n in (dane_names or (self.hostname,)))
        self.tlsa_owner = tlsa_owner or f"_25._tcp.{self.hostname}"
        self._clock = clock
        self.dane_result: dane.DaneResult | None = None
        try:
            ipaddress.ip_address(self.hostname)
            self._is_ip = True
        except ValueError:
            self._is_ip = False

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(client_context(self.trust_root), None)
        conn.set_app_data(tlsProtocol)
        if not self._is_ip and self.hostname:
            try:
                conn.set_tlsext_host_name(self.hostname.encode("idna"))
            except UnicodeError:
                pass
        conn.set_verify(SSL.VERIFY_PEER, self._verify)
        return conn

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        try:
            if not ok and self.chain_error is None:
                subject = _subject(cert)
                self.chain_error = f"{_X509_ERRORS.get(errno, f'X509 verify error {errno}')} (depth {depth}, {subject})"
            if depth == 0:
                self.saw_leaf = True
                if self.name_error is None:
                    ident = IPAddress_ID(self.hostname) if self._is_ip else DNS_ID(self.hostname)
                    try:
                        verify_service_identity(extract_patterns(cert), [ident], [])
                    except (VerificationError, CertificateError):
                        names = ", ".join(_cert_names(cert)) or "none"
                        self.name_error = f"certificate does not match host name {self.hostname} (it names: {names})"
        except Exception as e:  # noqa: BLE001 - never raise inside an OpenSSL callback
            self.name_error = self.name_error or f"certificate check failed: {e}"
        if self.tlsa:
            return self._dane(conn) if depth == 0 else True
        if not self.enforce:
            return True
        return bool(ok) and not (depth == 0 and self.name_error)

    def _dane(self, conn: SSL.Connection) -> bool:
        """DANE authentication of the presented chain, once (the verify
        callback may see the leaf more than once)."""
        if self.dane_result is None:
            try:
                chain = [c.to_cryptography() for c in (conn.get_peer_cert_chain() or [])]
                now = datetime.datetime.fromtimestamp(self._clock(), datetime.timezone.utc)
                self.dane_result = dane.authenticate(chain, self.tlsa, self.dane_names, now)
            except Exception as e:  # noqa: BLE001 - never raise inside an OpenSSL callback
                self.dane_result = dane.DaneResult(False, problem=f"DANE check failed: {e}")
        return self.dane_result.ok

    @property
    def dane_ok(self) -> bool:
        """DANE was asked for and the certificate is authenticated by it."""
        return bool(self.tlsa) and self.dane_result is not None and self.dane_result.ok

    def dane_problem(self) -> str | None:
        """Why DANE authentication failed, naming the TLSA owner name; None
        when DANE was not asked for, succeeded or was never reached."""
        if not self.tlsa or self.dane_ok:
            return None
        owner = self.tlsa_owner
        if self.dane_result is None:  # the handshake failed before the certificate
            return None
        problem = self.dane_result.problem or "not authenticated"
        return f"DANE: {problem.replace('no TLSA record', f'no TLSA record of {owner}', 1)}"

    @property
    def trusted(self) -> bool:
        return self.saw_leaf and self.chain_error is None

    @property
    def verified(self) -> bool:
        return self.trusted and self.name_error is None

    def problem(self) -> str | None:
        if self.tlsa:
            return self.dane_problem()
        return self.chain_error or self.name_error
