"""workers = 2: a [limits] rate limit is one limit for the whole relay (real relay processes)."""

from __future__ import annotations

import json
import smtplib

from tests.integration.test_workers import make, only_worker, relayctl


def mails(port: int, n: int) -> list[tuple[int, str]]:
    """n MAIL commands (each followed by RSET) in one session: the replies."""
    out = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.test")
        for _ in range(n):
            code, text = s.docmd("MAIL FROM:<a@client.test>")
            out.append((code, text.decode()))
            s.rset()
    return out


def test_two_workers_count_one_limit(tmp_path):
    relay, port = make(tmp_path, limits={"messages_per_ip": "60/1h"})
    relay.start(wait_for=("127.0.0.1", port))
    try:
        with only_worker(relay, 0):
            first = mails(port, 50)
        with only_worker(relay, 1):
            second = mails(port, 30)
        assert [c for c, _ in first] == [250] * 50
        # worker 1 knows what worker 0 counted: 10 more, not 30
        assert [c for c, _ in second] == [250] * 10 + [450] * 20, second
        assert second[-1][1] == ("4.7.1 too many messages from 127.0.0.1: limit 60 per 1h "
                                 "(limits.messages_per_ip)")
        # both workers at the limit now, whichever takes the connection
        assert all(c == 450 for c, _ in mails(port, 10))
        assert relay.log().count("limits.messages_per_ip") == 1  # logged once per window, by one worker
        # relayctl status lists who is at (or near) a limit, once for the relay
        st = json.loads(relayctl(relay.config_path, "status", "--json").stdout)
        assert st["limits"] == [{"limit": "limits.messages_per_ip", "key": "127.0.0.1", "count": 60, "max": 60,
                                 "window": 3600.0}]
        text = relayctl(relay.config_path, "status").stdout
        assert "Rate limits (at or near):\n  limits.messages_per_ip  127.0.0.1  60/60 per 1h  (at the limit)" in text
    finally:
        relay.stop()
