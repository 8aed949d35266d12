"""relay.intake.dkim and dkimcanon: signatures an independent verifier accepts (issue 14, DKIM signing).

Every signature is checked by dkimpy's ``dkim.verify`` (the key record fed
through its ``dnsfunc``) and, where Debian's opendkim-tools can run (see
tests/support/opendkim.py), by OpenDKIM's ``opendkim-testmsg`` too; a
tampered copy must fail with both, so neither check passes by accident.
The body canonicalisation is compared with dkimpy's (whole-message) one on
every way of cutting a body into chunks; a 10 MB message is signed in a
memory bound far under its size.  Keys: each bad key file is its own error
naming the file.  From: missing, several, malformed are a reason, not an
exception.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tracemalloc

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.canonicalization import ALGORITHMS as DKIMPY_CANON
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import dkim, dkimcanon
from relay.intake.dkimkeys import public_record, txt_strings
from tests.support import opendkim

T = 1764583200
ENVELOPE = b"ENVELOPE {\"sender\": \"joe@example.org\"}\n"  # the spool's first line: the message starts after it
HEAD = (b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nFrom: Joe <joe@example.org>\r\n"
        b"To: Ann <ann@example.net>\r\nSubject: hello\r\nMessage-ID: <1@example.org>\r\n")
MESSAGES = {
    "plain": HEAD + b"\r\nHello Ann,\r\n\r\nsee you.\r\n",
    "8-bit": (b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nFrom: =?utf-8?q?J=C3=B6?= <joe@example.org>\r\n"
              + "To: Änne <ann@example.net>\r\nSubject: Grüße aus Köln\r\n".encode()
              + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
              + "Ünïcödé body, ½ € ✓\r\n".encode() + b"latin-1: caf\xe9 \xff\r\n"),
    "long header lines": (HEAD + b"X-Long: " + b"x" * 900 + b"\r\nReferences: "
                          + b" ".join(b"<%d@example.org>" % i for i in range(55)) + b"\r\n\r\nbody\r\n"),
    "folded headers": (b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nFrom: Joe\r\n <joe@example.org>\r\n"
                       b"To: Ann <ann@example.net>,\r\n\tBob <bob@example.net>,\r\n   Cy <cy@example.net>\r\n"
                       b"Subject: a   subject\r\n folded\t \r\n\tthree times  \r\n\r\nbody\r\n"),
    "repeated headers": (b"Received: from a\r\nReceived: from b\r\n" + HEAD + b"Comments: one\r\n"
                         b"Keywords: k1\r\ncomments: two\r\nKeywords: k2\r\nCOMMENTS: three\r\n\r\nbody\r\n"),
    # RFC 5322 allows one To and one Cc (OpenDKIM refuses more), but such mail is sent
    "repeated To and Cc": (HEAD + b"To: Bob <bob@example.net>\r\nCc: one@example.net\r\nComments: not signed\r\n"
                           b"cc: two@example.net\r\n\r\nbody\r\n"),
    "empty body": HEAD + b"\r\n",
    "headers only": HEAD,
    "no final CRLF": HEAD + b"\r\nfirst line\r\nlast line without its end",
    "trailing blank lines": HEAD + b"\r\ntext\r\n\r\n\r\n  \r\n\t\r\n\r\n",
    "only blank lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "white space": HEAD + b"\r\n  lead\t\tand  inner  \t \r\ntrail   \r\n \r\nend\r\n",
}
CANONS = ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]
REPEATED = ["Received", "Comments", "Keywords", *dkim.DEFAULT_HEADERS]  # repeatable names signed too


def wire(message: bytes) -> bytes:
    """The message as a receiver gets it: SMTP's DATA ends an incomplete last line with CRLF."""
    return message if message.endswith(b"\r\n") or not message else message + b"\r\n"



