"""relay.runtime.logs: the JSON object of an event, and how twistd is made to use it."""

from __future__ import annotations

import io
import json
import sys

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from relay import config as configmod
from relay.common import logsafe
from relay.runtime import logs


def capture(fn):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        fn()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def test_structured_fields_and_reserved_keys():
    (ev,) = capture(lambda: Logger(namespace="relay.queue").info(
        "{queue_id}: to=<{to}>{_orig}, relay={relay}, delay={delay:.1f}, status={status} ({reply})",
        queue_id="1K17AAAAAAAAAAAA", to="x@example.com", _orig=", orig_to=<a@b.example>",
        orig_to="a@b.example", relay="mx.example.com[192.0.2.1]:25", delay=1.25, status="sent",
        reply="250 2.0.0 Ok", recipients=("a", "b"), blob=b"\xffbytes", obj=object()))
    d = logs.event_as_dict(ev)
    assert list(d)[:4] == ["timestamp", "level", "namespace", "text"]
    assert d["timestamp"].endswith("Z") and "T" in d["timestamp"]
    assert d["level"] == "info" and d["namespace"] == "relay.queue"
    assert d["text"] == ("1K17AAAAAAAAAAAA: to=<x@example.com>, orig_to=<a@b.example>, "
                         "relay=mx.example.com[192.0.2.1]:25, delay=1.2, status=sent (250 2.0.0 Ok)")
    assert d["queue_id"] == "1K17AAAAAAAAAAAA" and d["delay"] == 1.25 and d["orig_to"] == "a@b.example"
    assert "_orig" not in d and not any(k.startswith("log_") for k in d)
    assert d["recipients"] == ["a", "b"] and d["blob"] == "\ufffdbytes" and d["obj"].startswith("<object")
    line = logs.format_json_line(ev)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == json.loads(json.dumps(d))


def test_field_named_like_a_reserved_key_is_kept():
    (ev,) = capture(lambda: Logger(namespace="x").warn("{text} {timestamp}", text="hello", timestamp=3))
    d = logs.event_as_dict(ev)
    assert d["text"] == "hello 3" and d["level"] == "warn"
    assert d["text_"] == "hello" and d["timestamp_"] == 3


def test_failure_gets_a_traceback_and_one_line_text():
    def boom():
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            Logger(namespace="relay.queue").failure("{queue_id}: finalising failed", queue_id="Q")

    (ev,) = capture(boom)
    d = logs.event_as_dict(ev)
    assert d["level"] == "critical" and d["text"] == "Q: finalising failed"
    assert "ZeroDivisionError" in d["traceback"] and d["error"] == "division by zero"
    json.loads(logs.format_json_line(ev))


def test_legacy_events():
    evs = capture(lambda: (legacy_log.msg("plain legacy %d" % 1, foo=2),
                           legacy_log.err(Failure(ValueError("v")), "legacy failure")))
    a, b = (logs.event_as_dict(e) for e in evs)
    assert a["text"] == "plain legacy 1" and a["foo"] == 2 and a["namespace"] == "log_legacy"
    assert not {"message", "isError", "time", "format"} & set(a)
    assert b["text"] == "legacy failure" and "ValueError" in b["traceback"] and "failure" not in b
    assert b["level"] == "critical"


def test_newlines_stay_inside_one_line():
    (ev,) = capture(lambda: Logger().info("multi\nline {x}", x="a\nb"))
    line = logs.format_json_line(ev)
    assert line.count("\n") == 1 and json.loads(line)["x"] == "a\nb"


def test_unformattable_event_still_yields_a_line():
    (ev,) = capture(lambda: Logger().info("{missing}"))
    d = json.loads(logs.format_json_line(ev))
    assert "Unable to format event" in d["text"]


def test_json_observer_writes_lines():
    out = io.StringIO()
    obs = logs.json_file_observer(out)
    Logger(observer=obs, namespace="t").info("a {n}", n=1)
    Logger(observer=obs, namespace="t").error("b")
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["text"] for x in lines] == ["a 1", "b"]
    assert json.loads(lines[1])["level"] == "error"


class FakeServerOptions(dict):
    pass


class FakePluginOptions(dict):
    def __init__(self, parent):
        super().__init__()
        self.parent = parent


