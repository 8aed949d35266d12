"""Which modules a relayctl verb imports: relayctl's entry point run in a
fresh interpreter, which then reports the Twisted modules in sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# runs relayctl's entry point in a fresh interpreter, then reports which
# Twisted modules the verb imported (sys.modules at the end)
IMPORT_PROBE = """
import json, os, sys
from relay.admin import cli
rc = cli.main(sys.argv[1:])
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"rc": rc, "twisted": sorted(m for m in sys.modules if m.split(".")[0] == "twisted")}, f)
"""


def probe_imports(*args: str, cwd: str) -> tuple[dict, subprocess.CompletedProcess]:
    """(what the probe reported, the process) for ``relayctl ARGS``."""
    out = os.path.join(cwd, "probe.json")
    e = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    e.update(PYTHONPATH=ROOT, PROBE_OUT=out)
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr, r.stderr
    with open(out) as f:
        return json.load(f), r
