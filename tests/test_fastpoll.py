"""relay.runtime.fastpoll: the epoll loop without the per-event logging context."""

from __future__ import annotations

import select

from twisted.internet import epollreactor
from twisted.trial import unittest

from relay.runtime import fastpoll


class _Poller:
    def __init__(self, events):
        self.events = events

    def poll(self, timeout, maxevents):
        return self.events


class _Selectable:
    def logPrefix(self):
        return "sel"


class FastPollTests(unittest.TestCase):
    def setUp(self):
        self.r = epollreactor.EPollReactor()
        real = self.r._poller
        self.addCleanup(real.close)
        self.assertTrue(fastpoll.install(self.r))

    def test_dispatches_known_fds_and_survives_a_raising_handler(self):
        a, b = _Selectable(), _Selectable()
        calls = []

        def drdw(sel, fd, event):
            calls.append((fd, event))
            if sel is a:
                raise RuntimeError("boom")

        self.r._doReadOrWrite = drdw
        self.r._selectables = {5: a, 6: b}
        self.r._poller = _Poller([(5, select.EPOLLIN), (7, select.EPOLLIN), (6, select.EPOLLOUT)])
        self.r.doIteration(0)
        self.assertEqual(calls, [(5, select.EPOLLIN), (6, select.EPOLLOUT)])  # fd 7: unknown, skipped
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_reactors_untouched(self):
        from twisted.internet import task

        self.assertFalse(fastpoll.install(task.Clock()))
