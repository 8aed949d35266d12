"""Opening an outbound session: greeting, EHLO/HELO, STARTTLS, AUTH.

``open_session`` takes a fresh connection to the point where transactions
may start and returns the server's EHLO extensions, or raises HopFailed
(this hop cannot take the mail now).  STARTTLS follows the TLS mode of the
relay.outbound.request.TLSPolicy (``hop_tls``: the level this hop gets); a
required policy that the hop does not meet fails the hop (4.7.x, never a
plaintext retry), worded with the policy that required it (relay.delivery.tlspolicy),
and ``TLSPolicy.observe`` is told; AUTH is never sent over plaintext.  What it
learns about TLS goes into the DeliveryReport (``tls``, and ``attempts``
for a STARTTLS refused under "may").

DANE ("dane", "dane-only"; RFC 7672): ``hop_tls`` turns the policy into the
mode of one hop: "dane" with the hop's usable TLSA records (TLS required,
the certificate authenticated by DANE alone, never a plaintext retry),
"may" for a hop without records under "dane", or a deferral of the hop
(4.7.5) under "dane-only" or when the hop's TLSA look-up failed.  Under
"verify" set by an MTA-STS policy, a hop with usable TLSA records gets
"dane" too: DANE takes precedence over MTA-STS (RFC 8461 section 2).
"""

from __future__ import annotations

import base64
from typing import Any

from cryptography import x509
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


def hop_tls(out: Outbound, hop: Hop) -> tuple[str, tuple[Tlsa, ...]]:
    """The TLS mode of this hop and its TLSA records (see the module doc);
    raises HopFailed when DANE forbids trying the hop."""
    tls = out.tls
    host = hop.host.rstrip(".").lower()
    if tls.mode == "verify" and tls.tlsa.get(host):
        return "dane", tuple(tls.tlsa[host])  # DANE over MTA-STS
    if tls.mode not in DANE_MODES:
        return tls.mode, ()
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


def _observe(out: Outbound, hop: Hop, reason: str, failure: str, enforced: bool = False) -> None:
    """Tell the policy's observer (the metric, an MTA-STS report)."""
    if out.tls.observe is not None:
        out.tls.observe(hop.host, reason, failure, enforced)


def _policy_failed(out: Outbound, hop: Hop, status: str, reason: str, failure: str, old: str,
                   stage: str, reply: Reply | None = None) -> HopFailed:
    """A required policy not met on this hop: observed, and worded with the
    policy when an explicit one required it (``old`` otherwise)."""
    _observe(out, hop, reason, failure, True)
    text = f"{out.tls.required_by}: {failure}" if out.tls.required_by else old
    return HopFailed(status, text, reply=reply, stage=stage)


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
        failure = f"host {w} did not offer STARTTLS"
        if mode == "may":
            if out.tls.would_verify:
                _observe(out, hop, "starttls_not_offered", failure)
            return None
        raise _policy_failed(out, hop, "4.7.4", "starttls_not_offered", failure,
                             f"{_dane_prefix(mode, hop)}TLS is required, but was not offered by host {w}",
                             "STARTTLS")
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


def _refused(hop: Hop, out: Outbound, report: DeliveryReport, r: Reply, mode: str) -> None:
    """A reply other than 220 to STARTTLS: on in plaintext ("may"), or this
    hop failed."""
    w = where(hop)
    failure = f"host {w} refused to start TLS: {r.one_line}"
    if mode == "may":
        if out.tls.would_verify:
            _observe(out, hop, "starttls_refused", failure)
        log.info(
            "{queue_id}: {hop}: STARTTLS refused ({reply}); continuing in plaintext",
            queue_id=out.log_id,
            hop=str(hop),
            reply=r.one_line,
        )
        report.attempts.append((hop, f"host {w} refused STARTTLS: {r.one_line}; continued in plaintext"))
        return
    raise _policy_failed(out, hop, "4.7.4", "starttls_refused", failure,
                         f"{_dane_prefix(mode, hop)}TLS is required, but host {w} refused to start TLS: "
                         f"{r.one_line}", "STARTTLS", r)


def name_matches(pattern: str, name: str) -> bool:
    """Whether a certificate DNS name (maybe "*.domain") is valid for a
    policy's match name ("host" or "*.domain": one leftmost label)."""
    p, n = pattern.rstrip(".").lower(), name.rstrip(".").lower()
    if p == n:
        return True
    if n.startswith("*."):  # a wildcard certificate: a name one label below
        head, _, rest = p.partition(".")
        return bool(head) and head != "*" and rest == n[2:]
    if p.startswith("*."):
        head, _, rest = n.partition(".")
        return bool(head) and rest == p[2:]
    return False


