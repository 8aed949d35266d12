"""SMTPUTF8 on the way out (RFC 6531 section 3.2/3.4): what a message needs.

A message received with SMTPUTF8 (``Outbound.smtputf8``, the envelope's
flag) goes with ``MAIL FROM:<...> SMTPUTF8`` to a next hop that offers it.
To a hop that does not, it goes as any other message when it does not
*need* the extension: every envelope address is ASCII once its domain is in
A-labels, and the header block is ASCII (a UTF-8 body alone is 8BITMIME's
business, not SMTPUTF8's).  Otherwise the recipients that need it fail on
this hop with 5.6.7 (relay.outbound.transactions; relay.outbound.client
tries the other hops first, as Postfix does).

The header block is read from the spool file in the disk thread pool, in
bounded chunks, never on the reactor (``header_block_utf8``).  Here too:
the addresses as they go on the wire (``wire_address``: a U-label domain
in A-labels) and the ORCPT forms of RFC 6533 section 3 (``wire_orcpt``).
"""

from __future__ import annotations

from relay.common.address import AddressError, normalize_domain

SCAN_CHUNK = 64 * 1024


def wire_address(address: str) -> str:
    """The address as sent: its domain in A-labels (stored addresses are
    already; a caller's U-label domain is converted), the local part as is.
    An address whose domain cannot be converted is left as it is (it then
    needs SMTPUTF8, which is the honest answer)."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or domain.startswith("["):
        return address
    try:
        return f"{local}@{normalize_domain(domain)}"
    except AddressError:
        return address


def header_block_utf8(path: str, offset: int, size: int) -> bool:
    """Whether the message's header block (up to the first empty line, or
    the whole message when there is none) holds a byte over 127.  Blocking:
    run in a thread; reads SCAN_CHUNK bytes at a time, so memory is flat
    whatever the header size."""
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        tail = b"\r\n"  # the message start counts as a line start (an empty first line: no headers)
        while left > 0:
            chunk = f.read(min(SCAN_CHUNK, left))
            if not chunk:
                return False
            left -= len(chunk)
            seen = tail + chunk
            end = seen.find(b"\r\n\r\n")
            if end >= 0:
                return not seen[:end].isascii()
            if not chunk.isascii():
                return True
            tail = seen[-3:]
    return False


def header_utf8_in_memory(data: bytes) -> bool:
    """header_block_utf8 for a message held in memory."""
    seen = b"\r\n" + data
    end = seen.find(b"\r\n\r\n")
    return not (seen[:end] if end >= 0 else seen).isascii()


def _qchar(c: str) -> bool:
    return "!" <= c <= "~" and c not in "+=\\"


def unitext(address: str) -> str:
    """RFC 6533 utf-8-addr-unitext: UTF-8 as it is, ASCII that is not QCHAR
    (space, "+", "=", "\\\\", controls) as \\x{HEX}."""
    return "".join(c if (_qchar(c) or ord(c) > 127) else "\\x{%X}" % ord(c) for c in address)


def utf8_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: the 7-bit form, every other character as \\x{HEX}."""
    return "".join(c if _qchar(c) else "\\x{%X}" % ord(c) for c in address)


def wire_orcpt(orcpt: str, utf8_session: bool) -> str:
    """An ORCPT ("type;value") as sent: a ``utf-8`` value holding raw UTF-8
    goes as utf-8-addr-xtext to a session without SMTPUTF8 (RFC 6533
    section 3), the rest as stored."""
    kind, _, value = orcpt.partition(";")
    if kind.lower() != "utf-8" or utf8_session or value.isascii():
        return orcpt
    return f"{kind};" + "".join(c if ord(c) < 128 else "\\x{%X}" % ord(c) for c in value)
