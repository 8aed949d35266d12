"""relay.intake.dkimkeys: keys made, the record to publish, a published record checked (issue 14).

A generated key is read back by relay.intake.dkim.load_key (so it passes its
checks: 0600, a real key), signs a message that dkimpy verifies with the
record ``public_record`` gives, and, where opendkim-tools can run,
``opendkim-testkey`` finds that record matching the key file.  Every
verdict of ``check_record`` is reached by a record made for it.
"""

from __future__ import annotations

import base64
import os

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.intake import dkim, dkimkeys
from tests.support import opendkim

MESSAGE = (b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nFrom: Joe <joe@example.org>\r\nTo: ann@example.net\r\n"
           b"Subject: keys\r\nMessage-ID: <k@example.org>\r\n\r\nhello\r\n")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One RSA (default) and one Ed25519 key written by keygen, with their zone lines."""
    d = tmp_path_factory.mktemp("made")
    rsa_line = dkimkeys.keygen(str(d / "rsa.pem"), "example.org", "r1")
    ed_line = dkimkeys.keygen(str(d / "ed.pem"), "example.org", "e1", dkim.ED25519_SHA256)
    return {"r1": (dkim.load_key(str(d / "rsa.pem"), "example.org", "r1"), rsa_line),
            "e1": (dkim.load_key(str(d / "ed.pem"), "example.org", "e1", dkim.ED25519_SHA256), ed_line)}


def test_keygen_writes_a_key_that_loads_and_signs(tmp_path, made):
    for sel, (key, line) in made.items():
        assert os.stat(key.path).st_mode & 0o777 == 0o600
        assert not [n for n in os.listdir(os.path.dirname(key.path)) if n.startswith(".")]  # no temporary left
        assert key.warnings == ()
        if key.algorithm == dkim.RSA_SHA256:
            assert isinstance(key.private_key, rsa.RSAPrivateKey) and key.private_key.key_size == 2048
        else:
            assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
        assert line.startswith(f"{sel}._domainkey.example.org. IN TXT ( \"v=DKIM1; k=")
        record = "".join(part.strip('"') for part in line.split("( ")[1].rstrip(" )").split('" "'))
        assert record == dkimkeys.public_record(key.private_key)
        path = tmp_path / "m"
        path.write_bytes(MESSAGE)
        sig = dkim.sign(str(path), 0, key)
        assert dkimpy.verify(sig + MESSAGE, dnsfunc=lambda name, timeout=5, r=record: r.encode())


def test_keygen_ignores_the_umask_and_refuses_an_existing_key(tmp_path):
    old = os.umask(0)
    try:
        dkimkeys.keygen(str(tmp_path / "k.pem"), "example.org", "s", dkim.ED25519_SHA256)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "k.pem").st_mode & 0o777 == 0o600
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(FileExistsError, match="k.pem: a key file is already there"):
        dkimkeys.keygen(str(tmp_path / "k.pem"), "example.org", "s", dkim.ED25519_SHA256)
    assert (tmp_path / "k.pem").read_bytes() == before
    dkimkeys.keygen(str(tmp_path / "k.pem"), "example.org", "s", dkim.ED25519_SHA256, replace=True)
    assert (tmp_path / "k.pem").read_bytes() != before
    os.symlink(tmp_path / "elsewhere", tmp_path / "link.pem")  # a dangling link counts as there
    with pytest.raises(FileExistsError):
        dkimkeys.keygen(str(tmp_path / "link.pem"), "example.org", "s", dkim.ED25519_SHA256)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_keygen_chowns_to_the_relay_user(tmp_path):
    dkimkeys.keygen(str(tmp_path / "k.pem"), "example.org", "s", dkim.ED25519_SHA256, owner=(65534, 65534))
    st = os.stat(tmp_path / "k.pem")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)


def test_generate_key_bounds():
    with pytest.raises(ValueError, match="2048 to 4096"):
        dkimkeys.generate_key(dkim.RSA_SHA256, 1024)
    with pytest.raises(ValueError, match="unknown algorithm"):
        dkimkeys.generate_key("rsa-sha1")
    assert dkimkeys.generate_key(dkim.RSA_SHA256, 3072).key_size == 3072


def test_records_and_their_strings():
    ed = ed25519.Ed25519PrivateKey.generate()
    rec = dkimkeys.public_record(ed)
    assert rec.startswith("v=DKIM1; k=ed25519; p=") and len(base64.b64decode(rec.split("p=")[1])) == 32
    assert dkimkeys.public_record(ed.public_key()) == rec
    big = rsa.generate_private_key(65537, 4096)
    rec = dkimkeys.public_record(big)
    assert rec.startswith("v=DKIM1; k=rsa; p=MII")
    parts = dkimkeys.txt_strings(rec)
    assert len(parts) == 3 and all(len(p.encode()) <= 255 for p in parts) and "".join(parts) == rec
    assert dkimkeys.txt_strings("short") == ["short"]
    assert dkimkeys.record_name("Example.org.", "s1") == "s1._domainkey.Example.org"
    assert dkimkeys.zone_line("example.org", "s", "a" * 300) == (
        f's._domainkey.example.org. IN TXT ( "{"a" * 255}" "{"a" * 45}" )')


@pytest.mark.skipif(opendkim.unavailable() is not None, reason=str(opendkim.unavailable()))
def test_opendkim_testkey_finds_the_published_record_matching(made):
    # only RSA: opendkim-testkey 2.11 compares an Ed25519 key file as if it were RSA and fails
    # ("expecting an rsa key"); Ed25519 signatures are verified by opendkim-testmsg in test_dkim
    for sel, (key, _) in [("r1", made["r1"])]:
        published = {dkimkeys.record_name("example.org", sel): dkimkeys.txt_strings(
            dkimkeys.public_record(key.private_key))}
        rc, out = opendkim.testkey("example.org", sel, key.path, published)
        assert rc == 0 and "key OK" in out, out
    other = made["e1"][0]
    rc, out = opendkim.testkey("example.org", "r1", other.path, {
        "r1._domainkey.example.org": dkimkeys.txt_strings(dkimkeys.public_record(made["r1"][0].private_key))})
    assert rc != 0, out


# ---------------------------------------------------------------- check_record's verdicts

def test_a_matching_record_in_any_form(made):
    key = made["r1"][0]
    rec = dkimkeys.public_record(key.private_key)
    for published in ([rec], [rec.encode()], [dkimkeys.txt_strings(rec)],
                      [[s.encode() for s in dkimkeys.txt_strings(rec)]], ["v=spf1 -all", rec],
                      [rec.replace("; ", " ;\t ").replace("p=", "p= ")]):
        c = dkimkeys.check_record(key, published)
        assert c.ok and c.status == dkimkeys.MATCHES, (published, c)
        assert c.message == f"r1._domainkey.example.org matches {key.path}"
    c = dkimkeys.check_record(key, [rec + "; t=y"])
    assert c.ok and "t=y" in c.message and "remove t=y" in c.message
    c = dkimkeys.check_record(key.private_key, [rec], name="x._domainkey.example.org", path="/k")
    assert c.ok and c.message == "x._domainkey.example.org matches /k"


@pytest.mark.parametrize("published", [None, []])
def test_a_missing_record_says_what_to_publish(made, published):
    key = made["e1"][0]
    c = dkimkeys.check_record(key, published)
    assert (c.ok, c.status) == (False, dkimkeys.MISSING)
    assert c.message == ("no DKIM record at e1._domainkey.example.org: mail signed with this key fails to verify"
                         f" until you publish a TXT record there: {dkimkeys.public_record(key.private_key)}")


def test_other_verdicts(made):
    rsa_key, ed_key = made["r1"][0], made["e1"][0]
    mine = dkimkeys.public_record(rsa_key.private_key)
    other = dkimkeys.public_record(rsa.generate_private_key(65537, 2048))
    cases = [
        (["v=DKIM1; k=rsa; p="], dkimkeys.REVOKED, "empty p=: the key is revoked"),
        ([other], dkimkeys.MISMATCH, "publishes another key than"),
        ([dkimkeys.public_record(ed_key.private_key)], dkimkeys.MISMATCH, "publishes a k=ed25519 key but"),
        (["v=DKIM1; k=rsa; p=%%%notbase64"], dkimkeys.MALFORMED, "p= is not base64"),
        (["v=DKIM1; k=rsa"], dkimkeys.MALFORMED, "no p= tag"),
        (["v=spf1 -all"], dkimkeys.MALFORMED, "v=spf1 -all is not DKIM1"),
        (["k=rsa; v=DKIM1; p=AAAA"], dkimkeys.MALFORMED, "v= must be the first tag"),
        (["v=DKIM1; p=AA; p=BB"], dkimkeys.MALFORMED, "there twice"),
        (["v=DKIM1; garbage; p=AA"], dkimkeys.MALFORMED, "not a tag=value pair"),
        ([mine + "; h=sha1"], dkimkeys.MALFORMED, "allows only h=sha1"),
        ([mine + "; s=tlsrpt"], dkimkeys.MALFORMED, "not email"),
        ([mine, other], dkimkeys.SEVERAL, "has 2 DKIM records"),
    ]
    for published, status, words in cases:
        c = dkimkeys.check_record(rsa_key, published)
        assert (c.ok, c.status) == (False, status), (published, c)
        assert words in c.message and "r1._domainkey.example.org" in c.message, (published, c.message)
    assert dkimkeys.check_record(rsa_key, [mine + "; h=sha1:sha256; s=email:*"]).ok
    assert dkimkeys.check_record(ed_key, [dkimkeys.public_record(ed_key.private_key)]).ok


def test_parse_record():
    assert dkimkeys.parse_record(b"v=DKIM1; k=rsa; p=AB CD\r\n\tEF") == {"v": "DKIM1", "k": "rsa", "p": "ABCDEF"}
    assert dkimkeys.parse_record("p=;") == {"p": ""}
