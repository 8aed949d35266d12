"""Test certificates made by trustme: one CA, leaf certificates per name."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import trustme


@dataclass(frozen=True)
class CertFiles:
    ca_pem: str  # the CA certificate (trust root for clients)
    cert_pem: str  # leaf then chain
    key_pem: str
    names: tuple[str, ...]


@lru_cache(maxsize=None)
def _ca() -> trustme.CA:
    return trustme.CA()


def _dir() -> str:
    d = os.path.join(tempfile.gettempdir(), f"relay-test-certs-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    return d


@lru_cache(maxsize=None)
def cert_files(*names: str) -> CertFiles:
    """PEM files for a leaf certificate valid for names (signed by the test CA)."""
    names = names or ("localhost", "127.0.0.1")
    ca = _ca()
    leaf = ca.issue_cert(*names)
    d = _dir()
    tag = "_".join(n.replace(":", "-").replace("/", "-") for n in names)[:80]
    ca_path = os.path.join(d, "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    cert_path = os.path.join(d, f"{tag}.crt.pem")
    key_path = os.path.join(d, f"{tag}.key.pem")
    with open(cert_path, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key_path)
    return CertFiles(ca_path, cert_path, key_path, tuple(names))


def ca() -> trustme.CA:
    return _ca()
