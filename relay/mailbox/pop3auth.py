"""POP3's AUTHORIZATION state: USER/PASS, AUTH PLAIN (RFC 5034), the login.

A mixin of relay.mailbox.pop3protocol.POP3Server (the state it uses is
declared in relay.mailbox.pop3session.Connection).  Why the login is shaped
so:

* The password check (scrypt, which anyone can ask for without an account)
  runs in the relay's AUTH pool (``factory.run_auth``), never on the reactor
  nor in the disk pool whose fsyncs stand behind every SMTP 250; opening the
  Maildir (lock, listing) is disk work and goes to the disk pool
  (``factory.run_blocking``).
* A failed login is answered ``login_failure_delay`` seconds after it began,
  whether or not the account exists; ``max_login_failures`` closes the
  connection.  Commands pipelined behind it wait their turn.
* Without TLS where a certificate is configured (``auth_requires_tls``),
  no login command is accepted (RFC 2595): the reply names STLS.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.common import sasl
from relay.common.address import AddressError, fold_local, parse_mailbox
from relay.mailbox import maildir
from relay.mailbox.mboxlock import LockRefused
from relay.mailbox.pop3lock import keep_fresh
from relay.mailbox.pop3session import CommandError, Connection, Session, cmd_error, no_args
from relay.mailbox.users import UsersFileError, normalize_user

log = Logger(namespace="relay.pop3")

AUTH_REQUIRES_TLS_MSG = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; "
    b"use STLS first\r\n"
)


class AuthorizationCommands(Connection):
    """USER, PASS, AUTH and APOP, and the login they lead to."""

    _user: str | None  # the name USER gave, waiting for PASS
    _sasl: str | None  # the mechanism whose response line comes next
    _failures: int
    _delay: defer.Deferred[None] | None  # the answer to a failed login, waiting

    def _login_allowed(self) -> bool:
        f = self.factory
        return self.secure or not (f.tls_options is not None and f.auth_requires_tls)

    def do_USER(self, arg: bytes) -> None:
        if not self._login_allowed():
            raise CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        name = arg.strip(b" ")
        if not name:
            raise cmd_error("Syntax: USER <address>", bad=True)
        self._user = name.decode("utf-8", "replace")
        # Always +OK: whether the account exists is not disclosed.
        self._write(b"+OK Send your password\r\n")

    def do_PASS(self, arg: bytes):
        if not self._login_allowed():
            self._user = None
            raise CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        if self._user is None:
            raise cmd_error("Send USER first", bad=True)
        user, self._user = self._user, None
        return self._login(user, arg, "USER/PASS")

    def do_AUTH(self, arg: bytes):
        parts = arg.split(None, 1)
        if not self._login_allowed():
            raise CommandError(AUTH_REQUIRES_TLS_MSG, bad=True)
        if not parts:
            # The pre-RFC 5034 form: list the mechanisms.
            self._write(b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n")
            return None
        mech = parts[0].upper()
        if mech != b"PLAIN":
            raise cmd_error("Unsupported authentication mechanism (only PLAIN)", bad=True)
        if len(parts) == 1:
            self._sasl = "PLAIN"
            self._write(b"+ \r\n")
            return None
        return self._sasl_plain(parts[1].strip())

    def _sasl_response(self, line: bytes):
        self._sasl = None
        if line.strip() == b"*":
            self._write(b"-ERR Authentication cancelled\r\n")
            return None
        return self._sasl_plain(line.strip())

    def _sasl_plain(self, data: bytes):
        try:
            plain = sasl.decode_plain(data)
        except sasl.Base64Error:
            raise cmd_error("Invalid base64 data in the SASL response", bad=True)
        except sasl.PlainFormatError:
            raise cmd_error("Invalid SASL PLAIN response (authzid NUL authcid NUL password)", bad=True)
        if not plain.authzid_allowed:
            # Acting as another user is not supported: a failed login like any other.
            return self._login(plain.user, None, "SASL PLAIN")
        return self._login(plain.user, plain.password, "SASL PLAIN")

    def do_UTF8(self, arg: bytes) -> None:
        """RFC 6856 2: UTF-8 mode.  Nothing to switch: user names are UTF-8
        anyway (CAPA says "UTF8 USER") and messages are served as stored;
        only valid in the AUTHORIZATION state."""
        no_args(arg, "UTF8")
        self._write(b"+OK UTF8 enabled\r\n")

    def do_APOP(self, arg: bytes) -> None:
        raise cmd_error("APOP is not supported; use USER/PASS or AUTH PLAIN", bad=True)

    # -- the login ------------------------------------------------------------
    def _login(self, name: str, password: bytes | None, method: str) -> defer.Deferred:
        f = self.factory
        started = f.reactor.seconds()
        try:
            user = normalize_user(name, tuple(f.local_domains))
            addr = parse_mailbox(name.strip(), utf8=True)
            pw = password.decode("utf-8") if password is not None else None
        except (AddressError, UnicodeDecodeError) as e:
            log.info("pop3: login failed client={client} user={user} method={method}: {why}",
                     client=self.peer, user=name[:128], method=method, why=str(e))  # see relay.common.logsafe
            return self._failed_login(started)
        if pw is None:
            log.info("pop3: login failed client={client} user={user} method={method}: "
                     "authorization identity differs", client=self.peer, user=user, method=method)
            return self._failed_login(started)
        userdb = f.userdb
        try:
            # on the reactor (a stat, and a small file read only when it
            # changed): a user just added can log in at once, and the users
            # are never reloaded from two threads at a time
            userdb.refresh()
        except UsersFileError as e:  # keep the users we had; say why once per bad version
            log.error("pop3: {err}", err=str(e))
        root = f.mailbox_root
        d = f.run_auth(userdb.check, user, pw)

        def checked(ok: bool):
            if not ok:
                return None
            if self._lost:
                return None
            # the Maildir (lock, listing) is disk work: the disk pool
            return f.run_blocking(maildir.open_mailbox, root, addr.domain, fold_local(addr.local))

        def done(result):
            if result is None:
                if self._lost:
                    return None
                log.info("pop3: login failed client={client} user={user} method={method}: "
                         "bad credentials", client=self.peer, user=user, method=method)
                return self._failed_login(started)
            path, lock, msgs = result
            if self._lost:
                lock.release()
                return None
            self.session = Session(user, path, lock, msgs)
            keep_fresh(lock, f.reactor, f.run_blocking, user)  # the cross-host lock stays fresh
            n, size = self.session.stat()
            f.logged_in += 1
            log.info("pop3: login client={client} user={user} method={method} tls={tls} "
                     "messages={messages} octets={octets}", client=self.peer, user=user,
                     method=method, tls=self.secure, messages=n, octets=size)
            self._write(f"+OK Logged in, {n} messages ({size} octets)\r\n".encode("ascii"))
            return None

        def failed(fail: Failure):
            if fail.check(maildir.MailboxLocked):
                log.info("pop3: mailbox in use client={client} user={user}", client=self.peer, user=user)
                self._write(b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n")
                return None
            if fail.check(AddressError):
                return self._failed_login(started)
            if fail.check(LockRefused):  # a planted symlink or the like: the operator's to look at
                log.error("pop3: mailbox of {user} refused: {err}", user=user, err=str(fail.value))
                self._write(b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later\r\n")
                return None
            log.failure("pop3: cannot open the mailbox of {user}", fail, user=user)
            self._write(b"-ERR [SYS/TEMP] Cannot open the mailbox, try again later\r\n")
            return None

        return d.addCallback(checked).addCallbacks(done, failed)

    def _failed_login(self, started: float) -> defer.Deferred:
        f = self.factory
        self._failures += 1
        wait = max(0.0, started + f.login_failure_delay - f.reactor.seconds())

        def answer():
            if self._lost:
                return
            if self._failures >= f.max_login_failures:
                self._write(b"-ERR [AUTH] Authentication failed; too many failures, closing connection\r\n")
                self._close()
            else:
                self._write(b"-ERR [AUTH] Authentication failed\r\n")

        d = task.deferLater(f.reactor, wait, answer)
        self._delay = d
        return d.addErrback(lambda fail: fail.trap(defer.CancelledError) and None)
