"""[proxy] behind a real load balancer: Debian's haproxy (``send-proxy`` and
``send-proxy-v2``) in front of a ``twistd relay``, and a relay with
``workers = 2`` (the master binds, the workers adopt) behind a fake balancer.

Two clients on different loopback addresses (127.0.0.30 in relay.networks,
127.0.0.31 not) reach the relay through the same haproxy, whose own
connections come from 127.0.0.5 (``source``): the relay must decide, count,
log and write the Received header by each client's address.
"""

from __future__ import annotations

import contextlib
import glob
import os
import smtplib
import socket
import subprocess

import pytest

from relay.mailbox import users as usersmod
from tests.support.relay import RelayProcess, base_config, deep_merge, free_port
from tests.support.wait import poll

HAPROXY = "/usr/sbin/haproxy"
BALANCER = "127.0.0.5"  # haproxy's source address towards the relay: proxy.trusted
FRONT = "127.0.0.20"  # haproxy's frontends
LAN, OUTSIDE = "127.0.0.30", "127.0.0.31"  # two clients: in relay.networks, and not

pytestmark = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                reason=f"{HAPROXY} is missing (Debian's haproxy package)")


def haproxy_config(smtp: int, pop3: int, fronts: dict[str, int]) -> str:
    return f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_v1
    bind {FRONT}:{fronts['v1']}
    default_backend relay_v1
frontend smtp_v2
    bind {FRONT}:{fronts['v2']}
    default_backend relay_v2
frontend pop3_v2
    bind {FRONT}:{fronts['pop3']}
    default_backend relay_pop3
backend relay_v1
    server r1 127.0.0.1:{smtp} send-proxy source {BALANCER}
backend relay_v2
    server r1 127.0.0.1:{smtp} send-proxy-v2 proxy-v2-options crc32c source {BALANCER}
backend relay_pop3
    server r1 127.0.0.1:{pop3} send-proxy-v2 source {BALANCER}
