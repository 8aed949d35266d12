"""relay-sendmail -N, -R, -V as a real subprocess with a real relay process
(``twistd relay``): through the drop directory (the relay down, then
started) and over SMTP (the drop directory out of reach); the success
notice the relay sends is read back from the sender's Maildir."""

from __future__ import annotations

import email
import os

from relay.intake.dropfile import parse_drop_line
from tests.integration.test_ops_sendmail import Setup, sendmail
from tests.support.relay import deep_merge, toml_dumps
from tests.support.wait import poll
from tests.test_dsn import check_report


def _notice(s: Setup) -> tuple[bytes, bytes]:
    """(the message, the success notice) from alice's Maildir (she is sender and recipient)."""
    poll(lambda: len(s.mails()) >= 2, 20, what="the message and its success notice")
    mails = s.mails()
    notices = [m for m in mails if b"multipart/report" in m]
    assert len(mails) == 2 and len(notices) == 1, mails
    return next(m for m in mails if m not in notices), notices[0]


def test_drop_directory_carries_notify_ret_envid(tmp_path):
    s = Setup(str(tmp_path))
    s.spool.create()
    r = sendmail(["-C", s.cfg, "-f", "alice@local.test", "-N", "success,failure", "-R", "hdrs", "-V", "job 7",
                  "alice@local.test"], b"Subject: nightly\n\ndone\n")
    assert r.returncode == 0, r.stderr
    (name,) = os.listdir(s.spool.drop_dir)
    with open(os.path.join(s.spool.drop_dir, name), "rb") as f:
        assert parse_drop_line(f.readline())["dsn"] == {"notify": "SUCCESS,FAILURE", "ret": "HDRS", "envid": "job 7"}
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        _, notice = _notice(s)
    finally:
        relay.stop()
    per_msg, (b,) = check_report(notice.replace(b"\n", b"\r\n"))
    assert per_msg["Original-Envelope-Id"] == "job 7"
    assert b["Action"] == "delivered" and b["Final-Recipient"] == "rfc822; alice@local.test"
    assert email.message_from_bytes(notice)["Subject"] == "Successful Mail Delivery Report"


def test_smtp_submission_carries_them_too(tmp_path):
    s = Setup(str(tmp_path))
    relay = s.relay().start(wait_for=("127.0.0.1", s.port))
    try:
        other = deep_merge(s.data, {"spool": str(tmp_path / "not-created" / "spool")})
        cfg = tmp_path / "other.toml"
        cfg.write_text(toml_dumps(other))
        r = sendmail(["-C", str(cfg), "-f", "alice@local.test", "-N", "success", "-V", "over-smtp", "alice"],
                     b"Subject: via smtp\n\nbody\n")
        assert r.returncode == 0, r.stderr
        mail, notice = _notice(s)
        assert b"Received: from localhost ([127.0.0.1])" in mail
        per_msg, (b,) = check_report(notice.replace(b"\n", b"\r\n"))
        assert per_msg["Original-Envelope-Id"] == "over-smtp" and b["Action"] == "delivered"
        r = sendmail(["-C", str(cfg), "-N", "never,delay", "alice"], b"Subject: x\n\nx\n")
        assert r.returncode == 64 and b"NOTIFY" in r.stderr
    finally:
        relay.stop()
