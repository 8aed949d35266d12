"""The control protocol between relayctl and the relay, declared once.

Every AMP command of the control socket is declared here with its name,
its arguments, its answer and the error codes it may answer with.  Three
sides use these declarations:

* the relay's server side (relay.control.server), through relay.control.amp, which
  turns each declaration into a ``twisted.protocols.amp.Command``;
* relayctl (relay.admin.client, relay.admin.commands), which encodes requests and
  decodes answers with it, without Twisted;
* the master of a relay with workers (relay.runtime.metrics.WorkersMetrics), which
  asks each worker for its metrics, through relay.control.amp.

This module imports no Twisted on purpose: relayctl imports it, and
importing ``twisted.protocols.amp`` costs about 0.4 s (``python -X
importtime -c "import twisted.protocols.amp"`` on the 2-core test machine),
more than relayctl's whole work for a short queue.  The value encodings are
AMP's own (twisted.protocols.amp): Unicode is UTF-8, Integer decimal ASCII,
Boolean ``True``/``False``, ListOf(Unicode) each item after its 2-byte
length; ``BIG`` is relay.control.amp.BigString, one value spread over the keys
``name``, ``name.2``, ``name.3``... because an AMP value holds 64 KiB at most.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

MAX_VALUE = 0xFFFF  # bytes in one AMP value (amp.MAX_VALUE_LENGTH)


# -- value kinds: AMP's encodings, as relay.control.amp maps them --------------------------


def big(box: dict[bytes, bytes], name: bytes) -> bytes:
    """The value of a BIG argument: the keys ``name``, ``name.2``, ``name.3``..."""
    parts = [box.get(name, b"")]
    i = 2
    while True:
        part = box.get(name + b".%d" % i)
        if part is None:
            return b"".join(parts)
        parts.append(part)
        i += 1


def _put_big(box: dict[bytes, bytes], name: bytes, value: bytes) -> None:
    box[name] = value[:MAX_VALUE]
    for i, start in enumerate(range(MAX_VALUE, len(value), MAX_VALUE), 2):
        box[name + b".%d" % i] = value[start : start + MAX_VALUE]


def _text_list(values) -> bytes:
    out = []
    for v in values:
        b = v.encode("utf-8")
        out.append(struct.pack("!H", len(b)))
        out.append(b)
    return b"".join(out)


def _decode_text_list(data: bytes) -> list[str]:
    out = []
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("!H", data, i)
        out.append(data[i + 2 : i + 2 + n].decode("utf-8"))
        i += 2 + n
    return out


@dataclass(frozen=True)
class Kind:
    """How one argument's value is written into a box and read back."""

    name: str  # TEXT, INTEGER, ...: relay.control.amp maps it to an amp.Argument

    def put(self, box: dict[bytes, bytes], key: bytes, value: Any) -> None:
        if self is BIG:
            _put_big(box, key, value)
        elif self is TEXT:
            box[key] = value.encode("utf-8")
        elif self is INTEGER:
            box[key] = str(int(value)).encode("ascii")
        elif self is BOOLEAN:
            box[key] = b"True" if value else b"False"
        else:
            box[key] = _text_list(value)

    def get(self, box: dict[bytes, bytes], key: bytes) -> Any:
        """The value in an answer (a missing key reads as the kind's empty value)."""
        if self is BIG:
            return big(box, key)
        raw = box.get(key)
        if self is TEXT:
            return None if raw is None else raw.decode("utf-8")
        if self is INTEGER:
            return None if raw is None else int(raw)
        if self is BOOLEAN:
            return raw == b"True"
        return _decode_text_list(raw or b"")


TEXT = Kind("TEXT")  # amp.Unicode
INTEGER = Kind("INTEGER")  # amp.Integer
BOOLEAN = Kind("BOOLEAN")  # amp.Boolean
TEXT_LIST = Kind("TEXT_LIST")  # amp.ListOf(amp.Unicode())
BIG = Kind("BIG")  # relay.control.amp.BigString: bytes of any length


@dataclass(frozen=True)
class Arg:
    name: str
    kind: Kind
    optional: bool = False


# -- errors: raised by the server side, sent as AMP error codes -----------------------


class ControlRequestError(Exception):
    """A refused request; ``code`` is its AMP error code (relayctl shows the text)."""

    code = ""


class NoSuchMessage(ControlRequestError):
    code = "NO_SUCH_MESSAGE"


class NoQueue(ControlRequestError):
    code = "NO_QUEUE"


class BadRequest(ControlRequestError):
    code = "BAD_REQUEST"


class NotAuthenticated(ControlRequestError):
    """On the TCP control endpoint: no command before Login with the shared secret."""

    code = "NOT_AUTHENTICATED"


