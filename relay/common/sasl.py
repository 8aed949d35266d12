"""SASL PLAIN (RFC 4616) decoding, one for the SMTP server and POP3.

Pure: no I/O, no Twisted.  The protocols keep their own replies (their
wording is part of each protocol's contract); what a response means is
decided here, once.

The authorization identity rule: an authzid is accepted when it is empty
or names the same user as the authcid, compared as user names are
everywhere in the relay (surrounding white space ignored, case folded:
``relay.mailbox.users.normalize_user`` lower-cases local part and domain).  Acting
as another user is not supported: any other authzid is a failed login like
a wrong password.  (Before, SMTP compared the octets exactly and POP3 case
insensitively, so one login could pass on one and fail on the other.)
"""

from __future__ import annotations

import binascii
from typing import NamedTuple

from relay.common.address import login_key


class Base64Error(ValueError):
    """The response is not base64."""


class PlainFormatError(ValueError):
    """The decoded response is not authzid NUL authcid NUL password."""


class PlainResponse(NamedTuple):
    authzid: bytes
    authcid: bytes
    password: bytes

    @property
    def user(self) -> str:
        """The authentication identity, as the login checks it."""
        return self.authcid.decode("utf-8", "replace")

    @property
    def authzid_allowed(self) -> bool:
        """Empty, or the authcid's user (see the module's rule)."""
        return not self.authzid or same_user(self.authzid, self.authcid)


def same_user(a: bytes, b: bytes) -> bool:
    """One user in two spellings (a UTF-8 name: NFC, U-labels or A-labels; address.login_key)."""
    return login_key(a.decode("utf-8", "replace")) == login_key(b.decode("utf-8", "replace"))


def decode_base64(data: bytes | str) -> bytes:
    """A SASL response line: strict base64, ``=`` (or nothing) for an empty one."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError:
            raise Base64Error("not base64")
    if data in (b"", b"="):
        return b""
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise Base64Error(str(e))


def split_plain(raw: bytes) -> PlainResponse:
    fields = raw.split(b"\x00")
    if len(fields) != 3:
        raise PlainFormatError("not authzid NUL authcid NUL password")
    return PlainResponse(*fields)


def decode_plain(data: bytes | str) -> PlainResponse:
    """A base64 PLAIN response; Base64Error or PlainFormatError says what is wrong."""
    return split_plain(decode_base64(data))
