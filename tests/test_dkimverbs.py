"""relayctl dkim keygen and dkim check as real subprocesses, against the
test DNS server (tests/support/dns.py as a process, its zone file edited
between the checks); relayctl check on a bad key file."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from relay.intake.dkim import load_key
from relay.intake.dkimkeys import generate_key, public_record, txt_strings
from tests.support import opendkim
from tests.test_relayctl import relayctl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dns_server(tmp_path):
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"records": []}))
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "tests.support.dns", "--zone", str(zone)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY"), line
    yield zone, int(line.split()[1])
    p.terminate()
    p.wait(timeout=10)


def publish(zone, records: dict[str, list[str]]) -> None:
    recs = [[name, "TXT", strings] for name, strings in records.items()]
    zone.write_text(json.dumps({"records": recs}))
    st = zone.stat()  # the server re-reads it when its mtime changes
    os.utime(zone, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def zone_strings(out: str) -> list[str]:
    line = next(x for x in out.splitlines() if " IN TXT " in x)
    return re.findall(r'"([^"]*)"', line)


def test_keygen_then_check_every_verdict(tmp_path, dns_server):
    zone, port = dns_server
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'spool = "spool"\n[delivery]\nnameservers = ["127.0.0.1:{port}"]\n')
    r = relayctl("-c", str(cfg), "dkim", "keygen", "Example.org", "s1", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = tmp_path / "dkim" / "example.org.s1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "[[dkim.keys]]" in r.stdout and f'key = "{path}"' in r.stdout
    strings = zone_strings(r.stdout)
    assert all(len(s) <= 255 for s in strings) and "".join(strings).startswith("v=DKIM1; k=rsa; p=")
    key = load_key(str(path), "example.org", "s1")
    assert "".join(strings) == public_record(key.private_key)
    # the printed lines, appended to the config, are a valid [[dkim.keys]] table
    lines = r.stdout.splitlines()
    table = "\n".join(lines[lines.index("[[dkim.keys]]"):lines.index("[[dkim.keys]]") + 5])
    cfg.write_text(cfg.read_text() + "\n" + table + "\n")
    assert relayctl("-c", str(cfg), "check", cwd=str(tmp_path)).returncode == 0
    name = "s1._domainkey.example.org"

    def check():
        return relayctl("-c", str(cfg), "dkim", "check", "example.org", cwd=str(tmp_path))

    r = check()
    assert r.returncode == 1 and "selector s1: missing: no DKIM record at " + name in r.stdout, r.stdout
    publish(zone, {name: strings})
    r = check()
    assert r.returncode == 0 and "selector s1: matches" in r.stdout, (r.stdout, r.stderr)
    publish(zone, {name: txt_strings(public_record(generate_key()))})
    r = check()
    assert r.returncode == 1 and "does not match" in r.stdout
    publish(zone, {name: ["v=DKIM1; k=rsa; p="]})
    r = check()
    assert r.returncode == 1 and "revoked" in r.stdout
    assert relayctl("-c", str(cfg), "dkim", "check", "other.example", cwd=str(tmp_path)).returncode == 1
    if opendkim.unavailable() is None:  # the independent check of the printed record
        rc, out = opendkim.testkey("example.org", "s1", str(path), {name: strings})
        assert rc == 0, out


def test_keygen_refuses_an_existing_file_and_bad_input(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('spool = "spool"\n')
    args = ("-c", str(cfg), "dkim", "keygen")
    r = relayctl(*args, "example.org", "e1", "--algorithm", "ed25519-sha256", cwd=str(tmp_path))
    assert r.returncode == 0 and "k=ed25519" in r.stdout
    r = relayctl(*args, "example.org", "e1", "--algorithm", "ed25519-sha256", cwd=str(tmp_path))
    assert r.returncode == 1 and "already there" in r.stderr
    assert relayctl(*args, "example.org", "r2", "--bits", "1024", cwd=str(tmp_path)).returncode == 2
    assert relayctl(*args, "not a domain", "r2", cwd=str(tmp_path)).returncode == 2
    assert relayctl(*args, "example.org", "bad_sel", cwd=str(tmp_path)).returncode == 2


def test_relayctl_check_names_a_bad_key_file(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("junk\n")
    key.chmod(0o644)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'spool = "spool"\n[[dkim.keys]]\ndomain = "example.org"\nselector = "s"\nkey = "{key}"\n')
    r = relayctl("-c", str(cfg), "check", cwd=str(tmp_path))
    assert r.returncode == 1 and str(key) in r.stderr and "chmod 600" in r.stderr, r.stderr
    r = relayctl("-c", str(cfg), "dkim", "check", cwd=str(tmp_path))
    assert r.returncode == 1 and str(key) in r.stderr


def test_config_errors_name_the_key(tmp_path):
    cfg = tmp_path / "relay.toml"
    for bad in ('[[dkim.keys]]\ndomain = "example.org"\nselector = "s"\n',
                '[[dkim.keys]]\ndomain = "example.org"\nselector = "s"\nkey = "k"\nalgorithm = "rsa-sha1"\n',
                '[dkim]\nheaders = ["To"]\n', '[dkim]\ncanonicalization = "loose"\n'):
        cfg.write_text('spool = "spool"\n' + bad)
        r = relayctl("-c", str(cfg), "check", cwd=str(tmp_path))
        assert r.returncode == 1 and "dkim." in r.stderr, (bad, r.stderr)
