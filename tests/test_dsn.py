"""DSN (RFC 3461, 3464) pure parts: xtext, the parameter syntax, what NOTIFY
asks for, the envelope's storage (old spool lines still load), the report's
fields (read back with the email package), queue show, relay-sendmail's
-N/-R/-V and the drop file."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from relay.common import dsn, xtext
from relay.delivery import bounce
from relay.delivery.dsnout import carried
from relay.intake import dropfile
from relay.intake import sendmail as sm
from relay.intake.sysexits import Fatal
from relay.queue import view
from relay.queue.envelope import MAGIC, Envelope, State
from relay.smtp import dsnparams

STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
ACTIONS = {"failed": "5", "delayed": "4", "delivered": "2", "relayed": "2", "expanded": "2"}


def check_report(data: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    """An independent reading of a DSN (RFC 3462 / 3464): the multipart/report,
    its message/delivery-status part parsed by the email package, each field's
    syntax.  Returns (per-message fields, per-recipient blocks)."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    per_msg, per_rcpt = blocks[0], blocks[1:]
    assert re.match(r"^dns; \S+$", per_msg["Reporting-MTA"])
    if per_msg["Original-Envelope-Id"] is not None:
        assert all(" " <= c <= "~" for c in per_msg["Original-Envelope-Id"])
    assert per_rcpt, "no recipient block"
    for b in per_rcpt:
        assert re.match(r"^[A-Za-z0-9-]+; \S+$", b["Final-Recipient"]), b["Final-Recipient"]
        if b["Original-Recipient"] is not None:
            assert re.match(r"^[A-Za-z0-9-]+; \S+$", b["Original-Recipient"])
        assert b["Action"] in ACTIONS, b["Action"]
        assert STATUS.match(b["Status"]), b["Status"]
        assert b["Status"][0] == ACTIONS[b["Action"]], (b["Action"], b["Status"])
    return per_msg, per_rcpt


# -- xtext ------------------------------------------------------------------------
def test_xtext_round_trip_and_errors():
    assert xtext.encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext.decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert xtext.decode("x+2b") == "x+"  # lower-case hex accepted when reading
    for bad in ("a+ZZ", "a+2", "a=b", "a b", "a\x01"):
        with pytest.raises(xtext.XtextError):
            xtext.decode(bad)


# -- the parameters ----------------------------------------------------------------
def test_parameter_syntax():
    assert dsn.parse_ret("hdrs") == "HDRS"
    assert dsn.parse_envid("QQ+2B1") == "QQ+1"
    assert dsn.parse_notify("delay,Success") == "SUCCESS,DELAY"
    assert dsn.parse_notify("never") == "NEVER"
    assert dsn.parse_orcpt("RFC822;a+2Bb@x.example") == "rfc822;a+2Bb@x.example"
    assert dsn.parse_orcpt("x-local;whatever") == "x-local;whatever"  # passed through as given
    cases = [
        (dsn.parse_ret, "BOGUS", "RET"), (dsn.parse_envid, "a+ZZ", "ENVID"), (dsn.parse_envid, "x" * 101, "ENVID"),
        (dsn.parse_envid, "+01", "ENVID"), (dsn.parse_notify, "NEVER,SUCCESS", "NOTIFY"),
        (dsn.parse_notify, "SUCCESS,SUCCESS", "NOTIFY"), (dsn.parse_notify, "SOMETIMES", "NOTIFY"),
        (dsn.parse_notify, "", "NOTIFY"), (dsn.parse_orcpt, "a@b.example", "ORCPT"),
        (dsn.parse_orcpt, "rfc822;a+ZZ@b", "ORCPT"), (dsn.parse_orcpt, "rfc822;nobody", "ORCPT"),
        (dsn.parse_orcpt, "rfc 822;a@b", "ORCPT"),
    ]
    for fn, value, param in cases:
        with pytest.raises(dsn.DsnSyntax) as e:
            fn(value)
        assert e.value.param == param and param in str(e.value)


