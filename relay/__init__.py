"""twisted-relay: a mail relay gateway built on Twisted.

SMTP in, a durable queue on disk, relay hop to hop, local Maildirs and POP3,
run as ``twistd relay`` and administered with ``relayctl``.
"""

__version__ = "0.1.0"
