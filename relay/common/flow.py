"""Output flow control for request/response servers that are not producers.

A protocol that answers whatever it reads (AMP here) keeps reading while
the peer does not read the answers, and the answers pile up in the
transport's write buffer without bound.  ``ReadOnlyWhileDrained``, mixed
into such a protocol, registers a small push producer on the transport:
when the transport's buffer goes over its bound (Twisted calls
pauseProducing), the connection is not read any more; when it has drained
(resumeProducing), reading goes on.  Requests already read are still
answered, so what is held is bounded by one read's worth of requests.

The SMTP and POP3 servers are producers themselves (relay.smtp.server,
relay.mailbox.pop3): they also stop handling lines they have already read.
"""

from __future__ import annotations

from twisted.internet import interfaces
from zope.interface import implementer


@implementer(interfaces.IPushProducer)
class _ReadPause:
    def __init__(self, transport) -> None:
        self.transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        t = self.transport
        if getattr(t, "disconnecting", False):
            # loseConnection waits for a paused producer to be unregistered:
            # let the close go on now that the buffer has drained
            t.unregisterProducer()
            return
        t.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the connection is going away: nothing to stop


class ReadOnlyWhileDrained:
    """Mix in before the protocol class: ``class P(ReadOnlyWhileDrained, amp.AMP)``."""

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[misc]
        if getattr(self.transport, "producer", None) is None:  # type: ignore[attr-defined]
            self.transport.registerProducer(_ReadPause(self.transport), True)  # type: ignore[attr-defined]
