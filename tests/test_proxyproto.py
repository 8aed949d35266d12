"""The PROXY protocol header parser (relay.common.proxyproto): v1 and v2 as
HAProxy's proxy-protocol.txt writes them, and what a hostile peer may send."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.common import proxyproto as pp
from relay.common.proxyproto import ProxyError, parse

SIG = pp.V2_SIGNATURE


def v2(cmd: int = 0x1, fam: int = 0x11, block: bytes = b"", length: int | None = None) -> bytes:
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(block) if length is None else length) + block


def inet4(src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=25) -> bytes:
    return socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst) + struct.pack(
        "!HH", sport, dport)


def inet6(src="2001:db8::7", dst="2001:db8::1", sport=40000, dport=25) -> bytes:
    return socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack(
        "!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def reason(data: bytes) -> str:
    with pytest.raises(ProxyError) as e:
        parse(data)
    return e.value.reason


# ---------------------------------------------------------------- v1

def test_v1_tcp4_and_the_client_bytes_after_it_are_not_taken():
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
    h = parse(line + b"EHLO x\r\n")
    assert h == pp.ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.7", 40000), ("198.51.100.1", 25), len(line))
    assert h.client_ip == "192.0.2.7"


def test_v1_tcp6():
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n"
    h = parse(line)
    assert (h.family, h.source, h.destination, h.length) == ("TCP6", ("2001:db8::7", 65535),
                                                              ("2001:db8::1", 0), len(line))


def test_v1_unknown_ignores_the_rest_of_the_line_and_names_no_client():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        h = parse(line + b"USER x\r\n")
        assert (h.family, h.source, h.client_ip, h.length) == ("UNKNOWN", None, None, len(line))


def test_v1_longest_line_is_accepted():
    line = b"PROXY UNKNOWN " + b"x" * (pp.V1_MAX - 16) + b"\r\n"
    assert len(line) == pp.V1_MAX
    assert parse(line).length == pp.V1_MAX


@pytest.mark.parametrize("n", range(0, 44))
def test_v1_every_prefix_waits_for_more(n):
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n"
    assert n < len(line)
    assert parse(line[:n]) is None


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25 x\r\n", "bad_v1"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 25\r\n", "bad_v1"),  # wrong family
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 25\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 25\r\n", "bad_v1"),  # leading zero
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 25\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.7  198.51.100.1 1 25\r\n", "bad_v1"),  # two spaces
    (b"PROXY TCP6 fe80::1%eth0 fe80::2 1 25\r\n", "bad_v1"),  # a scope is not an address on the wire
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n", "bad_v1"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 25\n", "bad_v1"),  # LF only
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 25\r\n", "bad_v1"),
    (b"PROXY TCP4 \xc3\xa9 198.51.100.1 1 25\r\n", "bad_v1"),
    (b"PROXY \r\n", "bad_v1"),
    (b"PROXY", None),
    (b"proxy TCP4 192.0.2.7 198.51.100.1 1 25\r\n", "garbage"),
    (b"EHLO client.example\r\n", "garbage"),
    (b"PROXYTCP4", "garbage"),
    (b"PROXY UNKNOWN " + b"x" * 200, "oversize"),
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "oversize"),  # 108 bytes
])
def test_v1_bad_lines(line, why):
    if why is None:
        assert parse(line) is None
    else:
        assert reason(line) == why


# ---------------------------------------------------------------- v2

def test_v2_proxy_ipv4_with_the_client_bytes_after_it():
    hdr = v2(block=inet4())
    h = parse(hdr + b"EHLO x\r\n")
    assert h == pp.ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.7", 40000), ("198.51.100.1", 25), 28)


def test_v2_proxy_ipv6():
    h = parse(v2(fam=0x21, block=inet6()))
    assert (h.family, h.client_ip, h.destination, h.length) == ("TCP6", "2001:db8::7", ("2001:db8::1", 25), 52)


def test_v2_af_unix_paths_but_no_client_ip():
    block = b"/run/lb.sock".ljust(108, b"\0") + b"/run/relay.sock".ljust(108, b"\0")
    h = parse(v2(fam=0x31, block=block))
    assert (h.family, h.source, h.destination, h.client_ip) == ("UNIX", "/run/lb.sock", "/run/relay.sock", None)


def test_v2_unspec_and_local_name_no_client_and_skip_their_block():
    h = parse(v2(fam=0x00, block=b"\x01\x02\x03"))
    assert (h.command, h.family, h.source, h.length) == ("PROXY", "UNSPEC", None, 19)
    # LOCAL (a health check): the block is discarded whatever its family says
    h = parse(v2(cmd=0x0, fam=0x11, block=inet4()) + b"QUIT\r\n")
    assert (h.command, h.source, h.client_ip, h.length) == ("LOCAL", None, None, 28)
    assert parse(v2(cmd=0x0, fam=0x00)).length == 16


def test_v2_tlvs_are_checked_and_skipped():
    extra = tlv(0x04, b"") + tlv(0x05, b"unique-id") + tlv(0x20, b"\x01" + b"\0" * 4)
    h = parse(v2(block=inet4() + extra) + b"rest")
    assert h.client_ip == "192.0.2.7"
    assert h.length == 16 + 12 + len(extra)
    assert [k for k, _ in h.tlvs] == [0x04, 0x05, 0x20]


@pytest.mark.parametrize("data, why", [
    (v2(block=inet4() + b"\x05\x00"), "bad_v2"),  # a TLV cut inside its length
    (v2(block=inet4() + b"\x05\x00\x09abc"), "bad_v2"),  # a TLV longer than the header
    (v2(block=inet4()[:11]), "bad_v2"),  # the address block too short for INET
    (v2(fam=0x21, block=inet4()), "bad_v2"),  # INET6 needs 36 bytes
    (v2(fam=0x12, block=inet4()), "bad_v2"),  # DGRAM
    (v2(fam=0x41, block=inet4()), "bad_v2"),  # no such family
    (v2(fam=0x10, block=inet4()), "bad_v2"),  # INET over UNSPEC transport
    (v2(cmd=0x2, block=inet4()), "bad_v2"),  # no such command
    (SIG + b"\x11\x11\x00\x0c" + inet4(), "bad_v2"),  # version 1 in a v2 signature
    (SIG + b"\x21\x11\xff\xff", "oversize"),  # 64 KiB announced: refused before it arrives
    (v2(block=b"\0" * (pp.MAX_V2 - 15)), "oversize"),
    (SIG[:5] + b"X", "garbage"),
    (b"\r\nQUIT", "garbage"),
])
def test_v2_bad_headers(data, why):
    assert reason(data) == why


def test_v2_largest_allowed_header():
    block = inet4() + tlv(0x05, b"x" * (pp.MAX_V2 - 16 - 12 - 3))
    assert parse(v2(block=block)).length == pp.MAX_V2


def test_v2_every_prefix_of_a_header_waits_for_more():
    hdr = v2(block=inet4() + tlv(0x05, b"abc"))
    for n in range(len(hdr)):
        assert parse(hdr[:n]) is None, n


def test_empty_input_waits():
    assert parse(b"") is None


# ---------------------------------------------------------------- fuzz

VALID = [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n",
    b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(block=inet4()),
    v2(fam=0x21, block=inet6() + tlv(1, b"h2")),
    v2(cmd=0x0),
]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_raise_only_its_own_error(data):
    try:
        h = parse(data)
    except ProxyError as e:
        assert e.reason in ("garbage", "oversize", "bad_v1", "bad_v2")
        return
    if h is not None:
        assert 0 < h.length <= len(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.binary(max_size=200), st.data())
def test_fuzz_never_reads_past_the_header(header, tail, data):
    """Whatever follows a valid header (the client's bytes) changes nothing,
    and a mutated header fails only with ProxyError."""
    h = parse(header + tail)
    assert h is not None and h.length == len(header)
    assert parse(header) == h
    i = data.draw(st.integers(0, len(header) - 1))
    b = data.draw(st.integers(0, 255))
    mutated = header[:i] + bytes([b]) + header[i + 1:]
    try:
        m = parse(mutated + tail)
    except ProxyError:
        return
    if m is not None:
        assert m.length <= len(mutated + tail)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.integers(1, 20), max_size=10))
def test_fuzz_split_anywhere_gives_the_same_header(header, cuts):
    """The header arriving in pieces: None until complete, then the same result."""
    stream = header + b"EHLO x\r\n"
    got = b""
    pos = 0
    for n in cuts + [len(stream)]:
        got += stream[pos:pos + n]
        pos += n
        h = parse(got)
        if len(got) < len(header):
            assert h is None
        else:
            assert h == parse(header)
            break
