"""SIGKILL the relay while it delivers: no recipient is lost, and none that was
recorded as delivered is sent again.

A LAN relay process routes dest.test to a second relay process (the final
destination, with a local Maildir).  The LAN relay is killed several times
while it delivers a backlog, and restarted.  At each kill, the messages it
had recorded as done (no longer in its spool) are noted with how many
copies had arrived; afterwards none of them may arrive again, and every
acknowledged message must arrive at least once.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
from collections import Counter

from relay.mailbox import users as usersmod
from tests.support.relay import RelayProcess, free_port
from tests.support.wait import poll

N = 300


def maildir_copies(root: str) -> dict[str, list[bytes]]:
    """Message-ID -> each delivered copy, from its Message-ID header on (the
    relays add only headers above it; the Maildir holds LF line ends)."""
    out: dict[str, list[bytes]] = {}
    for sub in ("new", "cur"):
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            try:
                with open(os.path.join(d, name), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            m = re.search(rb"^Message-ID: <([^>]+)>", data, re.MULTILINE)
            if m:
                out.setdefault(m.group(1).decode(), []).append(data[m.start():])
    return out


def maildir_counts(root: str) -> Counter:
    return Counter({mid: len(copies) for mid, copies in maildir_copies(root).items()})


def spool_ids(spool: str) -> set[str]:
    return {n for n in os.listdir(os.path.join(spool, "queue")) if len(n) == 16}


def make(tmp_path, name, ip, port, **sections):
    base = tmp_path / name
    base.mkdir()
    data = {
        "hostname": f"{name}.test",
        "spool": str(base / "spool"),
        "workers": 1,
        "smtp": {"listen": [f"tcp:{port}:interface={ip}"], "max_connections_per_ip": 200},
        "local": {"domains": ["localhost"], "mailboxes": str(base / "mail"), "users": str(base / "users")},
        "pop3": {"listen": []},
        "delivery": {"retry_min": 1, "retry_max": 1, "connect_timeout": 3, "max_per_destination": 5},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return RelayProcess(str(base), data, name)


def test_sigkill_during_deliveries(tmp_path):
    port = free_port(("127.0.0.2", "127.0.0.4"))
    lan = make(tmp_path, "lan", "127.0.0.2", port, relay={"routes": {"dest.test": f"127.0.0.4:{port}"}})
    final = make(tmp_path, "final", "127.0.0.4", port, local={"domains": ["dest.test"]})
    usersmod.add_user(final.data["local"]["users"], "u@dest.test", "pw")
    mailbox = os.path.join(final.data["local"]["mailboxes"], "dest.test", "u")
    rnd = random.Random(5)
    acked: dict[str, str] = {}  # queue id at the LAN relay -> Message-ID
    sent: dict[str, bytes] = {}  # Message-ID -> the message acknowledged
    try:
        final.start(wait_for=("127.0.0.4", port))
        lan.start(wait_for=("127.0.0.2", port))
        with smtplib.SMTP("127.0.0.2", port) as s:
            s.ehlo("client.test")
            for i in range(N):
                mid = f"crash-{i}@client.test"
                text = ("x" * 70 + "\r\n") * rnd.randint(1, 40)
                body = f"Message-ID: <{mid}>\r\nSubject: {i}\r\n\r\n{text}\r\n".encode()
                s.mail("a@client.test")
                s.rcpt("u@dest.test")
                code, resp = s.data(body)
                assert code == 250
                acked[resp.decode().rsplit(" ", 1)[1]] = mid
                sent[mid] = body
        recorded: dict[str, int] = {}  # Message-ID -> copies present when it was recorded done
        kills = 0
        for kill in range(1, 6):
            # let some deliveries happen, then kill in the middle of them
            target = kill * N // 6
            poll(lambda target=target: sum(1 for n in maildir_counts(mailbox).values() if n) >= target, 60,
                 interval=0.005, what=f"{target} deliveries")
            lan.kill()
            kills += 1
            poll(lambda: not spool_ids(final.data["spool"]), 20, what="the final relay to settle")
            present = spool_ids(lan.data["spool"])
            counts = maildir_counts(mailbox)
            for qid, mid in acked.items():
                if qid not in present and mid not in recorded:
                    recorded[mid] = counts[mid]
            if len(recorded) == N:
                break
            lan.start(wait_for=("127.0.0.2", port))
        if lan.proc.poll() is not None:
            lan.start(wait_for=("127.0.0.2", port))
        poll(lambda: not spool_ids(lan.data["spool"]), 60, what="the LAN relay to deliver everything")
        poll(lambda: not spool_ids(final.data["spool"]), 20, what="the final relay to settle")
        copies = maildir_copies(mailbox)
        counts = maildir_counts(mailbox)
        lost = [mid for mid in acked.values() if counts[mid] == 0]
        assert not lost, f"{len(lost)} messages lost: {lost[:5]}"
        corrupt = [mid for mid in acked.values()
                   if any(c != sent[mid].replace(b"\r\n", b"\n") for c in copies[mid])]
        assert not corrupt, f"{len(corrupt)} delivered copies differ from what was acknowledged: {corrupt[:5]}"
        assert len(acked) == N
        resent = [mid for mid, n in recorded.items() if counts[mid] != n]
        assert not resent, f"recorded as delivered but sent again: {resent[:5]}"
        assert len(recorded) > 0
        dups = sum(n - 1 for n in counts.values() if n > 1)
        print(f"\n{kills} kills; sent {N}, acknowledged {len(acked)}, delivered {len(counts)}, lost 0, "
              f"duplicated {dups} (each from a delivery cut short by a kill)")
    finally:
        lan.stop()
        final.stop()
