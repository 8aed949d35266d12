"""An HTTPS server for MTA-STS policies on 127.0.0.x:443 (tests run as root).

Why: the policy URL is fixed by RFC 8461 (https, port 443, the name
mta-sts.<domain>), so tests serve it for real: twisted.web over TLS with a
trustme certificate (tests/support/certs.py) for the names given, each
domain on its own loopback address that the test DNS server gives for
mta-sts.<domain>.  What it answers is set on the object: the body, the
status, the media type, extra headers (a Location for a redirect), or
``hang`` (never answer: a slow server).
"""

from __future__ import annotations

import os

from twisted.internet import defer, ssl
from twisted.internet import reactor as default_reactor
from twisted.web import resource, server

from tests.support import certs

POLICY_PATH = b"/.well-known/mta-sts.txt"


def policy_ip(net: int, slot: int = 1) -> str:
    """A loopback address for a policy server: port 443 is fixed, so tests
    that run at once (pytest-xdist workers) each take their own address,
    127.<net>.<worker>.<slot>."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    return f"127.{net}.{n % 250}.{slot}"


def policy_text(mode: str = "enforce", mx: tuple[str, ...] = ("mx.example.test",), max_age: int = 86400,
                eol: str = "\r\n") -> bytes:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + [f"max_age: {max_age}"]
    return (eol.join(lines) + eol).encode()


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self, owner: PolicyServer):
        super().__init__()
        self.owner = owner

    def render_GET(self, request):
        o = self.owner
        o.requests.append(request.path)
        if o.hang:
            o.hanging.append(request)
            return server.NOT_DONE_YET
        if request.path != POLICY_PATH:
            request.setResponseCode(404)
            return b"not found"
        request.setResponseCode(o.code)
        request.setHeader(b"content-type", o.content_type)
        for k, v in o.headers.items():
            request.setHeader(k, v)
        return o.body


class PolicyServer:
    """HTTPS on ``interface``:``port`` with a certificate for ``names``."""

    def __init__(self, interface: str, *names: str, port: int = 443, reactor=None):
        self.reactor = reactor or default_reactor
        self.interface = interface
        self.port = port
        self.files = certs.cert_files(*names)
        self.body = policy_text()
        self.code = 200
        self.content_type = b"text/plain"
        self.headers: dict[bytes, bytes] = {}
        self.hang = False
        self.requests: list[bytes] = []
        self.hanging: list = []
        self._listener = None

    def start(self) -> PolicyServer:
        with open(self.files.cert_pem, "rb") as f:
            chain = f.read()
        with open(self.files.key_pem, "rb") as f:
            key = f.read()
        cert = ssl.PrivateCertificate.loadPEM(chain.split(b"-----END CERTIFICATE-----")[0]
                                              + b"-----END CERTIFICATE-----\n" + key)
        site = server.Site(_Policy(self))
        site.displayTracebacks = False
        self._listener = self.reactor.listenSSL(self.port, site, cert.options(), interface=self.interface)
        return self

    def stop(self):
        for r in self.hanging:
            if r.channel is not None:
                r.channel.transport.abortConnection()
        self.hanging = []
        listener, self._listener = self._listener, None
        return listener.stopListening() if listener else defer.succeed(None)
