"""delivery.pacing observed at a real next hop (relay processes on loopback)."""

from __future__ import annotations

import json
import os
import smtplib

from relay.mailbox import users as usersmod
from tests.integration.test_workers import relayctl
from tests.support.relay import RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll


def test_pacing_holds_the_rest_in_the_queue_and_says_why(tmp_path):
    dport = free_port(("127.0.0.4",))
    final = RelayProcess(str(tmp_path), deep_merge(base_config(str(tmp_path)), {
        "hostname": "final.test", "spool": str(tmp_path / "final-spool"),
        "smtp": {"listen": [f"tcp:{dport}:interface=127.0.0.4"]},
        "local": {"domains": ["dest.test"], "mailboxes": str(tmp_path / "final-mail"),
                  "users": str(tmp_path / "final-users")},
    }), "final")
    usersmod.add_user(str(tmp_path / "final-users"), "u@dest.test", "pw")
    base = tmp_path / "relay"
    base.mkdir()
    port = free_port()
    dest = f"route:127.0.0.4:{dport}"
    relay = RelayProcess(str(base), deep_merge(base_config(str(base)), {
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
        "relay": {"routes": {"dest.test": f"127.0.0.4:{dport}"}},
        "delivery": {"pacing": {dest: "2/3s"}}}), "relay")
    final.start(wait_for=("127.0.0.4", dport))
    relay.start(wait_for=("127.0.0.1", port))
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(6):
                s.sendmail("a@client.test", ["u@dest.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())

        def a_waiting_one():
            out = relayctl(relay.config_path, "queue", "--json").stdout
            recs = [json.loads(line) for line in out.splitlines() if line.strip()]
            return next((r for r in recs if r.get("waiting")), None)

        rec = poll(a_waiting_one, 20, interval=0.05, what="a message waiting for pacing")
        assert rec["waiting"] == f"pacing limit 2/3s for {dest}"
        assert [(r["status"], r["attempts"]) for r in rec["recipients"]] == [("pending", 0)]
        show = relayctl(relay.config_path, "queue", "show", rec["queue_id"])
        # (it may have gone meanwhile: then there is nothing to show)
        assert show.returncode != 0 or f"waiting: pacing limit 2/3s for {dest}" in show.stdout, show.stdout
        box = tmp_path / "final-mail" / "dest.test" / "u" / "new"
        poll(lambda: box.is_dir() and len(os.listdir(box)) == 6, 60, what="6 messages at the next hop")
        times = sorted(os.stat(box / n).st_mtime for n in os.listdir(box))
        assert times[2] - times[0] >= 1.0, times  # the third waited for the window to move
        assert "status=deferred" not in relay.log()
    finally:
        relay.stop()
        final.stop()
