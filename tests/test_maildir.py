"""relay.mailbox.maildir: delivery into Maildirs and the reading helpers POP3 uses."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.common.address import AddressError
from relay.mailbox import maildir


def spool_file(tmp_path, data: bytes, junk: bytes = b"") -> tuple[str, int]:
    """A spool-like file: some envelope bytes, then the message at an offset."""
    p = tmp_path / "spool.msg"
    p.write_bytes(junk + data)
    return str(p), len(junk)


def crlf_to_lf(b: bytes) -> bytes:
    return b.replace(b"\r\n", b"\n")


MSG = b"Subject: test\r\nFrom: a@example.net\r\n\r\nline one\r\n.dot line\r\n\r\nlast\r\n"
PREFIX = b"Return-Path: <a@example.net>\r\nDelivered-To: alice@example.org\r\n"


def test_deliver_writes_lf_file_with_sizes_in_name(tmp_path):
    root = str(tmp_path / "mail")
    src, off = spool_file(tmp_path, MSG, junk=b"ENVELOPE-JUNK\r\n")
    path = maildir.deliver(root, "example.org", "alice", src, off, PREFIX)
    assert os.path.dirname(path) == os.path.join(root, "example.org", "alice", "new")
    with open(path, "rb") as f:
        data = f.read()
    assert data == crlf_to_lf(PREFIX + MSG)
    assert b"\r" not in data
    name = os.path.basename(path)
    assert f",S={len(data)}," in name
    assert name.endswith(f",W={len(PREFIX + MSG)}")
    assert os.listdir(os.path.join(root, "example.org", "alice", "tmp")) == []


def test_deliver_modes(tmp_path):
    root = str(tmp_path / "mail")
    src, off = spool_file(tmp_path, MSG)
    path = maildir.deliver(root, "example.org", "alice", src, off, b"")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for d in ("example.org", "example.org/alice", "example.org/alice/new",
              "example.org/alice/cur", "example.org/alice/tmp"):
        assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d


def test_deliver_lowercases_the_mailbox(tmp_path):
    root = str(tmp_path / "mail")
    src, off = spool_file(tmp_path, MSG)
    p1 = maildir.deliver(root, "Example.ORG", "Alice", src, off, b"")
    assert p1.startswith(os.path.join(root, "example.org", "alice", "new"))


def test_deliver_unique_names(tmp_path):
    root = str(tmp_path / "mail")
    src, off = spool_file(tmp_path, MSG)
    paths = {maildir.deliver(root, "example.org", "bob", src, off, b"") for _ in range(50)}
    assert len(paths) == 50
    for p in paths:
        base = os.path.basename(p)
        assert "/" not in base and ":" not in base
        assert maildir.uidl_for(base.split(",")[0]) == base.split(",")[0] or len(base.split(",")[0]) > 70


def test_unique_name_escapes_hostname(monkeypatch):
    monkeypatch.setattr(maildir, "_hostname", None)
    monkeypatch.setattr(maildir.socket, "gethostname", lambda: "we/ird:host,name")
    name = maildir.unique_name()
    assert name.endswith(r".we\057ird\072host\054name")
    assert "/" not in name and ":" not in name and "," not in name


@pytest.mark.parametrize("local", ["..", "../x", "a/b", "", ".hidden", "a\x00b", "a\\b", "a\nb"])
def test_deliver_refuses_unsafe_local_parts(tmp_path, local):
    root = tmp_path / "mail"
    src, off = spool_file(tmp_path, MSG)
    with pytest.raises(AddressError):
        maildir.deliver(str(root), "example.org", local, src, off, b"")
    assert not root.exists() or list(root.rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.msg"]


@pytest.mark.parametrize("domain", ["..", ".", "a/b", "", ".hidden", "a\x00b", "../../etc"])
def test_deliver_refuses_unsafe_domains(tmp_path, domain):
    root = tmp_path / "mail"
    src, off = spool_file(tmp_path, MSG)
    with pytest.raises(AddressError):
        maildir.deliver(str(root), domain, "alice", src, off, b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.msg"]


def test_deliver_missing_source_is_oserror_and_leaves_nothing(tmp_path):
    root = str(tmp_path / "mail")
    with pytest.raises(OSError):
        maildir.deliver(root, "example.org", "alice", str(tmp_path / "nope"), 0, b"")
    box = os.path.join(root, "example.org", "alice")
    assert os.listdir(os.path.join(box, "tmp")) == []
    assert os.listdir(os.path.join(box, "new")) == []


def test_deliver_unwritable_maildir_is_oserror(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; make tmp/ a file instead so open() fails
        root = str(tmp_path / "mail")
        box = os.path.join(root, "example.org", "alice")
        os.makedirs(os.path.join(box, "new"))
        os.makedirs(os.path.join(box, "cur"))
        open(os.path.join(box, "tmp"), "w").close()
    else:
        root = str(tmp_path / "mail")
        os.makedirs(root)
        os.chmod(root, 0o500)
    src, off = spool_file(tmp_path, MSG)
    with pytest.raises(OSError):
        maildir.deliver(root, "example.org", "alice", src, off, b"")


def test_deliver_streams_in_chunks(tmp_path, monkeypatch):
    """Small CHUNK: a CRLF split across chunk boundaries is still one line end,
    and the whole message never has to be in memory at once."""
    monkeypatch.setattr(maildir, "CHUNK", 7)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, n):
            self.f.seek(n)

        def read(self, n):
            reads.append(n)
            return self.f.read(n)

    body = b"".join(b"line %d with some text\r\n" % i for i in range(200))
    src, off = spool_file(tmp_path, body)
    monkeypatch.setattr(maildir, "open", lambda p, m="r": Spy(real_open(p, m)) if p == src else real_open(p, m),
                        raising=False)
    path = maildir.deliver(str(tmp_path / "mail"), "example.org", "alice", src, off, PREFIX)
    assert max(reads) == 7
    with open(path, "rb") as f:
        assert f.read() == crlf_to_lf(PREFIX + body)
    assert path.endswith(f",W={len(PREFIX + body)}")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_lf_crlf_conversion_roundtrip(data, chunk):
    """ToCRLF(stored) has exactly the size _VirtualSize predicts, whatever the chunking."""
    conv_lf = maildir._ToLF()
    stored = b"".join(conv_lf.feed(data[i:i + chunk]) for i in range(0, len(data), chunk)) + conv_lf.flush()
    assert stored == data.replace(b"\r\n", b"\n")
    vs = maildir._VirtualSize()
    for i in range(0, len(stored), chunk):
        vs.feed(stored[i:i + chunk])
    conv = maildir.ToCRLF()
    wire = b"".join(conv.feed(stored[i:i + chunk]) for i in range(0, len(stored), chunk)) + conv.flush()
    assert len(wire) == vs.size == conv.size
    assert wire == stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    # For SMTP-clean input (CRLF only) the wire form is the original.
    clean = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    c2 = maildir._ToLF()
    st2 = c2.feed(clean) + c2.flush()
    c3 = maildir.ToCRLF()
    assert c3.feed(st2) + c3.flush() == clean


# -- reading -------------------------------------------------------------------


def fill(tmp_path, n=3):
    root = str(tmp_path / "mail")
    src, off = spool_file(tmp_path, MSG)
    paths = [maildir.deliver(root, "example.org", "alice", src, off, PREFIX) for _ in range(n)]
    return root, os.path.join(root, "example.org", "alice"), paths


def test_scan_lists_in_delivery_order_with_sizes(tmp_path):
    _root, box, paths = fill(tmp_path, 5)
    msgs = maildir.scan(box)
    assert [m.path for m in msgs] == paths
    assert all(m.size == len(PREFIX + MSG) for m in msgs)
    assert len({m.uid for m in msgs}) == 5
    for m in msgs:
        assert 1 <= len(m.uid) <= 70
        assert all(0x21 <= ord(c) <= 0x7E for c in m.uid)


def test_uidl_stable_across_move_and_flags(tmp_path):
    _root, box, _paths = fill(tmp_path, 2)
    before = {m.base: m.uid for m in maildir.scan(box)}
    m = maildir.scan(box)[0]
    new_path = maildir.mark_seen(box, m)
    assert os.path.dirname(new_path) == os.path.join(box, "cur")
    assert new_path.endswith(":2,S")
    # another reader adds flags
    flagged = new_path[: -len(":2,S")] + ":2,FRS"
    os.rename(new_path, flagged)
    after = {m.base: m.uid for m in maildir.scan(box)}
    assert after == before


def test_mark_seen_keeps_flags_sorted_and_follows_moves(tmp_path):
    _root, box, paths = fill(tmp_path, 1)
    m = maildir.scan(box)[0]
    # another reader moved it to cur/ with a flag meanwhile
    moved = os.path.join(box, "cur", os.path.basename(paths[0]) + ":2,F")
    os.rename(paths[0], moved)
    p = maildir.mark_seen(box, m)
    assert p == moved[: -len(":2,F")] + ":2,FS"
    assert maildir.mark_seen(box, m) == p  # already seen: no-op
    _root, box, paths = fill(tmp_path, 1)
    m = maildir.scan(box)[-1]
    os.unlink(m.path)
    with pytest.raises(FileNotFoundError):
        maildir.mark_seen(box, m)


def test_foreign_messages_sizes_computed(tmp_path):
    box = tmp_path / "box"
    for d in ("new", "cur", "tmp"):
        (box / d).mkdir(parents=True)
    (box / "cur" / "1000000000.12345_1.other:2,S").write_bytes(b"A: b\n\nbody\n")  # LF, no S/W
    (box / "new" / "1000000001.M5P6.other,S=99").write_bytes(b"A: b\r\n\r\nx\r\n")  # wrong S=, CRLF
    (box / "new" / ".hidden").write_bytes(b"junk")
    (box / "new" / "sub").mkdir()
    (box / "new" / "link").symlink_to("/etc/passwd")
    msgs = maildir.scan(str(box))
    assert [m.size for m in msgs] == [len(b"A: b\r\n\r\nbody\r\n"), len(b"A: b\r\n\r\nx\r\n")]
    assert [m.uid for m in msgs] == ["1000000000.12345_1.other", "1000000001.M5P6.other"]


def test_long_or_odd_names_get_hash_uidl(tmp_path):
    box = tmp_path / "box"
    for d in ("new", "cur", "tmp"):
        (box / d).mkdir(parents=True)
    long = "1.M1P1Q1R1." + "h" * 100
    (box / "new" / long).write_bytes(b"x\n")
    (box / "new" / "2.M1P1.caf\u00e9").write_bytes(b"y\n")
    (box / "new" / "3.M1P1.sp ace").write_bytes(b"z\n")
    msgs = maildir.scan(str(box))
    assert len(msgs) == 3
    for m in msgs:
        assert 1 <= len(m.uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in m.uid), m.uid
    assert len({m.uid for m in msgs}) == 3
    assert maildir.uidl_for(long) == maildir.uidl_for(long)


def test_duplicate_cores_are_disambiguated(tmp_path):
    box = tmp_path / "box"
    for d in ("new", "cur", "tmp"):
        (box / d).mkdir(parents=True)
    (box / "new" / "5.M1P1.host,S=2").write_bytes(b"x\n")
    (box / "new" / "5.M1P1.host,S=3,W=6").write_bytes(b"yy\n")
    msgs = maildir.scan(str(box))
    assert len({m.uid for m in msgs}) == 2


def test_same_message_in_new_and_cur_listed_once(tmp_path):
    _root, box, paths = fill(tmp_path, 1)
    name = os.path.basename(paths[0])
    os.link(paths[0], os.path.join(box, "cur", name + ":2,S"))
    assert len(maildir.scan(box)) == 1


def test_delete_and_read(tmp_path):
    _root, box, _paths = fill(tmp_path, 3)
    msgs = maildir.scan(box)
    assert maildir.read_message(box, msgs[0], 1 << 20) == crlf_to_lf(PREFIX + MSG)
    maildir.mark_seen(box, msgs[1])
    os.unlink(msgs[2].path)  # already gone: counts as deleted
    assert maildir.delete(box, msgs) == 0
    assert maildir.scan(box) == []


def test_read_follows_a_moved_file(tmp_path):
    _root, box, paths = fill(tmp_path, 1)
    m = maildir.scan(box)[0]
    os.rename(paths[0], os.path.join(box, "cur", os.path.basename(paths[0]) + ":2,"))
    assert maildir.read_message(box, m, 100).startswith(b"Return-Path")
    with maildir.open_message(box, m) as f:
        assert f.read(6) == b"Return"


def test_lock_is_exclusive_within_a_process(tmp_path):
    _root, box, _ = fill(tmp_path, 1)
    a = maildir.MailboxLock(box)
    a.acquire()
    b = maildir.MailboxLock(box)
    with pytest.raises(maildir.MailboxLocked):
        b.acquire()
    a.release()
    b.acquire()
    assert b.held
    b.release()
    assert not b.held


def test_lock_excludes_another_process(tmp_path):
    root, box, _ = fill(tmp_path, 1)
    code = (
        "import sys, fcntl, os\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, os.path.join(box, maildir.LOCK_NAME)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"locked\n"
        with pytest.raises(maildir.MailboxLocked):
            maildir.open_mailbox(root, "example.org", "alice")
    finally:
        p.stdin.close()
        p.wait(10)
    _path, lock, msgs = maildir.open_mailbox(root, "example.org", "alice")
    assert len(msgs) == 1
    lock.release()


def test_open_mailbox_creates_missing_maildir(tmp_path):
    root = str(tmp_path / "mail")
    path, lock, msgs = maildir.open_mailbox(root, "example.org", "newuser")
    try:
        assert msgs == []
        for d in ("new", "cur", "tmp"):
            assert os.path.isdir(os.path.join(path, d))
    finally:
        lock.release()


def test_open_mailbox_refuses_unsafe_names(tmp_path):
    with pytest.raises(AddressError):
        maildir.open_mailbox(str(tmp_path), "example.org", "../../x")
    with pytest.raises(AddressError):
        maildir.open_mailbox(str(tmp_path), "../x", "alice")
