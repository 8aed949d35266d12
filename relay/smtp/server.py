"""The inbound ESMTP server: the SMTP dialogue of a session, and the factory.

Written on twisted.internet.protocol.Protocol rather than by subclassing
twisted.mail.smtp.ESMTP, whose defects (issue 2 and 5: MAIL/RCPT parameters
thrown away, pipelined replies out of order, the rest of an over-long DATA
line read as commands, data written once per recipient, STARTTLS command
injection, a sender kept across STARTTLS) sit in the parts we would have to
replace anyway.  The server is in parts:

* relay.smtp.connection: lines in, replies out (in command order, batched,
  PIPELINING), CRLF only, line limits, output flow control, the idle timer,
  error and junk limits;
* this module: what each command does, the session's state (HELO, AUTH,
  the MAIL transaction), STARTTLS;
* relay.smtp.chunking: BDAT (CHUNKING, RFC 3030), a class between the two;
* relay.smtp.authsession: AUTH (the SASL dialogue and its failures), the
  class between chunking and this one;
* relay.smtp.transfer: the DATA of one message into the intake;
  relay.smtp.received: the Received header; relay.smtp.auth: the SASL
  exchange; relay.smtp.context: what the server gets from the relay.

What the session guarantees:

* Message data streams to one spool file, whatever the number of
  recipients; the 250 "queued as" reply is sent only after the file is
  fsynced, renamed into queue/ and the directory fsynced
  (relay.intake.accept).
* After STARTTLS everything the client sent before the handshake is thrown
  away and the session starts from scratch (RFC 3207).
* Commands that move no mail forward (NOOP, RSET, HELP, VRFY, HELO/EHLO)
  are bounded per session like Postfix's smtpd_junk_command_limit: past
  smtp.junk_command_limit each one also counts as an error, and the error
  limit ends the session; a message received resets the count.  So junk
  cannot keep a session (and its idle timer) alive forever.

Policy decisions come from relay.intake.policy, storage through
relay.intake.accept; this module only speaks the protocol.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.common.address import Address, AddressError, parse_path, split_command_argument
from relay.common.dsn import DsnRequest
from relay.common.ratelimit import Refusal
from relay.intake.policy import Client, Decision, in_networks
from relay.intake.rewrite import HeaderStage, SenderMap, sender_map
from relay.queue.spool import QueueEntry
from relay.smtp import auth, dsnparams, utf8
from relay.smtp import limits as ratelimits
from relay.smtp.authsession import AuthSession
from relay.smtp.chunking import ChunkReader
from relay.smtp.context import ServerContext
from relay.smtp.received import protocol_name, received_header, sanitize
from relay.smtp.transfer import SOURCE, Transfer

log = Logger(namespace="relay.smtp")

_VERB_OK = {
    "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY",
    "EXPN", "STARTTLS", "AUTH", "BDAT",
}


class SMTPServer(AuthSession):
    """One SMTP session."""

    def __init__(self, ctx: ServerContext, submission: bool = False, implicit_tls: bool = False):
        super().__init__(ctx, implicit_tls)
        self.submission = submission
        self.auth_failures = 0
        self.transfer: Transfer | None = None  # the message of a DATA in progress
        self.sasl: auth.SaslExchange | None = None  # an AUTH exchange in progress
        self._reset_session()

    # -- session state ---------------------------------------------------
    def _reset_session(self) -> None:
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.sender: Address | None = None
        self.has_sender = False
        self.recipients: list[Decision] = []
        self.rcpt_keys: set[str] = set()
        self.body_8bit = False
        self.smtputf8 = False  # MAIL said SMTPUTF8 (RFC 6531; relay.smtp.utf8)
        self.dsn_mail = ("", "")  # RET, ENVID (relay.smtp.dsnparams)
        self.rcpt_dsn: dict[str, tuple[str | None, str | None]] = {}  # address: NOTIFY, ORCPT
        self._abort_incoming()

    def _abort_incoming(self) -> None:
        t, self.transfer = self.transfer, None
        if t is not None:
            t.abort()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("latin-1")
        if self.mode == "auth":
            self._auth_step(text.strip())
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb, None) if verb in _VERB_OK else None
        if handler is None:
            self.error(500, "5.5.2 Error: command not recognized")
            return
        handler(arg)

    # -- commands ------------------------------------------------------------
    def do_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def do_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            self.error(501, "5.5.4 Syntax: %s hostname" % ("EHLO" if esmtp else "HELO"))
            return
        self._reset_transaction()
        self.helo = sanitize(name)
        self.esmtp = esmtp
        host = self.cfg.hostname
        if not esmtp:
            self.reply(250, host)
            self._junk()
            return
        lines = [
            host,
            "PIPELINING",
            f"SIZE {self.cfg.smtp.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "CHUNKING",
            "SMTPUTF8",
        ]
        if self.ctx.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_allowed() and self.auth_user is None and self.ctx.checker is not None:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self.reply(250, "\n".join(lines))
        self._junk()

    def _auth_allowed(self) -> bool:
        if self.tls_active:
            return True
        return self.ctx.tls is None or not self.cfg.tls.auth_requires_tls

    def do_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")
        self._junk()

    def do_RSET(self, arg: str) -> None:
        if arg.strip():
            self.error(501, "5.5.4 Syntax: RSET")
            return
        self._reset_transaction()
        self.reply(250, "2.0.0 Ok")
        self._junk()

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0 Bye")
        self._close()

    def do_HELP(self, arg: str) -> None:
        self.reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY"
                   + (" STARTTLS" if self.ctx.tls is not None else "")
                   + (" AUTH" if self.ctx.checker is not None else ""))
        self._junk()

    def do_VRFY(self, arg: str) -> None:
        if not arg.strip():
            self.error(501, "5.5.4 Syntax: VRFY address")
            return
        self.reply(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
        self._junk()

    def do_EXPN(self, arg: str) -> None:
        self.error(502, "5.5.1 EXPN is not available")

    def do_MAIL(self, arg: str) -> None:
        if self.shutting_down:
            self.reply(421, "4.3.2 Service shutting down, closing connection")
            self._close()
            return
        if self.helo is None:
            self.error(503, "5.5.1 Error: send HELO/EHLO first")
            return
        if self.has_sender:
            self.error(503, "5.5.1 Error: nested MAIL command")
            return
        if self.submission and self.auth_user is None:
            log.info("reject: MAIL from {helo}[{client_ip}]: 530 5.7.0 Authentication required",
                     helo=self.helo, client_ip=self.peer_ip, reason="auth_required")
            self.ctx.counters.reject("auth_required")
            self.error(530, "5.7.0 Authentication required")
            return
        if not arg[:5].upper() == "FROM:":
            self.error(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        text, valid = utf8.command_text(arg[5:])
        try:
            path, params = split_command_argument(text)
            smtputf8 = "SMTPUTF8" in params and self.esmtp
            utf8.check_valid(valid, smtputf8)
            sender = parse_path(path, allow_null=True, utf8=smtputf8)
        except AddressError as e:
            self.error(*utf8.refusal(e, "sender", "5.1.7" if e.status == "5.1.3" else e.status))
            return
        if params and not self.esmtp:
            self.error(555, "5.5.4 MAIL parameters are not allowed after HELO")
            return
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self.error(501, "5.5.4 Bad SIZE parameter")
                    return
                if int(value) > self.cfg.smtp.max_message_size:
                    log.info("reject: MAIL from {helo}[{client_ip}]: 552 5.3.4 Message size exceeds fixed limit "
                             "(SIZE={size}); from=<{sender}>", helo=self.helo, client_ip=self.peer_ip,
                             size=int(value), sender=path.strip().strip("<>"), reason="size")
                    self.reply(552, "5.3.4 Message size exceeds fixed limit")
                    self.ctx.counters.reject("size")
                    return
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    self.error(555, "5.5.4 Unsupported BODY parameter")
                    return
                self.body_8bit = (value or "").upper() == "8BITMIME"
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted and not propagated
            elif key == "SMTPUTF8":
                if (bad := utf8.mail_param(value)) is not None:
                    self.error(501, bad)
                    return
            elif key in dsnparams.MAIL_KEYS:
                pass  # read by _mail_dsn
            else:
                self.error(555, f"5.5.4 Unsupported parameter {key}")
                return
        dsn_mail = self._mail_dsn(text, path, params)
        if dsn_mail is None:
            return
        decision = self.ctx.policy.sender(self._client(), sender)
        if not decision.ok:
            self._reject("MAIL", decision, sender)
            return

        def accept() -> None:
            self.dsn_mail = dsn_mail
            self.smtputf8 = smtputf8
            self.sender = sender
            self.has_sender = True
            self.reply(250, "2.1.0 Ok")

        self._within_limits("MAIL", "messages", sender, None, accept)

    def do_RCPT(self, arg: str) -> None:
        if not self.has_sender:
            self.error(503, "5.5.1 Error: need MAIL command")
            return
        if not arg[:3].upper() == "TO:":
            self.error(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        text, valid = utf8.command_text(arg[3:])
        try:
            path, params = split_command_argument(text)
            utf8.check_valid(valid, self.smtputf8)
            stripped = path.strip()
            parsed = (Address("postmaster", self.cfg.local.domains[0])
                      if stripped.strip("<>").lower() == "postmaster" and self.cfg.local.domains
                      else parse_path(path, utf8=self.smtputf8))
            if parsed is None:  # not without allow_null: "<>" raises AddressError
                raise AddressError("missing address")
            rcpt = parsed
        except AddressError as e:
            self.error(*utf8.refusal(e, "recipient", e.status))
            return
        rcpt_dsn = self._rcpt_dsn(text, path, params)
        if rcpt_dsn is None:
            return
        if len(self.recipients) >= self.cfg.smtp.max_recipients:
            self.reply(452, "4.5.3 Error: too many recipients")
            return
        decision = self.ctx.policy.recipient(self._client(), rcpt)
        if not decision.ok:
            self._reject("RCPT", decision, rcpt)
            return

        def accept() -> None:
            if decision.address not in self.rcpt_keys:
                self.rcpt_keys.add(decision.address)
                self.recipients.append(decision)
                if rcpt_dsn != (None, None):
                    self.rcpt_dsn[decision.address] = rcpt_dsn
            self.reply(250, "2.1.5 Ok")

        if decision.address in self.rcpt_keys:  # a duplicate counts nothing
            accept()
        else:
            self._within_limits("RCPT", "recipients", self.sender, rcpt, accept)

    def _mail_dsn(self, rest: str, path: str, params: dict[str, str | None]) -> tuple[str, str] | None:
        """RET and ENVID of MAIL (RFC 3461), or None after the error reply."""
        got = dsnparams.check_mail(rest, path, params)
        if isinstance(got, dsnparams.Refusal):
            self.error(got.code, got.text)
            return None
        return got

    def _rcpt_dsn(self, rest: str, path: str, params: dict[str, str | None]) -> tuple[str | None, str | None] | None:
        """NOTIFY and ORCPT of RCPT, or None after the error reply."""
        got = dsnparams.check_rcpt(rest, path, params, self.esmtp)
        if isinstance(got, dsnparams.Refusal):
            self.error(got.code, got.text)
            return None
        return got

    def _dsn_request(self) -> DsnRequest | None:
        """The transaction's DSN request, ``limited`` for an untrusted client (docs/dsn.md)."""
        return dsnparams.request(self.dsn_mail, [self.rcpt_dsn.get(d.address, (None, None)) for d in self.recipients],
                                 limited=not self.ctx.policy.trusted(self._client()))

    def _within_limits(self, stage: str, kind: str, sender: Address | None, rcpt: Address | None,
                       accept: Callable[[], None]) -> None:
        """[limits] (relay.smtp.limits): counts this MAIL or RCPT and calls accept, or refuses
        it with 450 4.7.1; limits shared by a fleet (limits.redis) answer later: later
        commands wait for it (at most limits.redis_timeout)."""
        cfg = self.cfg
        wants = ratelimits.wants(cfg, kind, submission=self.submission, ip=self.peer_ip, user=self.auth_user,
                                 sender=str(sender) if sender else None,
                                 trusted_network=in_networks(self.peer_ip, cfg.relay.networks))
        got = ratelimits.check(self.ctx.rates, wants, self.ctx.reactor.seconds())
        if isinstance(got, defer.Deferred):
            self._wait(got.addCallback(self._limits_answer, stage, sender, rcpt, accept))
        else:
            self._limits_answer(got, stage, sender, rcpt, accept)

    def _limits_answer(self, refusal: Refusal | None, stage: str, sender: Address | None, rcpt: Address | None,
                       accept: Callable[[], None]) -> None:
        if self.closing:
            return
        if refusal is None:
            accept()
            return
        cfg = self.cfg
        text = ratelimits.reply_text(refusal, cfg)
        self.ctx.counters.rate_limit(refusal.want.limit)
        if refusal.first:  # once per key and window
            log.info("reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}> to=<{rcpt}>",
                     stage=stage, helo=self.helo, client_ip=self.peer_ip, reply=f"450 4.7.1 {text}",
                     sender=str(sender or ""), rcpt=str(rcpt or ""), reason="rate_limit")
        self.reply(450, f"4.7.1 {text}")  # not an error: 20 of them must not end a transaction begun

    def _client(self) -> Client:
        return Client(self.peer_ip, self.auth_user)

    def _reject(self, stage: str, decision: Decision, addr: Address | None) -> None:
        reason = ("relay_denied" if decision.status == "5.7.1" and stage == "RCPT"
                  else "unknown_user" if decision.status == "5.1.1" else "sender")
        log.info(
            "reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}> to=<{rcpt}>",
            stage=stage, helo=self.helo, client_ip=self.peer_ip, reply=decision.reply,
            sender=str(self.sender or "") if stage == "RCPT" else str(addr or ""),
            rcpt=str(addr) if stage == "RCPT" else "", reason=reason,
        )
        self.ctx.counters.reject(reason)
        self.error(decision.code, f"{decision.status} {decision.text}")

    def do_DATA(self, arg: str) -> None:
        if arg.strip():
            self.error(501, "5.5.4 Syntax: DATA")
            return
        if self._bdat_open():
            self.error(503, "5.5.1 Error: DATA after BDAT in one transaction")
            return
        if not self.has_sender:
            self.error(503, "5.5.1 Error: need MAIL command")
            return
        if not self.recipients:
            self.error(554, "5.5.1 Error: no valid recipients")
            return
        if (refusal := self._begin_message(None)) is not None:
            return self.reply(*refusal)
        self.mode = "data"
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        self._flush()
        self._arm()

    def _begin_message(self, reader: ChunkReader | None) -> tuple[int, str] | None:
        """The spool file of the transaction's message, its Received header
        written (self.transfer); or the reply that refuses it."""
        intake = self.ctx.intake
        smap = self._sender_map()
        env = intake.envelope(str(self.sender) if self.sender else "", [d.address for d in self.recipients], {
            "ip": self.peer_ip,
            "helo": self.helo,
            "proto": self._protocol_name(),
            **({"auth": self.auth_user} if self.auth_user else {}),
            **({"tls": self.tls_info} if self.tls_info else {}),
        }, rewrite=smap, dsn=self._dsn_request(), smtputf8=self.smtputf8)
        inc = None
        try:
            inc = intake.receive(env)
            inc.write(received_header(
                helo=self.helo, client_ip=self.peer_ip, hostname=self.cfg.hostname,
                proto=self._protocol_name(), queue_id=env.queue_id, tls_active=self.tls_active,
                tls_info=self.tls_info, now=self.ctx.reactor.seconds(),
                recipient=self.recipients[0].address if len(self.recipients) == 1 else None,
                hide_client=self._hide_client()))
        except OSError as e:
            log.error("{queue_id}: cannot create spool file: {error}", queue_id=env.queue_id, error=str(e))
            if inc is not None:
                inc.abort()
            return (452, "4.3.1 Insufficient system storage")
        self.transfer = Transfer(inc, self.cfg.smtp.max_message_size,
                                 HeaderStage(smap) if smap is not None else None, reader)
        return None

    def _sender_map(self) -> SenderMap | None:
        """The sender rewriting of this message: only for a trusted client
        (authenticated, or in relay.networks), and only when there is a map."""
        rw = self.cfg.rewrite
        smap = sender_map(rw.senders, rw.masquerade)
        return None if smap.empty or not self.ctx.policy.trusted(self._client()) else smap

    def _hide_client(self) -> bool:
        """Private submission: the Received header without the client, for authenticated clients."""
        smtp = self.cfg.smtp
        return bool(self.auth_user) and (smtp.submission_hide_client_session if self.submission
                                         else smtp.hide_client_session)

    def _protocol_name(self) -> str:
        return utf8.protocol(protocol_name(self.esmtp, self.tls_active, bool(self.auth_user)), self.smtputf8)

    def _data_input(self, chunk: bytes | None = None) -> None:
        if self.mode == "bdat":
            self._bdat_input(chunk)
            return
        t = self.transfer
        assert t is not None, "DATA input without a message"
        if chunk is None:
            chunk = bytes(self.buf)
            del self.buf[:]
        rest = t.feed(chunk)
        if rest is None:
            return
        self.buf = bytearray(rest)
        self.mode = "command"
        self._end_of_data(t)

    def _end_of_data(self, t: Transfer, stage: str = "DATA") -> None:
        self.transfer = None
        qid = t.queue_id if t.incoming is not None else "NOQUEUE"
        rejected = t.rejection()
        if rejected is not None:
            code, text, reason = rejected
            log.info("{queue_id}: reject: {stage} from {helo}[{client_ip}]: {reply}; from=<{sender}>",
                     queue_id=qid, stage=stage, helo=self.helo, client_ip=self.peer_ip, code=code,
                     reply=f"{code} {text}", sender=str(self.sender or ""), reason=reason)
            self.ctx.counters.reject(reason)
            self._reset_transaction()
            self.error(code, text)
            return
        assert t.incoming is not None  # not refused: still there
        d = self.ctx.intake.accept(t.incoming, SOURCE, announce=self._queued,
                                   failed=partial(self._not_queued, t.queue_id),
                                   eight_bit=t.reader.eight_bit, trusted=self.ctx.policy.trusted(self._client()))
        self._reset_transaction()
        self._wait(d)

    def _queued(self, entry: QueueEntry) -> None:
        """The message is durable: say so (the queue gets it next)."""
        env = entry.envelope
        log.info(
            "{queue_id}: client={helo}[{client_ip}], from=<{sender}>, size={size}, nrcpt={nrcpt}"
            "{_tls}{_auth}",
            queue_id=env.queue_id, helo=self.helo, client_ip=self.peer_ip, sender=env.sender,
            size=entry.size, nrcpt=len(env.recipients), proto=self._protocol_name(),
            tls=self.tls_info.get("version") if self.tls_info else None,
            sasl_username=self.auth_user,
            _tls=f", tls={self.tls_info.get('version')}" if self.tls_info else "",
            _auth=f", sasl_username={self.auth_user}" if self.auth_user else "",
            recipients=env.recipients,
        )
        self.ctx.counters.received += 1
        self.junk = 0  # a message moved forward: junk counts afresh (as Postfix does)
        self.reply(250, f"2.0.0 Ok: queued as {env.queue_id}")

    def _not_queued(self, qid: str, f: Failure) -> None:
        log.error("{queue_id}: could not queue: {error}", queue_id=qid, error=f.getErrorMessage())
        self.ctx.counters.reject("spool_error")
        self.reply(452, "4.3.1 Insufficient system storage")

    # -- STARTTLS ----------------------------------------------------------------
    def do_STARTTLS(self, arg: str) -> None:
        if self.ctx.tls is None:
            self.error(502, "5.5.1 Error: command not implemented")
            return
        if self.tls_active:
            self.error(503, "5.5.1 Error: TLS already active")
            return
        if arg.strip():
            self.error(501, "5.5.4 Syntax: STARTTLS")
            return
        self.reply(220, "2.0.0 Ready to start TLS")
        self._flush()
        # Anything pipelined after STARTTLS was sent in plaintext before the
        # handshake: it must never be executed (CVE-2011-0411 class).
        if self.buf:
            log.info("discarded {n} bytes sent after STARTTLS by [{client_ip}]",
                     n=len(self.buf), client_ip=self.peer_ip)
        del self.buf[:]
        self._reset_session()
        self.tls_active = True
        self._direct = False
        self.transport.startTLS(self.ctx.tls.options)
        # startTLS moved this producer onto the TLS layer, which starts unpaused
        self._out_paused = False
        self._sync_reading()

class SMTPFactory(ServerFactory):
    """Builds SMTP sessions for one listener (MX or submission)."""

    def __init__(self, ctx: ServerContext, *, submission: bool = False, implicit_tls: bool = False):
        self.ctx = ctx
        self.submission = submission
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> SMTPServer:
        p = SMTPServer(self.ctx, self.submission, self.implicit_tls)
        p.factory = self
        return p
