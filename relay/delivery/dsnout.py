"""What a message's DSN request carries to the next hop (RFC 3461 section 6.2).

The outbound client sends it only to a hop that offers DSN
(relay.outbound.transactions).  NOTIFY goes as honoured
(relay.common.dsn.effective_notify: an untrusted client's SUCCESS and DELAY
are not carried either); ORCPT as the client gave it, else the address the
client gave before alias expansion, else the address itself (a UTF-8
one with RFC 6533's ``utf-8`` address type).
"""

from __future__ import annotations

from typing import Any, Sequence

from relay.common import dsn as dsnmod
from relay.outbound.request import DsnParams
from relay.outbound.smtputf8 import unitext


def _default_orcpt(address: str) -> str:
    """The ORCPT of an address the client gave none for: rfc822 for ASCII,
    RFC 6533's utf-8 type (utf-8-addr-unitext) for a UTF-8 one; the
    outbound client writes the 7-bit form to a hop without SMTPUTF8."""
    return dsnmod.rfc822_orcpt(address) if address.isascii() else "utf-8;" + unitext(address)


def carried(env: Any, recipients: Sequence[str]) -> DsnParams | None:
    """The DsnParams of these recipients of an envelope (relay.queue.envelope.Envelope);
    None when there is nothing to carry but each address itself."""
    req = getattr(env, "dsn", None)
    addrs = list(getattr(env, "recipients", ()))
    origs = list(getattr(env, "orcpts", ()))
    if req is None and not any(origs):
        return None
    rcpts: dict[str, tuple[str | None, str]] = {}
    pos = {a: i for i, a in enumerate(addrs)}
    for r in recipients:
        i = pos.get(r, -1)
        notify = req.notify[i] if req is not None and i >= 0 else None
        orcpt = req.orcpt[i] if req is not None and i >= 0 else None
        orig = origs[i] if 0 <= i < len(origs) else None
        limited = req.limited if req is not None else False
        rcpts[r] = (dsnmod.effective_notify(notify, limited), orcpt or _default_orcpt(orig or r))
    return DsnParams(req.ret if req is not None else "", req.envid if req is not None else "", rcpts)