def write_pem(path, key, fmt=serialization.PrivateFormat.PKCS8, mode=0o600, encryption=None) -> str:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, fmt, encryption or serialization.NoEncryption()))
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An RSA 2048 (s1), an Ed25519 (s2) and a second RSA (s3, a rotation) key of example.org."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for sel, alg, key in (("s1", dkim.RSA_SHA256, rsa.generate_private_key(65537, 2048)),
                          ("s2", dkim.ED25519_SHA256, ed25519.Ed25519PrivateKey.generate()),
                          ("s3", dkim.RSA_SHA256, rsa.generate_private_key(65537, 2048))):
        out[sel] = dkim.load_key(write_pem(d / f"{sel}.pem", key), "example.org", sel, alg)
    return out


def records(*ks: dkim.SigningKey) -> dict[str, list[str]]:
    return {f"{k.selector}._domainkey.{k.domain}": txt_strings(public_record(k.private_key)) for k in ks}


def dnsfunc_for(*ks):
    recs = {name + ".": "".join(parts).encode() for name, parts in records(*ks).items()}

    def dnsfunc(name, timeout=5):
        return recs.get((name.decode() if isinstance(name, bytes) else name).lower())
    return dnsfunc


def dkimpy_ok(message: bytes, *ks, idx: int = 0) -> bool:
    """dkimpy's verdict on the idx-th signature (a failure it raises is a no)."""
    try:
        return bool(dkimpy.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc_for(*ks)))
    except dkimpy.DKIMException:
        return False


def spool_file(tmp_path, message: bytes, name: str = "msg") -> tuple[str, int]:
    path = tmp_path / name
    path.write_bytes(ENVELOPE + message)
    return str(path), len(ENVELOPE)


def tamper(message: bytes) -> bytes:
    """The message with one body or header byte changed (what a verifier must notice)."""
    i = message.find(b"\r\n\r\n")
    if i >= 0 and len(message) > i + 4:
        return message[:i + 4] + b"X" + message[i + 4:]
    return message.replace(b"Subject: hello", b"Subject: hellO")


# ---------------------------------------------------------------- verified by dkimpy and OpenDKIM