def test_postfix_rfc822_orcpt_of_a_utf8_address():
    """Postfix sends a SMTPUTF8 recipient's ORCPT as rfc822 with the UTF-8
    octets in xtext (RFC 6533 would say utf-8;): taken, and shown decoded in
    a global report, in its xtext form in an ASCII one."""
    stored = dsn.parse_orcpt("rfc822;j+C3+B6rg@local.test")
    assert stored == "rfc822;j+C3+B6rg@local.test"
    assert dsn.orcpt_field(stored, utf8=True) == "rfc822; j\u00f6rg@local.test"
    assert dsn.orcpt_field(stored) == "rfc822; j+C3+B6rg@local.test"
    for bad in ("rfc822;j+F6rg@local.test",  # latin-1, not UTF-8
                "rfc822;j+C2+85rg@local.test",  # a C1 control (NEL) in UTF-8
                "rfc822;j+E2+80+AErg@local.test",  # a bidi override
                "rfc822;j+C3+B6rg"):  # no domain
        with pytest.raises(dsn.DsnSyntax):
            dsn.parse_orcpt(bad)


def test_duplicate_parameter_found():
    assert dsnparams.duplicate(" <a@b> NOTIFY=NEVER notify=FAILURE", "<a@b>") == "NOTIFY"
    assert dsnparams.duplicate(' <"x y"@b> RET=FULL ENVID=1', '<"x y"@b>') is None


def test_what_notify_asks_for():
    w = dsn.wants
    assert w(None, dsn.FAILURE) and w(None, dsn.DELAY) and not w(None, dsn.SUCCESS)  # as before DSN
    assert not any(w("NEVER", k) for k in (dsn.SUCCESS, dsn.FAILURE, dsn.DELAY))
    assert w("SUCCESS", dsn.SUCCESS) and not w("SUCCESS", dsn.FAILURE) and not w("SUCCESS", dsn.DELAY)
    assert w("FAILURE,DELAY", dsn.DELAY) and not w("FAILURE", dsn.DELAY)
    # backscatter rule: an untrusted client's SUCCESS and DELAY are not honoured
    assert not w("SUCCESS,FAILURE,DELAY", dsn.SUCCESS, True) and not w(None, dsn.DELAY, True)
    assert w("SUCCESS,FAILURE", dsn.FAILURE, True)
    assert dsn.effective_notify("SUCCESS,DELAY", True) == "NEVER"
    assert dsn.effective_notify("SUCCESS,FAILURE", True) == "FAILURE"
    assert dsn.effective_notify("SUCCESS", False) == "SUCCESS" and dsn.effective_notify(None, True) is None


# -- storage -----------------------------------------------------------------------
def test_envelope_keeps_the_request_and_old_lines_load():
    req = dsn.DsnRequest("FULL", "id 1", ["SUCCESS,FAILURE", None], [None, "rfc822;o@x.example"], limited=True)
    env = Envelope("Q1", "s@x.example", ["a@x.example", "b@x.example"], 1.0, dsn=req)
    back = Envelope.from_line(env.to_line())
    assert back.dsn == req
    assert back.dsn_of("a@x.example") == ("SUCCESS,FAILURE", None)
    assert back.dsn_of("b@x.example") == (None, "rfc822;o@x.example")
    old = MAGIC + b'{"id":"Q2","from":"","rcpt":["a@x.example"],"t":2.0,"client":{}}\n'
    e2 = Envelope.from_line(old)
    assert e2.dsn is None and e2.dsn_of("a@x.example") == (None, None)
    assert b'"dsn"' not in Envelope("Q3", "", ["a@x"], 1.0).to_line()  # nothing asked: nothing written


def test_envelope_refuses_a_bad_request():
    from relay.queue.envelope import CorruptEntry
    for bad in (b'"dsn":[]', b'"dsn":{"ret":"ALL"}', b'"dsn":{"notify":["X","Y"]}'):
        line = MAGIC + b'{"id":"Q","from":"","rcpt":["a@x"],"t":1,' + bad + b"}\n"
        with pytest.raises(CorruptEntry):
            Envelope.from_line(line)


def test_carried_to_the_next_hop():
    req = dsn.DsnRequest("HDRS", "e", ["SUCCESS,DELAY", None], [None, "rfc822;o@x"], limited=True)
    env = Envelope("Q", "s@x", ["a@x", "b@x"], 1.0, orcpts=["list@x", None], dsn=req)
    p = carried(env, ["a@x", "b@x"])
    assert p is not None and p.ret == "HDRS" and p.envid == "e"
    assert p.rcpts == {"a@x": ("NEVER", "rfc822;list@x"), "b@x": (None, "rfc822;o@x")}
    assert carried(Envelope("Q", "s@x", ["a@x"], 1.0), ["a@x"]) is None


