"""relay.logs: the JSON object of an event, and how twistd is made to use it."""

from __future__ import annotations

import io
import json
import sys

from twisted.application import service
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from relay import config as configmod
from relay import logs


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


def test_text_format_leaves_twistd_alone():
    svc = service.MultiService()
    assert logs.for_twistd(svc, cfg("text"), FakePluginOptions(FakeServerOptions(nodaemon=True))) is svc


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