@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("sel", ["s1", "s2"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_dkimpy_verifies(tmp_path, keys, name, sel, canon):
    msg = MESSAGES[name]
    path, offset = spool_file(tmp_path, msg)
    sig = dkim.sign(path, offset, keys[sel], timestamp=T, canonicalization=canon, headers=REPEATED)
    assert dkimpy_ok(sig + wire(msg), keys[sel]), (name, sig)
    assert not dkimpy_ok(sig + tamper(wire(msg)), keys[sel])


@pytest.mark.skipif(opendkim.unavailable() is not None, reason=str(opendkim.unavailable()))
@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
@pytest.mark.parametrize("sel", ["s1", "s2"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_opendkim_verifies(tmp_path, keys, name, sel, canon):
    if name == "repeated To and Cc":
        pytest.skip("OpenDKIM refuses a message with two To or Cc headers (RFC 5322 3.6), signed or not")
    if name == "headers only" and canon == "simple/simple":
        # neither an empty body's CRLF (RFC 6376 3.4.3, dkimpy) nor nothing as its hash verifies there
        pytest.xfail("OpenDKIM 2.11 does not verify simple/simple on a message with no line after its headers")
    msg = wire(MESSAGES[name])
    path, offset = spool_file(tmp_path, MESSAGES[name])
    sig = dkim.sign(path, offset, keys[sel], timestamp=T, canonicalization=canon, headers=REPEATED)
    rc, out = opendkim.verify(sig + msg, records(keys[sel]))
    assert rc == 0, out
    rc, out = opendkim.verify(sig + tamper(msg), records(keys[sel]))
    assert rc != 0 and "Bad signature" in out, out


def test_the_signature_header_is_folded_and_tagged(tmp_path, keys):
    path, offset = spool_file(tmp_path, MESSAGES["repeated To and Cc"])
    for sel in ("s1", "s2"):
        sig = dkim.sign(path, offset, keys[sel], timestamp=T)
        assert sig.startswith(b"DKIM-Signature: v=1; ") and sig.endswith(b"\r\n")
        lines = sig[:-2].split(b"\r\n")
        assert all(len(line) <= 78 for line in lines), lines
        assert all(line[:1] == b"\t" for line in lines[1:])
        tags = dict(t.strip().split("=", 1) for t in re.sub(r"\s+", "", sig.decode()[15:]).split(";") if t)
        assert list(tags) == ["v", "a", "c", "d", "s", "t", "h", "bh", "b"]
        assert tags["a"] == keys[sel].algorithm and tags["c"] == "relaxed/relaxed"
        assert tags["d"] == "example.org" and tags["s"] == sel and tags["t"] == str(T)
        # every instance, the last first; From twice (one oversigned); names absent left out
        assert tags["h"] == "From:From:To:To:Cc:Cc:Subject:Date:Message-ID"
    path, offset = spool_file(tmp_path, MESSAGES["repeated headers"])
    sig = dkim.sign(path, offset, keys["s1"], timestamp=T, headers=["Comments", "From", "Received", "Keywords"])
    assert b"h=Comments:Comments:Comments:From:Received:Received:Keywords:Keywords;" in sig.replace(b"\r\n\t", b"")


def test_oversigned_from_breaks_when_a_from_is_added(tmp_path, keys):
    msg = MESSAGES["plain"]
    path, offset = spool_file(tmp_path, msg)
    sig = dkim.sign(path, offset, keys["s1"], timestamp=T)
    assert dkimpy_ok(sig + msg, keys["s1"])
    assert not dkimpy_ok(sig + b"From: evil@example.com\r\n" + msg, keys["s1"])
    assert not dkimpy_ok(sig + msg.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.com\r\n\r\n", 1), keys["s1"])
    # a name configured once covers its instances only: one added above them is not covered (RFC 6376 5.4.2)
    assert dkimpy_ok(sig + b"Subject: added\r\n" + msg, keys["s1"])


def test_configured_headers_and_their_case(tmp_path, keys):
    msg = MESSAGES["plain"]
    path, offset = spool_file(tmp_path, msg)
    sig = dkim.sign(path, offset, keys["s1"], timestamp=T, headers=["from", "SUBJECT", "x-absent"])
    assert b"h=from:SUBJECT;" in sig
    assert dkimpy_ok(sig + msg, keys["s1"])
    assert dkimpy_ok(sig + msg.replace(b"To: Ann", b"To: Bob"), keys["s1"])  # To is not signed now


def test_two_selectors_each_verify_and_neither_covers_the_other(tmp_path, keys):
    msg = MESSAGES["8-bit"]
    path, offset = spool_file(tmp_path, msg)
    both = dkim.sign_many(path, offset, [keys["s1"], keys["s3"]], timestamp=T)
    assert both == [dkim.sign(path, offset, keys["s1"], timestamp=T), dkim.sign(path, offset, keys["s3"], timestamp=T)]
    signed = both[1] + both[0] + msg
    assert dkimpy_ok(signed, keys["s1"], keys["s3"], idx=0) and dkimpy_ok(signed, keys["s1"], keys["s3"], idx=1)
    assert b"DKIM-Signature" not in b"".join(both).split(b"h=")[1].split(b";")[0]
    # the second signature made on the message as stored with the first: the same bytes
    path2, offset2 = spool_file(tmp_path, both[0] + msg, "msg2")
    assert dkim.sign(path2, offset2, keys["s3"], timestamp=T) == both[1]
    if opendkim.unavailable() is None:
        assert opendkim.verify(signed, records(keys["s3"]))[0] == 0


def test_mixed_algorithms_in_one_call(tmp_path, keys):
    msg = MESSAGES["folded headers"]
    path, offset = spool_file(tmp_path, msg)
    sigs = dkim.sign_many(path, offset, [keys["s2"], keys["s1"]], canonicalization="simple/simple")
    signed = b"".join(sigs) + msg
    assert dkimpy_ok(signed, keys["s1"], keys["s2"], idx=0) and dkimpy_ok(signed, keys["s1"], keys["s2"], idx=1)


def _big_message(path, mb: int) -> bytes:
    """A message with an mb MB base64 attachment, written in pieces; returns its header."""
    head = (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    with open(path, "wb") as f:
        f.write(ENVELOPE + head)
        block = os.urandom(57 * 1000)
        for _ in range(mb * 1024 * 1024 // 76000 + 1):
            enc = base64.b64encode(block)
            f.write(b"".join(enc[i:i + 76] + b"\r\n" for i in range(0, len(enc), 76)))
        f.write(b"--b--\r\n")
    return head


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple"])
def test_a_10_mb_attachment_is_signed_in_bounded_memory(tmp_path, keys, canon):
    path = str(tmp_path / "big")
    _big_message(path, 10)
    size = os.path.getsize(path)
    assert size > 10 * 1024 * 1024
    tracemalloc.start()
    try:
        sig = dkim.sign(path, len(ENVELOPE), keys["s1"], timestamp=T, canonicalization=canon)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"peak {peak} bytes for a {size}-byte message"
    with open(path, "rb") as f:
        msg = f.read()[len(ENVELOPE):]
    assert dkimpy_ok(sig + msg, keys["s1"])
    if opendkim.unavailable() is None:
        assert opendkim.verify(sig + msg, records(keys["s1"]))[0] == 0


def test_one_10_mb_line_is_signed_in_bounded_memory(tmp_path, keys):
    """No CRLF for 10 MB (white space and CRs in it): the incomplete line is hashed as it comes."""
    line = (b"abc \t \r def\r" * 100_000)[:1_000_000]
    path = str(tmp_path / "line")
    with open(path, "wb") as f:
        f.write(ENVELOPE + HEAD + b"\r\n")
        for _ in range(10):
            f.write(line)
        f.write(b"  \r\n\r\n")
    for canon in ("relaxed/relaxed", "simple/simple"):
        tracemalloc.start()
        try:
            sig = dkim.sign(path, len(ENVELOPE), keys["s2"], timestamp=T, canonicalization=canon)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024, peak
        with open(path, "rb") as f:
            assert dkimpy_ok(sig + f.read()[len(ENVELOPE):], keys["s2"])


# ---------------------------------------------------------------- the body canonicalisation, chunk by chunk

BODIES = [b"", b"a", b"\r\n", b"a\r\nb\r\n", b"\r\n\r\nx \t\r\n\r\n", b"x\r\r\n\n\r\n", b"  \r\n\r\n", b"\r",
          b"line \r\n \r\n\r\n\r\n", b"no end\r", b"a  \r\n\t\r\nb\r\n\r\n", b"\n\r\n\r\r\n", b" \t \r\n x\r\n \r"]


def reference(body: bytes, canon: str) -> bytes:
    """dkimpy's canonicalisation of the whole body at once, as it arrives (wire)."""
    return hashlib.sha256(DKIMPY_CANON[canon.encode()].canonicalize_body(wire(body))).digest()


def hashed(pieces, canon: str) -> bytes:
    h = dkimcanon.BodyHasher(canon)
    for p in pieces:
        h.update(p)
    return h.digest()


@pytest.mark.parametrize("partial", [None, 1, 2, 3])
@pytest.mark.parametrize("canon", ["relaxed", "simple"])
def test_every_cut_into_three_chunks_hashes_alike(monkeypatch, canon, partial):
    """Each CR, LF, space and tab falls on a chunk boundary in turn (with
    partial: an incomplete line is hashed past that many bytes, too)."""
    if partial is not None:
        monkeypatch.setattr(dkimcanon, "_PARTIAL", partial)
    for body in BODIES:
        want = reference(body, canon)
        for i in range(len(body) + 1):
            for j in range(i, len(body) + 1):
                assert hashed([body[:i], body[i:j], body[j:]], canon) == want, (body, i, j)


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n"]), max_size=40),
       cuts=st.lists(st.integers(1, 7), max_size=20), canon=st.sampled_from(["relaxed", "simple"]),
       partial=st.sampled_from([1, 4, 64 * 1024]))
def test_random_bodies_in_random_chunks_hash_as_dkimpy(body, cuts, canon, partial):
    data = b"".join(body)
    pieces, pos = [], 0
    for c in cuts:
        pieces.append(data[pos:pos + c])
        pos += c
    pieces.append(data[pos:])
    old = dkimcanon._PARTIAL
    dkimcanon._PARTIAL = partial
    try:
        assert hashed(pieces, canon) == reference(data, canon)
    finally:
        dkimcanon._PARTIAL = old


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64 * 1024])
def test_body_hash_from_a_file_in_any_chunk_size(tmp_path, chunk):
    msg = MESSAGES["white space"] + b"\r\n\r\n \r\n"
    path, offset = spool_file(tmp_path, msg)
    body = msg.split(b"\r\n\r\n", 1)[1]
    with open(path, "rb") as f:
        _, start = dkimcanon.read_header_block(f, offset)
        assert start == offset + msg.index(b"\r\n\r\n") + 4
        for canon in ("relaxed", "simple"):
            assert dkimcanon.body_hash(f, start, canon, chunk) == reference(body, canon)


def test_many_blank_lines_then_text(tmp_path):
    body = b"\r\n" * 100_000 + b"x\r\n" + b"\r\n" * 70_000
    for canon in ("relaxed", "simple"):
        assert hashed([body[i:i + 65536] for i in range(0, len(body), 65536)], canon) == reference(body, canon)


# ---------------------------------------------------------------- the header block

def test_header_block_is_bounded(tmp_path, keys):
    msg = HEAD + b"X-Big: " + b"y" * 900 + b"\r\n" + (b"X-More: " + b"z" * 70 + b"\r\n") * 20_000 + b"\r\nbody\r\n"
    path, offset = spool_file(tmp_path, msg)
    with pytest.raises(dkim.MessageError, match="longer than 1048576 bytes"):
        dkim.sign(path, offset, keys["s1"])
    assert dkimpy_ok(dkim.sign(path, offset, keys["s1"], max_header=4 * 1024 * 1024) + msg, keys["s1"])


def test_header_lines_that_are_no_field(tmp_path, keys):
    for bad in (b" folded first: x\r\n" + HEAD + b"\r\n", HEAD + b"no colon here\r\n\r\nbody\r\n",
                HEAD + b": no name\r\n\r\n"):
        path, offset = spool_file(tmp_path, bad)
        with pytest.raises(dkim.MessageError):
            dkim.sign(path, offset, keys["s1"])


def test_fields_and_their_values(tmp_path):
    path, offset = spool_file(tmp_path, MESSAGES["folded headers"])
    with open(path, "rb") as f:
        fields = dkimcanon.parse_header_fields(dkimcanon.read_header_block(f, offset)[0])
    assert [f.name for f in fields] == [b"Date", b"From", b"To", b"Subject"]
    assert fields[1].value == b" Joe\r\n <joe@example.org>"
    assert dkimcanon.canonicalize_header(fields[3], "relaxed") == b"subject:a subject folded three times\r\n"
    assert dkimcanon.canonicalize_header(fields[3], "simple") == fields[3].raw


def test_header_list_and_canonicalization_are_checked():
    assert dkim.header_list(dkim.DEFAULT_HEADERS) == dkim.DEFAULT_HEADERS
    for bad, why in ((["To"], "must include From"), (["From", "DKIM-Signature"], "not signed"),
                     (["From", "Sub ject"], "not a header"), (["From", "Grüße"], "not a header")):
        with pytest.raises(ValueError, match=why):
            dkim.header_list(bad)
    assert dkimcanon.parse_canonicalization("relaxed") == ("relaxed", "simple")
    assert dkimcanon.parse_canonicalization("Simple/Relaxed") == ("simple", "relaxed")
    with pytest.raises(ValueError):
        dkimcanon.parse_canonicalization("loose/relaxed")


# ---------------------------------------------------------------- which keys sign

def fields_of(head: bytes) -> list[dkim.HeaderField]:
    return dkimcanon.parse_header_fields(head)


def test_choose_keys_by_from_domain_or_a_configured_parent(keys):
    table = {"example.org": [keys["s1"], keys["s3"]], "xn--bcher-kva.example": [keys["s2"]]}
    c = dkim.choose_keys(fields_of(HEAD), table)
    assert c.signed and c.keys == (keys["s1"], keys["s3"]) and c.domain == "example.org"
    c = dkim.choose_keys(fields_of(b"From: cron <cron@NAS.Lan.Example.ORG>\r\n"), table)
    assert c.keys == (keys["s1"], keys["s3"]) and c.domain == "nas.lan.example.org"
    c = dkim.choose_keys(fields_of("From: Jö <jö@bücher.example>\r\n".encode()), table)
    assert c.keys == (keys["s2"],) and c.domain == "xn--bcher-kva.example"
    c = dkim.choose_keys(fields_of(b"From: a@example.org, b@mail.example.org\r\nSender: a@example.org\r\n"), table)
    assert not c.signed and c.reason == dkim.BAD_FROM and "several domains" in c.detail
    c = dkim.choose_keys(fields_of(b"From: a@example.org, b@example.org\r\n"), table)
    assert c.signed
    c = dkim.choose_keys(fields_of(b"From: joe@notexample.org\r\n"), table)
    assert (c.signed, c.reason, c.domain) == (False, dkim.NO_KEY, "notexample.org")


@pytest.mark.parametrize("head, reason", [
    (b"To: a@example.org\r\nSubject: x\r\n", dkim.NO_FROM),
    (b"", dkim.NO_FROM),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n", dkim.SEVERAL_FROM),
    (b"from: a@example.org\r\nTo: x@y\r\nFROM: a@example.org\r\n", dkim.SEVERAL_FROM),
    (b"From: not an address\r\n", dkim.BAD_FROM),
    (b"From: Joe <joe@example.org\r\n", dkim.BAD_FROM),
    (b"From: a@\r\n", dkim.BAD_FROM),
    (b"From: @example.org\r\n", dkim.BAD_FROM),
    (b"From: a@b@example.org\r\n", dkim.BAD_FROM),
    (b"From: x@[192.0.2.1]\r\n", dkim.BAD_FROM),
    (b"From: x@-bad-.example.org\r\n", dkim.BAD_FROM),
    (b"From: undisclosed:;\r\n", dkim.BAD_FROM),
    (b"From:\r\n", dkim.BAD_FROM),
    (b"From: <>\r\n", dkim.BAD_FROM),
    (b"From: a@exa\xffmple.org\r\n", dkim.BAD_FROM),
])
def test_messages_that_are_not_signed_say_why(keys, head, reason):
    c = dkim.choose_keys(fields_of(head), {"example.org": [keys["s1"]]})
    assert not c.signed and c.keys == () and c.reason == reason, c


# ---------------------------------------------------------------- key files

def test_a_good_key_loads_in_either_pem_form(tmp_path):
    key = rsa.generate_private_key(65537, 2048)
    for i, fmt in enumerate((serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL)):
        k = dkim.load_key(write_pem(tmp_path / f"{i}.pem", key, fmt), "Example.ORG.", "Sel1")
        assert (k.domain, k.selector, k.algorithm, k.warnings) == ("example.org", "sel1", dkim.RSA_SHA256, ())


def test_a_missing_key(tmp_path):
    with pytest.raises(dkim.KeyFileError, match=f"^{tmp_path}/nope.pem: no such file"):
        dkim.load_key(str(tmp_path / "nope.pem"), "example.org", "s")


def test_an_unreadable_key(tmp_path, monkeypatch):
    path = write_pem(tmp_path / "k.pem", ed25519.Ed25519PrivateKey.generate(), mode=0o000)
    if os.geteuid() == 0:  # root reads anything: make the open fail as it would for the relay's user
        def refuse(*a, **kw):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(dkim.os, "open", refuse)
    with pytest.raises(dkim.KeyFileError, match=f"^{path}: not readable by this user"):
        dkim.load_key(path, "example.org", "s", dkim.ED25519_SHA256)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o602])
def test_a_key_others_may_read(tmp_path, mode):
    path = write_pem(tmp_path / "k.pem", ed25519.Ed25519PrivateKey.generate(), mode=mode)
    with pytest.raises(dkim.KeyFileError, match=f"^{path}: mode {mode:04o} lets the group or others .* chmod 600"):
        dkim.load_key(path, "example.org", "s", dkim.ED25519_SHA256)


@pytest.mark.parametrize("content", [b"", b"hello\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                                     b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"])
def test_not_a_key(tmp_path, content):
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(dkim.KeyFileError, match=f"^{path}: not a PEM private key"):
        dkim.load_key(str(path), "example.org", "s")


def test_not_a_file_or_too_large(tmp_path):
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(dkim.KeyFileError, match="dir: not a regular file"):
        dkim.load_key(str(tmp_path / "dir"), "example.org", "s")
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (dkim.MAX_KEY_FILE + 1))
    big.chmod(0o600)
    with pytest.raises(dkim.KeyFileError, match="big.pem: not a key \\(larger than"):
        dkim.load_key(str(big), "example.org", "s")


def test_an_encrypted_key(tmp_path):
    path = write_pem(tmp_path / "k.pem", rsa.generate_private_key(65537, 2048),
                     encryption=serialization.BestAvailableEncryption(b"secret"))
    with pytest.raises(dkim.KeyFileError, match="k.pem: the key is encrypted"):
        dkim.load_key(path, "example.org", "s")


def test_an_rsa_key_too_short_is_refused_and_a_short_one_warned(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (cryptography makes no key under 1024 bits)")
    path = tmp_path / "512.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(path), "512"], check=True, capture_output=True)
    path.chmod(0o600)
    with pytest.raises(dkim.KeyFileError, match="512.pem: an RSA key of 512 bits: verifiers refuse"):
        dkim.load_key(str(path), "example.org", "s")
    k = dkim.load_key(write_pem(tmp_path / "1024.pem", rsa.generate_private_key(65537, 1024)), "example.org", "s")
    assert len(k.warnings) == 1 and "1024.pem: an RSA key of 1024 bits" in k.warnings[0]


def test_the_algorithm_must_match_the_key(tmp_path):
    ed = write_pem(tmp_path / "ed.pem", ed25519.Ed25519PrivateKey.generate())
    rs = write_pem(tmp_path / "rsa.pem", rsa.generate_private_key(65537, 2048))
    ecp = write_pem(tmp_path / "ec.pem", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(dkim.KeyFileError, match="ed.pem: an Ed25519 key, configured for rsa-sha256"):
        dkim.load_key(ed, "example.org", "s", dkim.RSA_SHA256)
    with pytest.raises(dkim.KeyFileError, match="rsa.pem: an RSA key, configured for ed25519-sha256"):
        dkim.load_key(rs, "example.org", "s", dkim.ED25519_SHA256)
    with pytest.raises(dkim.KeyFileError, match="ec.pem: not an RSA or Ed25519 key"):
        dkim.load_key(ecp, "example.org", "s", dkim.RSA_SHA256)
    with pytest.raises(dkim.KeyFileError, match="unknown algorithm 'rsa-sha1'"):
        dkim.load_key(rs, "example.org", "s", "rsa-sha1")


def test_domain_and_selector_must_be_dns_names(tmp_path):
    path = write_pem(tmp_path / "k.pem", ed25519.Ed25519PrivateKey.generate())
    for domain, selector in (("exa mple.org", "s"), ("example.org", "s;x"), ("example.org", ""), ("", "s")):
        with pytest.raises(ValueError):
            dkim.load_key(path, domain, selector, dkim.ED25519_SHA256)


# ---------------------------------------------------------------- intake's one call

def test_sign_message_chooses_and_signs_in_one_read(tmp_path, keys):
    table = {"example.org": [keys["s1"], keys["s2"]]}
    path, offset = spool_file(tmp_path, MESSAGES["8-bit"])
    choice, sigs = dkim.sign_message(path, offset, table, timestamp=T)
    assert choice.signed and choice.domain == "example.org" and len(sigs) == 2
    assert sigs == dkim.sign_many(path, offset, [keys["s1"], keys["s2"]], timestamp=T)
    signed = sigs[1] + sigs[0] + MESSAGES["8-bit"]
    assert dkimpy_ok(signed, keys["s1"], keys["s2"], idx=0) and dkimpy_ok(signed, keys["s1"], keys["s2"], idx=1)


@pytest.mark.parametrize("message, reason", [
    (b"To: a@example.org\r\n\r\nbody\r\n", dkim.NO_FROM),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n\r\n", dkim.SEVERAL_FROM),
    (b"From: a@\r\n\r\n", dkim.BAD_FROM),
    (b"From: a@example.net\r\n\r\n", dkim.NO_KEY),
    (b"From: a@example.org\r\nno colon\r\n\r\n", dkim.BAD_HEADER),
    (b"From: a@example.org\r\nX: " + b"y" * 2000 + b"\r\n\r\n", dkim.BAD_HEADER),
])
def test_sign_message_gives_a_reason_not_an_exception(tmp_path, keys, message, reason):
    path, offset = spool_file(tmp_path, message)
    choice, sigs = dkim.sign_message(path, offset, {"example.org": [keys["s1"]]}, max_header=1000)
    assert (choice.signed, choice.reason, sigs) == (False, reason, []), choice


FROMS = ["joe@example.org", "  Joe <joe@example.org>  ", '"Joe, Jr." <joe@Example.ORG>',
         "=?utf-8?q?J=C3=B6?= <j@x.example.org>", "Joe Q Public <john.q.public@example.org>",
         "J. Doe <j@example.org>", "joe@example.org (Joe)", "<joe@example.org>", "joe@exa_mple.org",
         "Joe <joe@example.org", "joe@-x.org", "a@b@example.org", "Jö <jö@bücher.example>",
         '"unterminated <joe@example.org>', "joe@[192.0.2.1]", "x <a..b@example.org>", "joe@example.org,", ""]


@pytest.mark.parametrize("value", FROMS)
def test_the_fast_path_for_plain_from_headers_reads_as_the_full_parser(monkeypatch, value):
    def outcome():
        try:
            return dkim.from_domain(value.encode())
        except ValueError as e:
            return f"ValueError: {e}"
    fast = outcome()
    monkeypatch.setattr(dkim, "_PLAIN_FROM", re.compile(r"(?!)"))
    assert fast == outcome()


@settings(max_examples=500, deadline=None)
@given(value=st.one_of(
    st.text(alphabet=' \t"<>@.,;:()\\aZ9-_=?ö', max_size=30),
    st.builds("{}<{}@{}>{}".format, st.text(alphabet=' \t"a.,=?()', max_size=8),
              st.text(alphabet='a.-"_+', min_size=1, max_size=6), st.text(alphabet="a.-_Zö", min_size=1, max_size=8),
              st.text(alphabet=" \t(),", max_size=3)),
    st.builds("{}@{}".format, st.text(alphabet='a.-"_+ ', min_size=1, max_size=6),
              st.text(alphabet="a.-_Z ", min_size=1, max_size=8))))
def test_the_fast_path_agrees_on_random_from_values(value):
    def outcome(fast):
        old = dkim._PLAIN_FROM
        if not fast:
            dkim._PLAIN_FROM = re.compile(r"(?!)")
        try:
            return dkim.from_domain(value.encode())
        except ValueError:
            return None
        finally:
            dkim._PLAIN_FROM = old
    assert outcome(True) == outcome(False)


def test_a_huge_from_header_is_not_parsed(keys):
    c = dkim.choose_keys(fields_of(b"From: " + b"a" * 20000 + b" <joe@example.org>\r\n"), {"example.org": [keys["s1"]]})
    assert (c.signed, c.reason, c.detail) == (False, dkim.BAD_FROM, "longer than 16384 bytes")


def test_a_message_without_from_signed_anyway_names_from_in_h(tmp_path, keys):
    msg = b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nSubject: no from\r\n\r\nbody\r\n"
    path, offset = spool_file(tmp_path, msg)
    sig = dkim.sign(path, offset, keys["s2"], timestamp=T)
    assert b"h=From:From:Subject:Date;" in sig
    assert dkimpy_ok(sig + msg, keys["s2"]) and not dkimpy_ok(sig + b"From: x@example.org\r\n" + msg, keys["s2"])
