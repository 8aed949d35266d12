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
    # the point of this module: the reactor's own method replaced on this one reactor
    reactor.doIteration = _do_poll.__get__(reactor)  # type: ignore[method-assign]
    return True
