"""AUTH on the inbound server (RFC 4954): the SASL dialogue of a session.

Its own module so that relay.smtp.server stays the dialogue of the mail
transaction.  ``AuthSession`` sits between relay.smtp.chunking and the
server (which subclasses it): it runs the exchange of relay.smtp.auth,
asks the relay's checker (in the AUTH pool: scrypt never runs on the
reactor), and delays every failure (``ServerContext.auth_failure_delay``)
so that guessing passwords is slow; the third failure in a row ends the
session with 421.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.smtp import auth
from relay.smtp.chunking import ChunkingSession
from relay.smtp.received import sanitize

log = Logger(namespace="relay.smtp")

MAX_AUTH_FAILURES = 3


class AuthSession(ChunkingSession):
    """The AUTH command and its exchange; the session state it reads
    (EHLO seen, a MAIL transaction, the user) is the server's."""

    esmtp: bool
    has_sender: bool
    helo: str | None
    auth_user: str | None
    auth_failures: int
    sasl: auth.SaslExchange | None

    def _auth_allowed(self) -> bool:
        raise NotImplementedError

    def do_AUTH(self, arg: str) -> None:
        if self.ctx.checker is None:
            self.error(502, "5.5.1 Error: authentication not enabled")
            return
        if not self.esmtp:
            self.error(503, "5.5.1 Error: send EHLO first")
            return
        if self.auth_user is not None:
            self.error(503, "5.5.1 Error: already authenticated")
            return
        if self.has_sender:
            self.error(503, "5.5.1 Error: MAIL transaction in progress")
            return
        if not self._auth_allowed():
            self.error(538, "5.7.11 Encryption required for requested authentication mechanism")
            return
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        if mech not in auth.MECHANISMS:
            self.error(504, "5.5.4 Unrecognized authentication type")
            return
        self.sasl = auth.SaslExchange(mech)
        self._auth_next(self.sasl.start(initial.strip()))

    def _auth_step(self, b64: str) -> None:
        assert self.sasl is not None  # mode "auth" only while an exchange is in progress
        self._auth_next(self.sasl.step(b64))

    def _auth_next(self, step: auth.Step) -> None:
        if isinstance(step, auth.Challenge):
            self.mode = "auth"
            self.reply(334, step.text)
            return
        self.mode = "command"
        self.sasl = None
        if isinstance(step, auth.Refused):
            self.error(step.code, step.text)
        elif isinstance(step, auth.Denied):
            self._wait(self._auth_fail_later())
        else:
            self._auth_check(step.user, step.password)

    def _auth_check(self, user: bytes, pw: bytes) -> None:
        checker = self.ctx.checker
        assert checker is not None  # AUTH is refused without one
        name = user.decode("utf-8", "replace").strip()
        # UsernamePassword is annotated with bytes; the relay's checker takes the name as str
        creds = UsernamePassword(name, pw)  # type: ignore[arg-type]
        d: defer.Deferred[Any] = defer.maybeDeferred(checker.requestAvatarId, creds)

        def ok(avatar: str | bytes) -> None:
            self.auth_user = avatar if isinstance(avatar, str) else avatar.decode()
            self.auth_failures = 0
            log.info("[{client_ip}]: authenticated as {user}", client_ip=self.peer_ip, user=self.auth_user)
            self.reply(235, "2.7.0 Authentication successful")

        def bad(f: Failure) -> defer.Deferred[None]:
            log.info("reject: AUTH from {helo}[{client_ip}]: authentication failed for {user}",
                     helo=self.helo, client_ip=self.peer_ip, user=sanitize(name, 100), reason="auth_failed")
            self.ctx.counters.reject("auth_failed")
            return self._auth_fail_later()

        d.addCallbacks(ok, bad)
        self._wait(d)

    def _auth_fail_later(self) -> defer.Deferred[None]:
        """535 after the failure delay; the third failure in a row ends the session."""
        d: defer.Deferred[None] = defer.Deferred()

        def after(_: object) -> None:
            self.auth_failures += 1
            self.error(535, "5.7.8 Error: authentication failed")
            if self.auth_failures >= MAX_AUTH_FAILURES and not self.closing:
                self.reply(421, "4.7.0 Too many authentication failures, closing connection")
                self._close()

        self.ctx.reactor.callLater(self.ctx.auth_failure_delay, d.callback, None)
        return d.addCallback(after)
