"""The SASL exchange of SMTP AUTH (RFC 4954): PLAIN and LOGIN, from the
mechanism's name and initial response to the user name and password.

No I/O and no session: the SMTP server (relay.smtp.server) sends what a step
says (a 334 challenge, an error reply) and checks the credentials with its
checker, off the reactor.  The PLAIN decoding and its authorization-identity
rule are relay.common.sasl's, shared with POP3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.common import sasl

MECHANISMS = ("PLAIN", "LOGIN")
_FIRST_CHALLENGE = {"PLAIN": "", "LOGIN": "VXNlcm5hbWU6"}  # LOGIN: base64 "Username:"
_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"  # base64 "Password:"


@dataclass(frozen=True)
class Challenge:
    """Send ``334 text`` and read the client's next line."""

    text: str


@dataclass(frozen=True)
class Refused:
    """The exchange ends with this error reply (no password was tried)."""

    code: int
    text: str


@dataclass(frozen=True)
class Denied:
    """The exchange ends as an authentication failure (an authorization
    identity other than the user's own: relay.common.sasl)."""


@dataclass(frozen=True)
class Credentials:
    """The exchange is complete: check these."""

    user: bytes
    password: bytes


Step = Challenge | Refused | Denied | Credentials


@dataclass
class SaslExchange:
    """One AUTH command's exchange with the client."""

    mechanism: str  # one of MECHANISMS
    parts: list[bytes] = field(default_factory=list)  # LOGIN: the user name once given

    def start(self, initial: str) -> Step:
        """The AUTH command's initial response ("" if none)."""
        if initial:
            return self.step(initial)
        return Challenge(_FIRST_CHALLENGE[self.mechanism])

    def step(self, b64: str) -> Step:
        """One base64 response from the client."""
        if b64 == "*":
            return Refused(501, "5.0.0 Authentication aborted")
        try:
            value = sasl.decode_base64(b64)
        except sasl.Base64Error:
            return Refused(501, "5.5.2 Cannot decode response")
        if self.mechanism == "PLAIN":
            try:
                plain = sasl.split_plain(value)
            except sasl.PlainFormatError:
                return Refused(501, "5.5.2 Invalid PLAIN response")
            if not plain.authzid_allowed:
                return Denied()
            return Credentials(plain.authcid, plain.password)
        self.parts.append(value)
        if len(self.parts) == 1:
            return Challenge(_PASSWORD_CHALLENGE)
        return Credentials(self.parts[0], self.parts[1])
