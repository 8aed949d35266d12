"""Where each worker of a relay with ``workers = N`` keeps its queue and
its control socket (relay.runtime.master starts the workers; relayctl finds them).

Kept apart from relay.runtime.master, which is Twisted-based: relayctl imports no
Twisted (relay.admin.cli), and it needs only these paths.
"""

from __future__ import annotations

import dataclasses
import os

from relay.config import Config, ControlConfig


def worker_spool(top: str, i: int) -> str:
    """Worker i's complete spool inside the relay's spool ``top``."""
    return os.path.join(top, f"w{i}")


def worker_socket_path(top: str, socket: str, i: int) -> str:
    """Worker i's control socket: ``<control.socket>.w<i>`` when the config
    names one, else ``control.sock`` in the worker's spool."""
    if socket:
        return f"{socket}.w{i}"
    return os.path.join(worker_spool(top, i), "control.sock")


def worker_socket(config: Config, i: int) -> str:
    """The control socket of worker i (relayctl connects to each)."""
    return worker_socket_path(config.spool, config.control.socket, i)


def worker_config(config: Config, i: int) -> Config:
    """The config worker i runs with: its own spool and control socket."""
    return dataclasses.replace(config, spool=worker_spool(config.spool, i),
                               control=ControlConfig(socket=worker_socket(config, i)))
