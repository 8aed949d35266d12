"""relay.intake.rewrite: the sender map, the address-list rewriting of a
header block, and the streaming stage; the config keys that feed them; the
Received header of private submission; the envelope field that keeps the
original sender.  Hypothesis for the header rewriter: it never raises, what
it writes parses, and every header it does not rewrite stays byte for byte."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import config as configmod
from relay.config.values import parse_masquerade, parse_senders
from relay.intake.rewrite import (
    MAX_HEADER_BLOCK,
    HeaderStage,
    SenderMap,
    Unparsable,
    address_specs,
    rewrite_header_block,
    sender_map,
)
from relay.queue.envelope import MAGIC, Envelope
from relay.smtp.received import received_header

MAP = SenderMap(parse_senders({"root@nas.lan": "alerts@example.org", "Backup@NAS.lan": "backup@example.org"}),
                parse_masquerade({"*.lan": "example.org", "nas.lan": "nas.example.org",
                                  "*.dev.lan": "dev.example.org", "bücher.local": "example.org"}))


def rw(block: bytes, smap: SenderMap = MAP) -> bytes:
    return rewrite_header_block(block, smap)[0]


# -- the map ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("addr, new", [
    ("root@nas.lan", "alerts@example.org"),  # exact wins over the exact domain
    ("ROOT@nas.lan", "alerts@example.org"),  # the local part's case is ignored in the lookup
    ("backup@nas.lan", "backup@example.org"),  # keys are normalised too
    ("cron@nas.lan", "cron@nas.example.org"),  # an exact domain wins over *.lan
    ("cron@printer.lan", "cron@example.org"),
    ("cron@a.b.lan", "cron@example.org"),
    ("cron@x.dev.lan", "cron@dev.example.org"),  # the longer wildcard wins
    ("cron@dev.lan", "cron@example.org"),  # *.dev.lan is not dev.lan itself
    ("cron@lan", None),  # *.lan is not lan itself
    ("cron@xlan", None),
    ("cron@example.org", None),
    ('"a b"@printer.lan', '"a b"@example.org'),
    ("x@xn--bcher-kva.local", "x@example.org"),  # IDN keys are A-labels
    ("", None),  # the null sender is never rewritten
    ("not an address", None),
])
def test_map(addr, new):
    r = MAP.address(addr)
    assert (r.address if r else None) == new


def test_rule_names_and_empty_map():
    assert MAP.address("root@nas.lan").rule == "rewrite.senders"
    assert MAP.address("a@b.lan").rule == 'rewrite.masquerade "*.lan"'
    assert SenderMap().empty and SenderMap().address("root@nas.lan") is None
    assert SenderMap(parse_senders({"a@b.c": "a@b.c"})).address("a@b.c") is None  # to itself: no change
    assert sender_map((), ()) is sender_map((), ())


@pytest.mark.parametrize("table, key, needle", [
    ({"senders": {"root@": "a@example.org"}}, "rewrite.senders", "entry 'root@': not an address"),
    ({"senders": {"root@nas.lan": "nobody"}}, "rewrite.senders", "'nobody' is not an address"),
    ({"senders": {"root@nas.lan": 3}}, "rewrite.senders", "the new address must be a string"),
    ({"senders": ["root@nas.lan"]}, "rewrite.senders", 'a table of "address" = "address"'),
    ({"masquerade": {"*.": "example.org"}}, "rewrite.masquerade", "entry '*.': not a domain"),
    ({"masquerade": {"a..b": "example.org"}}, "rewrite.masquerade", "entry 'a..b': not a domain"),
    ({"masquerade": {"*.lan": "bad domain"}}, "rewrite.masquerade", "'bad domain' is not a domain"),
    ({"masquerade": {"**.lan": "example.org"}}, "rewrite.masquerade", "entry '**.lan'"),
])
def test_bad_map_is_a_config_error_naming_key_and_entry(table, key, needle):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(data={"rewrite": table})
    assert f"{key}: expected" in str(e.value) and needle in str(e.value)


def test_config_defaults():
    cfg = configmod.load()
    assert cfg.rewrite.senders == () and cfg.rewrite.masquerade == ()
    assert cfg.smtp.hide_client_session is False and cfg.smtp.submission_hide_client_session is True


# -- header rewriting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("before, after", [
    (b"From: root@nas.lan\r\n", b"From: alerts@example.org\r\n"),
    (b"From: Root <root@nas.lan>\r\n", b"From: Root <alerts@example.org>\r\n"),
    (b'From: "Root, the admin" <root@nas.lan>\r\n', b'From: "Root, the admin" <alerts@example.org>\r\n'),
    (b"From: root@nas.lan (Cron Daemon)\r\n", b"From: alerts@example.org (Cron Daemon)\r\n"),
    (b"From: (c) root (x) <root@nas.lan> (y)\r\n", b"From: (c) root (x) <alerts@example.org> (y)\r\n"),
    (b"From: =?utf-8?q?J=C3=B6rg_M.?= <joerg@pc.lan>\r\n", b"From: =?utf-8?q?J=C3=B6rg_M.?= <joerg@example.org>\r\n"),
    (b'From: "j.\\"o d" <"j.\\"o d"@pc.lan>\r\n', b'From: "j.\\"o d" <"j.\\"o d"@example.org>\r\n'),
    (b"From: root@nas.lan <root@nas.lan>\r\n", b"From: root@nas.lan <alerts@example.org>\r\n"),  # sloppy devices
    (b"Reply-To: a@x.lan, b@example.com,\r\n\tc@y.lan\r\n",
     b"Reply-To: a@example.org, b@example.com,\r\n\tc@example.org\r\n"),
    (b"Reply-To: team: a@x.lan, b@other.example;, c@y.lan\r\n",
     b"Reply-To: team: a@example.org, b@other.example;, c@example.org\r\n"),
    (b"Reply-To: undisclosed-recipients:;\r\n", b"Reply-To: undisclosed-recipients:;\r\n"),
    (b"Sender: <@relay.lan:root@nas.lan>\r\n", b"Sender: <@relay.lan:alerts@example.org>\r\n"),  # obs-route kept
    (b"FROM:root@nas.lan\r\n", b"FROM:alerts@example.org\r\n"),
    (b"From:\r\n root@nas.lan\r\n", b"From:\r\n alerts@example.org\r\n"),  # folded
    (b"From: <>\r\n", b"From: <>\r\n"),
    (b"From: x@[192.168.1.2]\r\n", b"From: x@[192.168.1.2]\r\n"),
    (b"From: \xc3\xa9l\xc3\xa8ve@b\xc3\xbccher.local\r\n", b"From: \xc3\xa9l\xc3\xa8ve@example.org\r\n"),  # IDN, 8-bit
    (b"From: x@B\xc3\x9cCHER.local\r\n", b"From: x@example.org\r\n"),
    (b"To: root@nas.lan\r\nCc: root@nas.lan\r\nResent-From: root@nas.lan\r\n",
     b"To: root@nas.lan\r\nCc: root@nas.lan\r\nResent-From: root@nas.lan\r\n"),  # other headers: never
])
def test_header_rewriting(before, after):
    out, changes, problems = rewrite_header_block(before, MAP)
    assert out == after
    assert problems == []
    assert bool(changes) == (before != after)


def test_stage_rewrites_resent_from_and_resent_sender():
    block = (b"Resent-From: R <root@nas.lan>\r\nRESENT-SENDER:\r\n cron@x.lan\r\nResent-To: root@nas.lan\r\n"
             b"Resent-Reply-To: root@nas.lan\r\nResent-Cc: a@b.lan\r\n\r\nResent-From: root@nas.lan\r\n")
    s = HeaderStage(MAP)
    out = s.feed(block) + s.finish()
    assert out == (b"Resent-From: R <alerts@example.org>\r\nRESENT-SENDER:\r\n cron@example.org\r\n"
                   b"Resent-To: root@nas.lan\r\nResent-Reply-To: root@nas.lan\r\nResent-Cc: a@b.lan\r\n"
                   b"\r\nResent-From: root@nas.lan\r\n")  # the body: never
    assert [(c.header, c.old, c.new) for c in s.changes] == [
        ("Resent-From", "root@nas.lan", "alerts@example.org"), ("RESENT-SENDER", "cron@x.lan", "cron@example.org")]
    s = HeaderStage(MAP)
    s.feed(b"Resent-From: broken <root@nas.lan\r\n\r\n")
    assert len(s.problems) == 1
    assert s.problems[0].startswith("Resent-From header not rewritten: it does not parse as an address list")


@pytest.mark.parametrize("value", [
    b"From: broken <root@nas.lan\r\n",
    b"From: root@nas.lan (unterminated\r\n",
    b'From: "unterminated <root@nas.lan>\r\n',
    b"From: a@b@nas.lan\r\n",
    b"From: root@ (nas.lan)\r\n",
    b"From: <root@nas.lan> <x@nas.lan>\r\n",
    b"From: group: a@x.lan\r\n",
    b"From: just words from nas.lan\r\n",
    b"From: root@nas.lan;\r\n",
])
def test_malformed_header_is_left_as_it_is_and_reported(value):
    block = b"Subject: s\r\n" + value + b"X-Other: 1\r\n"
    out, changes, problems = rewrite_header_block(block, MAP)
    assert out == block and changes == []
    assert len(problems) == 1 and problems[0].startswith("From header not rewritten: it does not parse")


def test_a_header_that_cannot_hold_a_mapped_address_is_not_parsed():
    # (a quick substring test first: nothing to rewrite, so nothing to report)
    assert rewrite_header_block(b"From: just words\r\n", MAP) == (b"From: just words\r\n", [], [])


def test_no_from_several_from_and_untouched_order():
    block = b"Subject: a\r\nFrom: root@nas.lan\r\nX: y\r\nfrom: <cron@nas.lan>\r\n"
    out, changes, _ = rewrite_header_block(block, MAP)
    assert out == b"Subject: a\r\nFrom: alerts@example.org\r\nX: y\r\nfrom: <cron@nas.example.org>\r\n"
    assert [(c.header, c.old, c.new) for c in changes] == [
        ("From", "root@nas.lan", "alerts@example.org"), ("from", "cron@nas.lan", "cron@nas.example.org")]
    assert rewrite_header_block(b"Subject: no from\r\n", MAP) == (b"Subject: no from\r\n", [], [])
    assert rewrite_header_block(b"", MAP) == (b"", [], [])
    assert rw(b"not a header line\r\nFrom: root@nas.lan\r\n") == b"not a header line\r\nFrom: alerts@example.org\r\n"


# -- the streaming stage ---------------------------------------------------------------------------------

MESSAGE = (b'From: "R" <root@nas.lan>\r\nSubject: x\r\nReply-To: a@b.lan,\r\n c@d.lan\r\n\r\n'
           b"From: root@nas.lan\r\nbody\r\n")
EXPECTED = (b'From: "R" <alerts@example.org>\r\nSubject: x\r\nReply-To: a@example.org,\r\n c@example.org\r\n\r\n'
            b"From: root@nas.lan\r\nbody\r\n")


@pytest.mark.parametrize("cut", range(len(MESSAGE) + 1))
def test_stage_at_every_split(cut):
    s = HeaderStage(MAP)
    assert s.feed(MESSAGE[:cut]) + s.feed(MESSAGE[cut:]) + s.finish() == EXPECTED
    assert len(s.changes) == 3


def test_stage_message_without_body_and_empty_header():
    s = HeaderStage(MAP)
    assert s.feed(b"From: root@nas.lan\r\n") == b"" and s.finish() == b"From: alerts@example.org\r\n"
    s = HeaderStage(MAP)
    assert s.feed(b"\r\nFrom: root@nas.lan\r\n") == b"\r\nFrom: root@nas.lan\r\n"  # no header block at all
    s = HeaderStage(MAP)
    assert s.feed(b"") == b"" and s.finish() == b""


def test_stage_bound_passes_a_huge_header_block_unchanged():
    s = HeaderStage(MAP, limit=1000)
    block = b"From: root@nas.lan\r\n" + b"X-Long: " + b"a" * 900 + b"\r\n"
    out = s.feed(block) + s.feed(b"X-More: " + b"b" * 200 + b"\r\n") + s.feed(b"\r\nbody\r\n") + s.finish()
    assert out == block + b"X-More: " + b"b" * 200 + b"\r\n\r\nbody\r\n"
    assert s.problems == ["headers not rewritten: the header block is larger than 1000 octets"]
    assert MAX_HEADER_BLOCK == 1 << 20


# -- hypothesis -------------------------------------------------------------------------------------------

_atom = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=6)
_domain = st.sampled_from(["nas.lan", "x.lan", "lan", "a.dev.lan", "example.com", "bücher.local", "[10.0.0.1]"])
_local = st.one_of(_atom, st.builds(lambda a, b: f"{a}.{b}", _atom, _atom),
                   st.builds(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"',
                             st.text(" abc.,@<>()\\\"", min_size=1, max_size=6)))
_spec = st.builds(lambda lp, d: f"{lp}@{d}", _local, _domain)
_comment = st.builds(lambda t: f"({t})", st.text("abc <>@,;:", max_size=6))
_name = st.one_of(_atom, st.builds(lambda a, b: f"{a} {b}", _atom, _atom), st.just('"Doe, J."'),
                  st.just("=?utf-8?q?J=C3=B6rg_M.?="), st.just("=?UTF-8?B?w6k=?="))
_mailbox = st.one_of(_spec, st.builds(lambda n, s: f"{n} <{s}>", _name, _spec),
                     st.builds(lambda s, c: f"{s} {c}", _spec, _comment))
_address = st.one_of(_mailbox, st.builds(lambda n, ms: f"{n}: {', '.join(ms)};", _atom,
                                         st.lists(_mailbox, max_size=3)))
_good_value = st.builds(lambda xs, fold: (",\r\n\t" if fold else ", ").join(xs),
                        st.lists(_address, min_size=1, max_size=4), st.booleans())
_any_value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)
_name_of = st.sampled_from(["From", "from", "Sender", "Reply-To", "To", "Subject", "X-From"])


@st.composite
def _blocks(draw):
    fields = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(_name_of)
        value = draw(st.one_of(_good_value, _any_value))
        fields.append((name, f"{name}: {value}\r\n".encode("utf-8")))
    return fields


@settings(max_examples=400, deadline=None)
@given(_blocks())
def test_rewriter_never_raises_output_parses_untouched_headers_identical(fields):
    block = b"".join(f for _, f in fields)
    out, changes, problems = rewrite_header_block(block, MAP)
    out_fields = out.split(b"\r\n")[:-1] if out else []
    in_fields = block.split(b"\r\n")[:-1] if block else []
    # (no value folds here but _good_value's, whose continuation lines start with a tab)
    joined_in = [f for f in b"\r\n".join(in_fields).replace(b"\r\n\t", b"\x00").split(b"\r\n")] if in_fields else []
    joined_out = [f for f in b"\r\n".join(out_fields).replace(b"\r\n\t", b"\x00").split(b"\r\n")] if out_fields else []
    assert len(joined_in) == len(joined_out)
    for a, b in zip(joined_in, joined_out):
        name = a.partition(b":")[0].lower()
        if name not in (b"from", b"sender", b"reply-to") or a == b:
            assert a == b
            continue
        # rewritten: still an address list, with no address the map still changes
        value = b.partition(b":")[2].replace(b"\x00", b"\r\n\t").decode("utf-8")
        specs = address_specs(value)
        assert specs
        assert rewrite_header_block(b.replace(b"\x00", b"\r\n\t") + b"\r\n", MAP)[1] == []
        msg = email.message_from_bytes(b.replace(b"\x00", b"\r\n\t") + b"\r\n\r\n", policy=email.policy.default)
        assert msg[name.decode()] is not None
    assert len(problems) <= len(fields)
    assert all(c.header.lower() in ("from", "sender", "reply-to") for c in changes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_stage_never_raises_on_any_bytes_and_loses_nothing_unmapped(data, cut):
    s = HeaderStage(SenderMap())
    assert s.feed(data[:cut]) + s.feed(data[cut:]) + s.finish() == data
    s = HeaderStage(MAP)
    s.feed(data[:cut]), s.feed(data[cut:]), s.finish()


def test_address_specs_examples():
    assert [(s.local, s.domain) for s in address_specs('a <"x y"@b.c>, g: d@e;')] == [("x y", "b.c"), ("d", "e")]
    with pytest.raises(Unparsable):
        address_specs("a <b@c")


# -- the envelope keeps the original sender; the Received header of private submission ------------------


def test_envelope_orig_from_round_trip_and_old_lines_load():
    env = Envelope("0123456789abcdef", "alerts@example.org", ["a@b.c"], 1.5, extra={"orig_from": "root@nas.lan"})
    back = Envelope.from_line(env.to_line())
    assert (back.sender, back.extra) == ("alerts@example.org", {"orig_from": "root@nas.lan"})
    old = MAGIC + b'{"id":"0123456789abcdef","from":"root@nas.lan","rcpt":["a@b.c"],"t":1.5,"client":{}}\n'
    assert Envelope.from_line(old).extra == {}


def test_received_header_private_and_not():
    kw = dict(helo="laptop.home", client_ip="192.0.2.9", hostname="relay.test", proto="ESMTPSA",
              queue_id="0123456789abcdef", tls_active=True, tls_info={"version": "TLSv1.3", "cipher": "X", "bits": 256},
              recipient="a@b.c", now=0.0)
    shown = received_header(**kw)
    hidden = received_header(**kw, hide_client=True)
    assert shown.startswith(b"Received: from laptop.home ([192.0.2.9])\r\n\tby relay.test (twisted-relay)")
    assert hidden.startswith(b"Received: by relay.test (twisted-relay) with ESMTPSA id 0123456789abcdef\r\n\t(using")
    assert b"192.0.2.9" not in hidden and b"laptop" not in hidden
    assert email.message_from_bytes(hidden + b"\r\n")["Received"]


class _Incoming:
    queue_id = "0123456789abcdef"

    def __init__(self):
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("chunks", [
    [b"From: root@nas.lan\r\n\r\nbody\r\n.\r\n"],
    [b"From: root@nas.lan\r\n", b"\r\nbody\r\n", b".\r\n"],
    [b"From: root@nas.lan\r\n", b".\r\n"],  # no body, the end of data alone in its chunk
    [b"From: root@nas.lan\r\n", b"..dot\r\n", b".", b"\r\n"],
])
def test_transfer_with_stage_flushes_at_the_end_of_data(chunks):
    from relay.smtp.transfer import Transfer

    inc = _Incoming()
    t = Transfer(inc, 10_000, HeaderStage(MAP))  # type: ignore[arg-type]
    rest = None
    for c in chunks:
        rest = t.feed(c)
    assert rest == b"" and t.rejection() is None
    assert inc.data.startswith(b"From: alerts@example.org\r\n")
    assert b"root@nas.lan" not in inc.data
