"""The servers of the benchmark: Postfix's smtp-sink (the next hop), smtp-source
(the load), our relay (twistd relay from the bench venv) and a private Postfix
instance (the peer).

The Postfix instance never touches the system's Postfix: its own
config_directory, queue_directory and data_directory under the work
directory, started with ``postfix -c DIR start-fg``, listening only on its
127.0.0.x address and a free high port, logging to its own file.  Everything
else is Postfix's defaults (queue fsync, process limits, destination
concurrency, connection cache, in_flow_delay) except what the benchmark
needs: relayhost, mynetworks, no local delivery, and client limits high
enough for the load (as for our relay's smtp.max_connections_per_ip).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from procs import BenchError, CpuCgroup, Registry, free_port, status_kb, tree_cpu, wait_banner

SENDER = "bench@source.bench.test"
RECIPIENT = "rcpt@dest.bench.test"
HELO = "source.bench.test"


@dataclass
class Env:
    root: str  # the twisted-relay checkout
    venv: str
    python: str  # the bench venv's python (our relay and its helpers run on it)
    twistd: str
    relayctl: str
    smtp_source: str
    smtp_sink: str
    postfix: str
    postconf: str
    dovecot: str | None


# -- smtp-sink ---------------------------------------------------------------------


class Sink:
    """smtp-sink with -c: it prints "sess=N quit=N mesg=N" after every DATA it
    completes; a thread reads that so the benchmark knows when all mail is in."""

    _MESG = re.compile(rb"mesg=(\d+)")
    _SESS = re.compile(rb"sess=(\d+)")

    def __init__(self, reg: Registry, env: Env, addr: str):
        self.reg, self.env, self.addr = reg, env, addr
        self.port = 0
        self.count = 0
        self.sessions = 0  # SMTP sessions the sink has seen (connection reuse shows here)
        self.changed = time.monotonic()
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sink":
        self.port = free_port(self.addr)
        self.proc = self.reg.start("smtp-sink", [self.env.smtp_sink, "-c", "-u", "nobody",
                                                 f"{self.addr}:{self.port}", "1024"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True, name="sink-reader").start()
        wait_banner(self.addr, self.port, self.proc, what="smtp-sink")
        return self

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            found = self._MESG.findall(tail + chunk)
            sess = self._SESS.findall(tail + chunk)
            if sess:
                self.sessions = int(sess[-1])
            tail = chunk[-32:]
            if found:
                n = int(found[-1])
                with self._cond:
                    if n != self.count:
                        self.count = n
                        self.changed = time.monotonic()
                        self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = 900.0, stall: float = 60.0) -> float:
        """Wait until the sink has completed n messages; the monotonic time it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                now = time.monotonic()
                if now > deadline or now - self.changed > stall:
                    raise BenchError(f"the sink has {self.count} of {n} messages after {timeout:.0f}s "
                                     f"(no progress for {now - self.changed:.0f}s)")
                self._cond.wait(0.5)
            return self.changed

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid).seconds if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is not None:
            self.reg.stop(self.proc, timeout=5)
            self.proc = None


