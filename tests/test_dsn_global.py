"""RFC 6533 internationalized delivery status notifications (issue 17).

A report for a message that came with SMTPUTF8 is read twice: by Python's
email package under policy SMTPUTF8, and by ``read_global_report`` here, a
separate reading from the raw octets (the MIME boundaries, then each field
against RFC 3464 / RFC 6533's grammar, the text strict UTF-8), so a report
only one of them accepts fails.  A report for ASCII mail stays what it was
(tests/test_dsn.py, which this file does not change).
"""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from relay.common import dsn
from relay.delivery import bounce
from relay.delivery.dsnout import carried
from relay.queue.envelope import Envelope

JOERG = "j\u00f6rg@dest.test"
SENDER = "s\u00e9n@origin.test"
HEADERS = "Subject: Gr\u00fc\u00dfe\r\nFrom: <s\u00e9n@origin.test>\r\n\r\n".encode()
STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
# RFC 6533 section 3: utf-8-address (raw UTF-8 mailbox) or an rfc822 address
ADDRESS_FIELD = re.compile(r"^(?:utf-8; [^\s\x00-\x1f\x7f]+@[^\s\x00-\x1f\x7f]+|rfc822; [!-~]+@[!-~]+)$")


def read_global_report(data: bytes, strict_addresses: bool = True) -> dict:
    """An independent reading of a global DSN from its octets: returns the
    top header fields, the parts' headers and bodies, and the status part's
    field blocks; asserts the structure RFC 6522 / 6533 asks for."""
    text = data.decode("utf-8")  # strict: every octet is UTF-8
    assert "\r\n" in text and "\n" not in text.replace("\r\n", ""), "bare LF"
    head, _, body = text.partition("\r\n\r\n")
    top = _fields(head)
    ctype = top["content-type"]
    assert ctype.startswith("multipart/report;"), ctype
    assert "report-type=global-delivery-status" in ctype, ctype
    boundary = re.search(r'boundary="([^"]+)"', ctype).group(1)
    chunks = body.split(f"--{boundary}")
    assert chunks[-1].startswith("--"), "no closing boundary"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith("\r\n")
        ph, _, pb = chunk[2:].partition("\r\n\r\n")
        parts.append((_fields(ph), pb))
    types = [p[0]["content-type"].split(";")[0] for p in parts]
    assert types[0] == "text/plain" and types[1] == "message/global-delivery-status", types
    assert types[2] in ("message/global-headers", "message/global"), types
    for h, b in parts:
        if not b.isascii():
            assert h.get("content-transfer-encoding") == "8bit", h
    blocks = [_fields(b) for b in parts[1][1].strip("\r\n").split("\r\n\r\n")]
    per_msg, per_rcpt = blocks[0], blocks[1:]
    assert re.match(r"^dns; \S+$", per_msg["reporting-mta"])
    for b in per_rcpt:
        assert ADDRESS_FIELD.match(b["final-recipient"]) or not strict_addresses, b["final-recipient"]
        if "original-recipient" in b and strict_addresses:
            assert ADDRESS_FIELD.match(b["original-recipient"]), b["original-recipient"]
        assert b["action"] in ("failed", "delayed", "delivered", "relayed", "expanded"), b["action"]
        assert STATUS.match(b["status"]), b["status"]
    return {"top": top, "parts": parts, "per_msg": per_msg, "per_rcpt": per_rcpt}


def _fields(block: str) -> dict[str, str]:
    """Header fields (unfolded, names lower-cased); each line a field or a continuation."""
    out: dict[str, str] = {}
    name = None
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t") and name:
            out[name] += " " + line.strip()
            continue
        n, colon, v = line.partition(":")
        assert colon and re.match(r"^[!-9;-~]+$", n), f"not a field: {line!r}"
        name = n.lower()
        out[name] = v.strip()
    return out


def report(kind=bounce.FAILED, failures=None, full=None, smtputf8=True, sender=SENDER) -> bytes:
    failures = failures or [bounce.Failure(JOERG, "5.6.7", "SMTPUTF8 is required, but was not offered by host "
                                           "mx.dest.test[127.0.0.2]", orcpt="utf-8;j\\x{F6}rg@dest.test")]
    return bounce.build_report(kind=kind, reporting_mta="relay.test", queue_id="Q1", sender=sender,
                               arrival=1e9, failures=failures, original_headers=HEADERS, now=1e9 + 60,
                               full_message=full, smtputf8=smtputf8)


