"""Opening an outbound session: greeting, EHLO/HELO, STARTTLS, AUTH.

``open_session`` takes a fresh connection to the point where transactions
may start and returns the server's EHLO extensions, or raises HopFailed
(this hop cannot take the mail now).  STARTTLS follows the TLS mode of the
relay.outbound.request.TLSPolicy; AUTH is never sent over plaintext.  What it
learns about TLS goes into the DeliveryReport (``tls``, and ``attempts``
for a STARTTLS refused under "may").

DANE ("dane", "dane-only"; RFC 7672): ``hop_tls`` turns the policy into the
mode of one hop: "dane" with the hop's usable TLSA records (TLS required,
the certificate authenticated by DANE alone, never a plaintext retry),
"may" for a hop without records under "dane", or a deferral of the hop
(4.7.5) under "dane-only" or when the hop's TLSA look-up failed.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.logger import Logger

from relay.common.tls import session_info
from relay.outbound.clientproto import ClientProtocol
from relay.outbound.conversation import Down, HopFailed, command, reply, where
from relay.outbound.dane import Tlsa
from relay.outbound.replies import ConversationError, DeliveryReport, Reply, extensions
from relay.outbound.request import DANE_MODES, Hop, Outbound
from relay.outbound.tls import OutboundTLS

# the client's log lines keep the namespace they always had
log = Logger(namespace="relay.smtp.client")


async def open_session(
    proto: ClientProtocol, hop: Hop, out: Outbound, report: DeliveryReport, plaintext_only: bool
) -> dict[str, str]:
    """Greeting, EHLO, STARTTLS (and EHLO again), AUTH: the extensions."""
    try:
        greeting = await reply(proto.expect("greeting", out.timeouts.greeting), hop)
        if greeting.code // 100 != 2:
            raise HopFailed(
                greeting.status,
                f"host {where(hop)} refused to talk to me: {greeting.one_line}",
                reply=greeting,
                stage="greeting",
            )
        ext = await hello(proto, hop, out)
        tls = await starttls(proto, hop, out, report, ext, plaintext_only)
        if tls is not None:
            ext = await hello(proto, hop, out)
        await authenticate(proto, hop, out, report, ext)
    except Down as d:
        raise d.hop_failed()
    return ext


async def hello(proto: ClientProtocol, hop: Hop, out: Outbound) -> dict[str, str]:
    """EHLO, or HELO after a 5xx to EHLO: the extensions ({} after HELO)."""
    t = out.timeouts.helo
    helo = out.helo.encode("idna") if not out.helo.isascii() else out.helo.encode()
    r = await command(proto, hop, b"EHLO " + helo, "EHLO", t)
    if r.code // 100 == 2:
        return extensions(r)
    if r.code // 100 == 5:
        r2 = await command(proto, hop, b"HELO " + helo, "HELO", t)
        if r2.code // 100 == 2:
            return {}
        r = r2
        stage = "HELO"
    else:
        stage = "EHLO"
    raise HopFailed(
        r.status,
        f"host {where(hop)} refused to talk to me: {r.one_line} (in reply to {stage} command)",
        reply=r,
        stage=stage,
    )


async def starttls(
    proto: ClientProtocol, hop: Hop, out: Outbound, report: DeliveryReport, ext: dict[str, str], plaintext_only: bool
) -> dict[str, Any] | None:
    """STARTTLS as the TLS mode wants it: the session's TLS facts, or None
    (no TLS, and the mode allows that)."""
    mode, tlsa = hop_tls(out, hop)
    if mode == "none" or (plaintext_only and mode != "dane"):
        return None
    w = where(hop)
    if "STARTTLS" not in ext:
        if mode == "may":
            return None
        raise HopFailed("4.7.4", f"{_dane_prefix(mode, hop)}TLS is required, but was not offered by host {w}",
                        stage="STARTTLS")
    proto.stage = "STARTTLS"
    d = proto.expect("STARTTLS", out.timeouts.starttls, tls_boundary=True)
    proto.send(b"STARTTLS")
    r = await reply(d, hop)
    if r.code != 220:
        proto.resume_plaintext()
        _refused(hop, out, report, r, mode)  # raises unless the mode is "may"
        return None
    if proto.discarded:
        log.warn(
            "{queue_id}: {hop}: discarded {n} bytes the server sent after its reply to STARTTLS"
            " (response injection?)",
            queue_id=out.log_id,
            hop=str(hop),
            n=proto.discarded,
        )
    info = await _tls_handshake(proto, hop, out, mode, tlsa)
    report.tls = info
    return info


def hop_tls(out: Outbound, hop: Hop) -> tuple[str, tuple[Tlsa, ...]]:
    """The TLS mode of this hop and its TLSA records (see the module doc);
    raises HopFailed when DANE forbids trying the hop."""
    tls = out.tls
    if tls.mode not in DANE_MODES:
        return tls.mode, ()
    host = hop.host.rstrip(".").lower()
    error = tls.tlsa_errors.get(host)
    if error:
        raise HopFailed("4.7.5", f"{error}; not delivering to {host} without DANE", stage="TLSA")
    records = tuple(tls.tlsa.get(host, ()))
    if records:
        return "dane", records
    if tls.mode == "dane-only":
        raise HopFailed(
            "4.7.5",
            f"DANE is required (dane-only), but {host} has no usable DNSSEC-validated TLSA records "
            f"(_{hop.port}._tcp.{host})",
            stage="TLSA",
        )
    return "may", ()


def _dane_prefix(mode: str, hop: Hop) -> str:
    return f"DANE (TLSA records of _{hop.port}._tcp.{hop.host}): " if mode == "dane" else ""


def _refused(hop: Hop, out: Outbound, report: DeliveryReport, r: Reply, mode: str) -> None:
    """A reply other than 220 to STARTTLS: on in plaintext ("may"), or this
    hop failed."""
    w = where(hop)
    if mode == "may":
        log.info(
            "{queue_id}: {hop}: STARTTLS refused ({reply}); continuing in plaintext",
            queue_id=out.log_id,
            hop=str(hop),
            reply=r.one_line,
        )
        report.attempts.append((hop, f"host {w} refused STARTTLS: {r.one_line}; continued in plaintext"))
        return
    raise HopFailed(
        "4.7.4", f"{_dane_prefix(mode, hop)}TLS is required, but host {w} refused to start TLS: {r.one_line}",
        reply=r, stage="STARTTLS",
    )


def _creator(hop: Hop, out: Outbound, mode: str, tlsa: tuple[Tlsa, ...]) -> OutboundTLS:
    """The TLS connection creator for this hop; with DANE records, the DANE
    reference identifiers are the hop's name then the policy's names."""
    name = out.tls.hostname or hop.host
    if mode != "dane":
        return OutboundTLS(name, enforce=(mode == "verify"), trust_root=out.tls.trust_root)
    return OutboundTLS(name, enforce=False, trust_root=out.tls.trust_root, tlsa=tlsa,
                       dane_names=(name, *out.tls.dane_names), tlsa_owner=f"_{hop.port}._tcp.{hop.host}")


async def _tls_handshake(
    proto: ClientProtocol, hop: Hop, out: Outbound, mode: str, tlsa: tuple[Tlsa, ...]
) -> dict[str, Any]:
    """The handshake after a 220 to STARTTLS: the session's TLS facts."""
    w = where(hop)
    creator = _creator(hop, out, mode, tlsa)
    name = creator.hostname
    proto.stage = "TLS handshake"
    try:
        await proto.start_tls(creator, out.timeouts.starttls)
    except ConversationError as e:
        problem = creator.problem() if mode in ("verify", "dane") else None
        detail = problem or e.detail or e.kind
        if e.kind == "timeout":
            detail = "timed out"
        if mode == "may":
            raise HopFailed(
                "4.7.5",
                f"Cannot start TLS with {w}: handshake failed ({detail}); trying plaintext",
                stage="TLS handshake",
                plaintext_retry=True,
            )
        if problem:
            raise HopFailed("4.7.5", f"Server certificate not verified: {w}: {problem}", stage="TLS handshake")
        raise HopFailed("4.7.5", f"{_dane_prefix(mode, hop)}Cannot start TLS with {w}: handshake failed ({detail})",
                        stage="TLS handshake")
    if mode == "dane" and not creator.dane_ok:  # the callback never saw the leaf: never go on
        raise HopFailed("4.7.5", f"Server certificate not verified: {w}: DANE: no certificate was checked against "
                        f"the TLSA records of {creator.tlsa_owner}", stage="TLS handshake")
    info = dict(session_info(proto.transport) or {})
    info.update(
        hostname=name,
        trusted=creator.trusted or creator.dane_ok,
        verified=creator.verified or creator.dane_ok,
        problem=creator.problem(),
        mode=mode,
        discarded=proto.discarded,
    )
    if creator.dane_ok and creator.dane_result is not None and creator.dane_result.record is not None:
        info.update(dane=True, tlsa=creator.dane_result.record.short())
    kind = "Verified" if info["verified"] else "Trusted" if info["trusted"] else "Untrusted"
    log.info(
        "{queue_id}: {kind} TLS connection established to {hop}: {version} with cipher {cipher} ({bits} bits)",
        queue_id=out.log_id,
        kind=kind,
        hop=str(hop),
        version=info.get("version"),
        cipher=info.get("cipher"),
        bits=info.get("bits"),
    )
    if info.get("dane"):
        log.info("{queue_id}: {hop}: DANE authenticated by the TLSA record {tlsa} of {owner}", queue_id=out.log_id,
                 hop=str(hop), tlsa=info["tlsa"], owner=creator.tlsa_owner)
    return info


