"""Process-wide settings of a relay process, for the one-process relay
(relay.runtime.service) and the master of ``workers = N`` (relay.runtime.master)
alike: the open-files limit raised before listening, and the second SIGTERM
that exits at once while a graceful stop is under way.

Kept apart from the service so that the master, which runs no relay of its
own, need not import the SMTP server and the queue to use them.
"""

from __future__ import annotations

import os
import resource
import signal
from types import FrameType
from typing import Callable


def exit_on_second_signal(before: Callable[[], object] | None = None) -> None:
    """From now on SIGTERM or SIGINT exits at once (the graceful stop is
    under way); ``before`` runs first (the master kills its workers)."""

    def now(signum: int, frame: FrameType | None) -> None:
        if before is not None:
            before()
        os.write(2, b"twisted-relay: second SIGTERM, exiting now\n")
        os._exit(1)

    try:
        signal.signal(signal.SIGTERM, now)
        signal.signal(signal.SIGINT, now)
    except (ValueError, OSError):
        pass


def raise_fd_limit(cap: int = 1 << 20) -> int:
    """Raise the soft limit on open files to the hard one (systemd gives
    services a soft limit of 1024): each connection costs a descriptor, and
    past the limit new clients would be accepted and dropped at once."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return -1
