"""The mail transactions on a ready session: MAIL, RCPT..., DATA, the message.

On a session that is greeted, EHLO'd, and (as the policy wants) under TLS
and authenticated, ``Transactions.deliver_on`` sends the message to the
recipients in transactions of at most ``max_rcpts_per_txn``, pipelined
when the server offers PIPELINING, with SIZE, BODY=8BITMIME and SMTPUTF8
as offered and needed (relay.outbound.smtputf8: a message that needs
SMTPUTF8 is not sent to a hop without it; its recipients get 5.6.7 in
``utf8_refused``), and gives each recipient its RcptResult.  To a
server that offers DSN the request goes along (RET, ENVID on MAIL; NOTIFY,
ORCPT on RCPT, ORCPT=rfc822;<address> added where the client gave none, as
Postfix does) and the accepted recipients are marked ``dsn_carried``.  The
message is sent from memory when small and at hand, else streamed from the
spool file (relay.outbound.msgproducer).

To a server that offers CHUNKING (RFC 3030) the message goes as one
``BDAT <size> LAST`` chunk, the spool file's octets as they are (no
dot-stuffing, no "."), after the replies to MAIL and RCPT (pipelined as
they would be with DATA: the same round trips, docs/chunking.md).  The
reply to it is recorded as the "end of DATA" stage, as DATA's is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from twisted.internet import threads

from relay.common import xtext
from relay.common.fastwrite import send_now
from relay.outbound import smtputf8 as utf8mod
from relay.outbound.clientproto import ClientProtocol
from relay.outbound.conversation import Down, NeedsUtf8, command, down, quit_session, reply, where
from relay.outbound.msgproducer import CHUNK
from relay.outbound.replies import ConversationError, RcptResult, Reply, size_limit
from relay.outbound.request import Hop, Outbound

Results = dict[str, RcptResult]


def has_8bit(path: str, offset: int, size: int) -> bool:
    """Whether the message holds a byte over 127 (blocking: run in a thread)."""
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                return False
            if not chunk.isascii():
                return True
            left -= len(chunk)
    return False


def reply_result(r: Reply, hop: Hop, stage: str) -> RcptResult:
    """A recipient's result from the server's reply to ``stage``."""
    kind = r.kind
    if r.code // 100 not in (2, 4, 5):
        kind = "deferred"
    return RcptResult(
        kind,
        r.status if kind != "deferred" or r.status[0] == "4" else "4.5.0",
        r.text,
        code=r.code,
        hop=hop,
        stage=stage,
    )


def down_result(d: Down, hop: Hop) -> RcptResult:
    """A recipient left open when the connection died: deferred."""
    if d.reply is not None:
        return RcptResult(
            "deferred",
            d.reply.status if d.reply.status[0] == "4" else "4.0.0",
            d.reply.text,
            code=d.reply.code,
            hop=hop,
            stage=d.stage,
        )
    return RcptResult("deferred", d.status, d.reason, hop=hop, stage=d.stage)


def _check421(r: Reply, hop: Hop, stage: str) -> None:
    if r.code == 421:
        said = f"host {where(hop)} said: {r.one_line} (in reply to {stage} command)"
        raise Down(r.status, said, reply=r, stage=stage)


class Transactions:
    """The transactions of one delivery (on whichever hop and session);
    remembers what it learnt of the message (8-bit or not) across hops."""

    def __init__(self, reactor: Any, out: Outbound, threadpool: Any = None):
        self.reactor = reactor
        self.out = out
        self.t = out.timeouts
        self.size = out.message.size
        self.data = out.message.in_memory  # the message itself, when the caller has it
        self.body_8bit = out.message.eight_bit
        self.threadpool = threadpool
        self.max_rcpts = max(1, out.max_rcpts_per_txn)
        self.headers_utf8: bool | None = None  # the header block holds UTF-8 (read when it matters)
        self.utf8_refused: Results = {}  # recipients a hop refused for want of SMTPUTF8 (5.6.7)
        self.utf8_session = False  # the current transaction says SMTPUTF8

    async def deliver_on(
        self, proto: ClientProtocol, hop: Hop, rcpts: list[str], ext: dict[str, str], *, may_park: bool
    ) -> tuple[Results, bool]:
        """The transactions on a session that is ready (greeted, EHLO, TLS,
        AUTH): (results, parkable).  A session that ends clean and open is
        parkable when ``may_park`` (the caller parks it or QUITs); otherwise
        it is QUIT here."""
        results: Results = {}
        limit = size_limit(ext)
        if limit and self.size > limit:
            reply_text = f"message size {self.size} exceeds size limit {limit} of server {where(hop)}"
            for r in rcpts:
                results[r] = RcptResult("bounced", "5.3.4", reply_text, hop=hop, stage="MAIL FROM")
            await quit_session(proto, hop, self.t.quit)
            return results, False
        rcpts, utf8 = await self._smtputf8(proto, hop, rcpts, ext)
        self.utf8_session = utf8
        params = await self._mail_params(ext, utf8)
        clean = await self._transactions(proto, hop, rcpts, ext, params, results)
        if proto.lost is None:
            if may_park and clean:
                return results, True
            await quit_session(proto, hop, self.t.quit)
        return results, False

    async def _smtputf8(self, proto: ClientProtocol, hop: Hop, rcpts: list[str],
                        ext: dict[str, str]) -> tuple[list[str], bool]:
        """The recipients to send on this hop, and whether MAIL says SMTPUTF8
        (relay.outbound.smtputf8).  Recipients that need SMTPUTF8 on a hop
        that does not offer it get a 5.6.7 result in ``utf8_refused`` (the
        caller tries them on the next hop); when none is left, the session
        is QUIT and NeedsUtf8 raised (a failure of this hop)."""
        sender = utf8mod.wire_address(self.out.sender)
        wires = {r: utf8mod.wire_address(r) for r in rcpts}
        wanted = self.out.smtputf8 or not (sender.isascii() and all(w.isascii() for w in wires.values()))
        if not wanted or "SMTPUTF8" in ext:
            return rcpts, wanted
        need_all = not sender.isascii() or await self._headers_utf8()
        bad = list(rcpts) if need_all else [r for r in rcpts if not wires[r].isascii()]
        if not bad:
            return rcpts, False
        reason = f"SMTPUTF8 is required, but was not offered by host {where(hop)}"
        for r in bad:
            self.utf8_refused[r] = RcptResult("bounced", "5.6.7", reason, hop=hop, stage="MAIL FROM")
        left = [r for r in rcpts if r not in bad]
        if not left:
            await quit_session(proto, hop, self.t.quit)
            raise NeedsUtf8("5.6.7", reason, stage="MAIL FROM")
        return left, False

    async def _headers_utf8(self) -> bool:
        """Whether the header block is UTF-8 (read once, in the thread pool)."""
        if self.headers_utf8 is None:
            if self.data is not None:
                self.headers_utf8 = utf8mod.header_utf8_in_memory(self.data)
            else:
                m = self.out.message
                pool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
                try:
                    self.headers_utf8 = bool(await threads.deferToThreadPool(
                        self.reactor, pool, utf8mod.header_block_utf8, m.path, m.offset, m.size))
                except OSError:
                    return True  # unreadable: the transfer would fail anyway; send nothing unsure
        return self.headers_utf8

    async def _mail_params(self, ext: dict[str, str], utf8: bool) -> bytes:
        params = b""
        if "SIZE" in ext:
            params += b" SIZE=%d" % self.size
        if "8BITMIME" in ext:
            if self.body_8bit is None:
                self.body_8bit = (not self.data.isascii()) if self.data is not None else await self._scan_8bit()
            if self.body_8bit:
                params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        return params + self._mail_dsn(ext)

    def _mail_dsn(self, ext: dict[str, str]) -> bytes:
        d = self.out.dsn
        if "DSN" not in ext or d is None:
            return b""
        return ((b" RET=" + d.ret.encode() if d.ret else b"")
                + (b" ENVID=" + xtext.encode(d.envid).encode() if d.envid else b""))

    def _rcpt_line(self, rcpt: str, ext: dict[str, str]) -> bytes:
        line = b"RCPT TO:<" + utf8mod.wire_address(rcpt).encode() + b">"
        if "DSN" not in ext:
            return line
        notify, orcpt = (self.out.dsn.rcpts.get(rcpt, (None, None)) if self.out.dsn is not None
                         else (None, None))
        if notify:
            line += b" NOTIFY=" + notify.encode()
        if not orcpt:
            orcpt = "rfc822;" + xtext.encode(rcpt) if rcpt.isascii() else "utf-8;" + utf8mod.unitext(rcpt)
        return line + b" ORCPT=" + utf8mod.wire_orcpt(orcpt, self.utf8_session).encode()

    async def _scan_8bit(self) -> bool:
        m = self.out.message
        pool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        try:
            found: bool = await threads.deferToThreadPool(self.reactor, pool, has_8bit, m.path, m.offset, m.size)
            return found
        except OSError:
            return False  # the transfer itself will report the unreadable file

    async def _transactions(
        self, proto: ClientProtocol, hop: Hop, rcpts: list[str], ext: dict[str, str], params: bytes, results: Results
    ) -> bool:
        """Transactions of at most max_rcpts recipients on this connection;
        True when the session ended clean (nothing open, still connected).

        A connection that dies (or a 421) before any recipient has an answer
        and before any message data was sent is a failure of this hop (the
        caller tries the next one); later, the undecided recipients are
        deferred - in particular a transaction whose data was being sent.
        """
        queue = deque(rcpts)
        need_rset = False
        data_sent = False
        while queue and proto.lost is None:
            batch = [queue.popleft() for _ in range(min(self.max_rcpts, len(queue)))]
            try:
                if need_rset:
                    rset = await command(proto, hop, b"RSET", "RSET", self.t.rset)
                    if rset.code // 100 != 2:
                        raise Down(
                            rset.status if rset.code // 100 == 4 else "4.5.0",
                            f"host {where(hop)} said: {rset.one_line} (in reply to RSET command)",
                            reply=rset,
                            stage="RSET",
                        )
                retry, completed = await self._transaction(proto, hop, batch, ext, params, results)
            except Down as d:
                data_sent = data_sent or d.data_started
                if not data_sent and not any(r in results for r in rcpts):
                    raise d.hop_failed()
                for r in [r for r in batch if r not in results] + list(queue):
                    results[r] = down_result(d, hop)
                return False
            data_sent = data_sent or completed
            need_rset = not completed
            queue.extendleft(reversed(retry))
        return not need_rset and proto.lost is None

    async def _transaction(
        self, proto: ClientProtocol, hop: Hop, batch: list[str], ext: dict[str, str], params: bytes, results: Results
    ) -> tuple[list[str], bool]:
        """One MAIL/RCPT.../DATA; fills results; returns (retry, completed):
        the recipients to try again in the next transaction (452 after some
        were accepted) and whether the message data went through."""
        mail = b"MAIL FROM:<" + utf8mod.wire_address(self.out.sender).encode() + b">" + params
        rcpt_lines = [self._rcpt_line(r, ext) for r in batch]
        pipelining = "PIPELINING" in ext
        chunking = "CHUNKING" in ext
        data_reply: Reply | None = None
        if pipelining:
            mail_reply, rcpt_replies, data_reply = await self._pipelined(proto, hop, mail, rcpt_lines,
                                                                         with_data=not chunking)
        else:
            mail_reply, rcpt_replies = await self._lockstep(proto, hop, mail, rcpt_lines)

        if mail_reply.code // 100 != 2:
            for r in batch:
                results[r] = reply_result(mail_reply, hop, "MAIL FROM")
            if data_reply is not None and data_reply.code == 354:
                await self._abandon_data(proto, hop)
            return [], False

        accepted, retry = _sort_recipients(batch, rcpt_replies, hop, results)
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._abandon_data(proto, hop)
            return retry, False

        if not chunking:
            if data_reply is None:
                data_reply = await command(proto, hop, b"DATA", "DATA", self.t.data_init)
            _check421(data_reply, hop, "DATA")
            if data_reply.code != 354:
                for r in accepted:
                    results[r] = reply_result(data_reply, hop, "DATA")
                return retry, False
        await self._send_data(proto, hop, accepted, results, chunked=chunking)
        if "DSN" in ext:
            for r in accepted:
                if results[r].kind == "delivered":
                    results[r] = replace(results[r], dsn_carried=True)
        return retry, True

    async def _pipelined(
        self, proto: ClientProtocol, hop: Hop, mail: bytes, rcpt_lines: list[bytes], with_data: bool = True
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """MAIL, the RCPTs and DATA (unless not with_data: BDAT follows
        later) in one write (RFC 2920): their replies."""
        n = len(rcpt_lines)
        proto.stage = "MAIL FROM"
        stages = ["MAIL FROM"] + ["RCPT TO"] * n + ["DATA"] * with_data
        timeouts = [self.t.mail] + [self.t.rcpt] * n + [self.t.data_init] * with_data
        group = proto.expect_group(list(zip(stages, timeouts)))
        proto.send(mail, *rcpt_lines, *[b"DATA"] * with_data)
        # Wait for the whole group: every waiter ends (reply, timeout or
        # lost connection), so no failure is left unhandled.
        outcome = await group
        replies: list[Reply] = []
        for (ok, value), st in zip(outcome, stages):
            if not ok:
                e = value.value
                if not isinstance(e, ConversationError):
                    value.raiseException()
                raise down(hop, e)
            _check421(value, hop, st)
            replies.append(value)
        if not with_data:
            return replies[0], replies[1:], None
        return replies[0], replies[1:-1], replies[-1]

    async def _lockstep(
        self, proto: ClientProtocol, hop: Hop, mail: bytes, rcpt_lines: list[bytes]
    ) -> tuple[Reply, list[Reply]]:
        """MAIL, then each RCPT after the reply to the one before."""
        mail_reply = await command(proto, hop, mail, "MAIL FROM", self.t.mail)
        _check421(mail_reply, hop, "MAIL FROM")
        rcpt_replies = []
        if mail_reply.code // 100 == 2:
            for line in rcpt_lines:
                rep = await command(proto, hop, line, "RCPT TO", self.t.rcpt)
                _check421(rep, hop, "RCPT TO")
                rcpt_replies.append(rep)
        return mail_reply, rcpt_replies

    async def _send_data(self, proto: ClientProtocol, hop: Hop, accepted: list[str], results: Results,
                         chunked: bool = False) -> None:
        """The message after a 354, then the reply to its final "."; or
        (chunked) BDAT <size> LAST and the message as it is, then its reply."""
        proto.stage = "message body"
        try:
            if chunked:
                await self._send_chunk(proto)
            elif self.data is not None and self.size <= CHUNK:
                proto.send_small_message(self.data)
            else:
                await proto.send_message(self.out.message, self.t.data_block)
        except ConversationError as e:
            raise down(hop, e, data_started=True)
        proto.stage = "end of DATA"
        try:
            final = await reply(proto.expect("end of DATA", self.t.data_end), hop)
        except Down as d:
            d.data_started = True
            raise
        for r in accepted:
            results[r] = reply_result(final, hop, "end of DATA")
        if final.code == 421:
            raise Down(
                final.status,
                f"host {where(hop)} said: {final.one_line} (in reply to end of DATA command)",
                reply=final,
                stage="end of DATA",
                data_started=True,
            )

    async def _send_chunk(self, proto: ClientProtocol) -> None:
        """The whole message as one BDAT LAST chunk (RFC 3030): the command
        and a small message in one write, a big one streamed after it."""
        if proto.lost is not None:
            raise proto.lost
        line = b"BDAT %d LAST\r\n" % self.size
        if self.data is not None and self.size <= CHUNK:
            send_now(proto.transport, line + self.data)
            return
        send_now(proto.transport, line)
        await proto.send_message(self.out.message, self.t.data_block, stuff=False)

    async def _abandon_data(self, proto: ClientProtocol, hop: Hop) -> None:
        """A pipelined DATA got 354 with no recipient accepted: send an empty
        message body so the server is back in command state (RFC 2920)."""
        proto.stage = "end of DATA"
        d = proto.expect("end of DATA", self.t.data_end)
        proto.send(b".")
        await reply(d, hop)


def _sort_recipients(
    batch: list[str], rcpt_replies: list[Reply], hop: Hop, results: Results
) -> tuple[list[str], list[str]]:
    """(accepted, retry) from the replies to RCPT; the refused get their
    result, except a 452 after others were accepted ("too many recipients":
    the next transaction)."""
    accepted: list[str] = []
    rejected: list[tuple[str, Reply]] = []
    for r, rep in zip(batch, rcpt_replies):
        if rep.code // 100 == 2:
            accepted.append(r)
        else:
            rejected.append((r, rep))
    retry: list[str] = []
    for r, rep in rejected:
        if rep.code == 452 and accepted:
            retry.append(r)
        else:
            results[r] = reply_result(rep, hop, "RCPT TO")
    return accepted, retry
