"""relay.common.idle: the one lazily moved idle timer (its users over sockets:
test_smtp_protocol.py, test_pop3_unit.py, test_smtp_client_faults.py)."""

from __future__ import annotations

from twisted.internet import task

from relay.common.idle import IdleTimer


def make():
    clock = task.Clock()
    fired = []
    return clock, IdleTimer(clock, lambda: fired.append(clock.seconds())), fired


def test_moving_the_deadline_costs_one_call_per_period_not_per_set():
    clock, t, fired = make()
    scheduled = []
    real = clock.callLater
    clock.callLater = lambda *a: scheduled.append(a[0]) or real(*a)
    t.set(10)
    for _ in range(100):
        clock.advance(1)
        t.set(10)
    assert len(scheduled) <= 13  # one at the start, one each time it woke early (every ~9 s), not 101
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(9.5)
    assert fired == []
    clock.advance(0.5)
    assert fired == [110.0]
    assert clock.getDelayedCalls() == []


def test_a_shorter_timeout_applies_at_once():
    clock, t, fired = make()
    t.set(600)
    t.set(30)
    clock.advance(30)
    assert fired == [30.0]


def test_pause_then_set_and_cancel():
    clock, t, fired = make()
    t.set(5)
    t.pause()
    clock.advance(100)
    assert fired == [] and not t.armed
    t.set(5)
    clock.advance(5)
    assert fired == [105.0]
    t.set(5)
    t.cancel()
    clock.advance(10)
    assert fired == [105.0] and clock.getDelayedCalls() == []