def cfg(fmt: str):
    return configmod.load(None, data={"spool": "/nonexistent", "log": {"format": fmt}})


def test_text_format_is_twistds_classic_lines_formatted_fast(tmp_path):
    svc = service.MultiService()
    opts = FakePluginOptions(FakeServerOptions(nodaemon=False, logfile=str(tmp_path / "relay.log")))
    top = logs.for_twistd(svc, cfg("text"), opts)
    app = service.Application("relay")
    top.setServiceParent(app)
    observer = app.getComponent(ILogObserver)
    event = {"log_format": "{queue_id}: to=<{to}>, delay={delay:.1f}", "queue_id": "Q", "to": "a@b",
             "delay": 1.25, "log_level": LogLevel.info, "log_namespace": "relay.queue", "log_time": 1e9}
    from twisted.logger import formatEventAsClassicLogText

    observer(event)
    observer({"log_format": "odd {x()}", "x": lambda: "call", "log_level": LogLevel.warn,
              "log_namespace": "t", "log_time": 1e9})
    f = logs.twistd_destination  # noqa: F841 - the file is the one twistd would use
    lines = (tmp_path / "relay.log").read_text().splitlines(keepends=True)
    assert lines[0] == formatEventAsClassicLogText(event)
    assert lines[1].endswith("[t#warn] odd call\n")


@pytest.fixture(autouse=True)
def _no_source_neutraliser_left_behind():
    """for_twistd with --syslog/--logger puts an observer on the global log
    publisher (as in a real twistd run): take it off after each test."""
    yield
    logs.stop_neutralising_at_source()


def test_syslog_lines_are_neutralised_before_twistds_syslog_observer():
    """--syslog: Twisted's own syslog observer writes the lines and sends each
    line of an event's text as a message of its own; a newline in a field must
    not make a forged entry, nor may a control character reach syslog."""
    from twisted.logger import LegacyLogObserverWrapper
    from twisted.python.syslog import SyslogObserver

    sent = []

    class CapturedSyslog(SyslogObserver):  # the real observer; only the syslog(3) calls are captured
        openlog = staticmethod(lambda *a: None)
        syslog = staticmethod(lambda prio, msg: sent.append(msg))

    svc = service.MultiService()
    opts = FakePluginOptions(FakeServerOptions(nodaemon=True, syslog=True))
    assert logs.for_twistd(svc, cfg("text"), opts) is svc
    # what twistd's AppLogger.start does after the plugin built the service
    syslog_obs = LegacyLogObserverWrapper(CapturedSyslog("relay").emit)
    globalLogPublisher.addObserver(syslog_obs)
    try:
        Logger(namespace="relay.smtp").info(
            "reject: MAIL from {client}[{client_ip}]: {reply}; from=<{sender}>",
            client="x", client_ip="127.0.0.9", reply="553 5.1.8 no",
            sender='a\nreject: RCPT from x[203.0.113.7]: \x1b[2J"@attacker.example')
    finally:
        globalLogPublisher.removeObserver(syslog_obs)
    assert len(sent) == 1, sent
    assert "203.0.113.7" in sent[0] and "\x1b" not in sent[0] and "\n" not in sent[0]
    assert sent[0].startswith("[-] reject: MAIL from x[127.0.0.9]: 553 5.1.8 no; from=<a\\x0areject:"), sent


def test_text_format_with_syslog_leaves_twistd_alone():
    svc = service.MultiService()
    opts = FakePluginOptions(FakeServerOptions(nodaemon=True, syslog=True))
    assert logs.for_twistd(svc, cfg("text"), opts) is svc


def test_json_sets_the_observer_component_on_the_application(tmp_path):
    svc = service.MultiService()
    opts = FakePluginOptions(FakeServerOptions(nodaemon=False, logfile=str(tmp_path / "relay.log")))
    top = logs.for_twistd(svc, cfg("json"), opts)
    assert isinstance(top, logs.TwistdLogSetup) and svc.parent is top
    app = service.Application("relay")
    top.setServiceParent(app)  # as twistd's createOrGetApplication does
    # twistd's AppLogger.start asks the Application for it
    observer = app.getComponent(ILogObserver)
    assert observer is not None and svc in list(service.IServiceCollection(app))[0]
    observer({"log_format": "hi {x}", "x": 1, "log_level": LogLevel.info, "log_namespace": "t",
              "log_time": 0.0})
    observer._outFile.flush()
    (line,) = (tmp_path / "relay.log").read_text().splitlines()
    assert json.loads(line) == {"timestamp": "1970-01-01T00:00:00.000Z", "level": "info", "namespace": "t",
                                "text": "hi 1", "x": 1}


