"""The control protocol's commands as Twisted AMP classes.

Built from the declarations in relay.control.proto (names, arguments, answers,
error codes are written there, once), for the two Twisted sides of the
control socket: the relay's server (relay.control.server) and the master's metrics
scrape of its workers (relay.runtime.metrics.WorkersMetrics).  relayctl never
imports this module (relay.control.proto says why).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from relay.control import proto as ctlproto


class BigString(amp.Argument):
    """Bytes of any length: chunks in keys ``name``, ``name.2``, ``name.3``..."""

    CHUNK = amp.MAX_VALUE_LENGTH

    def fromBox(self, name, strings, objects, proto):
        parts = [strings.pop(name, b"")]
        i = 2
        while True:
            part = strings.pop(name + b".%d" % i, None)
            if part is None:
                break
            parts.append(part)
            i += 1
        objects[name.decode("ascii")] = b"".join(parts)

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(name.decode("ascii"))
        n = self.CHUNK
        strings[name] = value[:n]
        for i, start in enumerate(range(n, len(value), n), 2):
            strings[name + b".%d" % i] = value[start : start + n]


def _argument(arg: ctlproto.Arg) -> amp.Argument:
    kind = arg.kind
    if kind is ctlproto.BIG:
        return BigString(optional=arg.optional)
    if kind is ctlproto.TEXT:
        return amp.Unicode(optional=arg.optional)
    if kind is ctlproto.INTEGER:
        return amp.Integer(optional=arg.optional)
    if kind is ctlproto.BOOLEAN:
        return amp.Boolean(optional=arg.optional)
    if kind is ctlproto.TEXT_LIST:
        return amp.ListOf(amp.Unicode(), optional=arg.optional)
    raise ValueError(f"no AMP argument type for {kind.name}")


def command(decl: ctlproto.Command) -> type[amp.Command]:
    """The amp.Command class of one declared command."""
    attrs = {
        "__doc__": decl.doc,
        "__module__": __name__,
        "commandName": decl.name.encode("ascii"),
        "arguments": [(a.name.encode("ascii"), _argument(a)) for a in decl.arguments],
        "response": [(a.name.encode("ascii"), _argument(a)) for a in decl.response],
        "errors": {e: e.code.encode("ascii") for e in decl.errors},
    }
    # made by amp.Command's metaclass, as a class statement would (Any: mypy cannot
    # call a metaclass it knows only as type[type[Command]])
    meta: Any = type(amp.Command)
    made: type[amp.Command] = meta(decl.name, (amp.Command,), attrs)
    return made


Hello = command(ctlproto.HELLO)
Status = command(ctlproto.STATUS)
QueueList = command(ctlproto.QUEUE_LIST)
QueueShow = command(ctlproto.QUEUE_SHOW)
QueueAction = command(ctlproto.QUEUE_ACTION)
Route = command(ctlproto.ROUTE)
Metrics = command(ctlproto.METRICS)
Reload = command(ctlproto.RELOAD)
QueueDrain = command(ctlproto.QUEUE_DRAIN)
Login = command(ctlproto.LOGIN)


class QuietAMP(amp.AMP):
    """AMP without its "connection established" / "connection lost" lines:
    every relayctl call (and every metrics scrape of a master with workers)
    would write two lines about the transport into the relay's log, where an
    operator greps for what happened.  What a command did is logged instead
    (relay.control.server.ControlProtocol._log_action, the reload's own lines)."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
