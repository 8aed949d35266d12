"""DATA stream reading: terminator, dot-unstuffing, bare CR/LF, long lines, sizes."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.dataread import DataReader


def read_all(chunks, max_size=10_000_000):
    r = DataReader(max_size)
    out = b""
    for i, c in enumerate(chunks):
        text, rest = r.feed(c)
        out += text
        if rest is not None:
            return r, out, rest + b"".join(chunks[i + 1 :])
    return r, out, None


def stuff(msg: bytes) -> bytes:
    return (b"\r\n" + msg).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def test_simple_message_and_rest():
    r, out, rest = read_all([b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"])
    assert out == b"Subject: x\r\n\r\nhello\r\n"
    assert rest == b"QUIT\r\n"
    assert r.error is None


def test_empty_message():
    r, out, rest = read_all([b".\r\nNOOP\r\n"])
    assert out == b"" and rest == b"NOOP\r\n" and r.error is None


def test_unstuffing_and_leading_dot():
    msg = b".starts with dot\r\n..two\r\nmid.dle\r\n.\r\n"
    r, out, rest = read_all([msg])
    assert out == b"starts with dot\r\n.two\r\nmid.dle\r\n"


@pytest.mark.parametrize("split", range(1, 30))
def test_terminator_split_anywhere(split):
    wire = b"a: b\r\n\r\nline\r\n..x\r\n.\r\nNEXT"
    r, out, rest = read_all([wire[:split], wire[split:]])
    assert out == b"a: b\r\n\r\nline\r\n.x\r\n"
    assert rest == b"NEXT"


def test_byte_by_byte():
    wire = b"h: v\r\n\r\n..\r\nbody\r\n.\r\nQUIT\r\n"
    r = DataReader(1000)
    out = b""
    rest = None
    for i in range(len(wire)):
        text, rest = r.feed(wire[i : i + 1])
        out += text
        if rest is not None:
            rest += wire[i + 1 :]
            break
    assert out == b"h: v\r\n\r\n.\r\nbody\r\n"
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize(
    "wire",
    [
        b"a\nb\r\n.\r\n",  # bare LF
        b"a\rb\r\n.\r\n",  # bare CR
        b"x\r\n\n.\r\n.\r\n",
        b"x\r\n.\n.\r\n\r\n.\r\n",
    ],
)
def test_bare_cr_lf_is_error(wire):
    r, out, rest = read_all([wire])
    assert r.error == "bare"
    assert rest == b""


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"],
)
def test_smuggling_is_not_end_of_data(smuggle):
    wire = b"Subject: x\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nbad\r\n.\r\nQUIT\r\n"
    r, out, rest = read_all([wire])
    assert r.error == "bare"
    # the real end is the only CRLF.CRLF: the smuggled commands are data
    assert rest == b"QUIT\r\n"


def test_long_line_error_and_rest_not_commands():
    wire = b"a" * 5000 + b"\r\nRSET\r\n.\r\nNOOP\r\n"
    chunks = [wire[i : i + 700] for i in range(0, len(wire), 700)]
    r, out, rest = read_all(chunks)
    assert r.error == "long"
    assert rest == b"NOOP\r\n"


def test_998_octet_line_ok_999_not():
    ok = b"x" * 998 + b"\r\n.\r\n"
    assert read_all([ok])[0].error is None
    bad = b"x" * 999 + b"\r\n.\r\n"
    assert read_all([bad])[0].error == "long"


def test_stuffed_998_line_ok():
    ok = b"." + b"." + b"x" * 997 + b"\r\n.\r\n"  # unstuffed: 998 octets
    assert read_all([ok])[0].error is None


def test_size_limit():
    body = (b"y" * 80 + b"\r\n") * 100
    r, out, rest = read_all([body + b".\r\n"], max_size=1000)
    assert r.error == "size" and rest == b""


def test_received_headers_counted_only_in_header_section():
    msg = b"Received: a\r\nreceived: b\r\nSubject: s\r\n\r\nReceived: not a header\r\n.\r\n"
    r, out, rest = read_all([msg])
    assert r.received == 2


def test_received_count_across_chunks():
    msg = b"".join(b"Received: hop %d\r\n" % i for i in range(150)) + b"\r\nbody\r\n.\r\n"
    chunks = [msg[i : i + 37] for i in range(0, len(msg), 37)]
    r, out, rest = read_all(chunks)
    assert r.received == 150


def test_fail_then_find_end():
    r = DataReader(1000)
    r.feed(b"abc\r\n")
    r.fail("io")
    text, rest = r.feed(b"more\r\n.\r\nQUIT\r\n")
    assert text == b"" and rest == b"QUIT\r\n"


def test_eight_bit_kept():
    high = bytes(range(128, 256)).replace(b"\r", b"").replace(b"\n", b"")
    msg = "Subject: é\r\n\r\nÜnïcode ✓\r\n".encode() + high + b"\r\n"
    r, out, rest = read_all([stuff(msg)])
    assert out == msg and r.eight_bit


lines = st.lists(
    st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(lines, st.randoms(use_true_random=False))
def test_roundtrip_any_chunking(ls, rnd):
    msg = b"".join(x + b"\r\n" for x in ls)
    wire = stuff(msg) + b"AFTER"
    cuts = sorted(rnd.sample(range(len(wire) + 1), min(len(wire), rnd.randint(0, 8))))
    chunks, prev = [], 0
    for c in cuts + [len(wire)]:
        chunks.append(wire[prev:c])
        prev = c
    r, out, rest = read_all(chunks)
    assert r.error is None
    assert out == msg
    assert rest == b"AFTER"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_crash(data):
    r = DataReader(2000)
    for i in range(0, len(data), 97):
        text, rest = r.feed(data[i : i + 97])
        assert len(r.carry) <= 1000 and len(r.tail) <= 4
        if rest is not None:
            break


def test_random_split_fuzz_stable():
    rnd = random.Random(7)
    for _ in range(200):
        body = b"".join(rnd.choice([b".", b"..", b"a", b"\r\n", b"x" * 10]) for _ in range(50))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        if b"\r\n.\r\n" in b"\r\n" + body:
            continue
        wire = stuff(body)
        k = rnd.randint(1, len(wire))
        r, out, rest = read_all([wire[:k], wire[k:]])
        assert out == body and rest == b""