def test_global_bounce_read_by_the_email_package():
    data = report()
    # message_from_bytes would keep the UTF-8 header octets as surrogates:
    # RFC 6532 headers are read from the decoded text
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    human, status, returned = msg.iter_parts()
    assert human.get_content_charset() == "utf-8"
    # ... and 8bit bodies from the octets (a str-parsed 8bit body is mangled)
    as_bytes = email.message_from_bytes(data, policy=email.policy.SMTPUTF8)
    assert f"<{JOERG}>: SMTPUTF8 is required" in list(as_bytes.iter_parts())[0].get_content()
    assert status.get_content_type() == "message/global-delivery-status"
    # the email package reads a message/global-* body as a message: its first
    # block is the per-message fields, the rest the recipients' blocks
    (inner,) = status.get_payload()
    assert inner["Reporting-MTA"] == "dns; relay.test"
    assert inner["X-Relay-Sender"] == f"utf-8; {SENDER}"
    blocks = email.message_from_string(inner.get_payload(), policy=email.policy.SMTPUTF8)
    assert blocks["Final-Recipient"] == f"utf-8; {JOERG}"
    assert blocks["Original-Recipient"] == f"utf-8; {JOERG}"  # \x{F6} decoded (utf-8-address form)
    assert blocks["Status"] == "5.6.7"
    assert returned.get_content_type() == "message/global-headers"
    assert returned.get_payload()[0]["Subject"] == "Gr\u00fc\u00dfe"
    # and it generates again under SMTPUTF8 without an encoded word
    assert b"=?utf-8?" not in as_bytes.as_bytes(policy=email.policy.SMTPUTF8)


def test_global_bounce_read_independently():
    r = read_global_report(report())
    assert r["top"]["to"] == f"<{SENDER}>"
    (b,) = r["per_rcpt"]
    assert (b["final-recipient"], b["status"], b["action"]) == (f"utf-8; {JOERG}", "5.6.7", "failed")
    assert "not offered by host mx.dest.test[127.0.0.2]" in b["diagnostic-code"]
    assert r["parts"][2][1].startswith("Subject: Gr\u00fc\u00dfe\r\n")


def test_ascii_addresses_keep_rfc822_type_and_full_message_is_global():
    f = [bounce.Failure("a@dest.test", "5.1.1", "550 5.1.1 no", original="A@dest.test")]
    full = HEADERS + "K\u00f6rper\r\n".encode()
    r = read_global_report(report(failures=f, full=full, sender="s@origin.test"))
    (b,) = r["per_rcpt"]
    assert b["final-recipient"] == "rfc822; a@dest.test"
    assert b["original-recipient"] == "rfc822; A@dest.test"
    assert r["parts"][2][0]["content-type"] == "message/global"
    msg = email.message_from_string(report(failures=f, full=full).decode(), policy=email.policy.SMTPUTF8)
    assert list(msg.iter_parts())[2].get_payload()[0]["Subject"] == "Gr\u00fc\u00dfe"


@pytest.mark.parametrize("kind", [bounce.DELAYED, bounce.SUCCESS])
def test_delay_and_success_notices_are_global_too(kind):
    f = [bounce.Failure(JOERG, "4.4.1" if kind == bounce.DELAYED else "2.0.0", "x",
                        action=None if kind == bounce.DELAYED else "relayed", will_retry_until=1e9 + 999)]
    r = read_global_report(report(kind=kind, failures=f))
    assert r["per_rcpt"][0]["final-recipient"] == f"utf-8; {JOERG}"


def test_hostile_text_stays_on_its_line():
    # a remote reply and an address with line breaks, C1 controls, separators
    f = [bounce.Failure("j\u00f6rg\u2028X-Evil: 1@dest.test", "5.0.0", "550 ok\r\nX-Evil: 1\x85\u2029",
                        orcpt="utf-8;a\\x{0A}b\\x{85}@x")]
    r = read_global_report(report(failures=f), strict_addresses=False)
    (b,) = r["per_rcpt"]
    assert "x-evil" not in b and "x-evil" not in r["top"]
    assert b["original-recipient"] == "utf-8; a\\x{0A}b\\x{85}@x"  # controls stay encoded


def test_ascii_mail_report_is_not_global():
    data = report(smtputf8=False, sender="s@origin.test",
                  failures=[bounce.Failure("a@dest.test", "5.1.1", "no", orcpt="utf-8;j\u00f6rg@dest.test")])
    assert b"global" not in data
    assert b"Original-Recipient: utf-8; j\\x{F6}rg@dest.test" in data  # the 7-bit form
    assert b"message/delivery-status" in data


def test_utf8_orcpt_syntax():
    assert dsn.parse_orcpt("UTF-8;j\u00f6rg@dest.test") == "utf-8;j\u00f6rg@dest.test"  # unitext (RFC 6533)
    assert dsn.parse_orcpt("utf-8;j\\x{F6}rg@dest.test") == "utf-8;j\\x{F6}rg@dest.test"  # xtext form
    for bad in ("utf-8;a b@x", "utf-8;a=b@x", "utf-8;j\u00f6rg\u0085@x"):
        with pytest.raises(dsn.DsnSyntax):
            dsn.parse_orcpt(bad)


def test_carried_orcpt_of_a_utf8_recipient():
    env = Envelope("Q1", "s@origin.test", [JOERG, "a@dest.test"], 1.0, extra={"smtputf8": True})
    d = carried(env, [JOERG, "a@dest.test"])
    assert d is None  # nothing asked: the outbound client adds the ORCPT itself
    env.orcpts = ["J\u00f6rg@Dest.test", None]
    d = carried(env, [JOERG, "a@dest.test"])
    assert d.rcpts[JOERG] == (None, "utf-8;J\u00f6rg@Dest.test")
    assert d.rcpts["a@dest.test"] == (None, "rfc822;a@dest.test")
