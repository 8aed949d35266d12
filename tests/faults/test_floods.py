"""Floods against a relay process: 2000 connections at once, an endless
command line, an endless header block (and an endless line) inside DATA,
random bytes.  The relay stays up, its memory stays bounded (VmRSS/VmHWM
from /proc), and a new client is served meanwhile.
"""

from __future__ import annotations

import random
import re
import resource
import smtplib
import time

import pytest

from relay.queue import spool as spoolmod
from tests.support.flood import open_many, pour_unread, reply_lines, stream
from tests.support.procs import LimitedRelayProcess, memory, nofile_limit, open_fds, raise_nofile
from tests.support.relay import base_config, deep_merge, free_port
from tests.support.wait import poll

MB = 1024 * 1024
REPLY = re.compile(rb"^\d{3}[ -]")


def make_relay(tmp_path, nofile: int | None = None, backlog: int | None = None,
               **smtp) -> tuple[LimitedRelayProcess, int]:
    port = free_port()
    listen = f"tcp:{port}:interface=127.0.0.1" + (f":backlog={backlog}" if backlog else "")
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [listen], **smtp},
        "relay": {"smarthost": f"127.0.0.1:{free_port()}"},  # nothing listens: mail stays queued
        "delivery": {"retry_min": "1h", "retry_max": "1h"},
    })
    limits = {resource.RLIMIT_NOFILE: nofile} if nofile else {}
    relay = LimitedRelayProcess(str(tmp_path), data, limits=limits)
    relay.start(wait_for=("127.0.0.1", port))
    return relay, port


def served(port: int, tag: str = "probe") -> float:
    """A new client sends one message; seconds until its banner."""
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        banner = time.monotonic() - t0
        s.sendmail("a@client.test", ["b@remote.test"], f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())
    return banner


@pytest.fixture
def relay(tmp_path):
    r, port = make_relay(tmp_path, max_message_size=4 * MB)
    yield r, port
    r.stop()


def need_fds() -> None:
    if raise_nofile(4500) < 4500:
        pytest.skip("cannot raise RLIMIT_NOFILE of the test process to 4500")


def test_2000_connections_at_once(tmp_path):
    """With a listen backlog that takes the burst (backlog= in smtp.listen)
    and a file descriptor limit above 2000, every connection gets its banner."""
    need_fds()
    relay, port = make_relay(tmp_path, nofile=8192, backlog=4096)
    try:
        pid = relay.proc.pid
        before = memory(pid)["VmRSS"]
        flood = open_many("127.0.0.1", port, 2000)  # 100 source addresses x 20 (the per-address limit)
        try:
            codes = flood.codes()
            assert codes == {b"220": 2000}, codes
            during = memory(pid)
            fds = open_fds(pid)
            banner_wait = served(port, "during-flood")
            assert relay.proc.poll() is None
        finally:
            flood.close()
        grown = during["VmHWM"] - before
        print(f"\n2000 connections: all banners in {flood.seconds:.1f}s; relay fds {fds}; "
              f"VmRSS {before / MB:.1f} -> {during['VmRSS'] / MB:.1f} MB (peak +{grown / MB:.1f} MB); "
              f"a new client got its banner in {banner_wait * 1000:.0f} ms")
        assert grown < 100 * MB
        poll(lambda: open_fds(pid) < fds - 1900, 20, what="the relay to close the flood's connections")
        served(port, "after-flood")
        assert len(spoolmod.Spool(relay.data["spool"]).queue_ids()) == 2
    finally:
        relay.stop()


def test_2000_connections_at_once_default_backlog(tmp_path):
    need_fds()
    relay, port = make_relay(tmp_path, nofile=8192)
    try:
        flood = open_many("127.0.0.1", port, 2000, timeout=60)  # (it returns once every banner is in)
        try:
            assert flood.codes() == {b"220": 2000}, flood.codes()
        finally:
            flood.close()
    finally:
        relay.stop()


def _flood_over_limit(tmp_path):
    """A relay started with the usual soft RLIMIT_NOFILE of 1024 (what systemd
    gives a service without LimitNOFILE=): the relay raises it to the hard limit."""
    need_fds()
    relay, port = make_relay(tmp_path, nofile=1024, backlog=4096)
    soft, hard = nofile_limit(relay.proc.pid)
    assert soft > 2100 or soft == hard, (soft, hard)
    return relay, port


