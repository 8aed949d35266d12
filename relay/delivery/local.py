"""Local delivery: one recipient of a local domain into its Maildir.

Aliases were already expanded when the message was queued (relay.intake.aliases,
like Postfix's virtual alias expansion in cleanup), so a local recipient
here is a mailbox: a user in the users file, or postmaster (which always
has a mailbox, so that mail to postmaster is never lost).  A recipient that
is neither (a user deleted since the message was accepted) bounces with
5.1.1.  Blocking: the queue runs it in the disk thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.common.address import AddressError, fold_local, parse_mailbox
from relay.mailbox import maildir
from relay.mailbox.users import check_safe_local_part


@dataclass(frozen=True)
class LocalResult:
    kind: str  # delivered | deferred | bounced
    status: str
    text: str
    path: str = ""


def mailbox_path(root: str, address: str) -> str:
    import os

    local, _, domain = address.rpartition("@")
    return os.path.join(root, domain, fold_local(local))


def deliver(
    *,
    root: str,
    address: str,
    sender: str,
    message_path: str,
    offset: int,
    user_exists,
) -> LocalResult:
    try:
        parsed = parse_mailbox(address, utf8=True)  # queued addresses may be UTF-8 (SMTPUTF8)
        local, domain = fold_local(parsed.local), parsed.domain
        check_safe_local_part(local)
    except AddressError:
        return LocalResult("bounced", "5.1.3", f"550 5.1.3 <{address}>: unsafe mailbox name")
    if not (local == "postmaster" or user_exists(parsed.lower())):
        return LocalResult("bounced", "5.1.1", f"550 5.1.1 <{address}>: no such user")
    ret = sender if sender else ""
    prefix = f"Return-Path: <{ret}>\r\nDelivered-To: {parsed.lower()}\r\n".encode("utf-8")
    try:
        path = maildir.deliver(root, domain, local, message_path, offset, prefix)
    except FileNotFoundError as e:
        if e.filename == message_path:
            raise
        return LocalResult("deferred", "4.3.0", f"451 4.3.0 cannot write to the mailbox: {e}")
    except OSError as e:
        return LocalResult("deferred", "4.3.0", f"451 4.3.0 cannot write to the mailbox: {e.strerror or e}")
    return LocalResult("delivered", "2.0.0", "250 2.0.0 delivered to maildir", path)