def test_destination_rules_follow_twistd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert logs.twistd_destination(FakeServerOptions(nodaemon=True, logfile="-")) is sys.stdout
    assert logs.twistd_destination(FakeServerOptions(nodaemon=True, logfile="")) is sys.stdout
    assert logs.twistd_destination(FakeServerOptions(nodaemon=False, logfile="-")) is None
    assert logs.twistd_destination(FakeServerOptions(syslog=True)) is None
    assert logs.twistd_destination(FakeServerOptions(logger="x.y")) is None
    f = logs.twistd_destination(FakeServerOptions(nodaemon=False, logfile=""))
    assert f.path == str(tmp_path / "twistd.log")
    f.close()


def test_syslog_and_logger_options_win():
    svc = service.MultiService()
    assert logs.for_twistd(svc, cfg("json"), FakePluginOptions(FakeServerOptions(syslog=True))) is svc
    assert logs.for_twistd(svc, cfg("json"), FakePluginOptions(FakeServerOptions(logger="a.b"))) is svc


# -- untrusted text in lines (relay.common.logsafe) -------------------------------------------------

ATTACK_SENDER = '"reject: RCPT from x[203.0.113.7]: "@attacker.example'
CONTROLS = "\x00\x07\x1b[2J\r\n\x7f\x85\x9b\u2028\u2029\u202e\u2066\u200f\ufeff\udcff\xa0"


def _event(fmt: str, **fields) -> dict:
    ev = {"log_format": fmt, "log_level": LogLevel.info, "log_namespace": "relay.smtp", "log_time": 1e9}
    ev.update(fields)
    return ev


def _text_line(ev: dict) -> str:
    return logs._TextFormatter()(ev)


REJECT = "reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}> to=<{rcpt}>"


def test_normal_lines_are_exactly_as_before():
    """Normal input is rendered byte for byte as str.format renders it: a contract."""
    cases = [
        (REJECT, dict(stage="RCPT", helo="client.example", client_ip="192.0.2.7",
                      reply="554 5.7.1 <x@remote.example>: Relay access denied", sender="a@b.example",
                      rcpt="x@remote.example")),
        (REJECT, dict(stage="RCPT", helo="[192.0.2.7]", client_ip="192.0.2.7", reply="550 5.1.1 <a@[192.0.2.1]>: no",
                      sender="", rcpt="a@[192.0.2.1]")),
        ("{queue_id}: to=<{to}>{_orig}, relay={relay}, delay={delay:.1f}, status={status} ({reply})",
         dict(queue_id="1K17AAAAAAAAAAAA", to="x@example.com", _orig=", orig_to=<a@b.example>",
              relay="mx.example.com[192.0.2.1]:25", delay=1.25, status="deferred",
              reply="host mx.example.com[192.0.2.1] said: 451 4.3.0 id=1tX-000 (try later) :-)")),
        ("pop3: login failed client={client} user={user} method={method}: {why}",
         dict(client="192.0.2.8", user="jürgen@example.org", method="USER/PASS", why="bad credentials")),
        ("{queue_id}: client={helo}[{client_ip}], from=<{sender}>, size={size}, nrcpt={nrcpt}",
         dict(queue_id="1K17AAAAAAAAAAAA", helo="[IPv6:2001:db8::1]", client_ip="2001:db8::1",
              sender='"quoted.local"@b.example', size=10, nrcpt=1)),
    ]
    for fmt, fields in cases:
        ev = _event(fmt, **fields)
        assert _text_line(ev).endswith("] " + fmt.format(**fields) + "\n"), fields
        assert logs.event_as_dict(ev)["text"] == fmt.format(**fields)
        assert logsafe.neutralise(ev, fmt) is ev  # no copy for normal input


def _printable(s: str) -> bool:
    return all(c.isprintable() for c in s)


