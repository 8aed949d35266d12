"""Several relays as one mail service, on loopback (issue 18's proof).

A fleet as docs/fleet.md describes it: N relay processes on 127.0.0.11,
.12, ... (one per "host"), behind MX records of equal preference in the test
DNS server, each with its own spool, all delivering into ONE mailbox tree
and serving it over POP3, their limits kept in one real Redis
(tests.support.redis.RedisServer, on 127.0.0.10).  A remote domain (``far.test``)
has its MX on a sink that the caller starts when it wants, so that mail for
it waits in the nodes' queues.

The load (``Load``) is what the internet does to such a service: many
clients (from their own 127.0.1.x addresses), each looking the MX records
up and trying the hosts in random order, moving to the next host when one
refuses or breaks the connection, and remembering which messages were
acknowledged (250 after the final dot) and which are uncertain (the
connection broke after the dot, before the reply: the at-least-once window).
Used by tests/integration/test_fleet_proof.py and, with more messages, bench/fleet.py.
"""

from __future__ import annotations

import os
import random
import smtplib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from relay.mailbox import users as usersmod
from tests.support import dns as dnsmod
from tests.support import redis as redissupport
from tests.support import sinkproc
from tests.support.relay import ROOT, RelayProcess, free_port

DOMAIN = "fleet.test"
FAR = "far.test"
REDIS_IP = "127.0.0.10"
SINK_IP = "127.0.0.20"
USERS = ("ann", "ben", "cat", "dan")
PASSWORD = "fleet-pw"


def node_ip(i: int) -> str:
    return f"127.0.0.{11 + i}"


def redis_server() -> str | None:
    """redis-server's path, or None when it is not installed."""
    return None if redissupport.available() else redissupport.REDIS_SERVER


