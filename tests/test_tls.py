"""Certificates from the config: errors name the file, expiry is loud, TLS 1.2+ only."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

import pytest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from relay.common.tls import TLSConfigError, load_server_tls
from tests.support.certs import ca, cert_files
from tests.support.relay import ROOT, InProcessRelay, in_thread


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="relay-tls-")
    yield d
    shutil.rmtree(d, True)


def test_missing_files_name_the_file_and_key(tmp):
    c = cert_files("localhost")
    with pytest.raises(TLSConfigError, match=r"tls.certificate: certificate file .*/nope.pem does not exist"):
        load_server_tls(os.path.join(tmp, "nope.pem"), c.key_pem)
    with pytest.raises(TLSConfigError, match=r"tls.key: key file .*/nokey.pem does not exist"):
        load_server_tls(c.cert_pem, os.path.join(tmp, "nokey.pem"))


def test_garbage_and_mismatched_key(tmp):
    c = cert_files("localhost")
    other = cert_files("other.example")
    junk = os.path.join(tmp, "junk.pem")
    with open(junk, "w") as f:
        f.write("not a certificate\n")
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        load_server_tls(junk, c.key_pem)
    with pytest.raises(TLSConfigError, match="not a valid PEM private key"):
        load_server_tls(c.cert_pem, junk)
    with pytest.raises(TLSConfigError, match=r"tls.key: .* does not match the certificate in"):
        load_server_tls(c.cert_pem, other.key_pem)


def test_expired_certificate_is_a_loud_warning(tmp):
    leaf = ca().issue_cert("old.example", not_before=datetime.datetime(2020, 1, 1),
                           not_after=datetime.datetime(2021, 1, 1))
    cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
    with open(cert, "wb") as f:
        for b in leaf.cert_chain_pems:
            f.write(b.bytes())
    leaf.private_key_pem.write_to_path(key)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        t = load_server_tls(cert, key)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert t.expired
    warns = [e for e in seen if e.get("log_level") == LogLevel.warn]
    assert warns and "EXPIRED" in warns[0]["log_format"] and warns[0]["certificate"] == cert


def test_relay_does_not_start_on_a_bad_key(tmp):
    c = cert_files("localhost")
    other = cert_files("other.example")
    cfg = os.path.join(tmp, "relay.toml")
    with open(cfg, "w") as f:
        f.write(f'spool = "spool"\n[tls]\ncertificate = "{c.cert_pem}"\nkey = "{other.key_pem}"\n'
                '[smtp]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[pop3]\nlisten = []\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                        "--pidfile=", "relay", "--config", cfg], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert "does not match the certificate" in r.stdout + r.stderr
    assert other.key_pem in r.stdout + r.stderr


class Versions(unittest.TestCase):
    async def test_tls_1_1_refused_1_2_and_1_3_accepted(self):
        tmp = tempfile.mkdtemp(prefix="relay-tlsv-")
        self.addCleanup(shutil.rmtree, tmp, True)
        c = cert_files("localhost", "127.0.0.1")
        relay = InProcessRelay(tmp, {"tls": {"certificate": c.cert_pem, "key": c.key_pem},
                                     "smtp": {"listen": ["ssl:0:interface=127.0.0.1"]}}, deliver=False)
        await relay.start()
        self.addCleanup(relay.stop)
        host, port = relay.smtp

        def handshake(version):
            ctx = ssl.create_default_context(cafile=c.ca_pem)
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = version
            try:
                ctx.set_ciphers("ALL:@SECLEVEL=0")
            except ssl.SSLError:
                pass
            with socket.create_connection((host, port), timeout=10) as s:
                try:
                    with ctx.wrap_socket(s, server_hostname="localhost") as t:
                        return t.version()
                except (ssl.SSLError, ConnectionError) as e:
                    return f"refused: {e.__class__.__name__}"

        got = {v: await in_thread(handshake, v)
               for v in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)}
        self.assertTrue(got[ssl.TLSVersion.TLSv1_1].startswith("refused"), got)
        self.assertEqual(got[ssl.TLSVersion.TLSv1_2], "TLSv1.2")
        self.assertEqual(got[ssl.TLSVersion.TLSv1_3], "TLSv1.3")