def test_controls_are_escaped_in_every_field_of_a_text_line():
    ev = _event("{queue_id}: {hop}: {anything} {reply} {count}", queue_id="Q" + CONTROLS, hop="h" + CONTROLS,
                anything="a" + CONTROLS, reply="451 " + CONTROLS, count=3)
    line = _text_line(ev)
    assert line.endswith("\n") and line.count("\n") == 1
    assert _printable(line[:-1]), repr(line)
    body = line.split("] ", 1)[1]
    # one escape per character, readable and reversible
    assert "a\\x00\\x07\\x1b[2J\\x0d\\x0a\\x7f\\x85\\x9b\\u2028\\u2029\\u202e\\u2066\\u200f\\ufeff\\udcff\\xa0" in body
    assert body.endswith(" 3\n")


def test_untrusted_fields_cannot_contain_their_delimiters():
    ev = _event(REJECT, stage="RCPT", helo="x[203.0.113.9]:", client_ip="192.0.2.7",
                reply=f"554 5.7.1 <{ATTACK_SENDER}>: Relay access denied", sender="a@b.example",
                rcpt=ATTACK_SENDER)
    body = _text_line(ev).split("] ", 1)[1]
    esc = '"reject:\\x20RCPT\\x20from\\x20x\\x5b203.0.113.7\\x5d:\\x20"@attacker.example'
    assert body == (f"reject: RCPT from x\\x5b203.0.113.9\\x5d:[192.0.2.7]: 554 5.7.1 <{esc}>: Relay access denied; "
                    f"from=<a@b.example> to=<{esc}>\n")
    assert body.count("[") == 1 and body.count("]") == 1 and body.count(" from ") == 1
    # an address: <, >, spaces, brackets and backslashes; a domain literal stays
    assert logsafe.address('"a> b<\\"c"@[192.0.2.1]') == '"a\\x3e\\x20b\\x3c\\\\"c"@[192.0.2.1]'
    assert logsafe.address("a@b]c[d") == "a@b\\x5dc\\x5bd"
    # a name shown bare: no white space at all
    assert (logsafe.token("reject: AUTH from x[203.0.113.8]: y")
            == "reject:\\x20AUTH\\x20from\\x20x\\x5b203.0.113.8\\x5d:\\x20y")
    assert logsafe.token("a\tb\u3000c") == "a\\x09b\\u3000c"
    assert logsafe.helo("[192.0.2.1]") == "[192.0.2.1]" and logsafe.helo("[192.0.2.1]x") == "\\x5b192.0.2.1\\x5dx"
    # free text keeps its spaces and brackets, loses its controls; backslashes doubled
    assert logsafe.text("451 a [b] \\x1b\x1b") == "451 a [b] \\\\x1b\\x1b"


def test_a_pop3_user_name_cannot_add_fields():
    fmt = "pop3: login failed client={client} user={user} method={method}: {why}"
    ev = _event(fmt, client="192.0.2.8", user="x method=PLAIN: y client=203.0.113.8 user=z",
                method="USER/PASS", why="bad credentials")
    body = _text_line(ev).split("] ", 1)[1]
    assert body.count(" client=") == 1 and body.count(" method=") == 1 and body.count(" user=") == 1


def test_objects_and_tracebacks_are_checked_too():
    class Evil:
        def __str__(self):
            return "evil\x1b]0;title\x07\nreject: RCPT from x[203.0.113.9]: "

    line = _text_line(_event("{thing} {rcpt}", thing=Evil(), rcpt=Evil()))
    first, rest = line.split("\n", 1)
    # an object's text of an unknown field: controls escaped, a newline continues the line (tab)
    assert _printable(first) and "evil\\x1b]0;title\\x07" in first
    assert rest.startswith("\treject: RCPT from x[203.0.113.9]:  evil\\x1b\\x5d0;title\\x07\\x0areject:\\x20")

    def boom():
        try:
            raise ValueError("bad \x1b[2J\nreject: RCPT from x[203.0.113.9]: ")
        except ValueError:
            Logger(namespace="relay.queue").failure("{queue_id}: failed", queue_id="Q\x1b")

    (ev,) = capture(boom)
    text = _text_line(ev)
    assert _printable(text.replace("\n", "").replace("\t", "")), repr(text)
    assert all(ln.startswith("\t") for ln in text.splitlines()[1:])  # no line of its own
    assert "Q\\x1b: failed" in text.splitlines()[0]
    d = json.loads(logs.format_json_line(ev))
    assert d["text"] == "Q\\x1b: failed" and d["queue_id"] == "Q\x1b" and "ValueError" in d["traceback"]


