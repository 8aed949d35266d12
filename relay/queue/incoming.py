"""A message being received, until it is complete and durable in queue/.

The SMTP server, the pickup and the DSNs the queue makes all write a new
message through an IncomingMessage: held in memory while small, or in a
file in incoming/, then written, fdatasynced and renamed into queue/ by
``finish()`` (blocking: run it in a thread, see relay.queue.diskio).
"""

from __future__ import annotations

import errno
import io
import os
from typing import BinaryIO, Callable

from relay.common.fileio import DurableFile, write_all
from relay.queue.envelope import Envelope
from relay.queue.layout import TMP_SUFFIX

MEMORY_LIMIT = 64 * 1024  # a message up to this size is held in memory until finish()
COPY_CHUNK = 1 << 20  # bytes per copy_file_range / sendfile call

Sign = Callable[[BinaryIO, int], bytes]  # (the message file, its offset) -> header lines to prepend


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """src's bytes [start, end) appended to dst at its position, in the
    kernel (copy_file_range, else sendfile, else reads of COPY_CHUNK)."""
    pos = start
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            try:
                done = os.sendfile(dst, src, pos, n)
            except OSError:
                chunk = os.pread(src, n, pos)
                write_all(dst, chunk)
                done = len(chunk)
        if done <= 0:
            raise OSError(errno.EIO, "the message file ended early", pos)
        pos += done


class IncomingMessage:
    """A message being received; blocking methods.

    Two ways to hold it until ``finish()`` (run it in a thread):

    * in memory (``in_memory=True``, what the SMTP server asks for): the
      bytes are kept in a list until they pass MEMORY_LIMIT; ``finish()``
      then creates the file in incoming/, writes it in one call, fsyncs and
      renames it into queue/, and keeps the bytes (``data``) so that the
      first delivery attempt need not read the file back.  A bigger message
      moves to a file as soon as it passes the limit (``spill`` gives an
      empty file made ahead of time, when there is one).
    * in a buffered file in incoming/ from the start (page cache, cheap).

    Either way nothing is in queue/ before the file is complete and fsynced;
    the caller then fsyncs the queue directory (see diskio.QueueDirSync,
    which groups them).
    """

    def __init__(self, incoming_dir: str, queue_dir: str, envelope: Envelope,
                 prepared: tuple[str, int] | None = None, *, in_memory: bool = False,
                 spill: Callable[[], tuple[str, int] | None] | None = None):
        self.incoming_dir = incoming_dir
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.final_path = os.path.join(queue_dir, self.queue_id)
        self.header = envelope.to_line()
        self.size = 0
        self.closed = False
        self.data: bytes | None = None  # after finish(): the message, when it was held in memory
        self.tmp_path: str | None = None
        self._file: DurableFile | None = None
        self._spill = spill
        # set by diskio.AsyncSpool: runs abort's file work in the disk pool
        self.defer_io: Callable[[Callable[[], None]], None] | None = None
        if in_memory:
            self._chunks: list[bytes] | None = [self.header]
            self._held = len(self.header)
            return
        self._chunks = None
        f = self._open(prepared)
        try:
            f.write(self.header)
        except BaseException:
            self.abort()
            raise

    def _open(self, prepared: tuple[str, int] | None) -> DurableFile:
        if prepared is not None:
            # a file created ahead of time off the reactor (diskio.IncomingStock)
            self.tmp_path, fd = prepared
            f = DurableFile(self.tmp_path, fd=fd, buffering=64 * 1024)
        else:
            self.tmp_path = os.path.join(self.incoming_dir, self.queue_id + TMP_SUFFIX)
            f = DurableFile(self.tmp_path, buffering=64 * 1024)
        self._file = f
        return f

    def _opened(self) -> DurableFile:
        f = self._file
        if f is None:  # aborted while it was held in memory
            raise OSError(errno.EBADF, "message was aborted", self.queue_id)
        return f

    def write(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is not None:
            chunks.append(data)
            self.size += len(data)
            self._held += len(data)
            if self._held > MEMORY_LIMIT:
                self._to_file()
            return
        self._opened().write(data)
        self.size += len(data)

    def _to_file(self) -> None:
        """Too big for memory: on to a file in incoming/."""
        chunks, self._chunks = self._chunks or [], None
        try:
            f = self._open(self._spill() if self._spill is not None else None)
            f.write(b"".join(chunks))
        except BaseException:
            self.abort()
            raise

    def finish(self, sign: Sign | None = None) -> str:
        """Blocking: write, fdatasync, rename into queue/ (no dir fsync: the
        caller's, grouped).

        sign(file, offset): header lines to put first in the message (after
        the envelope line), made from the message as written from offset
        (b"": none).  A spilled message is then written again as envelope,
        those lines and a kernel-side copy of the rest (bounded memory)."""
        if self.closed:
            raise OSError(errno.EBADF, "message was aborted", self.queue_id)
        if self._chunks is not None:
            return self._finish_memory(self._chunks, sign)
        f = self._opened()
        self.closed = True
        try:
            if sign is not None:
                f.flush()
                assert self.tmp_path is not None
                with open(self.tmp_path, "rb", buffering=0) as r:
                    added = sign(r, len(self.header))
                    if added:
                        f = self._rewrite(f, r.fileno(), added)
            f.commit(self.final_path, datasync=True, sync_dir=False)
        except BaseException:
            f.abort()
            raise
        finally:
            self.tmp_path = None  # renamed, or removed by the failed commit
        return self.queue_id

    def _rewrite(self, old: DurableFile, src: int, added: bytes) -> DurableFile:
        """A new file: envelope, added, then old's message (read from src,
        old's file opened for reading) copied by the kernel; old removed."""
        new = DurableFile(os.path.join(self.incoming_dir, self.queue_id + ".s" + TMP_SUFFIX))
        try:
            new.write(self.header + added)
            copy_range(src, new.fd, len(self.header), len(self.header) + self.size)
        except BaseException:
            new.abort()
            raise
        old.abort()
        self.size += len(added)
        return new

    def _finish_memory(self, chunks: list[bytes], sign: Sign | None = None) -> str:
        blob = b"".join(chunks)
        self._chunks = None
        self.closed = True
        if sign is not None:
            added = sign(io.BytesIO(blob), len(self.header))
            if added:
                blob = self.header + added + blob[len(self.header):]
                self.size += len(added)
        f = DurableFile(os.path.join(self.incoming_dir, self.queue_id + TMP_SUFFIX))
        try:
            f.write(blob)
        except BaseException:
            f.abort()
            raise
        f.commit(self.final_path, datasync=True, sync_dir=False)
        self.data = blob[len(self.header):]
        return self.queue_id

    def abort(self, here: bool = False) -> None:
        """Drop the message.  here=True: do the file work in this thread;
        otherwise it may be handed to the disk pool (defer_io), as the
        reactor must not wait for it."""
        self._chunks = None
        self.tmp_path = None
        if self.closed:
            return
        self.closed = True
        f = self._file
        if f is None:
            return  # held in memory only: nothing on disk
        if self.defer_io is not None and not here:
            # a rejected big message, from the reactor: closing flushes up to
            # 64 KiB and the unlink may wait for the journal, so in a thread
            self.defer_io(f.abort)
        else:
            f.abort()

