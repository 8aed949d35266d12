"""TLS context factories from the config.

One server context serves STARTTLS, STLS and the implicit TLS endpoints
that do not name their own key.  TLS 1.2 and 1.3 only, OpenSSL's default
ciphers otherwise.  Problems with the files are config errors naming the
file (an expired certificate is a loud warning: a relay that refuses to
start on the day a certificate expires loses mail, one that warns does not).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.logger import Logger

log = Logger(namespace="relay.tls")


class TLSConfigError(Exception):
    pass


@dataclass(frozen=True)
class ServerTLS:
    """The loaded certificate and a context factory for servers."""

    options: ssl.CertificateOptions
    subject: str
    not_after: datetime.datetime
    expired: bool


def _read(path: str, what: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSConfigError(f"{key}: {what} file {path} does not exist")
    except PermissionError:
        raise TLSConfigError(f"{key}: {what} file {path} is not readable (permission denied)")
    except OSError as e:
        raise TLSConfigError(f"{key}: cannot read {what} file {path}: {e.strerror}")


def _split_pem_certs(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    out = []
    for part in data.split(marker)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(part[start:] + marker + b"\n")
    return out


def load_server_tls(certificate: str, key: str, *, now: datetime.datetime | None = None) -> ServerTLS:
    """Load a PEM chain (leaf first) and its key; raise TLSConfigError naming the file."""
    chain_pem = _read(certificate, "certificate", "tls.certificate")
    key_pem = _read(key, "key", "tls.key")
    pems = _split_pem_certs(chain_pem)
    if not pems:
        raise TLSConfigError(f"tls.certificate: {certificate} holds no PEM certificate")
    try:
        certs = [crypto.load_certificate(crypto.FILETYPE_PEM, p) for p in pems]
    except crypto.Error as e:
        raise TLSConfigError(f"tls.certificate: {certificate} is not a valid PEM certificate: {e}")
    try:
        pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        raise TLSConfigError(f"tls.key: {key} is not a valid PEM private key: {e}")
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate(certs[0])
        ctx.use_privatekey(pkey)
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"tls.key: {key} does not match the certificate in {certificate}")
    leaf = certs[0].to_cryptography()
    not_after = leaf.not_valid_after_utc
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expired = not_after < now
    subject = leaf.subject.rfc4514_string()
    options = ssl.CertificateOptions(
        privateKey=pkey,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    if expired:
        log.warn(
            "TLS CERTIFICATE EXPIRED: {certificate} ({subject}) expired on {not_after}; "
            "clients that verify will refuse it",
            certificate=certificate, subject=subject, not_after=not_after.isoformat(),
        )
    return ServerTLS(options, subject, not_after, expired)


def session_info(transport) -> dict | None:
    """TLS version and cipher of an established connection, or None."""
    try:
        conn = transport.getHandle()
    except Exception:  # noqa: BLE001 - not a TLS transport
        return None
    if not isinstance(conn, SSL.Connection):
        return None
    try:
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
        bits = conn.get_cipher_bits()
    except SSL.Error:
        return None
    if not cipher:
        return None
    return {"version": version, "cipher": cipher, "bits": bits}
