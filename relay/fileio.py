"""Small blocking file helpers shared by the spool, the Maildir writer and
the users file (run them in a thread, never on the reactor)."""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
