"""A leaner dispatch loop for the epoll reactor (worker processes).

For every ready file descriptor, EPollReactor.doPoll goes through
``log.callWithLogger``, which builds a logging context (a dict copied per
call, the selectable's log prefix) only so that *legacy* ``log.msg`` calls
made inside the handler are tagged with the connection's "system".  Our code
logs with twisted.logger (no context), and ``_doReadOrWrite`` already catches
and logs whatever a handler raises; with a dozen socket events per relayed
message that wrapper was ~3% of a worker's reactor time.  ``install`` swaps
the loop of one EPollReactor for one without the wrapper; any other reactor
is left alone.  A failure escaping ``_doReadOrWrite`` (none should) is
logged the way callWithLogger would have.
"""

from __future__ import annotations

import errno

from twisted.python import log


def _do_poll(self, timeout):
    if timeout is None:
        timeout = -1
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    drdw = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            drdw(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - as log.callWithLogger: log, go on
            log.err(system=_prefix(selectable))


def _prefix(selectable) -> str:
    try:
        return selectable.logPrefix()
    except Exception:  # noqa: BLE001
        return "(buggy logPrefix method)"


def install(reactor) -> bool:
    """Use the lean loop on this reactor if it is the epoll one; True if done."""
    from twisted.internet import epollreactor

    if type(reactor) is not epollreactor.EPollReactor:
        return False
    reactor.doIteration = _do_poll.__get__(reactor)
    return True


def exclusive_accept(reactor, port) -> bool:
    """Wake only one of the processes waiting on a shared listening socket.

    The workers of a relay accept on the same listening socket; without
    EPOLLEXCLUSIVE every idle worker is woken for each new connection and
    all but one find nothing to accept.  With it, the kernel wakes one
    worker that is waiting in epoll (a busy one is passed over).  Only for
    a port registered for reading alone (an exclusive registration cannot
    be modified, only removed: Twisted's stopReading does just that).
    True if done.
    """
    import select

    from twisted.internet import epollreactor

    flag = getattr(select, "EPOLLEXCLUSIVE", 0)
    if type(reactor) is not epollreactor.EPollReactor or not flag:
        return False
    fd = port.fileno()
    if fd not in reactor._reads or fd in reactor._writes:
        return False
    reactor._poller.unregister(fd)
    try:
        reactor._poller.register(fd, select.EPOLLIN | flag)
    except OSError:
        reactor._poller.register(fd, select.EPOLLIN)
        return False
    return True
