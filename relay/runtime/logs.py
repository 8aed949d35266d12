"""Log output: twistd's human-readable lines, or one JSON object per event.

Every relay event is a twisted.logger event whose fields are structured
(``queue_id``, ``client_ip``, ``sender``, ``size``, ``nrcpt``, ``to``,
``relay``, ``delay``, ``status``, ``reply``, ...); the text format shows them
through the event's format string, the JSON format writes them as keys.  A
field whose name starts with ``_`` only helps the text (", tls=TLSv1.3") and
is left out of the JSON object, which carries the structured value instead.

Why a component on the twistd Application: twistd picks its log observer
(stdout with ``-n``, else ``--logfile`` / twistd.log, SIGUSR1 rotation)
*before* the plugin could say anything, except through one documented
hook: ``AppLogger.start`` uses an ``ILogObserver`` component set on the
Application instead of building its own text observer.  The plugin's
service cannot see the Application it is added to, so ``TwistdLogSetup``
wraps it and sets the component when twistd attaches it
(``setServiceParent(application)``), which happens before ``AppLogger.start``.
The observer writes to the same destination twistd would have chosen, with
the same rules; ``--logger`` and ``--syslog`` keep priority (a JSON log into
syslog would not be what a syslog user expects; a warning says so).
The text format keeps twistd's classic lines, formatted fast (_TextFormatter).

Both formats render every field through relay.common.logsafe first: what a
client or a next hop sent (addresses, HELO, user names, replies) can
neither break a line, nor drive a terminal, nor pass for a field or a
prefix the relay wrote; normal values are shown unchanged.  The JSON
object keeps the exact values in its fields and the neutralised line in
``text``.  With ``--syslog`` or ``--logger`` twistd's (or the user's)
observer formats the events itself, without this rendering.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any, Callable, TextIO

from twisted.application import service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python import logfile

from relay.common import logsafe

log = Logger(namespace="relay.logs")

# keys of the JSON object that are not event fields
RESERVED = ("timestamp", "level", "namespace", "system", "text", "traceback")
# fields of events from twisted.python.log (the legacy API) that only repeat
# what the reserved keys say
_LEGACY = frozenset(("message", "isError", "system", "time", "format", "why", "failure", "printed"))
_MAX_DEPTH = 6


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy: numbers, strings, lists and dicts pass; anything else is str()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if depth >= _MAX_DEPTH:
        return str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a log line must never fail over a field
        return f"<unprintable {type(value).__name__}>"


def event_as_dict(event: dict) -> dict:
    """The JSON object for one event: reserved keys first, then the event's fields."""
    t = event.get("log_time")
    if not isinstance(t, (int, float)):
        import time

        t = time.time()
    ts = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": str(event.get("log_namespace", "-")),
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        out["system"] = str(system)
    legacy = event.get("log_namespace") == "log_legacy"
    failure = event.get("log_failure") or (event.get("failure") if legacy else None)
    try:
        text = logsafe.line_text(formatEvent(_shown(event)))
    except Exception:  # noqa: BLE001 - formatEvent already guards; be doubly sure
        text = logsafe.control(repr(event.get("log_format")))
    if legacy and failure is not None:
        # the legacy text already embeds the traceback: keep the first line
        text = logsafe.control(str(event.get("why") or "").strip()) or text.split("\n", 1)[0]
    out["text"] = logsafe.bound_lines(text.rstrip("\n"))
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
            out["error"] = failure.getErrorMessage()
        except Exception:  # noqa: BLE001
            out["traceback"] = str(failure)
    for key, value in event.items():
        if key.startswith("log_") or key.startswith("_") or (legacy and key in _LEGACY):
            continue
        name = key if key not in out else key + "_"
        out[name] = _jsonable(value)
    return out


def format_json_line(event: dict) -> str:
    try:
        return json.dumps(event_as_dict(event), ensure_ascii=True, separators=(",", ":")) + "\n"
    except Exception as e:  # noqa: BLE001 - never lose the line entirely
        return json.dumps({"level": "error", "namespace": "relay.logs",
                           "text": f"unformattable log event: {e!r}"}) + "\n"


class _TextFormatter:
    """twistd's classic text lines ("<time> [<system>] <text>"), made fast.

    twisted.logger formats with string.Formatter in Python and a time zone
    object per event, tens of microseconds a line; with a few lines per
    message that was a tenth of the relay's reactor time.  Here the common
    case is one ``str.format_map`` (in C) and a timestamp string computed
    once per second; anything unusual (a format with calls, a failure with
    its traceback, a legacy event) goes through twisted's own formatter, so
    the output is the same.
    """

    def __init__(self) -> None:
        self._sec = -1
        self._stamp = ""

    def _time(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec)) + _utcoffset(sec)
        return self._stamp

    def __call__(self, event: dict) -> str | None:
        fmt = event.get("log_format")
        if fmt is None or "log_failure" in event or "log_legacy" in event:
            return _classic(event)
        if isinstance(fmt, str):
            shown, objects = logsafe.neutralise_checked(event, fmt)
        else:
            shown, objects = event, True
        try:
            text = fmt.format_map(shown)
        except Exception:  # noqa: BLE001 - e.g. "{x()}": twisted's own semantics
            return _classic(event)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        else:
            system = logsafe.control(str(system))
        if objects:
            text = logsafe.line_text(text)
        if len(text) > logsafe.MAX_LINE:
            text = logsafe.bound_lines(text)
        text = text.replace("\n", "\n\t")
        return f"{self._time(event.get('log_time') or time.time())} [{system}] {text}\n"


