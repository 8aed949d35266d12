"""relay.runtime.reconfig: what a reload applies live and what needs a restart."""

from __future__ import annotations

import dataclasses

from relay import config as configmod
from relay.runtime import reconfig


def _config(**data) -> configmod.Config:
    return configmod.load(None, data={"spool": "/tmp/relay-reconfig-spool", "workers": 1, **data})


def test_every_restart_key_is_kept_as_it_runs():
    old = _config()
    new = _config(spool="/tmp/other", workers=2, smtp={"listen": ["tcp:2526"], "submission": ["tcp:2588"],
                                                       "max_recipients": 7},
                  pop3={"listen": ["tcp:2111"]}, control={"socket": "/tmp/ctl"},
                  metrics={"listen": ["tcp:9199"]}, log={"format": "json"})
    assert reconfig.restart_needed(old, new) == [key for key, _ in reconfig.RESTART_KEYS]
    kept = reconfig.keep_running(old, new)
    assert reconfig.restart_needed(old, kept) == []
    assert kept.smtp.max_recipients == 7  # what can change live does


def test_workers_needs_a_restart():
    old = _config()
    assert reconfig.restart_needed(old, dataclasses.replace(old, workers=3)) == ["workers"]


def test_messages():
    old = _config()
    new = _config(smtp={"max_recipients": 7})
    msgs = reconfig.reload_messages(old, new, None, ["workers"])
    assert msgs[0].endswith("; changed: smtp")
    assert msgs[1] == "workers changed: takes effect after a restart"
