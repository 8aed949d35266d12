"""relay-sendmail (its command line, the message it builds, its refusals)
and the pickup of the drop directory by a running relay.

relay-sendmail runs in-process here (``main(argv, stdin)``) for speed; the
subprocess tests with a relay up and down are in
tests/integration/test_ops_sendmail.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import time

import pytest
from twisted.trial import unittest

from relay.intake import sendmail as sm
from relay.mailbox import users as usersmod
from relay.queue import spool as spoolmod
from tests.support.relay import InProcessRelay, base_config, deep_merge, free_port, toml_dumps
from tests.support.wait import apoll

# -- the command line ------------------------------------------------------------------


def test_cron_and_php_command_lines():
    o = sm.parse_args(["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t"])  # cron
    assert o.extract and not o.dot_ends and o.full_name == "CronDaemon" and o.recipients == []
    o = sm.parse_args(["-t", "-i"])  # PHP mail()
    assert o.extract and not o.dot_ends
    o = sm.parse_args(["-ti", "-f", "www@example.org"])  # combined flags, -f with a separate argument
    assert o.extract and not o.dot_ends and o.sender == "www@example.org"


def test_options_with_values_ignored_options_and_recipients():
    o = sm.parse_args(["-fbounce@example.org", "-F", "Git Sender", "-v", "-B8BITMIME", "-N", "never",
                       "-R", "hdrs", "-V", "-L", "label", "-h", "17", "-Am", "-oA/etc/aliases", "-odb",
                       "-U", "-G", "-m", "-n", "-x", "-e", "x", "-p", "local", "-bm", "a@b.example", "c@d.example"])
    assert o.sender == "bounce@example.org" and o.full_name == "Git Sender" and o.body == "8BITMIME"
    assert o.dot_ends and o.recipients == ["a@b.example", "c@d.example"] and o.verbose == 1
    assert sm.parse_args(["-r", "x@y.example", "r@e.example"]).sender == "x@y.example"  # -r: obsolete -f
    assert sm.parse_args(["--", "-dash@x.example"]).recipients == ["-dash@x.example"]
    assert sm.parse_args(["a@b.example", "-t"]).recipients == ["a@b.example", "-t"]  # options end at the first


@pytest.mark.parametrize("argv,needle", [
    (["-bs"], "-bs (an SMTP conversation on standard input) is not supported"),
    (["-bp"], "relayctl"),
    (["-bd"], "daemon"),
    (["-bv", "x"], "-bv is not supported"),
    (["-q"], "-q (run the queue) is not supported"),
    (["-qRexample.org"], "not supported"),
    (["-f"], "option -f requires an argument"),
    (["-Z"], "unknown option -Z"),
    (["-B", "9BIT"], "-B needs 7BIT or 8BITMIME"),
])
def test_refused_options(argv, needle):
    with pytest.raises(sm.Fatal) as e:
        sm.parse_args(argv)
    assert e.value.status == sm.EX_USAGE and needle in e.value.message


def test_nothing_to_do_modes(capsys):
    assert sm.main(["-bi"], stdin=io.BytesIO(b"")) == 0
    assert sm.main(["-I"], stdin=io.BytesIO(b"")) == 0
    assert "aliases" in capsys.readouterr().err
    assert sm.main(["-q1h"], stdin=io.BytesIO(b"")) == 0


# -- building and queueing the message (no relay running) --------------------------------


@pytest.fixture
def setup(tmp_path):
    port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"],
                                                            "max_message_size": 4096}})
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml_dumps(data))
    sp = spoolmod.Spool(data["spool"])
    sp.create()
    return str(cfg), sp


def run(cfg: str, argv: list[str], data: bytes) -> int:
    return sm.main(["-C", cfg, *argv], stdin=io.BytesIO(data))


def dropped(sp: spoolmod.Spool) -> tuple[str, dict, bytes]:
    (name,) = os.listdir(sp.drop_dir)
    raw = open(os.path.join(sp.drop_dir, name), "rb").read()
    line, _, msg = raw.partition(b"\n")
    return name, json.loads(line[len(sm.DROP_MAGIC):]), msg


def headers_of(msg: bytes) -> list[bytes]:
    return msg.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_queued_in_drop_with_added_headers(setup):
    cfg, sp = setup
    assert run(cfg, ["-i", "alice", "Bob <bob@example.org>, carol@example.net"],
               b"Subject: report\n\nline one\n.\n..two\nlast") == 0
    name, env, msg = dropped(sp)
    assert spoolmod.is_queue_id(name) and os.stat(os.path.join(sp.drop_dir, name)).st_mode & 0o777 == 0o640
    assert env["rcpt"] == ["alice@local.test", "bob@example.org", "carol@example.net"]
    assert env["from"] == "root@local.test" and env["uid"] == os.getuid() and env["user"] == "root"
    hs = headers_of(msg)
    assert hs[0] == b"Subject: report"
    assert any(h.startswith(b"From: ") and h.endswith(b"<root@local.test>") for h in hs)
    assert any(h.startswith(b"Date: ") for h in hs)
    assert any(h.startswith(b"Message-ID: <") and h.endswith(b"@relay.test>") for h in hs)
    assert msg.endswith(b"\r\n\r\nline one\r\n.\r\n..two\r\nlast\r\n")  # -i: "." is text; CRLF added at the end
    assert b"\n" not in msg.replace(b"\r\n", b"")
    assert not [n for n in os.listdir(sp.drop_dir) if n.startswith(".")]


def test_crlf_and_lf_input_store_the_same(setup):
    cfg, sp = setup
    crlf_in = b"Subject: a\r\nDate: d\r\nMessage-ID: <m@x>\r\nFrom: f@x\r\n\r\nb\r\nc\r\n"
    assert run(cfg, ["x@example.org"], crlf_in) == 0
    _, _, crlf = dropped(sp)
    shutil.rmtree(sp.drop_dir)
    sp.create()
    assert run(cfg, ["x@example.org"], b"Subject: a\nDate: d\nMessage-ID: <m@x>\nFrom: f@x\n\nb\nc\n") == 0
    _, _, lf = dropped(sp)
    assert crlf == lf == b"Subject: a\r\nDate: d\r\nMessage-ID: <m@x>\r\nFrom: f@x\r\n\r\nb\r\nc\r\n"


def test_lone_dot_ends_the_message_without_i(setup):
    cfg, sp = setup
    assert run(cfg, ["x@example.org"], b"Subject: a\n\nbefore\n.\nafter\n") == 0
    _, _, msg = dropped(sp)
    assert msg.endswith(b"\r\n\r\nbefore\r\n") and b"after" not in msg


def test_t_reads_to_cc_bcc_and_removes_bcc(setup):
    cfg, sp = setup
    data = (b"From: Me <me@example.org>\nTo: a@example.org, B <b@example.org>\nCc: c@example.org\n"
            b"Bcc: hidden@example.org,\n  hidden2@example.org\nSubject: t\n\nbody\n")
    assert run(cfg, ["-t", "-i", "extra@example.org"], data) == 0
    _, env, msg = dropped(sp)
    assert env["rcpt"] == ["extra@example.org", "a@example.org", "b@example.org", "c@example.org",
                           "hidden@example.org", "hidden2@example.org"]
    assert b"hidden" not in msg and b"Bcc" not in msg
    assert headers_of(msg)[0] == b"From: Me <me@example.org>"  # kept as given
    assert env["from"] == "root@local.test"


def test_t_with_resent_headers_uses_them(setup):
    cfg, sp = setup
    data = b"To: old@example.org\nResent-To: new@example.org\nResent-Bcc: secret@example.org\n\nx\n"
    assert run(cfg, ["-t"], data) == 0
    _, env, msg = dropped(sp)
    assert env["rcpt"] == ["new@example.org", "secret@example.org"] and b"secret" not in msg


def test_t_group_syntax_and_no_recipients(setup, capsys):
    cfg, sp = setup
    assert run(cfg, ["-t"], b"To: undisclosed-recipients:;\nSubject: x\n\nx\n") == sm.EX_DATAERR
    assert "no recipients" in capsys.readouterr().err
    assert run(cfg, [], b"Subject: x\n\nx\n") == sm.EX_USAGE
    assert "no recipients given" in capsys.readouterr().err
    assert os.listdir(sp.drop_dir) == []


def test_sender_and_full_name(setup):
    cfg, sp = setup
    assert run(cfg, ["-f", "Bounces <bounces@example.org>", "-F", "Nightly Job", "x@example.org"],
               b"Subject: s\n\nx\n") == 0
    _, env, msg = dropped(sp)
    assert env["from"] == "bounces@example.org"
    assert b"From: Nightly Job <bounces@example.org>\r\n" in msg
    shutil.rmtree(sp.drop_dir)
    sp.create()
    assert run(cfg, ["-f<>", "-F", "Jos\u00e9 \"Q\" User", "x@example.org"], b"Subject: s\n\nx\n") == 0
    _, env, msg = dropped(sp)
    assert env["from"] == ""
    from_line = [h for h in headers_of(msg) if h.startswith(b"From: ")][0]
    assert from_line.startswith(b"From: =?utf-8?") and from_line.endswith(b"<root@local.test>")


def test_body_without_headers_and_mbox_line(setup):
    cfg, sp = setup
    assert run(cfg, ["x@example.org"], b"From someone Mon Jan  1 00:00:00 2024\nhello world: not a header?\n"
                                       b"second\n") == 0
    _, _, msg = dropped(sp)
    head, _, body = msg.partition(b"\r\n\r\n")
    assert b"From someone" not in msg
    assert body == b"hello world: not a header?\r\nsecond\r\n"
    shutil.rmtree(sp.drop_dir)
    sp.create()
    assert run(cfg, ["x@example.org"], b"just text, no headers\nmore\n") == 0
    _, _, msg = dropped(sp)
    head, _, body = msg.partition(b"\r\n\r\n")
    assert body == b"just text, no headers\r\nmore\r\n"
    assert [h.split(b":")[0] for h in head.split(b"\r\n")] == [b"From", b"Date", b"Message-ID"]


def test_long_lines_are_folded_and_broken(setup):
    cfg, sp = setup
    subject = b"Subject: " + b" ".join([b"word"] * 300)
    body = b"x" * 2100
    assert run(cfg, ["x@example.org"], subject + b"\n\n" + body + b"\n") == 0
    _, _, msg = dropped(sp)
    assert all(len(ln) <= 998 for ln in msg.split(b"\r\n"))
    head, _, stored = msg.partition(b"\r\n\r\n")
    assert head.split(b"\r\nFrom:")[0].replace(b"\r\n", b"") == subject  # folding is undone by unfolding
    assert stored.replace(b"\r\n", b"") == body


def test_bare_cr_is_refused_and_nothing_left(setup, capsys):
    cfg, sp = setup
    assert run(cfg, ["x@example.org"], b"Subject: a\n\nline\rwith CR\n") == sm.EX_DATAERR
    assert "bare CR" in capsys.readouterr().err
    assert os.listdir(sp.drop_dir) == []


def test_mail_loop_is_refused(setup, capsys):
    cfg, sp = setup
    hops = b"Received: from a by b\n"
    assert run(cfg, ["x@example.org"], hops * 101 + b"Subject: loop\n\nx\n") == sm.EX_DATAERR
    assert "too many hops: 101 Received headers" in capsys.readouterr().err
    assert os.listdir(sp.drop_dir) == []
    assert run(cfg, ["x@example.org"], hops * 100 + b"Subject: ok\n\nx\n") == 0


def test_too_big_is_refused(setup, capsys):
    cfg, sp = setup
    assert run(cfg, ["x@example.org"], b"Subject: a\n\n" + b"y" * 5000 + b"\n") == sm.EX_DATAERR
    assert "smtp.max_message_size (4096" in capsys.readouterr().err
    assert run(cfg, ["x@example.org"], b"Subject: a\n\n" + (b"y" * 70 + b"\n") * 100) == sm.EX_DATAERR
    assert os.listdir(sp.drop_dir) == []


def test_bad_addresses(setup, capsys):
    cfg, sp = setup
    assert run(cfg, ["not an address"], b"x\n") == sm.EX_USAGE
    assert "bad recipient address 'not an address'" in capsys.readouterr().err
    assert run(cfg, ["root@"], b"x\n") == sm.EX_USAGE
    assert run(cfg, ["a@b.example c@d.example"], b"x\n") == sm.EX_USAGE
    assert run(cfg, ["-f", "a@@b", "x@example.org"], b"x\n") == sm.EX_USAGE
    assert run(cfg, ["-t"], b"To: ok@example.org, bad<<@\n\nx\n") == sm.EX_DATAERR
    # "caf\u00e9@example.org" was refused here until issue 17 (SMTPUTF8:
    # tests/test_smtputf8.py); characters no address may hold still are
    assert run(cfg, ["caf\u00e9\u202e@example.org"], b"x\n") == sm.EX_USAGE
    assert os.listdir(sp.drop_dir) == []


def test_never_started_relay_gets_its_spool_made_and_the_message_queued(tmp_path, capsys):
    """Before the first start there is no spool: the user the relay would
    make it as (here: this test's user, who owns the directory it goes in)
    makes the relay's own layout and queues in drop/."""
    data = base_config(str(tmp_path))
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml_dumps(data))
    sp = spoolmod.Spool(data["spool"])
    assert not os.path.exists(sp.root)
    assert run(str(cfg), ["x@example.org"], b"Subject: a\n\nb\n") == sm.EX_OK, capsys.readouterr().err
    for d in (sp.root, sp.incoming_dir, sp.queue_dir, sp.quarantine_dir, sp.drop_dir):
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), d
    (name,) = os.listdir(sp.drop_dir)
    assert spoolmod.is_queue_id(name)


