"""Crash: SIGKILL the relay at random moments while many clients send mail
through it to a sink; every acknowledged message arrives, and nothing the
relay recorded as delivered arrives again (issue 8).

A short run (5 kills); bench/crash_harness.py runs the long one.  The
machinery is tests.support.crash.
"""

from __future__ import annotations

from tests.support.crash import run


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    report = run(str(tmp_path), kills=5, clients=6, seed=20240805, min_up=0.3, max_up=1.2)
    print("\n" + report.text())
    assert report.kills == 5
    assert report.acked > 50, report.text()
    assert report.lost == 0, report.text()
    assert report.corrupt == 0, report.text()
    assert report.delivered == report.acked, report.text()
    assert report.resent == 0, report.text()
    assert report.left_in_queue == 0 and report.quarantined == 0, report.text()
    assert report.recorded > 0, report.text()


def test_sigkill_with_workers_loses_nothing(tmp_path):
    # workers = 2: kills of the whole relay (master and workers) and of one worker
    report = run(str(tmp_path), kills=4, clients=6, seed=20261127, min_up=0.3, max_up=1.0, workers=2)
    print("\n" + report.text())
    assert report.kills == 4
    assert report.acked > 50, report.text()
    assert report.lost == 0, report.text()
    assert report.corrupt == 0, report.text()
    assert report.delivered == report.acked, report.text()
    assert report.resent == 0, report.text()
    assert report.left_in_queue == 0 and report.quarantined == 0, report.text()