def _shown(event: dict) -> dict:
    """The event with its fields rendered for a line (see relay.common.logsafe)."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and "log_legacy" not in event:
        return logsafe.neutralise(event, fmt)
    return logsafe.neutralise(event)


def _classic(event: dict) -> str | None:
    """twisted's classic text line, for the events the fast path leaves
    alone, with the same neutralising (a traceback keeps its lines, each
    continuation indented by twisted; nothing else may break a line)."""
    line = formatEventAsClassicLogText(_shown(event))
    if line is None:
        return None
    body = line[:-1] if line.endswith("\n") else line
    return logsafe.bound_lines(logsafe.line_text(body)) + "\n"


def _utcoffset(sec: int) -> str:
    offset = datetime.datetime.fromtimestamp(sec).astimezone().utcoffset()  # aware: never None
    off = int(offset.total_seconds()) if offset is not None else 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return f"{sign}{off // 3600:02d}{off % 3600 // 60:02d}"


def text_file_observer(out: TextIO) -> FileLogObserver:
    """twistd's text lines, formatted fast (see _TextFormatter)."""
    return FileLogObserver(out, _TextFormatter())


def json_file_observer(out: TextIO) -> FileLogObserver:
    """One JSON object per line on ``out``."""
    return FileLogObserver(out, format_json_line)


def twistd_destination(server_options: Any) -> TextIO | None:
    """Where twistd would write its log, by twistd's own rules
    (twisted.scripts._twistd_unix.UnixAppLogger._getLogObserver); None when
    twistd logs elsewhere (--syslog) or the user chose an observer (--logger)."""
    get = getattr(server_options, "get", None)
    if get is None:
        return None
    if get("logger") or get("syslog"):
        return None
    name = get("logfile", "") or ""
    nodaemon = bool(get("nodaemon", False))
    if name == "-":
        if not nodaemon:
            return None  # twistd refuses this itself ("Daemons cannot log to stdout")
        return sys.stdout
    if nodaemon and not name:
        return sys.stdout
    f = logfile.LogFile.fromFullPath(name or "twistd.log")
    _rotate_on_sigusr1(f)
    return f


def _rotate_on_sigusr1(f: logfile.LogFile) -> None:
    """As twistd does for its own log file."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum, frame):
        from twisted.internet import reactor

        reactor.callFromThread(f.rotate)

    signal.signal(signal.SIGUSR1, rotate)


class TwistdLogSetup(service.MultiService):
    """Wraps the relay's service; when twistd attaches it to its
    Application, sets the ILogObserver component that twistd's AppLogger
    will use instead of its text observer."""

    def __init__(self, child: service.Service, make_observer: Callable[[], Callable | None]):
        super().__init__()
        self.make_observer = make_observer
        self.child = child
        child.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        get = getattr(parent, "getComponent", None)
        if get is not None and get(ILogObserver, None) is None:
            observer = self.make_observer()
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)


def for_twistd(svc: service.Service, config, options: Any) -> service.Service:
    """What the twistd plugin returns: ``svc`` wrapped so that its log lines
    (JSON, or text formatted fast) go where twistd would have written its
    own text."""
    parent = getattr(options, "parent", None)
    if parent is None:
        return svc
    if parent.get("syslog"):
        if config.log.format == "json":
            log.warn("log.format = \"json\" is ignored with --syslog: syslog gets text lines")
        neutralise_at_source()
        return svc
    if parent.get("logger"):
        neutralise_at_source()
        return svc  # the user's own observer wins, as with any twistd application
    make_observer = json_file_observer if config.log.format == "json" else text_file_observer

    def make():
        out = twistd_destination(parent)
        return make_observer(out) if out is not None else None

    return TwistdLogSetup(svc, make)


_NEUTRALISED = "log_relay_neutralised"


def neutralise_in_place(event: dict) -> None:
    """An observer that renders an event's untrusted fields (relay.common.logsafe)
    in the event itself, so that observers after it see them neutralised.

    With ``--syslog`` or ``--logger`` twistd's own observer writes the
    lines, not ours: Twisted's syslog observer sends each line of an event's
    text as a message of its own, so a newline in a field would become a
    forged syslog entry.  This observer runs first (it is added when the
    plugin builds the service, before twistd starts logging), and marks the
    event, so an event replayed from twistd's start-up buffer is not
    escaped twice.
    """
    if event.get(_NEUTRALISED):
        return
    fmt = event.get("log_format")
    if fmt is not None:
        shown = logsafe.neutralise(event, fmt)
        if shown is not event:
            event.update(shown)
    event[_NEUTRALISED] = True


_at_source = False


def neutralise_at_source() -> None:
    """Put ``neutralise_in_place`` on the global log publisher (once: a
    second call must not move it behind observers added since)."""
    global _at_source
    if not _at_source:
        _at_source = True
        # any callable taking the event is an observer; ILogObserver is a zope
        # interface, which a function cannot be to mypy
        globalLogPublisher.addObserver(neutralise_in_place)  # type: ignore[arg-type]


def stop_neutralising_at_source() -> None:
    """Undo ``neutralise_at_source`` (tests)."""
    global _at_source
    _at_source = False
    globalLogPublisher.removeObserver(neutralise_in_place)  # type: ignore[arg-type]  # (as above)