class Fleet:
    """N relay processes behind equal-preference MX records, one mailbox tree, one Redis."""

    def __init__(self, directory: str, n: int = 3, workers: int = 1, redis: bool = True):
        self.dir = directory
        self.port = free_port(tuple(node_ip(i) for i in range(n)))
        self.pop3_port = free_port(tuple(node_ip(i) for i in range(n)))
        self.sink_port = free_port((SINK_IP,))
        self.mail = os.path.join(directory, "mail")
        self.users = os.path.join(directory, "users")
        os.makedirs(self.mail, exist_ok=True)
        for u in USERS:
            usersmod.add_user(self.users, f"{u}@{DOMAIN}", PASSWORD)
        records: list = [[DOMAIN, "MX", 10, f"mx{i + 1}.{DOMAIN}"] for i in range(n)]
        records += [[f"mx{i + 1}.{DOMAIN}", "A", node_ip(i)] for i in range(n)]
        records += [[FAR, "MX", 10, f"mx.{FAR}"], [f"mx.{FAR}", "A", SINK_IP]]
        self.dns, self.dns_port = dnsmod.start_process(directory, records)
        self.redis = redissupport.RedisServer(REDIS_IP).start() if redis else None
        self.nodes = [self._node(i, workers) for i in range(n)]
        self.sink: subprocess.Popen | None = None
        self.sink_record = os.path.join(directory, "sink.record")

    def _node(self, i: int, workers: int) -> RelayProcess:
        base = os.path.join(self.dir, f"node{i + 1}")
        os.makedirs(base)
        ip = node_ip(i)
        data: dict = {
            "hostname": f"mx{i + 1}.{DOMAIN}",
            "spool": os.path.join(base, "spool"),
            "workers": workers,
            "smtp": {"listen": [f"tcp:{self.port}:interface={ip}"], "max_connections_per_ip": 50},
            "local": {"domains": [DOMAIN], "mailboxes": self.mail, "users": self.users},
            "pop3": {"listen": [f"tcp:{self.pop3_port}:interface={ip}"]},
            "relay": {"networks": ["127.0.1.0/24", "127.0.0.0/24"]},  # the clients; the peers (drain)
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns_port}"], "port": self.sink_port,
                         "retry_min": 1, "retry_max": 2, "connect_timeout": 2, "mta_sts": False},
            "limits": {"messages_per_sender": "off", "recipients_per_sender": "off"},
        }
        if self.redis is not None:
            data["limits"]["redis"] = self.redis.url
        return RelayProcess(base, data, f"node{i + 1}")

    def start(self) -> "Fleet":
        for i, node in enumerate(self.nodes):
            node.start(wait_for=(node_ip(i), self.port), timeout=60)
        return self

    def start_sink(self) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.sink = subprocess.Popen(
            [sys.executable, "-m", "tests.support.sinkproc", "--interface", SINK_IP, "--port",
             str(self.sink_port), "--record", self.sink_record],
            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.sink.stdout is not None
        line = self.sink.stdout.readline()
        assert line.startswith("READY "), line

    def mx_hosts(self) -> list[str]:
        """The MX hosts of the fleet's domain, as the test DNS serves them."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.dns_port
        answer = r.resolve(DOMAIN, "MX")
        hosts = []
        for rr in answer:
            a = r.resolve(rr.exchange.to_text(), "A")
            hosts.append(a[0].to_text())
        return hosts

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - stop everything whatever happens
                pass
        for p in (self.sink, self.dns):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)
        if self.redis is not None:
            self.redis.close()

    # -- what arrived -------------------------------------------------------------
    def delivered_local(self) -> dict[str, int]:
        """Message-ID -> how many copies in the shared mailbox tree (new/ and cur/)."""
        out: dict[str, int] = {}
        root = os.path.join(self.mail, DOMAIN)
        if not os.path.isdir(root):
            return out
        for user in os.listdir(root):
            for sub in ("new", "cur"):
                d = os.path.join(root, user, sub)
                if not os.path.isdir(d):
                    continue
                for name in os.listdir(d):
                    mid = _message_id(os.path.join(d, name))
                    if mid:
                        out[mid] = out.get(mid, 0) + 1
        return out

    def delivered_far(self) -> dict[str, int]:
        """Message-ID -> how many copies the remote sink accepted (one recipient each)."""
        out: dict[str, int] = {}
        for (mid, _rcpt), n in sinkproc.read_record(self.sink_record).items():
            out[mid] = out.get(mid, 0) + n
        return out


def _message_id(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:  # moved to cur/ meanwhile: counted there
        return ""
    mid = sinkproc.message_id(head)
    return "" if mid == "-" else mid


@dataclass
class Load:
    """Many clients sending to the fleet as MTAs do (MX order shuffled, next host on failure)."""

    hosts: list[str]
    port: int
    count: int
    clients: int = 16
    first_client: int = 0  # several loads in several processes: their clients' numbers and addresses
    far_share: float = 0.1  # messages for far.test (they wait in the queues)
    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> the host that said 250
    uncertain: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def recipient(self, n: int) -> str:
        if random.random() < self.far_share:
            return f"user{n % 7}@{FAR}"
        return f"{USERS[n % len(USERS)]}@{DOMAIN}"

    def run(self) -> "Load":
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.seconds = time.monotonic() - t0
        return self

    def _client(self, c: int) -> None:
        source = f"127.0.1.{1 + (self.first_client + c) % 250}"
        per = self.count // self.clients + (1 if c < self.count % self.clients else 0)
        for k in range(per):
            c_id = self.first_client + c
            mid = f"fleet-{c_id}-{k}@load.test"
            rcpt = self.recipient(c_id * 100003 + k)
            body = (f"From: client{c_id}@load.test\r\nTo: {rcpt}\r\nSubject: fleet {c_id}/{k}\r\n"
                    f"Message-ID: <{mid}>\r\n\r\nmessage {k} of client {c_id}\r\n").encode()
            self._send(source, f"client{c_id}@load.test", rcpt, mid, body)

    def _send(self, source: str, sender: str, rcpt: str, mid: str, body: bytes) -> None:
        hosts = list(self.hosts)
        random.shuffle(hosts)  # equal preference: any order (RFC 5321 5.1)
        for _round in range(20):
            for host in hosts:
                outcome = self._try(source, host, sender, rcpt, mid, body)
                if outcome == "ok":
                    return
            time.sleep(0.2)  # every host refused for now: as an MTA, retry later
        with self._lock:
            self.failures.append(mid)

    def _try(self, source: str, host: str, sender: str, rcpt: str, mid: str, body: bytes) -> str:
        after_dot = False
        try:
            with smtplib.SMTP(host, self.port, local_hostname="load.test", timeout=30,
                              source_address=(source, 0)) as s:
                code, _ = s.ehlo()
                if code != 250:
                    return "temp"
                code, _ = s.mail(sender)
                if code != 250:
                    return "temp"
                code, _ = s.rcpt(rcpt)
                if code != 250:
                    return "temp"
                s.putcmd("data")
                code, _ = s.getreply()
                if code != 354:
                    return "temp"
                after_dot = True
                s.send(body + b".\r\n")  # body: CRLF lines, none starting with a dot
                code, _ = s.getreply()
                if code == 250:
                    with self._lock:
                        self.acked[mid] = host
                    return "ok"
                after_dot = False
                return "temp"
        except (OSError, smtplib.SMTPException):
            if after_dot:
                with self._lock:
                    self.uncertain.add(mid)
            return "broken"


def load_part(hosts: list[str], port: int, count: int, clients: int, first_client: int) -> tuple[dict, set, list]:
    """One process's share of a load (bench/fleet.py runs several): acked, uncertain, failures."""
    load = Load(hosts, port, count, clients=clients, first_client=first_client).run()
    return load.acked, load.uncertain, load.failures


def relayctl(config_path: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", config_path, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def queued(spool: str) -> list[str]:
    """The queue ids in a node's spool (one process, or every worker's queue)."""
    from relay.queue import spool as spoolmod

    dirs = [os.path.join(spool, "queue")] + [os.path.join(spool, d, "queue") for d in sorted(os.listdir(spool))
                                             if d.startswith("w") and d[1:].isdigit()]
    return sorted(n for d in dirs if os.path.isdir(d) for n in os.listdir(d) if spoolmod.is_queue_id(n))


def pop3_uidls(host: str, port: int, user: str) -> list[str]:
    """The UIDL list of a user's mailbox as one node serves it."""
    import poplib

    p = poplib.POP3(host, port, timeout=30)
    try:
        p.user(f"{user}@{DOMAIN}")
        p.pass_(PASSWORD)
        _, lines, _ = p.uidl()
        return sorted(ln.split()[1].decode() for ln in lines)
    finally:
        p.quit()
