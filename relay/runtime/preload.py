"""Import, before privileges are dropped, everything the relay uses later.

``twistd -u/-g`` binds the ports as root and then runs as an unprivileged
user.  Anything imported lazily after that (a dnspython record type, an
email submodule, a codec) is read from disk with the new user's rights; on
systems where the Python installation is not readable by that user, the
first MX lookup or bounce would fail.  The twistd plugin calls preload()
while still privileged.
"""

from __future__ import annotations

import importlib

MODULES = (
    # ours
    "relay.intake.aliases", "relay.delivery.bounce", "relay.delivery.attempt", "relay.queue.diskio",
    "relay.delivery.local", "relay.mailbox.maildir", "relay.delivery.mx", "relay.intake.policy",
    "relay.queue.manager", "relay.delivery.routing", "relay.outbound.client", "relay.smtp.dataread",
    "relay.smtp.server", "relay.queue.spool", "relay.common.tls", "relay.mailbox.users",
    "relay.mailbox.pop3", "relay.control.server",
    # the standard library, lazily used
    "email.message", "email.parser", "email.policy", "email.utils", "email.header", "email.headerregistry",
    "email.generator", "email._header_value_parser", "encodings.idna", "encodings.ascii",
    "encodings.latin_1", "encodings.utf_8", "encodings.punycode", "json", "hmac", "hashlib", "base64",
    "stringprep", "unicodedata",
    # dnspython: record types are imported on first use
    "dns.resolver", "dns.rdtypes.ANY.MX", "dns.rdtypes.ANY.CNAME", "dns.rdtypes.ANY.NS",
    "dns.rdtypes.ANY.SOA", "dns.rdtypes.ANY.TXT", "dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.PTR", "dns.nameserver", "dns.edns", "dns.rcode", "dns.flags",
    # twisted parts used after start
    "twisted.protocols.amp", "twisted.protocols.tls", "twisted.internet.ssl", "twisted.internet._sslverify",
    "twisted.cred.credentials", "twisted.cred.error", "twisted.internet.endpoints", "twisted.web.server",
    "twisted.web.resource", "service_identity", "service_identity.pyopenssl", "idna",
)


def preload() -> list[str]:
    """Import MODULES; return the names that are not available (optional parts)."""
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    # some codecs are looked up by name, not imported
    "x".encode("idna")
    import dns.rdata  # noqa: F401 - record classes register themselves on import
    return missing