def run_source(reg: Registry, env: Env, addr: str, port: int, messages: int, *, sessions: int,
               size: int, timeout: float = 900.0) -> tuple[float, float]:
    """smtp-source: messages of size bytes over sessions parallel sessions (a new
    connection per message, its default); returns (start, end) monotonic times."""
    argv = [env.smtp_source, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-M", HELO,
            "-f", SENDER, "-t", RECIPIENT, f"{addr}:{port}"]
    t0 = time.monotonic()
    p = reg.start("smtp-source", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reg.stop(p, timeout=1)
        raise BenchError(f"smtp-source did not finish {messages} messages within {timeout:.0f}s")
    t1 = time.monotonic()
    reg.stop(p)
    if p.returncode != 0 or out.strip():
        raise BenchError(f"smtp-source to {addr}:{port} failed (status {p.returncode}): "
                         f"{out.decode(errors='replace').strip()[:500]}")
    return t0, t1


# -- our relay ----------------------------------------------------------------------


class OurRelay:
    name = "twisted-relay"

    def __init__(self, reg: Registry, env: Env, workdir: str, addr: str, *, next_hop: tuple[str, int],
                 retry_min: str | None = None, max_message_size: int | None = None,
                 max_connections_per_ip: int = 100, spool: str | None = None, routes: dict | None = None,
                 workers: int = 1, dkim: str = ""):
        self.reg, self.env, self.dir, self.addr = reg, env, workdir, addr
        self.workers = workers
        self.dkim = dkim  # an algorithm: sign the sender's domain with a new key of it (bench/dkim_accept.py)
        self.next_hop = next_hop
        self.retry_min = retry_min
        self.max_message_size = max_message_size
        self.max_connections_per_ip = max_connections_per_ip
        self.spool = spool or os.path.join(workdir, "spool")
        self.routes = routes or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.config = os.path.join(workdir, "relay.toml")
        self.log = os.path.join(workdir, "relay.log")
        self.t_start = 0.0
        self.cg: CpuCgroup | None = None

    def write_config(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port(self.addr)
        smtp = [f'listen = ["tcp:{self.port}:interface={self.addr}"]',
                f"max_connections_per_ip = {self.max_connections_per_ip}"]
        if self.max_message_size:
            smtp.append(f"max_message_size = {self.max_message_size}")
        delivery = [f'retry_min = "{self.retry_min}"', f'retry_max = "{self.retry_min}"'] if self.retry_min else []
        routes = ", ".join(f'"{d}" = "{h}"' for d, h in self.routes.items())
        host, port = self.next_hop
        with open(self.config, "w") as f:
            f.write(f"""# written by bench/run.py
hostname = "relay.bench.test"
spool = "{self.spool}"
workers = {self.workers}
[smtp]
{chr(10).join(smtp)}
[relay]
networks = ["127.0.0.0/8"]
smarthost = "[{host}]:{port}"
routes = {{{routes}}}
[delivery]
{chr(10).join(delivery)}
[local]
domains = ["local.bench.test"]
mailboxes = "{self.dir}/mail"
users = "{self.dir}/users"
[pop3]
listen = []
[limits]
# the benchmark pushes thousands of messages from one client and sender (Postfix's anvil limits are off too)
messages_per_ip = "off"
recipients_per_ip = "off"
messages_per_user = "off"
recipients_per_user = "off"
messages_per_sender = "off"
recipients_per_sender = "off"
""")
        if self.dkim:
            self._add_dkim_key()

    def _add_dkim_key(self) -> None:
        """relayctl dkim keygen for SENDER's domain; its [[dkim.keys]] lines appended to the config."""
        key = os.path.join(self.dir, "dkim.pem")
        if os.path.exists(key):
            os.unlink(key)
        r = subprocess.run([self.env.relayctl, "-c", self.config, "dkim", "keygen", SENDER.split("@")[1], "bench",
                            "--algorithm", self.dkim, "--key", key], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BenchError(f"relayctl dkim keygen failed: {r.stderr.strip()}")
        lines = r.stdout.splitlines()
        start = lines.index("[[dkim.keys]]")
        with open(self.config, "a") as f:
            f.write("\n".join(lines[start:start + 5]) + "\n")

    def start(self, *, wait_loaded: bool = True) -> "OurRelay":
        self.write_config()
        logf = open(self.log, "ab")
        self.t_start = time.monotonic()
        argv = [self.env.twistd, "-n", "--pidfile=", "--logfile", self.log, "relay", "--config", self.config]
        self.cg = CpuCgroup.create("ours")
        self.proc = self.reg.start("twistd relay", self.cg.wrap(argv) if self.cg else argv,
                                   cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        if wait_loaded:
            wait_banner(self.addr, self.port, self.proc, what="twistd relay")
            self.wait_log("queue loaded", 600)
        return self

    def wait_log(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        needle = text.encode()
        while time.monotonic() < deadline:
            with open(self.log, "rb") as f:
                if needle in f.read():
                    return time.monotonic()
            if self.proc.poll() is not None:
                raise BenchError(f"twistd relay exited ({self.proc.returncode}); see {self.log}")
            time.sleep(0.05)
        raise BenchError(f"no {text!r} in {self.log} after {timeout:.0f}s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds of the relay: its cgroup where there is one, else its process tree."""
        return self.cg.usage() if self.cg else self.cpu_tree()

    def cpu_tree(self) -> float:
        return tree_cpu(self.proc.pid).seconds

    def processes(self) -> int:
        return tree_cpu(self.proc.pid).processes

    def rss_kb(self) -> int:
        return status_kb(self.proc.pid, "VmRSS")

    def queued(self) -> int:
        """Messages in the queue (one file per message plus its .state)."""
        total = 0
        dirs = [os.path.join(self.spool, "queue")] + [os.path.join(self.spool, f"w{i}", "queue")
                                                      for i in range(self.workers)]
        for qdir in dirs:
            try:
                total += sum(1 for n in os.listdir(qdir) if len(n) == 16 and "." not in n)
            except FileNotFoundError:
                pass
        return total

    def deferrals_on_disk(self) -> int:
        """Messages whose deferral is written down: a .state file next to the
        message.  A message only suspended (its next hop known dead, no
        attempt made) keeps its deferral in memory: after a crash it is
        simply tried again."""
        total = 0
        dirs = [os.path.join(self.spool, "queue")] + [os.path.join(self.spool, f"w{i}", "queue")
                                                      for i in range(self.workers)]
        for qdir in dirs:
            try:
                total += sum(1 for n in os.listdir(qdir) if n.endswith(".state"))
            except FileNotFoundError:
                pass
        return total

    def relayctl(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.env.relayctl, "--config", self.config, *args], capture_output=True,
                              timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            self.reg.stop(self.proc, timeout=40)
            self.proc = None
        if self.cg is not None:
            self.cg.remove()
            self.cg = None


# -- Postfix ---------------------------------------------------------------------------

MASTER_CF = """# written by bench/run.py: Debian's master.cf without chroot, smtpd on one address
{addr}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """# written by bench/run.py: a private instance, defaults unless said otherwise
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
# no local delivery: everything is relayed
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
# the smtpd address is in master.cf; Postfix only checks inet_interfaces
# against interface addresses, which 127.0.0.x (x > 1) are not
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [{next_host}]:{next_port}
# no reverse DNS of the client (our relay does none either)
smtpd_peername_lookup = no
# client limits high enough for the benchmark (anvil)
smtpd_client_connection_count_limit = 1000
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
{extra}
"""


class Postfix:
    name = "postfix"

    def __init__(self, reg: Registry, env: Env, workdir: str, addr: str, *, next_hop: tuple[str, int],
                 message_size_limit: int | None = None, main_cf: str = ""):
        self.reg, self.env, self.dir, self.addr = reg, env, workdir, addr
        self.next_hop = next_hop
        self.message_size_limit = message_size_limit
        self.main_cf = main_cf  # more main.cf lines (tests: smtputf8_enable)
        self.conf = os.path.join(workdir, "conf")
        self.queue_dir = os.path.join(workdir, "queue")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.master_pid = 0
        self.cg: CpuCgroup | None = None

    def start(self) -> "Postfix":
        for d in (self.conf, self.queue_dir, os.path.join(self.dir, "data")):
            os.makedirs(d, exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(os.path.join(self.dir, "data"), pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)
        self.port = free_port(self.addr)
        extra = f"message_size_limit = {self.message_size_limit}" if self.message_size_limit else ""
        extra += "\n" + self.main_cf if self.main_cf else ""
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(dir=self.dir, next_host=self.next_hop[0], next_port=self.next_hop[1],
                                   extra=extra))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(addr=self.addr, port=self.port))
        check = subprocess.run([self.env.postfix, "-c", self.conf, "check"], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"postfix -c {self.conf} check failed: {check.stdout}{check.stderr} "
                             f"(see {self.dir}/maillog)")
        out = open(os.path.join(self.dir, "start-fg.out"), "ab")
        argv = [self.env.postfix, "-c", self.conf, "start-fg"]
        self.cg = CpuCgroup.create("postfix")
        self.proc = self.reg.start("postfix", self.cg.wrap(argv) if self.cg else argv,
                                   stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait_banner(self.addr, self.port, self.proc, what=f"postfix (log {self.dir}/maillog)")
        with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
            self.master_pid = int(f.read().strip())
        return self

    def cpu(self) -> float:
        """The whole instance (master, its daemons, those already exited): its
        cgroup where there is one, else the master's process tree."""
        return self.cg.usage() if self.cg else self.cpu_tree()

    def cpu_tree(self) -> float:
        return tree_cpu(self.master_pid).seconds

    def processes(self) -> int:
        return tree_cpu(self.master_pid).processes

    def queued(self) -> int:
        """Queue files in incoming, active, deferred and hold (hashed subdirectories included)."""
        n = 0
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dirpath, _dirnames, files in os.walk(os.path.join(self.queue_dir, q)):
                n += len(files)
        return n

    def deferrals_on_disk(self) -> int:
        """Messages whose deferral is written down: Postfix's bounce daemon
        appends the reason to a defer logfile per message (defer/) and qmgr
        moves the queue file into deferred/, for a dead destination too."""
        n = 0
        for _dirpath, _dirnames, files in os.walk(os.path.join(self.queue_dir, "defer")):
            n += len(files)
        return n

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            subprocess.run([self.env.postfix, "-c", self.conf, "stop"], capture_output=True, timeout=60)
        finally:
            self.reg.stop(self.proc, timeout=30)
            self.proc = None
            if self.cg is not None:
                self.cg.remove()
                self.cg = None


def postfix_version(env: Env) -> str:
    r = subprocess.run([env.postconf, "-d", "-h", "mail_version"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def which(name: str, *extra: str) -> str | None:
    for path in (shutil.which(name), *extra):
        if path and os.access(path, os.X_OK):
            return path
    return None