def peer_names(proto: ClientProtocol) -> list[str]:
    """The DNS names in the server certificate's subjectAltName."""
    try:
        transport: Any = proto.transport
        cert = transport.getPeerCertificate()
        san = cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return list(san.get_values_for_type(x509.DNSName))[:20]
    except Exception:  # noqa: BLE001 - no certificate or SAN: no names
        return []


def _certificate_failure(hop: Hop, creator: OutboundTLS, match: tuple[str, ...],
                         names: list[str]) -> tuple[str, str] | None:
    """(reason, what failed) when the certificate is not what "verify"
    wants (a trusted chain, valid for the host name or one of ``match``)."""
    if creator.chain_error:
        return "certificate_untrusted", f"the certificate of {hop.host} is not trusted ({creator.chain_error})"
    if match:
        if not any(name_matches(pattern, n) for pattern in match for n in names):
            return ("certificate_name", f"the certificate of {hop.host} is not valid for the names the policy "
                    f"allows ({', '.join(match)}; it names: {', '.join(names) or 'none'})")
        return None
    if creator.name_error:
        named = creator.name_error.partition(" (it names: ")[2].rstrip(")") or "none"
        return "certificate_name", f"the certificate of {hop.host} is not valid for that name (it names: {named})"
    return None


def _creator(hop: Hop, out: Outbound, mode: str, tlsa: tuple[Tlsa, ...]) -> OutboundTLS:
    """The TLS connection creator for this hop; with DANE records, the DANE
    reference identifiers are the hop's name then the policy's names.  With
    match names the name check is ours, after the handshake."""
    name = out.tls.hostname or hop.host
    if mode != "dane":
        return OutboundTLS(name, enforce=(mode == "verify" and not out.tls.match), trust_root=out.tls.trust_root)
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
        raise _handshake_failed(hop, out, mode, creator, e)
    if mode == "dane" and not creator.dane_ok:  # the callback never saw the leaf: never go on
        raise _policy_failed(out, hop, "4.7.5", "certificate_untrusted",
                             f"DANE: no certificate of {hop.host} was checked against the TLSA records of "
                             f"{creator.tlsa_owner}",
                             f"Server certificate not verified: {w}: DANE: no certificate was checked against "
                             f"the TLSA records of {creator.tlsa_owner}", "TLS handshake")
    checked = mode == "verify" or (out.tls.would_verify and mode != "dane")
    match = out.tls.match if checked else ()
    bad = _certificate_failure(hop, creator, match, peer_names(proto) if match else []) if checked else None
    if bad is not None and mode == "verify":
        raise _policy_failed(out, hop, "4.7.5", bad[0], bad[1],
                             f"Server certificate not verified: {w}: {bad[1]}", "TLS handshake")
    if bad is not None:
        _observe(out, hop, *bad)
    info = dict(session_info(proto.transport) or {})
    verified = (creator.verified if not match else bad is None) or creator.dane_ok
    trusted = creator.trusted or creator.dane_ok
    info.update(
        hostname=name,
        trusted=trusted,
        verified=verified,
        problem=creator.problem() if bad is None else bad[1],
        mode=mode,
        discarded=proto.discarded,
    )
    if creator.dane_ok and creator.dane_result is not None and creator.dane_result.record is not None:
        info.update(dane=True, tlsa=creator.dane_result.record.short())
    kind = "Verified" if verified else "Trusted" if trusted else "Untrusted"
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


def _handshake_failed(hop: Hop, out: Outbound, mode: str, creator: OutboundTLS, e: ConversationError) -> HopFailed:
    """The HopFailed for a handshake that did not complete."""
    w = where(hop)
    # with match names the chain and names are checked after the handshake, not in it
    problem = creator.problem() if (mode == "verify" and not out.tls.match) or mode == "dane" else None
    detail = problem or e.detail or e.kind
    if e.kind == "timeout":
        detail = "timed out"
    if mode == "may":
        if out.tls.would_verify:
            _observe(out, hop, "handshake", f"the TLS handshake with {w} failed ({detail})")
        return HopFailed(
            "4.7.5",
            f"Cannot start TLS with {w}: handshake failed ({detail}); trying plaintext",
            stage="TLS handshake",
            plaintext_retry=True,
        )
    if problem and mode == "dane":
        return _policy_failed(out, hop, "4.7.5", "certificate_untrusted", problem,
                              f"Server certificate not verified: {w}: {problem}", "TLS handshake")
    bad = _certificate_failure(hop, creator, (), []) if problem else None
    if bad is not None:
        return _policy_failed(out, hop, "4.7.5", bad[0], bad[1],
                              f"Server certificate not verified: {w}: {problem}", "TLS handshake")
    return _policy_failed(out, hop, "4.7.5", "handshake", f"the TLS handshake with {w} failed ({detail})",
                          f"{_dane_prefix(mode, hop)}Cannot start TLS with {w}: handshake failed ({detail})",
                          "TLS handshake")


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