def test_relay_down_and_drop_unreachable_is_a_clear_tempfail(tmp_path, capsys):
    port = free_port()
    data = deep_merge(base_config(str(tmp_path)), {"smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
                                                   "spool": str(tmp_path / "missing" / "spool")})
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml_dumps(data))
    # a spool the relay itself could not make (its parent is missing): nothing to write to
    assert run(str(cfg), ["x@example.org"], b"Subject: a\n\nb\n") == sm.EX_TEMPFAIL
    err = capsys.readouterr().err
    assert "message NOT queued: the relay is not running" in err and f"127.0.0.1:{port}" in err
    assert f"the spool {tmp_path}/missing/spool does not exist, nor does {tmp_path}/missing" in err
    assert not os.path.exists(tmp_path / "missing")


def test_no_config_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setattr(sm, "SYSTEM_CONFIG", str(tmp_path / "nope.toml"))
    assert sm.main(["x@example.org"], stdin=io.BytesIO(b"x\n")) == sm.EX_CONFIG
    assert "no relay config found" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("[smtp]\nmax_message_size = 1\n")
    assert sm.main(["-C", str(tmp_path / "bad.toml"), "x@example.org"], stdin=io.BytesIO(b"x\n")) == sm.EX_CONFIG
    assert "smtp.max_message_size" in capsys.readouterr().err


