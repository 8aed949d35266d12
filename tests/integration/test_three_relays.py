"""Whole system: three relay processes pass a message hop to hop by MX lookup.

    client -> LAN relay (127.0.0.2) -> final MX (127.0.0.4, down for a while)
                                    -> backup MX (127.0.0.3) -> final MX -> Maildir

A real DNS server (a subprocess built on twisted.names) says that
example.test has MX 10 mx1.example.test (127.0.0.4) and MX 20
mx2.example.test (127.0.0.3).  All three relays listen on the same port on
their own address, as MX hosts do on port 25.
"""

from __future__ import annotations

import os
import smtplib

from relay.mailbox import users as usersmod
from tests.support import dns as dnsmod
from tests.support.relay import RelayProcess, free_port
from tests.support.wait import poll

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def start_dns(tmp_path, records):
    return dnsmod.start_process(str(tmp_path), records)


def relay_config(tmp_path, name, ip, port, dns_port, **sections):
    base = tmp_path / name
    base.mkdir()
    data = {
        "hostname": f"{name}.test",
        "spool": str(base / "spool"),
        "workers": 1,
        "smtp": {"listen": [f"tcp:{port}:interface={ip}"]},
        "local": {"domains": ["localhost"], "mailboxes": str(base / "mail"), "users": str(base / "users")},
        "pop3": {"listen": []},
        "delivery": {"nameservers": [f"127.0.0.1:{dns_port}"], "port": port, "retry_min": 1, "retry_max": 1,
                     "connect_timeout": 3},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return RelayProcess(str(base), data, name)


def test_hop_to_hop_by_mx_with_final_mx_down_for_a_while(tmp_path):
    port = free_port(IPS)
    dns, dns_port = start_dns(tmp_path, [
        ["example.test", "MX", 10, "mx1.example.test"],
        ["example.test", "MX", 20, "mx2.example.test"],
        ["mx1.example.test", "A", "127.0.0.4"],
        ["mx2.example.test", "A", "127.0.0.3"],
    ])
    lan = relay_config(tmp_path, "lan", "127.0.0.2", port, dns_port)
    backup = relay_config(tmp_path, "backup", "127.0.0.3", port, dns_port, relay={"domains": ["example.test"]})
    final = relay_config(tmp_path, "final", "127.0.0.4", port, dns_port,
                         local={"domains": ["example.test"]}, relay={"networks": ["10.255.0.0/16"]})
    usersmod.add_user(final.data["local"]["users"], "bob@example.test", "pw")
    relays = [lan, backup, final]
    try:
        lan.start(wait_for=("127.0.0.2", port))
        backup.start(wait_for=("127.0.0.3", port))
        body = b"Subject: hop to hop\r\nMessage-ID: <hop@client.test>\r\n\r\nacross three relays\r\n"
        with smtplib.SMTP("127.0.0.2", port) as s:
            s.ehlo("client.test")
            assert s.sendmail("alice@client.test", ["bob@example.test"], body) == {}
        # the final MX is down: the LAN relay hands the message to the backup MX
        lan_queue = os.path.join(lan.data["spool"], "queue")
        backup_queue = os.path.join(backup.data["spool"], "queue")
        poll(lambda: not os.listdir(lan_queue) and os.listdir(backup_queue), 30,
             what="the message to move from the LAN relay to the backup MX")
        assert "relay=mx2.example.test[127.0.0.3]" in lan.log()
        assert "status=sent" in lan.log()
        # the backup keeps it while the final MX is down...
        poll(lambda: "Connection refused" in backup.log(), 20, what="the backup MX to try the final MX")
        assert os.listdir(backup_queue)
        # ...and delivers it once the final MX is up
        final.start(wait_for=("127.0.0.4", port))
        new = os.path.join(final.data["local"]["mailboxes"], "example.test", "bob", "new")
        poll(lambda: os.path.isdir(new) and os.listdir(new), 30, what="the message in bob's Maildir")
        poll(lambda: not [n for n in os.listdir(backup_queue) if not n.endswith(".state")], 10,
             what="the backup MX queue to empty")
        (name,) = os.listdir(new)
        with open(os.path.join(new, name), "rb") as f:
            data = f.read()
        headers = data.split(b"\n\n", 1)[0]
        received = [ln for ln in headers.split(b"\n") if ln.startswith(b"Received:")]
        assert [r.split(b" ")[2] for r in received] == [b"backup.test", b"lan.test", b"client.test"]
        assert b"by final.test" in headers and b"by backup.test" in headers and b"by lan.test" in headers
        assert headers.startswith(b"Return-Path: <alice@client.test>\nDelivered-To: bob@example.test\n")
        assert data.endswith(b"\n\nacross three relays\n")
    finally:
        for r in relays:
            r.stop()
        dns.terminate()
        dns.wait(10)
