"""relay.common.sasl: the one SASL PLAIN decoder (SMTP and POP3 over sockets:
tests/test_smtp_tls.py and tests/test_pop3.py)."""

from __future__ import annotations

import base64

import pytest

from relay.common import sasl


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def test_decode_plain_fields():
    r = sasl.decode_plain(b64(b"\0alice@local.test\0pw"))
    assert r == (b"", b"alice@local.test", b"pw")
    assert r.user == "alice@local.test"
    assert sasl.decode_plain(b64(b"a\0b\0c").decode()) == (b"a", b"b", b"c")  # str, as the SMTP server has it


@pytest.mark.parametrize("authz, ok", [(b"", True), (b"alice@local.test", True), (b"ALICE@Local.Test", True),
                                       (b" alice@local.test ", True), (b"bob@local.test", False)])
def test_authzid_rule(authz, ok):
    assert sasl.decode_plain(b64(authz + b"\0alice@local.test\0pw")).authzid_allowed is ok


@pytest.mark.parametrize("data", [b"!!!", b"YQ", b"\xff", "é"])
def test_not_base64(data):
    with pytest.raises(sasl.Base64Error):
        sasl.decode_plain(data)


@pytest.mark.parametrize("data", [b"", b"=", b64(b"no nuls"), b64(b"a\0b\0c\0d")])
def test_not_three_fields(data):
    with pytest.raises(sasl.PlainFormatError):
        sasl.decode_plain(data)
