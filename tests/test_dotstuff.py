"""relay.common.dotstuff: one helper for both directions (the wire behaviour is
tested over sockets in test_smtp_client.py, test_pop3.py, test_sendmail.py
and test_smtp_server.py)."""

from __future__ import annotations

import random

import pytest

from relay.common import dotstuff

CASES = [b"", b".", b"..", b"a", b".a\r\n", b"a\r\n.\r\n", b"a\r\n..b\r\n.", b"x\n.y\r\n", b"\r\n.\r\n.\r\n",
         b"no end", b"a\r", b"line\r\n"]


@pytest.mark.parametrize("data", CASES)
def test_whole_message(data):
    out = dotstuff.stuff_message(data)
    assert out.endswith(b"\r\n.\r\n") or out == b".\r\n"
    body = out[: -len(dotstuff.END)]
    assert b"\r\n.\r\n" not in b"\r\n" + body  # no early end of data
    if (data.endswith(b"\r\n") or not data) and data.count(b"\n") == data.count(b"\r\n"):  # CRLF text
        assert dotstuff.unstuff_lines(body) == data


@pytest.mark.parametrize("seed", range(20))
def test_chunks_give_what_the_whole_gives(seed):
    rnd = random.Random(seed)
    data = b"".join(rnd.choice([b".", b"\r\n", b"\n", b"a", b"\r", b".."]) for _ in range(200))
    st = dotstuff.Stuffer()
    out, pos = [], 0
    while pos < len(data):
        n = rnd.randint(1, 7)
        out.append(st.feed(data[pos:pos + n]))
        pos += n
    assert b"".join(out) + st.end() == dotstuff.stuff_message(data)


def test_unstuff_lines():
    assert dotstuff.unstuff_lines(b"..a\r\nb\r\n.\r\n..c\r\n") == b".a\r\nb\r\n\r\n.c\r\n"
    assert dotstuff.unstuff_lines(b"plain\r\n") == b"plain\r\n"
