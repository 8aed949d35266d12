"""``relayctl queue bounce`` honours the client's DSN request (issue 17).

An administrator's bounce follows the rules of an ordinary bounce: every
open recipient is bounced, but one whose NOTIFY has no FAILURE (NEVER, or
SUCCESS/DELAY only) is left out of the notice, and the notice carries the
client's ORCPT (Original-Recipient) and ENVID (Original-Envelope-Id).
Live: an in-process relay (tests.test_control.LiveCase) with the sender's
domain and the recipients at a sink on 127.0.0.2 that defers them; the
message goes in over real SMTP with the DSN parameters.  Offline: a spool
as a stopped relay left it, relayctl as a subprocess.
"""

from __future__ import annotations

import smtplib

from twisted.logger import globalLogPublisher

from relay import config as configmod
from relay.common.dsn import DsnRequest
from relay.queue import spool as spoolmod
from tests.support.relay import in_thread
from tests.support.wait import apoll
from tests.test_control import LiveCase, make_spool, run_ctl, tmp  # noqa: F401 (tmp: the fixture)

BUSY = "451 4.2.0 busy"


class LiveBounce(LiveCase):
    sink_behaviour = {"rcpt_replies": {f"{n}@sink.test": BUSY for n in ("never", "fail", "plain", "late", "bob")}}

    def send_dsn(self, rcpts: list[tuple[str, list[str]]], mail_opts: list[str]):
        def run() -> str:
            with smtplib.SMTP(*self.relay.smtp) as s:
                s.ehlo("client.test")
                s.mail("alice@sink.test", mail_opts)
                for r, opts in rcpts:
                    code, resp = s.rcpt(r, opts)
                    assert code == 250, resp
                code, resp = s.data(b"Subject: dsn bounce\r\n\r\nbody\r\n")
                assert code == 250, resp
                return resp.decode().rsplit(" ", 1)[1]

        return in_thread(run)

    def notices(self) -> list:
        return [t for t in self.sink.transactions if t.mail_from == ""]

    async def test_bounce_leaves_out_notify_never_and_reports_orcpt_and_envid(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        qid = await self.send_dsn([("never@sink.test", ["NOTIFY=NEVER"]),
                                   ("fail@sink.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;first+2Bx@client.test"]),
                                   ("plain@sink.test", []),
                                   ("late@sink.test", ["NOTIFY=DELAY"])], ["ENVID=env+2D42"])
        await apoll(lambda: self.deferred(qid), what="deferral")
        r = await self.ctl("queue", "bounce", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: returned to the sender\n"))
        await apoll(lambda: self.notices(), what="the DSN")
        self.assertNotIn(qid, self.queue.messages)
        (t,) = self.notices()
        self.assertEqual(t.rcpts, ["alice@sink.test"])
        self.assertIn(b"Original-Envelope-Id: env-42", t.data)
        self.assertIn(b"Final-Recipient: rfc822; fail@sink.test\r\nOriginal-Recipient: rfc822; first+x@client.test",
                      t.data)
        self.assertIn(b"Final-Recipient: rfc822; plain@sink.test", t.data)
        self.assertIn(b"returned to sender by the mail administrator", t.data)
        self.assertNotIn(b"never@sink.test", t.data)
        self.assertNotIn(b"late@sink.test", t.data)
        said = [e.get("to") for e in events if "no non-delivery notification" in e.get("log_format", "")
                and e.get("queue_id") == qid]
        self.assertEqual(sorted(said), ["late@sink.test", "never@sink.test"])
        self.assertEqual(self.queue.counters.bounced, 4)  # all four bounced, two reported

    async def test_bounce_with_no_recipient_wanting_a_notice_sends_none(self):
        qid = await self.send_dsn([("never@sink.test", ["NOTIFY=NEVER"])], [])
        await apoll(lambda: self.deferred(qid), what="deferral")
        r = await self.ctl("queue", "bounce", qid)
        self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: returned to the sender\n"))
        # the notice would be queued before the removal: none is queued, none was sent
        self.assertEqual(list(self.queue.messages), [])
        self.assertEqual((self.notices(), self.queue.counters.dsn_sent, self.queue.counters.bounced), ([], 0, 1))

    async def test_bounce_of_an_alias_expansion_reports_the_alias(self):
        """team@local.test expands to alice (local: delivered) and bob@sink.test
        (deferred); bob carries team's NOTIFY, and the notice names team as
        the Original-Recipient; with NOTIFY=NEVER on team, no notice."""
        q1 = await self.send_dsn([("team@local.test", ["NOTIFY=FAILURE"])], [])
        q2 = await self.send_dsn([("team@local.test", ["NOTIFY=NEVER"])], [])
        await apoll(lambda: self.deferred(q1) and self.deferred(q2), what="bob's deferrals")
        for qid in (q1, q2):
            r = await self.ctl("queue", "bounce", qid)
            self.assertEqual((r.returncode, r.stderr), (0, f"{qid}: returned to the sender\n"))
        await apoll(lambda: self.notices(), what="the DSN")
        self.assertEqual(list(self.queue.messages), [])
        (t,) = self.notices()
        self.assertIn(f"X-Relay-Queue-ID: {q1}".encode(), t.data)
        self.assertIn(b"Final-Recipient: rfc822; bob@sink.test\r\nOriginal-Recipient: rfc822; team@local.test",
                      t.data)
        self.assertNotIn(b"alice@local.test", t.data)  # delivered: not part of the bounce


def _dsn_spool(tmp_dir: str, dsn: DsnRequest, rcpts: list[str]) -> tuple[str, str, spoolmod.Spool]:
    cfg, (qid,) = make_spool(tmp_dir, [{"rcpts": rcpts, "sender": "alice@client.test"}])
    sp = spoolmod.Spool(configmod.load(cfg).spool)
    path = sp.message_path(qid)
    with open(path, "rb") as f:
        line, nl, rest = f.read().partition(b"\n")
    env = spoolmod.Envelope.from_line(line + nl)
    dsn.fit(len(env.recipients))
    env.dsn = dsn
    with open(path, "wb") as f:
        f.write(env.to_line() + rest)
    return cfg, qid, sp


def test_offline_bounce_follows_notify_and_reports_orcpt_envid(tmp):  # noqa: F811
    dsn = DsnRequest(ret="FULL", envid="off-1", notify=["NEVER", "FAILURE", None],
                     orcpt=[None, "rfc822;orig+2By@client.test", None])
    cfg, qid, sp = _dsn_spool(tmp, dsn, ["x@dest.test", "y@dest.test", "z@dest.test"])
    r = run_ctl(cfg, "queue", "bounce", qid)
    assert r.returncode == 0, r.stderr
    assert "returned to the sender (notification" in r.stderr
    (nid,) = sp.queue_ids()
    assert sp.load(nid).envelope.recipients == ["alice@client.test"]
    with open(sp.message_path(nid), "rb") as f:
        body = f.read()
    assert b"Original-Envelope-Id: off-1" in body
    assert b"Final-Recipient: rfc822; y@dest.test\r\nOriginal-Recipient: rfc822; orig+y@client.test" in body
    assert b"Final-Recipient: rfc822; z@dest.test" in body
    assert b"x@dest.test" not in body
    assert b"Content-Type: message/rfc822" in body and b"body\r\n" in body  # RET=FULL, as live


def test_offline_bounce_with_no_recipient_wanting_a_notice(tmp):  # noqa: F811
    cfg, qid, sp = _dsn_spool(tmp, DsnRequest(notify=["NEVER", "SUCCESS"]), ["x@dest.test", "y@dest.test"])
    r = run_ctl(cfg, "queue", "bounce", qid)
    assert (r.returncode, r.stderr) == (
        0, f"{qid}: returned to the sender (no notification: no recipient's NOTIFY asked for one)\n")
    assert sp.queue_ids() == []
