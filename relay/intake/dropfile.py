"""The drop file's format: written by relay-sendmail (relay/intake/sendmail.py), read
by the pickup (relay/intake/pickup.py).  Its own module so that the daemon does not
import the submission command, nor the command the daemon.

A drop file is one envelope line (``RELAYDROP1 `` and a JSON object: from,
rcpt, t, uid, user, and only when relay-sendmail got -N, -R or -V "dsn":
{"notify", "ret", "envid"}: older drop files, without it, read as before),
then the message: CRLF line endings, headers complete
except the relay's Received header, which the pickup adds.  No Twisted, no
other project module: relay-sendmail imports it at start-up.
"""

from __future__ import annotations

import json

DROP_MAGIC = b"RELAYDROP1 "
DROP_MODE = 0o640  # group-readable: see "Permissions" in the README
MAX_LINE = 998  # octets without CRLF (RFC 5322 2.1.1)
MAX_HOPS = 100  # Received headers: a mail loop (the SMTP server's limit, relay.smtp.transfer.MAX_HOPS)


DSN_KEYS = ("notify", "ret", "envid")


def drop_line(sender: str, recipients: list[str], uid: int, user: str, arrival: float,
              dsn: dict[str, str] | None = None) -> bytes:
    d: dict[str, object] = {"from": sender, "rcpt": recipients, "t": arrival, "uid": uid, "user": user}
    if dsn:
        d["dsn"] = dsn
    return DROP_MAGIC + json.dumps(d, separators=(",", ":")).encode("ascii") + b"\n"


def parse_drop_line(line: bytes) -> dict:
    """The envelope of a drop file; ValueError says what is wrong."""
    if not line.startswith(DROP_MAGIC) or not line.endswith(b"\n"):
        raise ValueError("not a relay-sendmail drop file (no RELAYDROP1 line)")
    try:
        d = json.loads(line[len(DROP_MAGIC):])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"bad envelope line: {e}")
    if not isinstance(d, dict):
        raise ValueError("bad envelope line: not an object")
    rcpt = d.get("rcpt")
    if not isinstance(rcpt, list) or not rcpt or not all(isinstance(r, str) and r for r in rcpt):
        raise ValueError("bad envelope line: no recipient list")
    if not isinstance(d.get("from"), str):
        raise ValueError("bad envelope line: no sender")
    t = d.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t == t) or t in (float("inf"), -float("inf")):
        raise ValueError("bad envelope line: no arrival time")
    uid = d.get("uid")
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
        raise ValueError("bad envelope line: no uid")
    if not isinstance(d.get("user"), str):
        raise ValueError("bad envelope line: no user name")
    dsn = d.get("dsn", {})
    if not isinstance(dsn, dict) or not all(k in DSN_KEYS and isinstance(v, str) for k, v in dsn.items()):
        raise ValueError("bad envelope line: bad dsn")
    return d