def test_drop_line_round_trip_and_refusals():
    line = sm.drop_line("a@b.example", ["c@d.example"], 1000, "alice", 12.5)
    assert sm.parse_drop_line(line)["rcpt"] == ["c@d.example"]
    for bad in (b"garbage\n", sm.DROP_MAGIC + b"{}\n", sm.DROP_MAGIC + b"[1]\n",
                sm.DROP_MAGIC + b'{"from":"","rcpt":[],"t":1,"uid":1,"user":""}\n',
                sm.DROP_MAGIC + b'{"from":"","rcpt":["x"],"t":1,"uid":-1,"user":""}\n',
                line[:-1]):
        with pytest.raises(ValueError):
            sm.parse_drop_line(bad)


# -- the pickup, in a running relay ----------------------------------------------------------


class Pickup(unittest.TestCase):
    async def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="relay-pickup-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        usersmod.add_user(os.path.join(self.tmp, "users"), "alice@local.test", "pw")
        self.relay = InProcessRelay(self.tmp, {"smtp": {"max_message_size": 100_000}})
        self.sp = spoolmod.Spool(self.relay.config.spool)
        self.sp.create()
        self.cfg = os.path.join(self.tmp, "relay.toml")
        with open(self.cfg, "w") as f:
            f.write(toml_dumps(self.relay.data))
        self.inbox = os.path.join(self.tmp, "mail", "local.test", "alice", "new")

    async def start(self):
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        return self.relay.service

    def mails(self) -> list[bytes]:
        if not os.path.isdir(self.inbox):
            return []
        return [open(os.path.join(self.inbox, n), "rb").read() for n in sorted(os.listdir(self.inbox))]

    def drop_raw(self, name: str, data: bytes) -> str:
        path = os.path.join(self.sp.drop_dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def quarantined(self) -> list[str]:
        return sorted(os.listdir(self.sp.quarantine_dir))

    async def test_waiting_file_is_picked_up_at_start(self):
        assert run(self.cfg, ["alice"], b"Subject: waited\n\nhello\n") == 0
        (qid,) = os.listdir(self.sp.drop_dir)
        await self.start()
        await apoll(self.mails, 10, what="delivery of the dropped message")
        (mail,) = self.mails()
        assert b"Received: by relay.test (twisted-relay, from userid root (uid 0))\n\tid " + qid.encode() in mail
        assert b"Subject: waited\n" in mail
        assert os.listdir(self.sp.drop_dir) == [] and self.quarantined() == []
        assert self.relay.service.pickup.received == 1

    async def test_file_dropped_while_running_is_delivered_at_once(self):
        svc = await self.start()
        if svc.pickup._notifier is None:
            raise unittest.SkipTest("no inotify here: the periodic scan is the only trigger")
        svc.pickup._loop.stop()  # no periodic scan: only the inotify event can trigger the pickup
        assert run(self.cfg, ["alice@local.test"], b"Subject: now\n\nhi\n") == 0
        await apoll(self.mails, 10, what="delivery")
        assert svc.pickup.received == 1

    async def test_bad_files_are_quarantined_not_lost(self):
        svc = await self.start()
        good_env = sm.drop_line("a@b.example", ["alice@local.test"], 0, "root", time.time())
        bad = {
            spoolmod.new_id(): b"garbage without an envelope line",
            spoolmod.new_id(): good_env + b"Subject: x\n\nbare LF\n",
            spoolmod.new_id(): good_env + b"Subject: x\r\n\r\nbare\rCR\r\n",
            spoolmod.new_id(): good_env + b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n",
            spoolmod.new_id(): good_env + b"Subject: x\r\n\r\n" + b"z" * 100 + (b"\r\n" + b"z" * 900) * 120,
            spoolmod.new_id(): sm.drop_line("a@b.example", ["bad address"], 0, "root", 1.0) + b"x\r\n",
            spoolmod.new_id(): good_env + b"Received: from a by b\r\n" * 101 + b"Subject: loop\r\n\r\nx\r\n",
            "not-a-queue-id": good_env + b"Subject: x\r\n\r\nok\r\n",
        }
        for name, data in bad.items():
            self.drop_raw(name, data)
        link = spoolmod.new_id()
        os.symlink("/etc/passwd", os.path.join(self.sp.drop_dir, link))
        hard = spoolmod.new_id()
        self.drop_raw(hard, good_env + b"Subject: x\r\n\r\nok\r\n")
        os.link(os.path.join(self.sp.drop_dir, hard), os.path.join(self.tmp, "other-name"))
        svc.pickup.kick()
        await apoll(lambda: len(self.quarantined()) == len(bad) + 2, 10, what="quarantine")
        assert os.listdir(self.sp.drop_dir) == []
        assert self.quarantined() == sorted("drop-" + n for n in [*bad, link, hard])
        assert self.mails() == [] and svc.pickup.quarantined == len(bad) + 2 and svc.pickup.received == 0
        # a good one still goes through afterwards
        assert run(self.cfg, ["alice"], b"Subject: fine\n\nx\n") == 0
        await apoll(self.mails, 10, what="delivery")

    async def test_already_queued_drop_file_is_removed_at_start(self):
        """A crash after the queue commit, before the drop file's removal."""
        assert run(self.cfg, ["alice"], b"Subject: once\n\nx\n") == 0
        (qid,) = os.listdir(self.sp.drop_dir)
        env = spoolmod.Envelope(qid, "root@local.test", ["alice@local.test"], time.time())
        inc = self.sp.incoming(env)
        inc.write(b"Subject: once\r\n\r\nx\r\n")
        inc.finish()
        await self.start()
        await apoll(self.mails, 10, what="delivery")
        await apoll(lambda: not self.relay.service.queue.messages, 10, what="the queue to empty")
        assert len(self.mails()) == 1 and os.listdir(self.sp.drop_dir) == []

    async def test_stale_temp_file_is_quarantined_fresh_one_left(self):
        old = self.drop_raw(".X.1234.tmp", b"half written")
        os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
        self.drop_raw(".Y.5678.tmp", b"being written")
        await self.start()
        await apoll(lambda: self.quarantined() == ["drop-X.1234.tmp"], 10, what="quarantine")
        assert os.listdir(self.sp.drop_dir) == [".Y.5678.tmp"]

    async def test_owner_of_the_file_is_the_submitter(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to give the file to another user")
        name = spoolmod.new_id()
        path = self.drop_raw(name, sm.drop_line("a@b.example", ["alice@local.test"], 0, "root", time.time())
                             + b"Subject: claim\r\n\r\nx\r\n")
        os.chown(path, 65534, 65534)  # written by nobody, who claims to be root
        await self.start()
        await apoll(self.mails, 10, what="delivery")
        (mail,) = self.mails()
        assert b"(twisted-relay, from userid nobody (uid 65534))" in mail
