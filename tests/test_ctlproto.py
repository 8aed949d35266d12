"""The control protocol is declared once (relay.control.proto): relayctl's
Twisted-free encoding and the relay's Twisted AMP classes (relay.control.amp,
built from the same declarations) read each other's boxes, for every
command, its arguments, its answer and its error codes."""

from __future__ import annotations

import pytest
from twisted.protocols import amp

from relay.admin.client import _BoxReader, encode_box
from relay.control import amp as ctlamp
from relay.control import proto as ctlproto

BIG_VALUE = bytes(range(256)) * 600  # 153,600 bytes: three AMP values


def sample(kind: ctlproto.Kind, n: int):
    return {
        ctlproto.TEXT: f"välue {n} ✓",
        ctlproto.INTEGER: 1000 + n,
        ctlproto.BOOLEAN: n % 2 == 0,
        ctlproto.TEXT_LIST: [f"a{n}", "", "ü" * 300],
        ctlproto.BIG: BIG_VALUE + bytes([n]),
    }[kind]


def amp_class(decl: ctlproto.Command):
    return getattr(ctlamp, decl.name)


def wire(box: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Through the client's framing and back, as on the socket."""
    (out,) = _BoxReader().feed(encode_box(box))
    return out


@pytest.mark.parametrize("decl", ctlproto.COMMANDS, ids=lambda d: d.name)
def test_one_declaration_both_sides(decl):
    cls = amp_class(decl)
    assert cls.commandName == decl.name.encode("ascii")
    assert [k for k, _ in cls.arguments] == [a.name.encode() for a in decl.arguments]
    assert [k for k, _ in cls.response] == [a.name.encode() for a in decl.response]
    assert {e: e.code.encode() for e in decl.errors} == cls.errors


@pytest.mark.parametrize("decl", ctlproto.COMMANDS, ids=lambda d: d.name)
def test_requests_relayctl_encodes_are_what_the_relay_parses(decl):
    values = {a.name: sample(a.kind, i) for i, a in enumerate(decl.arguments)}
    box = wire(decl.request(**values))
    assert amp_parse(amp_class(decl), box) == values
    optional = [a.name for a in decl.arguments if a.optional]
    if optional:
        less = {k: v for k, v in values.items() if k not in optional}
        assert amp_parse(amp_class(decl), wire(decl.request(**less))) == {**less, **dict.fromkeys(optional)}


def amp_parse(cls, box: dict[bytes, bytes]) -> dict:
    parsed = cls.parseArguments(amp.AmpBox(box), None)
    return {k: parsed.get(k) for k in [a.decode() for a, _ in cls.arguments]}


@pytest.mark.parametrize("decl", ctlproto.COMMANDS, ids=lambda d: d.name)
def test_answers_the_relay_writes_are_what_relayctl_decodes(decl):
    values = {a.name: sample(a.kind, i) for i, a in enumerate(decl.response)}
    box = amp_class(decl).makeResponse(dict(values), None)
    assert decl.answer(wire(dict(box))) == values


def test_big_values_written_by_relayctl_are_read_by_the_relay():
    box: dict[bytes, bytes] = {}
    ctlproto.BIG.put(box, b"v", BIG_VALUE)
    assert len(box) == 3
    objects: dict = {}
    ctlamp.BigString().fromBox(b"v", dict(box), objects, None)
    assert objects["v"] == BIG_VALUE


def test_request_names_its_mistakes():
    with pytest.raises(TypeError, match="QueueList: argument limit missing"):
        ctlproto.QUEUE_LIST.request(start=True)
    with pytest.raises(TypeError, match="Hello: no argument x"):
        ctlproto.HELLO.request(x=1)
