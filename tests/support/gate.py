"""A gate on the relay's state-file writes, for tests over real relay processes.

``GatedRelayProcess`` starts ``twistd relay`` with this module installed in
the child: while the file ``<gate>/closed`` exists, every write of a state
file (``Spool.write_state_merged``, run in the disk pool's threads, never on
the reactor) waits before it starts, after touching ``<gate>/waiting.<id>``
so the test knows which outcome is being written.  The test thus holds a
message in "outcome being written" as long as it likes, with the rest of the
relay (SMTP, control socket, other deliveries) running.
"""

from __future__ import annotations

import os
import time

from tests.support.relay import RelayProcess

ENV = "RELAY_TEST_WRITE_GATE"


def install() -> None:
    gate = os.environ.get(ENV)
    if not gate:
        return
    from relay.queue import spool as spoolmod
    orig = spoolmod.Spool.write_state_merged

    def gated(self, qid, *args, **kw):
        closed = os.path.join(gate, "closed")
        if os.path.exists(closed):
            with open(os.path.join(gate, f"waiting.{qid}"), "a"):
                pass
            while os.path.exists(closed):
                time.sleep(0.01)
        return orig(self, qid, *args, **kw)

    spoolmod.Spool.write_state_merged = gated


class Gate:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def close(self) -> None:
        with open(os.path.join(self.path, "closed"), "w"):
            pass

    def open(self) -> None:
        try:
            os.unlink(os.path.join(self.path, "closed"))
        except FileNotFoundError:
            pass

    def waiting(self) -> set[str]:
        return {n.split(".", 1)[1] for n in os.listdir(self.path) if n.startswith("waiting.")}


class GatedRelayProcess(RelayProcess):
    launch = "import tests.support.gate as g; g.install(); " + RelayProcess.launch

    def __init__(self, tmpdir: str, data: dict, name: str = "relay"):
        super().__init__(tmpdir, data, name)
        self.gate = Gate(os.path.join(tmpdir, f"{name}.gate"))
        self.env = {ENV: self.gate.path}