"""


@contextlib.contextmanager
def haproxy(tmp_path, smtp: int, pop3: int):
    fronts = {k: free_port((FRONT,)) for k in ("v1", "v2", "pop3")}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(smtp, pop3, fronts))
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def bound():
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {(tmp_path / 'haproxy.log').read_text()}")
            return all(_listening(FRONT, p) for p in fronts.values())

        poll(bound, 20, what="haproxy listening")
        yield fronts
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _listening(host: str, port: int) -> bool:
    # /proc/net/tcp, not a connection: a test connection would reach the relay
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in list(f)[1:])


def relay_process(tmp_path, *, workers: int = 1, pop3: bool = True):
    base = tmp_path / "relay"
    base.mkdir()
    smtp, pport = free_port(), free_port()
    mx = f"tcp:{smtp}:interface=127.0.0.1"
    p3 = f"tcp:{pport}:interface=127.0.0.1"
    data = deep_merge(base_config(str(base)), {
        "workers": workers,
        "relay": {"networks": [f"{LAN}/32", "10.1.0.0/16"], "smarthost": f"127.0.0.1:{free_port()}"},
        "smtp": {"listen": [mx], "max_connections_per_ip": 5},
        "pop3": {"listen": [p3] if pop3 else []},
        "tls": {"auth_requires_tls": False},
        "proxy": {"listeners": [mx] + ([p3] if pop3 else []), "trusted": [BALANCER]},
    })
    usersmod.add_user(str(base / "users"), "alice@local.test", "alice-pw")
    return RelayProcess(str(base), data), smtp, pport


def queued_messages(spool: str) -> list[bytes]:
    out = []
    for path in glob.glob(os.path.join(spool, "**", "queue", "*"), recursive=True):
        if os.path.isfile(path) and "." not in os.path.basename(path):
            with open(path, "rb") as f:
                out.append(f.read())
    return out


def send(host: str, port: int, source: str, rcpt: str, subject: str) -> tuple[int, int | None]:
    """(RCPT code, DATA code or None)."""
    with smtplib.SMTP(host, port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("client.example")
        s.mail("a@b.example")
        code, _ = s.rcpt(rcpt)
        if code != 250:
            return code, None
        dcode, _ = s.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        return code, dcode


def test_haproxy_send_proxy_v1_and_v2_carry_the_client(tmp_path):
    relay, smtp, pport = relay_process(tmp_path)
    relay.start(wait_for=("127.0.0.1", smtp))
    try:
        with haproxy(tmp_path, smtp, pport) as fronts:
            results = {}
            for version in ("v1", "v2"):
                for client in (LAN, OUTSIDE):
                    results[version, client] = send(FRONT, fronts[version], client, "friend@remote.example",
                                                     f"{version} {client}")
            # POP3 through haproxy: the relay sees the client's address
            with socket.create_connection((FRONT, fronts["pop3"]), source_address=(LAN, 0), timeout=30) as s:
                f = s.makefile("rb")
                pop3 = [f.readline()]
                for line in (b"USER alice@local.test", b"PASS alice-pw", b"QUIT"):
                    s.sendall(line + b"\r\n")
                    pop3.append(f.readline())
                f.close()
        assert all(r.startswith(b"+OK") for r in pop3), pop3
        assert results[("v1", LAN)] == (250, 250)
        assert results[("v2", LAN)] == (250, 250)
        assert results[("v1", OUTSIDE)][0] == 554  # not relayed: its own address is not in relay.networks
        assert results[("v2", OUTSIDE)][0] == 554
        msgs = queued_messages(relay.data["spool"])
        assert len(msgs) == 2
        for m in msgs:
            assert b"Received: from client.example ([127.0.0.30])" in m, m[:300]
        log = relay.log()
        assert f"proxy: connect from [{LAN}]" in log and f"via [{BALANCER}] (PROXY v1 TCP4)" in log
        assert f"proxy: connect from [{OUTSIDE}]" in log and f"via [{BALANCER}] (PROXY v2 TCP4)" in log
        assert f"reject: RCPT from client.example[{OUTSIDE}]: 554 5.7.1" in log
        assert f"pop3: login client={LAN} user=alice@local.test" in log

        # a direct connection to the PROXY listener (not from the balancer) is refused
        with socket.create_connection(("127.0.0.1", smtp), source_address=(LAN, 0), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(100) == b""
        poll(lambda: f"proxy: refused [{LAN}]: not a configured load balancer" in relay.log(), 10,
             what="the refusal logged")
    finally:
        relay.stop()


def test_workers_adopt_the_proxied_listener(tmp_path):
    from tests.integration.test_workers import only_worker

    relay, smtp, _ = relay_process(tmp_path, workers=2, pop3=False)
    relay.start(wait_for=("127.0.0.1", smtp))
    try:
        codes = {}
        for w in (0, 1):
            with only_worker(relay, w):
                for client in ("10.1.2.3", "192.0.2.9"):
                    s = socket.create_connection(("127.0.0.1", smtp), source_address=(BALANCER, 0), timeout=30)
                    s.sendall(f"PROXY TCP4 {client} 127.0.0.1 4000{w} 25\r\n".encode())
                    f = s.makefile("rb")
                    f.readline()
                    s.sendall(b"EHLO client.example\r\n")
                    while f.readline()[3:4] == b"-":
                        pass
                    s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<friend@remote.example>\r\n")
                    f.readline()
                    codes[w, client] = int(f.readline()[:3])
                    s.sendall(b"QUIT\r\n")
                    f.close()
                    s.close()
        assert codes == {(0, "10.1.2.3"): 250, (0, "192.0.2.9"): 554, (1, "10.1.2.3"): 250, (1, "192.0.2.9"): 554}
        log = relay.log()
        for w in (0, 1):
            assert f"proxy: connect from [10.1.2.3]:4000{w} via [{BALANCER}]" in log, log[-3000:]
    finally:
        relay.stop()

