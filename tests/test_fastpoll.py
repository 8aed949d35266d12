"""relay.fastpoll: the epoll loop without the per-event logging context."""

from __future__ import annotations

import select

from twisted.internet import epollreactor
from twisted.trial import unittest

from relay import fastpoll


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


class ExclusiveAcceptTests(unittest.TestCase):
    """A shared listening socket is registered with EPOLLEXCLUSIVE, so one
    new connection wakes one waiting worker, not all of them."""

    def test_listening_port_registered_exclusive(self):
        import errno

        from twisted.internet.protocol import ServerFactory

        r = epollreactor.EPollReactor()
        self.addCleanup(r._poller.close)
        port = r.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.connectionLost, None)
        self.assertTrue(fastpoll.exclusive_accept(r, port))
        # the kernel refuses to modify an exclusive registration: proof that it is one
        with self.assertRaises(OSError) as e:
            r._poller.modify(port.fileno(), select.EPOLLIN)
        self.assertEqual(e.exception.errno, errno.EINVAL)
        # and Twisted can still stop reading it (unregister)
        port.stopReading()
        self.assertNotIn(port.fileno(), r._reads)

    def test_other_reactors_untouched(self):
        from twisted.internet import task

        self.assertFalse(fastpoll.exclusive_accept(task.Clock(), None))