def test_2000_connections_over_the_fd_limit_relay_survives_and_recovers(tmp_path):
    relay, port = _flood_over_limit(tmp_path)
    try:
        flood = open_many("127.0.0.1", port, 2000, timeout=10)
        codes = flood.codes()
        print(f"\n2000 connections, relay started with soft RLIMIT_NOFILE 1024: banners {codes} "
              f"in {flood.seconds:.1f}s")
        assert codes.get(b"220", 0) > 900
        assert relay.proc.poll() is None
        flood.close()
        poll(lambda: open_fds(relay.proc.pid) < 100, 20, what="the relay to close the flood's connections")
        served(port, "after")
        assert relay.proc.poll() is None
    finally:
        relay.stop()


def test_2000_connections_over_the_fd_limit_new_client_served(tmp_path):
    relay, port = _flood_over_limit(tmp_path)
    try:
        flood = open_many("127.0.0.1", port, 2000, timeout=10)
        try:
            served(port, "during")
        finally:
            flood.close()
    finally:
        relay.stop()


def test_endless_command_line(relay):
    r, port = relay
    pid = r.proc.pid
    before = memory(pid)["VmRSS"]
    chunk = b"a" * 65536
    st = stream("127.0.0.1", port, b"EHLO ", (chunk for _ in range(1024)), b"\r\nNOOP\r\nQUIT\r\n")  # 64 MB
    poll(lambda: st.sent > 8 * MB or st.done.is_set(), 30, what="the flood to be under way")
    served(port, "beside-endless-line")
    assert not st.done.is_set() or st.sent >= 64 * MB
    st.done.wait(120)
    st.thread.join(5)
    assert st.error is None, st.error
    poll(lambda: b"221" in st.replies, 20, what="the replies after the endless line")
    lines = reply_lines(bytes(st.replies))
    assert [ln[:3] for ln in lines] == [b"220", b"500", b"250", b"221"], lines
    assert b"Line too long" in lines[1]
    peak = memory(pid)["VmHWM"] - before
    print(f"\nendless line: 64 MB taken, relay peak RSS +{peak / MB:.1f} MB")
    assert peak < 20 * MB
    assert r.proc.poll() is None


@pytest.mark.parametrize("kind", ["header block", "folded header", "one line"])
def test_endless_data(relay, kind):
    r, port = relay
    pid = r.proc.pid
    before = memory(pid)["VmRSS"]
    if kind == "header block":
        chunk = b"".join(b"X-Flood-%06d: %s\r\n" % (i, b"h" * 60) for i in range(800))
    elif kind == "folded header":
        chunk = b"\tcontinued continued continued continued continued continued\r\n" * 1000
    else:
        chunk = b"x" * 65536
    n = (24 * MB) // len(chunk)  # six times max_message_size
    prologue = b"EHLO flood.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n"
    if kind == "folded header":
        prologue += b"Subject: start\r\n"
    st = stream("127.0.0.1", port, prologue, (chunk for _ in range(n)), b"\r\n.\r\nQUIT\r\n")
    poll(lambda: st.sent > 4 * MB or st.done.is_set(), 30, what="the flood to be under way")
    served(port, f"beside-{kind}")
    st.done.wait(120)
    st.thread.join(5)
    assert st.error is None, st.error
    poll(lambda: b"221" in st.replies, 20, what="the replies after the endless data")
    lines = reply_lines(bytes(st.replies))
    codes = [ln[:3] for ln in lines if ln[3:4] == b" "]
    final = codes[-2]
    expect = {"header block": b"552", "folded header": b"552", "one line": b"550"}[kind]
    assert final == expect, lines[-3:]
    peak = memory(pid)["VmHWM"] - before
    print(f"\nendless {kind}: {st.sent / MB:.0f} MB in DATA, reply {lines[-2]!r}, relay peak RSS +{peak / MB:.1f} MB")
    assert peak < 20 * MB
    sp = spoolmod.Spool(r.data["spool"])
    assert len(sp.queue_ids()) == 1  # only the probe
    poll(lambda: sp.incoming_leftovers() == [], 10, what="the aborted file to be removed")
    assert r.proc.poll() is None


