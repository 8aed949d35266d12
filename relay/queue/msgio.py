"""The spool writes of one message, one after another.

Every write of a message's state file and its removal go through here: two
writes of one state file in the disk pool at once could land in either
order (an older snapshot over a newer one) or follow its removal, so each
waits for the ones queued before it for the same message.  An
administrator's action and an outcome can thus never land out of order.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from relay.queue.diskio import AsyncSpool
from relay.queue.message import Message


class MessageIO:
    """``ended`` is called after each operation (the runner checks whether
    it has become idle)."""

    def __init__(self, aspool: AsyncSpool, ended: Callable[[], None]):
        self.aspool = aspool
        self.ended = ended

    def run(self, msg: Message, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        """Run fn() (a Deferred-returning spool operation) after the ones
        queued before for this message have ended."""
        prev = msg.io
        tail: defer.Deferred[None] = defer.Deferred()
        msg.io = tail
        out: defer.Deferred[Any] = defer.Deferred()

        def start(_: object = None) -> None:
            d = defer.maybeDeferred(fn)

            def end(result: object) -> object:
                if msg.io is tail:
                    msg.io = None
                tail.callback(None)
                self.ended()
                return result

            d.addBoth(end).chainDeferred(out)

        if prev is None:
            start()
        else:
            prev.addCallback(start)
        return out

    def write(self, msg: Message, durable: bool = True) -> defer.Deferred[Any]:
        """Rewrite the message's state file (durable: the directory fsynced too)."""

        def go() -> defer.Deferred[Any]:
            msg.state_file = True
            # their DSN is not queued yet
            unfinal = {f.recipient for f in msg.failures} | {f.recipient for f in msg.successes}
            return self.aspool.write_state(msg.qid, msg.state, durable=durable, unfinal=unfinal)

        return self.run(msg, go)

    def remove(self, msg: Message) -> defer.Deferred[Any]:
        return self.run(msg, lambda: self.aspool.remove(msg.qid, state_file=msg.state_file))