def test_queue_show_lists_the_request():
    req = dsn.DsnRequest("HDRS", "env-1", ["NEVER"], ["rfc822;o@x.example"])
    env = Envelope("Q1", "s@x.example", ["a@x.example"], 1.0, dsn=req)
    d = view.details(env, State.fresh(env), 10, "active", b"Subject: x\r\n")
    assert d["dsn"] == {"ret": "HDRS", "envid": "env-1", "limited": False}
    assert d["recipients"][0]["notify"] == "NEVER" and d["recipients"][0]["orcpt"] == "rfc822;o@x.example"
    text = view.format_details(d, now=2.0)
    assert "RET=HDRS ENVID=env-1" in text and "NOTIFY=NEVER ORCPT=rfc822;o@x.example" in text
    plain = Envelope("Q2", "s@x.example", ["a@x.example"], 1.0)
    d2 = view.details(plain, State.fresh(plain), 10, "active", b"")
    assert d2["dsn"] == {"ret": None, "envid": None, "limited": False} and d2["recipients"][0]["notify"] is None


# -- the report ------------------------------------------------------------------------
def _report(kind, failures, **kw):
    return bounce.build_report(kind=kind, reporting_mta="relay.test", queue_id="Q1", sender="s@x.example",
                               arrival=1.0, failures=failures, original_headers=b"Subject: hi\r\n", now=2.0, **kw)


def test_report_fields_envid_orcpt_and_full_message():
    f = bounce.Failure("a@x.example", "5.1.1", "550 5.1.1 no", orcpt="rfc822;orig+2Bx@x.example")
    data = _report(bounce.FAILED, [f], envid="env 1", full_message=b"Subject: hi\r\n\r\nthe body\r\n")
    per_msg, (b,) = check_report(data)
    assert per_msg["Original-Envelope-Id"] == "env 1"
    assert b["Original-Recipient"] == "rfc822; orig+x@x.example"  # xtext decoded
    msg = email.message_from_bytes(data, policy=email.policy.default)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert b"the body" in returned.as_bytes()


def test_success_report_delivered_and_relayed():
    fs = [bounce.Failure("a@x.example", "2.0.0", "delivered to mailbox", diagnostic_type="x-unix",
                         action=bounce.DELIVERED),
          bounce.Failure("b@y.example", "2.0.0", "250 2.0.0 Ok", action=bounce.RELAYED, remote_mta="mx.y.example")]
    data = _report(bounce.SUCCESS, fs)
    _, blocks = check_report(data)
    assert [b["Action"] for b in blocks] == ["delivered", "relayed"]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_report_too_big_for_full_says_so():
    data = _report(bounce.FAILED, [bounce.Failure("a@x.example", "5.1.1", "no")], too_big=50000)
    assert b"larger than 50000 bytes: only its headers are returned" in data
    check_report(data)


# -- relay-sendmail ----------------------------------------------------------------
def test_sendmail_dsn_options():
    o = sm.parse_args(["-N", "success,delay", "-R", "full", "-V", "my-envid", "a@b.example"])
    assert o.dsn == {"notify": "SUCCESS,DELAY", "ret": "FULL", "envid": "my-envid"}
    assert o.recipients == ["a@b.example"]
    assert sm.parse_args(["-Nnever", "a@b.example"]).dsn == {"notify": "NEVER"}
    assert sm.parse_args(["-V", "a@b.example"]).recipients == ["a@b.example"]  # the old VERP flag
    for argv in (["-N", "never,success", "a@b"], ["-R", "most", "a@b"], ["-V", "x" * 120, "a@b"]):
        with pytest.raises(Fatal) as e:
            sm.parse_args(argv)
        assert e.value.status == sm.EX_USAGE


def test_drop_line_carries_the_request_and_old_ones_read():
    line = dropfile.drop_line("s@x", ["a@x"], 1000, "u", 1.0, {"notify": "NEVER", "ret": "HDRS"})
    assert dropfile.parse_drop_line(line)["dsn"] == {"notify": "NEVER", "ret": "HDRS"}
    old = dropfile.drop_line("s@x", ["a@x"], 1000, "u", 1.0)
    assert "dsn" not in dropfile.parse_drop_line(old)
    with pytest.raises(ValueError):
        dropfile.parse_drop_line(dropfile.DROP_MAGIC + b'{"from":"","rcpt":["a@x"],"t":1,"uid":1,"user":"u",'
                                 b'"dsn":{"notify":7}}\n')