def test_json_lines_stay_one_line_without_raw_controls_and_keep_exact_values():
    ev = _event(REJECT, stage="RCPT", helo="x[203.0.113.9]:", client_ip="192.0.2.7",
                reply="550 5.1.1 " + CONTROLS, sender=ATTACK_SENDER, rcpt="b" + CONTROLS + "@c.example")
    line = logs.format_json_line(ev)
    assert line.count("\n") == 1 and line.endswith("\n")
    assert all(0x20 <= ord(c) < 0x7f for c in line[:-1]), repr(line)  # ASCII, no control character
    d = json.loads(line)
    assert d["sender"] == ATTACK_SENDER and d["rcpt"] == "b" + CONTROLS + "@c.example"  # the exact values
    assert d["helo"] == "x[203.0.113.9]:" and d["reply"] == "550 5.1.1 " + CONTROLS
    assert _printable(d["text"]) and d["text"] == _text_line(ev).split("] ", 1)[1].rstrip("\n")
    assert "x[203.0.113.7]" not in d["text"] and "x[203.0.113.9]" not in d["text"]


def test_worker_events_are_neutralised_by_the_master():
    """A worker's events reach the master's formatter as JSON-decoded fields
    (relay.runtime.worker.EventPipe): the same rendering applies there."""
    from relay.runtime.worker import EventPipe

    out = io.StringIO()
    pipe = EventPipe(out)
    pipe(_event(REJECT, stage="MAIL", helo="h", client_ip="192.0.2.7", reply="552 x", sender=ATTACK_SENDER,
                rcpt=""))
    ev = json.loads(out.getvalue())
    ev["log_level"] = LogLevel.info
    ev["log_system"] = "w1 relay.smtp#info"
    line = _text_line(ev)
    assert " [w1 relay.smtp#info] reject: MAIL from h[192.0.2.7]: 552 x; from=<\"reject:\\x20RCPT" in line


def test_a_format_with_outside_text_in_it_is_checked_too():
    """log.info(text) with text from outside: the format itself is checked."""
    line = _text_line(_event("said \x1b[2J\x07 {n}", n=1))
    assert line.endswith("] said \\x1b[2J\\x07 1\n")


def test_legacy_events_are_neutralised_too():
    evs = capture(lambda: (legacy_log.msg("legacy \x1b[2J msg"),
                           legacy_log.err(Failure(ValueError("v\x07")), "legacy \x1b failure")))
    a, b = (logs.event_as_dict(e) for e in evs)
    assert a["text"] == "legacy \\x1b[2J msg" and b["text"] == "legacy \\x1b failure"
    for e in evs:
        line = logs._TextFormatter()(e)
        assert all(c.isprintable() or c in "\n\t" for c in line), repr(line)


def test_a_huge_field_cannot_make_a_reader_split_the_line():
    """journald splits a line longer than LineMax (48 KiB) into entries of their own:
    the rest would start with the peer's text.  Lines are cut below that."""
    forged = "2026-01-01T00:00:00+0000 [relay.smtp#info] reject: RCPT from x[203.0.113.7]: "
    reply = "451 " + "\u00e9" * 60000 + forged
    ev = _event("{queue_id}: to=<{to}>, status={status} ({reply})", queue_id="Q", to="a@b.example",
                status="deferred", reply=reply)
    line = _text_line(ev)
    assert len(line.encode("utf-8")) < 48 * 1024 and line.count("\n") == 1
    assert "203.0.113.7" not in line and line.endswith(" more characters not logged]\n")
    d = logs.event_as_dict(ev)
    assert d["reply"] == reply and len(d["text"]) < logsafe.MAX_LINE + 100  # the exact value stays in its field

    def boom():
        try:
            raise ValueError("x" * 60000 + forged)
        except ValueError:
            Logger(namespace="relay.queue").failure("failed")

    (fev,) = capture(boom)
    assert all(len(ln) < logsafe.MAX_LINE + 100 for ln in _text_line(fev).splitlines())