class ReloadUnsupported(ControlRequestError):
    code = "NO_RELOAD"

    def __init__(self, message: str = "this relay cannot reload its config while it runs (no reload "
                                      "support in this version): restart it to apply changes"):
        super().__init__(message)


# -- the commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    arguments: tuple[Arg, ...]
    response: tuple[Arg, ...]
    errors: tuple[type[ControlRequestError], ...] = ()
    doc: str = ""

    def request(self, **values: Any) -> dict[bytes, bytes]:
        """The argument keys of a request (without ``_command`` and ``_ask``)."""
        box: dict[bytes, bytes] = {}
        known = {a.name for a in self.arguments}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"{self.name}: no argument {', '.join(sorted(unknown))}")
        for a in self.arguments:
            value = values.get(a.name)
            if value is None:
                if a.optional:
                    continue
                raise TypeError(f"{self.name}: argument {a.name} missing")
            a.kind.put(box, a.name.encode("ascii"), value)
        return box

    def answer(self, box: dict[bytes, bytes]) -> dict[str, Any]:
        """The decoded values of an answer box."""
        return {a.name: a.kind.get(box, a.name.encode("ascii")) for a in self.response}


_QUEUE_ERRORS = (NoQueue, BadRequest)

HELLO = Command(
    "Hello", (), (Arg("version", TEXT), Arg("pid", INTEGER), Arg("spool", TEXT)),
    doc="Who answers: proves the relay is alive before a long call.")
STATUS = Command("Status", (), (Arg("status", BIG),), doc="relayctl status: a JSON object.")
QUEUE_LIST = Command(
    "QueueList", (Arg("start", BOOLEAN), Arg("limit", INTEGER)),
    (Arg("lines", BIG), Arg("more", BOOLEAN), Arg("total", INTEGER), Arg("loading", BOOLEAN)),
    _QUEUE_ERRORS, doc="One page of the listing: JSON lines as in ``relayctl queue --json``.")
QUEUE_SHOW = Command(
    "QueueShow", (Arg("id", TEXT),), (Arg("message", BIG),), (NoSuchMessage, *_QUEUE_ERRORS),
    doc="One message: a JSON object, relay.queue.view.details().")
QUEUE_ACTION = Command(
    "QueueAction", (Arg("action", TEXT), Arg("ids", TEXT_LIST), Arg("all", BOOLEAN)),
    (Arg("result", BIG),), _QUEUE_ERRORS,
    doc="delete | hold | release | retry | bounce, on ids or on every message; a JSON object.")
ROUTE = Command(
    "Route", (Arg("address", TEXT), Arg("client", TEXT, optional=True), Arg("sender", TEXT, optional=True)),
    (Arg("route", BIG),),
    doc="How an address would be delivered now (and a sender rewritten): a JSON object, "
        "relay.control.route.explain().")
METRICS = Command(
    "Metrics", (), (Arg("text", BIG),),
    doc="This relay's Prometheus text exposition: the master of a relay with workers serves the "
        "sum of its workers' (relay.runtime.metrics.WorkersMetrics).")
RELOAD = Command(
    "Reload", (), (Arg("ok", BOOLEAN), Arg("messages", TEXT_LIST), Arg("restart_needed", TEXT_LIST)),
    (ReloadUnsupported,), doc="Re-read the config file, all or nothing.")

QUEUE_DRAIN = Command(
    "QueueDrain",
    (Arg("id", TEXT), Arg("host", TEXT), Arg("address", TEXT), Arg("port", INTEGER), Arg("ehlo", TEXT),
     Arg("tls", TEXT), Arg("ca_file", TEXT, optional=True), Arg("auth_user", TEXT, optional=True),
     Arg("auth_password", TEXT, optional=True), Arg("held", BOOLEAN, optional=True),
     Arg("wait", INTEGER, optional=True), Arg("reply_timeout", INTEGER, optional=True)),
    (Arg("result", BIG),), (NoSuchMessage, *_QUEUE_ERRORS),
    doc="relayctl queue drain: hand one message over to another relay over SMTP (relay.queue.drain); "
        "a JSON object, relay.queue.drain.Result.as_json().")

LOGIN = Command(
    "Login", (Arg("secret", TEXT),), (Arg("ok", BOOLEAN),), (NotAuthenticated,),
    doc="The first command on the TCP control endpoint (control.tcp_listen): the fleet's shared secret "
        "(control.secret_file); a wrong one ends the connection.  Not needed on the UNIX socket.")

COMMANDS = (HELLO, STATUS, QUEUE_LIST, QUEUE_SHOW, QUEUE_ACTION, ROUTE, METRICS, RELOAD, QUEUE_DRAIN, LOGIN)

# QueueAction's actions; only these two may be applied to every message (``all``)
ACTIONS = ("delete", "hold", "release", "retry", "bounce")
ACTIONS_ON_ALL = ("delete", "retry")
