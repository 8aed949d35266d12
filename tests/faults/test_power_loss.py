"""Power loss, not only SIGKILL (issue 12, item 15): the spool and the
Maildirs on a file system that forgets, at a cut, everything not made
durable (tests/support/powerfs.py).

The two findings of the outside run, each pinned down on its own, then a
short run of the power-loss harness (tests/support/powerloss.py; the long
one is bench/power_loss.py).
"""

from __future__ import annotations

import os

import pytest

from relay.mailbox import maildir as maildirmod
from relay.queue import spool as spoolmod
from tests.support.powerfs import PowerFS, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture
def fs(tmp_path):
    with PowerFS(str(tmp_path / "fs")) as p:
        yield p


def _queue(sp: spoolmod.Spool, rcpts: list[str], body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    env = spoolmod.Envelope(spoolmod.new_id(), "s@example.test", rcpts, 1.0)
    inc = sp.incoming(env)
    inc.write(body)
    qid = inc.finish()
    spoolmod.fsync_dir(sp.queue_dir)  # what the commit does before the 250
    return qid


def test_spool_made_at_first_start_survives_a_power_cut(fs):
    """Before: incoming/, queue/... and the spool itself were made without
    an fsync of their parent: an acknowledged message vanished with them."""
    sp = spoolmod.Spool(os.path.join(fs.mnt, "spool"))
    sp.create()
    qid = _queue(sp, ["a@example.test"])
    fs.cut()
    fs.mount()
    sp = spoolmod.Spool(os.path.join(fs.mnt, "spool"))
    assert sp.queue_ids() == [qid]
    for d in (sp.incoming_dir, sp.quarantine_dir, sp.drop_dir):
        assert os.path.isdir(d), d


def test_spool_left_by_a_crash_before_its_fsync_is_made_durable_at_the_next_start(fs):
    root = os.path.join(fs.mnt, "spool")
    for d in ("", "incoming", "queue", "quarantine", "drop"):
        os.mkdir(os.path.join(root, d), 0o700)  # made, never fsynced (a first start killed)
    sp = spoolmod.Spool(root)
    sp.create()
    qid = _queue(sp, ["a@example.test"])
    fs.cut()
    fs.mount()
    assert spoolmod.Spool(root).queue_ids() == [qid]


def test_a_deferral_never_undoes_a_recorded_delivery(fs):
    """Before: the deferral's state file was renamed over the fsynced one
    without fdatasync; the next message's commit fsynced queue/, making the
    rename durable but not the data: after the cut the state file was empty,
    recovery quarantined it and every recipient was pending again."""
    root = os.path.join(fs.mnt, "spool")
    sp = spoolmod.Spool(root)
    sp.create()
    qid = _queue(sp, ["a@example.test", "b@example.test"])
    entry = sp.load(qid)
    a, b = entry.state.recipients
    a.status, a.reply = spoolmod.DELIVERED, "250 ok"
    b.status, b.reply, b.attempts = spoolmod.DEFERRED, "451 later", 1
    sp.write_state_merged(qid, entry.state, durable=True)  # a delivered: durable
    spoolmod.fsync_dir(sp.queue_dir)
    b.attempts, b.reply = 2, "451 later again"
    b.history = []
    sp.write_state_merged(qid, entry.state, durable=False)  # the deferral rewrite
    _queue(sp, ["c@example.test"])  # the next message's commit fsyncs queue/
    fs.cut()
    fs.mount()
    sp = spoolmod.Spool(root)
    got = list(sp.recover())
    assert os.listdir(sp.quarantine_dir) == []
    mine = [e for e in got if e.envelope.queue_id == qid]
    assert len(mine) == 1
    statuses = {r.address: r.status for r in mine[0].state.recipients}
    assert statuses["a@example.test"] == spoolmod.DELIVERED, statuses


def test_a_message_removed_as_delivered_stays_removed(fs):
    """A message delivered at its first attempt has no state file: its
    removal is the only record.  Before, the queue forgot it without an
    fsync of queue/, and a power cut brought it back with every recipient
    pending: all of them were sent again."""
    from relay.queue.diskio import AsyncSpool, DiskPool

    root = os.path.join(fs.mnt, "spool")
    sp = spoolmod.Spool(root)
    sp.create()
    qid = _queue(sp, ["a@example.test", "b@example.test"])
    aspool = AsyncSpool(sp, DiskPool(None, inline=True))
    results: list = []
    aspool.remove(qid, state_file=False).addBoth(results.append)
    assert results == [None]
    fs.cut()
    fs.mount()
    assert spoolmod.Spool(root).queue_ids() == []


def test_users_file_in_a_new_directory_survives_a_power_cut(fs):
    """relayctl user add into a directory it creates: the file was fsynced
    and its directory too, but not the new directory's name in its parent."""
    from relay.mailbox import users as usersmod
    path = os.path.join(fs.mnt, "etc", "relay", "users")
    with usersmod.locked(path):
        usersmod.atomic_write(path, b"u1@local.test:x\n")
    fs.cut()
    fs.mount()
    with open(path, "rb") as f:
        assert f.read() == b"u1@local.test:x\n"


def _message_file(tmp_path) -> str:
    p = os.path.join(str(tmp_path), "src")
    with open(p, "wb") as f:
        f.write(b"Subject: hi\r\n\r\nhello\r\n")
    return p


def test_maildir_made_at_first_delivery_survives_a_power_cut(fs, tmp_path):
    root = os.path.join(fs.mnt, "mail")
    path = maildirmod.deliver(root, "local.test", "u1", _message_file(tmp_path), 0, b"")
    fs.cut()
    fs.mount()
    assert os.path.exists(path)


def test_maildir_made_but_never_fsynced_is_made_durable_before_delivery(fs, tmp_path):
    """A Maildir whose directories exist but are not durable yet (made by a
    process killed before its fsync, or by another thread still before its
    fsync): before, delivery saw tmp/new/cur and skipped the fsyncs, so the
    message it had fsynced into new/ vanished with the directories."""
    root = os.path.join(fs.mnt, "mail")
    box = os.path.join(root, "local.test", "u2")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub), 0o700)
    maildirmod._durable_maildirs.discard(box)
    path = maildirmod.deliver(root, "local.test", "u2", _message_file(tmp_path), 0, b"")
    fs.cut()
    fs.mount()
    assert os.path.exists(path)


def test_power_cuts_under_load_lose_nothing_and_resend_nothing_recorded(tmp_path):
    from tests.support.powerloss import run

    report = run(str(tmp_path), cuts=2, clients=5, seed=20261202, min_up=0.6, max_up=1.5)
    print("\n" + report.text())
    assert report.cuts == 3  # 2 under load, 1 after the queue drained
    assert report.acked > 50, report.text()
    assert report.local_rcpts > 0, report.text()
    assert report.lost == 0, report.text()
    assert report.torn == 0, report.text()
    assert report.quarantined == 0, report.text()
    assert report.resent == 0, report.text()
    assert report.left_in_queue == 0, report.text()
    assert report.recorded > 0, report.text()
    # the file system did throw things away: the run tested something
    assert report.fs["names_dropped"] + report.fs["empty_never_synced"] + report.fs["names_restored"] > 0
