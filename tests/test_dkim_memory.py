"""DKIM signing of a message held in memory (issue 14: signing under 15% of the accept rate).

A message up to 64 KiB is signed from the bytes intake holds (an io.BytesIO):
its header block and body hash are taken from those bytes in a few calls,
and the DKIM-Signature header is a template folded once per key and h= list
and filled per message.  Each must give exactly the bytes of the streaming,
fold-per-message way: the same signature as a file of the same message
(which tests/test_dkim.py has dkimpy and OpenDKIM verify), and dkimpy accepts
it, for every message of test_dkim's set, every canonicalisation, bad header
blocks and bodies cut anywhere.
"""

from __future__ import annotations

import hashlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import dkim, dkimcanon
from tests import test_dkim
from tests.test_dkim import CANONS, ENVELOPE, MESSAGES, REPEATED, T, dkimpy_ok, spool_file, wire

keys = test_dkim.keys  # the module's fixture: an RSA (s1) and an Ed25519 (s2) key of example.org

FROM_FILE = {"timestamp": T, "headers": REPEATED}


@pytest.mark.parametrize("canon", CANONS)
@pytest.mark.parametrize("sel", ["s1", "s2"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_memory_and_file_give_the_same_signature(tmp_path, keys, name, sel, canon):
    msg = MESSAGES[name]
    path, offset = spool_file(tmp_path, msg)
    table = {"example.org": [keys[sel]]}
    on_disk = dkim.sign_message(path, offset, table, canonicalization=canon, **FROM_FILE)
    held = dkim.sign_open(io.BytesIO(ENVELOPE + msg), offset, table, canonicalization=canon, **FROM_FILE)
    assert held == on_disk
    assert held[1] and dkimpy_ok(held[1][0] + wire(msg), keys[sel])


def test_a_second_message_of_the_same_layout_is_signed_right(keys):
    """The template of the first message's header is reused: the second one's
    t=, bh= and b= are its own (a stale value would fail dkimpy)."""
    table = {"example.org": [keys["s1"], keys["s2"]]}
    for i, msg in enumerate((MESSAGES["plain"], MESSAGES["plain"].replace(b"see you", b"bye"))):
        choice, sigs = dkim.sign_open(io.BytesIO(ENVELOPE + msg), len(ENVELOPE), table, timestamp=T + i)
        assert len(sigs) == 2 and all(f"t={T + i};".encode() in s for s in sigs)
        signed = b"".join(reversed(sigs)) + msg
        assert dkimpy_ok(signed, keys["s1"], keys["s2"], idx=0) and dkimpy_ok(signed, keys["s1"], keys["s2"], idx=1)


def test_a_header_block_too_long_in_memory_is_a_reason():
    msg = b"From: a@example.org\r\nX-Big: " + b"x" * 300 + b"\r\n\r\nbody\r\n"
    choice, sigs = dkim.sign_open(io.BytesIO(msg), 0, {}, max_header=100)
    assert choice.reason == dkim.BAD_HEADER and not sigs
    with pytest.raises(dkimcanon.MessageError):
        dkimcanon.header_block_of(msg, 0, 100)
    with pytest.raises(dkimcanon.MessageError):
        dkimcanon.header_block_of(b"From: a@example.org\r\n" * 10, 0, 100)  # no body: all of it headers


def test_an_unknown_body_canonicalization_is_refused():
    with pytest.raises(ValueError):
        dkimcanon.body_hash_of(b"x\r\n", 0, "loose")


PIECES = st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"X: y", b"  \r\n"]),
                  max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=PIECES, start=st.integers(0, 4), limit=st.sampled_from([dkimcanon.MAX_HEADER_BYTES, 8, 30]))
def test_header_block_and_body_hash_from_bytes_match_the_file_way(data, start, limit):
    start = min(start, len(data))

    def from_file():
        try:
            return dkimcanon.read_header_block(io.BytesIO(data), start, limit)
        except dkimcanon.MessageError as e:
            return str(e)

    try:
        held = dkimcanon.header_block_of(data, start, limit)
    except dkimcanon.MessageError as e:
        held = str(e)
    assert held == from_file()
    for canon in ("simple", "relaxed"):
        assert dkimcanon.body_hash_of(data, start, canon) == dkimcanon.body_hash(io.BytesIO(data), start, canon)


def test_a_body_past_the_partial_bound_is_hashed_in_parts_alike():
    body = b"w" * (70 * 1024) + b"  \r\n\r\n"  # one line longer than BodyHasher's partial bound
    for canon in ("simple", "relaxed"):
        assert dkimcanon.body_hash_of(body, 0, canon) == dkimcanon.body_hash(io.BytesIO(body), 0, canon, 1000)
    assert dkimcanon.body_hash_of(b"", 0, "simple") == hashlib.sha256(b"\r\n").digest()
    assert dkimcanon.body_hash_of(b"", 0, "relaxed") == hashlib.sha256(b"").digest()
