"""POP3's TRANSACTION state: the listing, RETR and TOP, the marks, QUIT's deletion.

A mixin of relay.mailbox.pop3protocol.POP3Server (the state it uses is
declared in relay.mailbox.pop3session.Connection).  Why it works so:

* Messages up to INLINE_MAX octets are read and rendered on the reactor (a
  page-cache read of a few KB costs less than a thread hop); larger ones
  are opened in the disk pool and streamed (relay.mailbox.pop3message.Streamer).
* While the client reads a reply (``_while_client_reads``), the next message
  is read ahead and rendered, and up to SEEN_INLINE retrieved messages are
  renamed new/ -> cur/ (metadata only, no fsync); a burst of more than
  SEEN_BATCH goes to the disk pool.
* DELE only marks; files are removed only when QUIT arrives in this state,
  after the renames still in flight (no rename after an unlink), and the
  mailbox lock goes only once those are done.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.mailbox import maildir
from relay.mailbox.pop3message import Streamer, render
from relay.mailbox.pop3session import Connection, Session, cmd_error, no_args

log = Logger(namespace="relay.pop3")

INLINE_MAX = 64 * 1024  # messages up to this size are read on the reactor
SEEN_BATCH = 256  # more retrieved messages than this waiting: move them in a thread
SEEN_INLINE = 4  # moved to cur/ on the reactor after each batch of replies

_NUMBER = re.compile(rb"[0-9]{1,10}\Z")


def _mark_seen(path: str, batch: list[maildir.Message]) -> None:
    """Move retrieved messages to cur/ with the S flag (blocking: renames)."""
    for m in batch:
        try:
            maildir.mark_seen(path, m)
        except OSError as e:
            log.warn("pop3: cannot mark {path} as seen: {err}", path=m.path, err=str(e))  # noqa: G010


class TransactionCommands(Connection):
    """STAT, LIST, UIDL, DELE, RSET, RETR, TOP and the QUIT that deletes."""

    _streamer: Streamer | None  # the large message being sent
    _quitting: defer.Deferred[Any] | None  # QUIT's deletion, under way
    _prefetched: tuple[int, bytes] | None  # (index, RETR reply) read ahead

    def _while_client_reads(self) -> None:
        """Read ahead the message a client fetching in order will ask for
        next; mark a few retrieved ones seen."""
        s = self.session
        if s is not None and s.next_read is not None:
            i, s.next_read = s.next_read, None
            if i < len(s.msgs) and i not in s.deleted and s.msgs[i].size <= INLINE_MAX:
                m = s.msgs[i]
                try:
                    data = maildir.read_message(s.path, m, INLINE_MAX + 1)
                except OSError:
                    return  # RETR will read again and say what is wrong
                if len(data) <= INLINE_MAX:
                    self._prefetched = (i, b"+OK %d octets\r\n" % m.size + render(data, None))
        if s is not None and s.seen_queue and s.seen_job is None:
            # While the client reads the reply: a rename or two (no fsync; a
            # metadata update of microseconds) costs less here than handing
            # them to a thread, whose GIL contention would slow this loop.
            batch, s.seen_queue = s.seen_queue[:SEEN_INLINE], s.seen_queue[SEEN_INLINE:]
            _mark_seen(s.path, batch)

    def _current(self) -> Session:
        """The logged-in session (the TRANSACTION commands run only with one)."""
        s = self.session
        assert s is not None
        return s

    def _msg(self, arg: bytes, allow_deleted: bool = False) -> tuple[int, maildir.Message]:
        s = self._current()
        if not (arg.isdigit() and len(arg) <= 10):
            arg = arg.strip(b" ")
            if not _NUMBER.match(arg):
                raise cmd_error("Invalid message number", bad=True)
        n = int(arg)
        if not 1 <= n <= len(s.msgs):
            raise cmd_error(f"No such message {n}")
        i = n - 1
        if i in s.deleted and not allow_deleted:
            raise cmd_error(f"Message {n} is deleted")
        return i, s.msgs[i]

    def do_STAT(self, arg: bytes) -> None:
        no_args(arg, "STAT")
        n, size = self._current().stat()
        self._write(b"+OK %d %d\r\n" % (n, size))

    def do_LIST(self, arg: bytes) -> None:
        s = self._current()
        if arg.strip(b" "):
            i, m = self._msg(arg)
            self._write(b"+OK %d %d\r\n" % (i + 1, m.size))
            return
        n, size = s.stat()
        lines = [b"+OK %d messages (%d octets)" % (n, size)]
        lines += [b"%d %d" % (i + 1, m.size) for i, m in enumerate(s.msgs) if i not in s.deleted]
        lines.append(b".\r\n")
        self._write(b"\r\n".join(lines))

    def do_UIDL(self, arg: bytes) -> None:
        s = self._current()
        if arg.strip(b" "):
            i, m = self._msg(arg)
            self._write(b"+OK %d %s\r\n" % (i + 1, m.uid.encode("ascii")))
            return
        lines = [b"+OK Unique-ID listing follows"]
        lines += [b"%d %s" % (i + 1, m.uid.encode("ascii")) for i, m in enumerate(s.msgs)
                  if i not in s.deleted]
        lines.append(b".\r\n")
        self._write(b"\r\n".join(lines))

    def do_DELE(self, arg: bytes) -> None:
        i, _ = self._msg(arg)
        self._current().deleted.add(i)
        self._write(b"+OK Message %d marked for deletion\r\n" % (i + 1))

    def do_RSET(self, arg: bytes) -> None:
        no_args(arg, "RSET")
        s = self._current()
        s.deleted.clear()
        n, size = s.stat()
        self._write(b"+OK Maildrop has %d messages (%d octets)\r\n" % (n, size))

    def do_RETR(self, arg: bytes):
        i, m = self._msg(arg)
        return self._send(i, m, None)

    def do_TOP(self, arg: bytes):
        parts = arg.split()
        if len(parts) != 2 or not _NUMBER.match(parts[1]):
            raise cmd_error("Syntax: TOP <message> <lines>", bad=True)
        i, m = self._msg(parts[0])
        return self._send(i, m, int(parts[1]))

    def _send(self, i: int, m: maildir.Message, top: int | None):
        s = self._current()
        head = b"+OK %d octets\r\n" % m.size if top is None else b"+OK Top of message follows\r\n"
        if m.size <= INLINE_MAX:
            pre, self._prefetched = self._prefetched, None
            if top is None:
                s.next_read = i + 1
                if pre is not None and pre[0] == i:
                    self._write(pre[1])
                    self._retrieved(m, top)
                    return None
            try:
                data = maildir.read_message(s.path, m, INLINE_MAX + 1)
            except FileNotFoundError:
                raise cmd_error(f"[SYS/PERM] Message {i + 1} was removed by another program")
            except OSError as e:
                log.error("pop3: cannot read {path}: {err}", path=m.path, err=str(e))
                raise cmd_error(f"[SYS/TEMP] Cannot read message {i + 1}")
            if len(data) <= INLINE_MAX:  # else it grew since the listing: stream it
                self._write(head + render(data, top))
                self._retrieved(m, top)
                return None
        return self._stream(i, m, top, head)

    def _stream(self, i: int, m: maildir.Message, top: int | None, head: bytes) -> defer.Deferred:
        s = self._current()
        d = self.factory.run_blocking(maildir.open_message, s.path, m)

        def opened(fobj):
            if self._lost:
                self.factory.run_blocking(fobj.close)
                return None
            self._write(head)
            self._streamer = Streamer(fobj, top, run_blocking=self.factory.run_blocking,
                                      write=self.transport.write, touch=self._touch, abort=self._abort)
            if self._out_paused:
                self._streamer.pause()
            return self._streamer.start().addCallback(sent)

        def sent(_):
            self._streamer = None
            if not self._lost:
                self._retrieved(m, top)

        def failed(f: Failure):
            if f.check(FileNotFoundError):
                self._write(b"-ERR [SYS/PERM] Message %d was removed by another program\r\n" % (i + 1))
            else:
                log.failure("pop3: cannot open {path}", f, path=m.path)
                self._write(b"-ERR [SYS/TEMP] Cannot read message %d\r\n" % (i + 1))

        return d.addCallbacks(opened, failed)

    def _retrieved(self, m: maildir.Message, top: int | None) -> None:
        if top is not None:
            return  # TOP is a peek: the message stays unread
        s = self.session
        if s is None:
            return
        s.retrieved += 1
        if not m.seen and not m.queued:
            m.queued = True
            s.seen_queue.append(m)
            if s.seen_job is None and len(s.seen_queue) >= SEEN_BATCH:
                self._run_seen(s)  # a pipelined burst: move them in a thread

    def _run_seen(self, s: Session) -> None:
        """Move retrieved messages to cur/ with the S flag, in a thread, in batches."""
        batch, s.seen_queue = s.seen_queue, []

        def done(_):
            if s.seen_queue:
                self._run_seen(s)
            else:
                job, s.seen_job = s.seen_job, None
                job.callback(None)

        s.seen_job = s.seen_job or defer.Deferred()
        self.factory.run_blocking(_mark_seen, s.path, batch).addErrback(
            lambda f: log.failure("pop3: marking messages seen failed", f)
        ).addBoth(done)

    def _seen_idle(self, s: Session) -> defer.Deferred:
        """Start moving what is still queued; fire when nothing is in flight."""
        if s.seen_job is None and s.seen_queue:
            self._run_seen(s)
        if s.seen_job is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        s.seen_job.addBoth(fire)
        return d

    def _quit(self) -> defer.Deferred:
        s = self.session
        assert s is not None
        doomed = [m for i, m in enumerate(s.msgs) if i in s.deleted]
        gone = {id(m) for m in doomed}
        s.seen_queue = [m for m in s.seen_queue if id(m) not in gone]  # no rename before unlink
        self._quitting = d = self._seen_idle(s)
        d.addCallback(lambda _: self.factory.run_blocking(maildir.delete, s.path, doomed) if doomed else 0)

        def done(failed: int):
            self.session = None
            self._end_session(s, deleted=len(doomed) - failed, reason="QUIT")
            host = self.factory.hostname.replace("\r", "").replace("\n", "")
            if failed:
                self._write(b"-ERR [SYS/TEMP] %d of the deleted messages could not be removed\r\n" % failed)
            else:
                self._write(
                    f"+OK {host} POP3 server signing off ({len(doomed)} messages deleted)\r\n".encode(
                        "utf-8", "replace")
                )
            self._close()

        def error(f: Failure):
            log.failure("pop3: deleting messages of {user} failed", f, user=s.user)
            self.session = None
            self._end_session(s, deleted=0, reason="QUIT (delete failed)")
            self._write(b"-ERR [SYS/TEMP] Deleted messages could not be removed\r\n")
            self._close()

        d.addCallbacks(done, error)
        self._closing = True  # nothing after QUIT is read
        return d

    def _end_session(self, s: Session, deleted: int, reason: str) -> None:
        self.factory.logged_in -= 1
        log.info("pop3: logout client={client} user={user} retrieved={retrieved} "
                 "deleted={deleted} reason={reason}", client=self.peer, user=s.user,
                 retrieved=s.retrieved, deleted=deleted, reason=reason)
        # Renames to cur/ still running in a thread finish before the lock goes.
        self._seen_idle(s).addBoth(lambda _: s.lock.release())
