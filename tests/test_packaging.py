"""setup.cfg's package list names every package of relay/ (issue 13 moved
modules into packages: one left out installs a relay that cannot start,
while the tests, which run from the checkout, would not notice)."""

from __future__ import annotations

import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = {p.strip() for p in cfg["options"]["packages"].split("\n") if p.strip()}
    found = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "relay")):
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert "relay.queue" in found  # the walk saw the tree
    assert found <= listed, f"setup.cfg [options] packages lacks: {sorted(found - listed)}"
