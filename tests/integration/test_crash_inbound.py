"""SIGKILL the relay while clients send: every message that got a 250 survives.

The relay runs as a real ``twistd -n relay`` process; concurrent smtplib
clients record the queue id of every acknowledged message and what they
sent.  The next hop is a closed port, so acknowledged mail stays in the
spool, where it is compared byte for byte after each restart.
"""

from __future__ import annotations

import hashlib
import os
import random
import smtplib
import threading
import time

from relay.queue import spool as spoolmod
from tests.support.relay import RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll


def strip_received(msg: bytes) -> bytes:
    """The message without our Received header (first line plus its continuations)."""
    assert msg.startswith(b"Received: ")
    i = msg.index(b"\r\n") + 2
    while msg[i : i + 1] in (b"\t", b" "):
        i = msg.index(b"\r\n", i) + 2
    return msg[i:]


def sender_loop(host, port, stop, acked, lock, seed):
    rnd = random.Random(seed)
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(host, port, timeout=10) as s:
                s.ehlo("crash.client")
                while not stop.is_set():
                    n += 1
                    body = (f"Message-ID: <{seed}.{n}@test>\r\nSubject: crash {n}\r\n\r\n".encode()
                            + os.urandom(rnd.randint(10, 20000)).hex().encode() + b"\r\n")
                    s.mail("sender@client.example")
                    s.rcpt("dest@remote.example")
                    code, resp = s.data(body)
                    if code == 250:
                        qid = resp.decode().rsplit(" ", 1)[1]
                        with lock:
                            acked[qid] = hashlib.sha256(body).hexdigest()
        except (OSError, smtplib.SMTPException):
            time.sleep(0.01)


def test_sigkill_while_receiving_loses_no_acknowledged_message(tmp_path):
    port = free_port()
    closed = free_port()
    data = deep_merge(base_config(str(tmp_path)), {
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "max_connections_per_ip": 100},
        "relay": {"smarthost": f"127.0.0.1:{closed}"},
        "delivery": {"retry_min": "1h", "retry_max": "1h"},
        # hundreds of transactions a second from one sender, most refused at DATA: not what [limits] is about
        "limits": {"messages_per_sender": "off", "recipients_per_sender": "off", "messages_per_ip": "off",
                   "recipients_per_ip": "off"},
    })
    relay = RelayProcess(str(tmp_path), data)
    acked: dict[str, str] = {}
    lock = threading.Lock()
    sp = spoolmod.Spool(data["spool"])
    try:
        _run_cycles(relay, port, acked, lock, sp)
    finally:
        relay.stop()


def _run_cycles(relay, port, acked, lock, sp):
    for cycle in range(3):
        relay.start(wait_for=("127.0.0.1", port))
        stop = threading.Event()
        threads = [threading.Thread(target=sender_loop, args=("127.0.0.1", port, stop, acked, lock, cycle * 100 + i))
                   for i in range(6)]
        for t in threads:
            t.start()
        before = len(acked)
        poll(lambda before=before: len(acked) >= before + 30, 30, what="30 more acknowledged messages")
        relay.kill()  # SIGKILL in the middle of transactions
        stop.set()
        for t in threads:
            t.join(15)
    relay.start(wait_for=("127.0.0.1", port))
    assert len(acked) >= 90
    ids = set(sp.queue_ids())
    missing = set(acked) - ids
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
    for qid, digest in acked.items():
        env, off, size = sp.read_envelope(qid)
        assert env.recipients == ["dest@remote.example"], (qid, env.recipients)
        with open(sp.message_path(qid), "rb") as f:
            f.seek(off)
            msg = f.read()
        body = strip_received(msg)
        assert hashlib.sha256(body).hexdigest() == digest, qid
    assert sp.incoming_leftovers() == []