def test_random_bytes(relay):
    r, port = relay
    pid = r.proc.pid
    before = memory(pid)["VmRSS"]
    rnd = random.Random(8)
    streams = []
    for i in range(20):
        chunks = [rnd.randbytes(rnd.randint(1, 65536)) for _ in range(16)]
        if i % 2:  # some with CRLFs sprinkled in, so they reach the command parser line by line
            chunks = [c.replace(b"\x00", b"\r\n") for c in chunks]
        streams.append(stream("127.0.0.1", port, b"", iter(chunks)))
    served(port, "beside-random")
    for st in streams:
        st.done.wait(60)
    for st in streams:
        poll(lambda st=st: not _open(st), 20, what="the relay to end the random sessions")
        for ln in reply_lines(bytes(st.replies)):
            assert REPLY.match(ln), ln
    peak = memory(pid)["VmHWM"] - before
    print(f"\nrandom bytes: 20 sessions, {sum(s.sent for s in streams) / MB:.1f} MB; peak RSS +{peak / MB:.1f} MB")
    assert peak < 20 * MB
    served(port, "after-random")
    assert r.proc.poll() is None


def _open(st) -> bool:
    """True while the relay keeps the connection open (a read would block)."""
    import socket

    try:
        st.sock.setblocking(False)
        data = st.sock.recv(1, socket.MSG_PEEK)
        return bool(data)
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_pipelined_junk_whose_replies_are_never_read(tmp_path):
    """16 MB of pipelined HELP (a 90-octet reply each, 15 times what is sent)
    from a client that never reads: the relay stops reading while its output
    to that client is not drained (flow control), so its memory stays
    bounded; after the client leaves it is back near where it started.
    (The junk command limit is off here: it would end the session first.)"""
    relay, port = make_relay(tmp_path, junk_command_limit=0)
    try:
        pid = relay.proc.pid
        served(port, "warm-up")
        before = memory(pid)["VmRSS"]
        junk = pour_unread("127.0.0.1", port, b"HELP\r\n" * (16 * MB // 6), stall=5)
        try:
            during = memory(pid)
            banner_wait = served(port, "beside-unread")
        finally:
            junk.sock.close()
        grown = max(during["VmHWM"], during["VmRSS"]) - before
        print(f"\nunread replies: the relay took {junk.sent / MB:.1f} MB of HELP before it stopped reading "
              f"(stalled={junk.stalled}); VmRSS {before / MB:.1f} -> {during['VmRSS'] / MB:.1f} MB "
              f"(peak +{grown / MB:.1f} MB); a new client got its banner in {banner_wait * 1000:.0f} ms")
        assert junk.stalled, f"the relay read all {junk.sent} octets while its replies piled up"
        assert grown < 10 * MB
        poll(lambda: memory(pid)["VmRSS"] - before < 5 * MB, 30,
             what="the relay's memory to come back after the client left")
        assert relay.proc.poll() is None
    finally:
        relay.stop()


def test_a_client_that_never_reads_is_dropped_after_the_timeout(tmp_path):
    """Paused for a client that does not read, the session still times out
    (smtp.timeout), and the relay does not keep the connection open for
    ever waiting for that client to read the 421: it aborts it."""
    # the timeout well above the client's stall detection (2 s): a loaded
    # machine must not end the session before the client saw it stop reading
    relay, port = make_relay(tmp_path, timeout="12s", junk_command_limit=0)
    try:
        junk = pour_unread("127.0.0.1", port, b"HELP\r\n" * (16 * MB // 6), stall=2)
        try:
            assert junk.stalled
            client_port = junk.sock.getsockname()[1]
            assert _relay_side(port, client_port), "the relay's end of the connection"
            poll(lambda: not _relay_side(port, client_port), 60,
                 what="the relay to drop the connection of a client that does not read")
        finally:
            junk.sock.close()
        log = relay.log()
        assert "timeout after command from [127.0.0.1]" in log
        assert "[127.0.0.1]: closing: the client does not read its replies" in log
        assert relay.proc.poll() is None
    finally:
        relay.stop()


def _relay_side(port: int, client_port: int) -> list[str]:
    """TCP states (hex, /proc/net/tcp) of the relay's socket for the connection
    from 127.0.0.1:client_port to 127.0.0.1:port."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        rows = [ln.split() for ln in f.readlines()[1:]]
    return [r[3] for r in rows if r[1] == local and r[2] == remote]
