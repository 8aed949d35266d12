"""relay.intake.signing with the spool's IncomingMessage: the signature
first in the stored message (held in memory, or spilled and rewritten with a
kernel-side copy), bounded memory on 10 MB, the copy's fallbacks, and a job
that never raises (the reasons it gives)."""

from __future__ import annotations

import errno
import os
import tracemalloc

import dkim as dkimpy
import pytest

from relay.intake import dkim
from relay.intake.dkimkeys import generate_key, public_record, write_key
from relay.intake.signing import Signer
from relay.queue import incoming as incmod
from relay.queue.envelope import Envelope

MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\nbody\r\n"


@pytest.fixture
def key(tmp_path):
    k = generate_key(dkim.ED25519_SHA256)
    path = str(tmp_path / "k.pem")
    write_key(path, k)
    return dkim.load_key(path, "example.org", "s", dkim.ED25519_SHA256)


def dnsfunc_for(key):
    rec = public_record(key.private_key).encode()
    return lambda name, timeout=5: rec if name in (b"s._domainkey.example.org.", "s._domainkey.example.org.") else None


def new_message(tmp_path, qid="Q1"):
    for d in ("incoming", "queue"):
        (tmp_path / d).mkdir(exist_ok=True)
    env = Envelope(queue_id=qid, sender="a@example.org", recipients=["b@example.net"], orcpts=[None],
                   arrival=0, client={})
    return incmod.IncomingMessage(str(tmp_path / "incoming"), str(tmp_path / "queue"), env, in_memory=True)


def stored(tmp_path, m) -> bytes:
    data = (tmp_path / "queue" / m.queue_id).read_bytes()
    assert data.startswith(m.header)
    return data[len(m.header):]


def test_in_memory_message_signed_first_and_data_kept(tmp_path, key):
    m = new_message(tmp_path)
    m.write(b"Received: by us\r\n" + MSG)
    job = Signer([key]).job()
    m.finish(job)
    body = stored(tmp_path, m)
    assert body.startswith(b"DKIM-Signature:") and m.data == body and m.size == len(body)
    assert dkimpy.verify(body, dnsfunc=dnsfunc_for(key))
    assert job.outcome() == (True, "d=example.org s=s a=ed25519-sha256")
    assert os.listdir(tmp_path / "incoming") == []


@pytest.mark.parametrize("fail", [None, "copy_file_range", "sendfile"])
def test_spilled_message_rewritten_in_bounded_memory(tmp_path, key, monkeypatch, fail):
    calls = []
    if fail:
        def broken(*a, **kw):
            calls.append(fail)
            raise OSError(errno.EXDEV if fail == "copy_file_range" else errno.EINVAL, "no")
        monkeypatch.setattr(os, "copy_file_range", broken)
        if fail == "sendfile":
            monkeypatch.setattr(os, "sendfile", broken)
    m = new_message(tmp_path)
    line = b"x" * 76 + b"\r\n"
    m.write(MSG)
    for _ in range(10 * 1024 * 1024 // len(line) // 64):
        m.write(line * 64)
    size = m.size
    tracemalloc.start()
    try:
        m.finish(Signer([key]).job())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024 + 256 * 1024, peak  # a chunk for hashing, the copy's chunk for the last fallback
    assert (tmp_path / "queue" / "Q1").stat().st_size == len(m.header) + m.size
    assert m.size > size and m.data is None
    assert os.listdir(tmp_path / "incoming") == []
    with open(tmp_path / "queue" / "Q1", "rb") as f:
        f.seek(len(m.header))
        head = f.read(2000)
    assert head.startswith(b"DKIM-Signature:") and MSG in head
    body = stored(tmp_path, m)
    assert dkimpy.verify(body, dnsfunc=dnsfunc_for(key))
    assert bool(calls) == bool(fail)


def test_unsigned_message_is_stored_as_written(tmp_path, key):
    m = new_message(tmp_path)
    m.write(b"To: b@example.net\r\n\r\nno from\r\n")
    job = Signer([key]).job()
    m.finish(job)
    assert stored(tmp_path, m) == b"To: b@example.net\r\n\r\nno from\r\n"
    assert job.outcome() == (False, "no From header")


def test_job_never_raises(tmp_path, key, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("surprise")
    monkeypatch.setattr("relay.intake.signing.sign_open", boom)
    m = new_message(tmp_path)
    m.write(MSG)
    job = Signer([key]).job()
    m.finish(job)
    assert stored(tmp_path, m) == MSG
    assert job.outcome() == (False, "signing failed (RuntimeError: surprise)")


def test_signer_reconfigure_and_parent_domain(tmp_path, key):
    s = Signer()
    assert not s.enabled
    s.reconfigure([key], headers=("From", "Subject"), canonicalization="simple/simple")
    assert s.enabled
    m = new_message(tmp_path)
    m.write(MSG.replace(b"a@example.org", b"cron@nas.example.org"))
    job = s.job()
    m.finish(job)
    body = stored(tmp_path, m)
    assert b"c=simple/simple" in body and b"h=From:Subject" in body.replace(b"\r\n\t", b"")
    assert dkimpy.verify(body, dnsfunc=dnsfunc_for(key))
