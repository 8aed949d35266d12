"""Errors shared by the parts of the running relay.

A leaf module (it imports nothing of the project), so a part that can stop
the start (the control socket, relay.control.server) need not import the service
that assembles it (relay.runtime.service, which re-exports StartupError).
"""

from __future__ import annotations


class StartupError(Exception):
    """The relay cannot start as configured; str() says why (the config key or file)."""