async def authenticate(
    proto: ClientProtocol, hop: Hop, out: Outbound, report: DeliveryReport, ext: dict[str, str]
) -> None:
    """AUTH PLAIN or LOGIN with the credentials, over TLS only."""
    if not out.auth:
        return
    w = where(hop)
    if report.tls is None:
        raise HopFailed(
            "4.7.0",
            f"not sending AUTH to {w} over a plaintext connection (TLS was not established); "
            "authentication credentials are only sent over TLS",
            stage="AUTH",
        )
    mechs = ext.get("AUTH", "").upper().split()
    if "AUTH" not in ext:
        return  # Postfix: no AUTH offered, send without authenticating
    t = out.timeouts.auth
    user, password = out.auth
    if "PLAIN" in mechs:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        r = await command(proto, hop, b"AUTH PLAIN " + token, "AUTH", t)
        if r.code == 334:  # server ignored the initial response
            r = await command(proto, hop, token, "AUTH", t)
    elif "LOGIN" in mechs:
        r = await command(proto, hop, b"AUTH LOGIN", "AUTH", t)
        if r.code == 334:
            r = await command(proto, hop, base64.b64encode(user.encode()), "AUTH", t)
        if r.code == 334:
            r = await command(proto, hop, base64.b64encode(password.encode()), "AUTH", t)
    else:
        raise HopFailed(
            "4.7.0",
            f"cannot authenticate to {w}: no supported mechanism (offered: {' '.join(mechs) or 'none'})",
            stage="AUTH",
        )
    if r.code // 100 != 2:
        if r.code == 334:  # a server wanting more than we have: cancel
            proto.send(b"*")
        raise HopFailed(
            "4.7.8" if r.code // 100 == 5 else r.status,
            f"SASL authentication failed; server {w} said: {r.one_line}",
            reply=r,
            stage="AUTH",
        )
