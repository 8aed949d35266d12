"""relay.idle: the one lazily moved idle timer (its users over sockets:
test_smtp_protocol.py, test_pop3_unit.py, test_smtp_client_faults.py)."""

from __future__ import annotations

from twisted.internet import task

from relay.idle import IdleTimer


def make():
    clock = task.Clock()
    fired = []
    return clock, IdleTimer(clock, lambda: fired.append(clock.seconds())), fired


def test_moving_the_deadline_schedules_nothing_new():
    clock, t, fired = make()
    t.set(10)
    (call,) = clock.getDelayedCalls()
    for _ in range(100):
        clock.advance(1)
        t.set(10)
    assert clock.getDelayedCalls() == [call]
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
