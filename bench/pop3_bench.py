"""POP3 retrieval benchmark: twisted-relay's POP3 server vs Dovecot's.

One mailbox of 1000 x 2 KB messages (delivered with relay.mailbox.maildir.deliver);
Python's poplib logs in and the timed part is LIST + RETR of every message +
QUIT, one session.  Each run gets a fresh copy of the Maildir (all mail in
new/) and an untimed warm-up login (STAT, QUIT) first, so both servers are
measured on a mailbox they have seen once (Dovecot builds its index then).
Figures are medians of --runs runs.  Everything listens on --host (127.0.0.1).

    .venv/bin/python bench/pop3_bench.py [--messages 1000] [--size 2048] [--runs 5] [--no-dovecot]
                               [--host 127.0.0.1] [--json FILE]

Dovecot (Debian: dovecot-pop3d) is installed with apt-get when missing and
when running as root (--no-install to skip); it runs from a private config
in a temporary directory, mail owned by "nobody".
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HOST = "127.0.0.1"  # where both servers listen (--host)
USER = "alice@example.org"
PASSWORD = "bench-password"


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout}s")


class Mismatch(RuntimeError):
    """A server listed or returned other messages than were delivered."""


def make_mailbox(root: str, n: int, size: int) -> str:
    """Deliver n distinct messages of about size octets (each its own number in
    its Message-ID and body, and a line starting with a dot, which goes
    dot-stuffed over the wire); return the Maildir path."""
    from relay.mailbox import maildir
    src = os.path.join(os.path.dirname(root), "message.eml")
    body_line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    path = ""
    for k in range(n):
        head = (b"From: bench@example.net\r\nTo: alice@example.org\r\n"
                b"Subject: benchmark message %d\r\nMessage-ID: <bench.%d@example.net>\r\n\r\n"
                b".message %d of %d\r\n" % (k, k, k, n))
        body = body_line * max(1, (size - len(head)) // len(body_line))
        with open(src, "wb") as f:
            f.write(head + body)
        path = maildir.deliver(root, "example.org", "alice", src, 0, b"Return-Path: <bench@example.net>\r\n")
    os.unlink(src)
    return os.path.dirname(os.path.dirname(path))


def delivered(maildir_path: str) -> dict[bytes, int]:
    """What a POP3 client must get for each delivered message, as it comes out of
    poplib (lines joined with CRLF, dot-stuffing undone): the Maildir files
    with their LF endings as CRLF.  Keyed by content (a multiset: equal
    messages would count twice)."""
    want: dict[bytes, int] = {}
    for sub in ("new", "cur"):
        d = os.path.join(maildir_path, sub)
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            if b"\r\n" in data:
                raise Mismatch(f"{name}: the Maildir holds CRLF line ends; expected LF")
            data = data.replace(b"\n", b"\r\n")
            want[data] = want.get(data, 0) + 1
    return want


def session(port: int, timed: bool, want: dict[bytes, int] | None = None) -> tuple[float, int, int]:
    """One POP3 session; timed: LIST + RETR of every message + QUIT.  Returns the
    seconds, the messages retrieved, and how many of them were compared equal
    to a delivered message (after the timer stops).  Raises Mismatch when the
    server listed or returned other messages than were delivered, so that a
    fast figure from a server that skipped or mangled mail is never reported."""
    c = poplib.POP3(HOST, port, timeout=60)
    c.user(USER)
    c.pass_(PASSWORD)
    if not timed:
        c.stat()
        c.quit()
        return 0.0, 0, 0
    t0 = time.perf_counter()
    _, listing, _ = c.list()
    got = []
    for i in range(1, len(listing) + 1):
        _, lines, _octets = c.retr(i)
        got.append(lines)
    c.quit()
    secs = time.perf_counter() - t0
    compared = 0
    if want is not None:
        left = dict(want)
        expected = sum(want.values())
        if len(listing) != expected:
            raise Mismatch(f"LIST shows {len(listing)} messages; {expected} were delivered")
        for i, lines in enumerate(got, 1):
            data = b"\r\n".join(lines) + b"\r\n"
            if left.get(data, 0) <= 0:
                raise Mismatch(f"RETR {i} returned {len(data)} octets that match no delivered message "
                               f"(or one already retrieved): {data[:120]!r}")
            left[data] -= 1
            compared += 1
        if compared != expected:
            raise Mismatch(f"retrieved and compared {compared} messages; {expected} were delivered")
    return secs, len(got), compared


# -- our server -----------------------------------------------------------------


def serve(root: str, users: str, port: int) -> None:
    """Subprocess mode: run our POP3 server on HOST:port until killed."""
    from twisted.internet import reactor

    from relay.mailbox import pop3
    from relay.mailbox.users import UserDB

    f = pop3.POP3Factory(hostname="bench.example.org", mailbox_root=root,
                         local_domains=["example.org"], userdb=UserDB(users))
    reactor.listenTCP(port, f, interface=HOST)
    reactor.run()


class OurServer:
    name = "twisted-relay"

    def __init__(self, workdir: str):
        from relay.mailbox.users import hash_password

        self.workdir = workdir
        self.users = os.path.join(workdir, "users")
        with open(self.users, "w") as f:
            f.write(f"{USER}:{hash_password(PASSWORD)}\n")
        self.proc: subprocess.Popen | None = None

    def start(self, template: str | None, root: str | None = None) -> int:
        if root is None:
            root = os.path.join(self.workdir, "ours-mail")
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(template, os.path.join(root, "example.org", "alice"))
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--host", HOST, "--serve", root, self.users, str(port)])
        wait_port(port, self.proc)
        return port

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


# -- Dovecot ----------------------------------------------------------------------


def find_dovecot(install: bool) -> str | None:
    exe = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
    if exe or not install:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    print("installing dovecot-pop3d with apt-get ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "dovecot-pop3d"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "dovecot-pop3d"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return find_dovecot(False)


def dovecot_version(exe: str) -> str:
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


class Dovecot:
    def __init__(self, exe: str, workdir: str):
        if os.geteuid() != 0:
            raise RuntimeError("Dovecot needs to start as root here (it switches to the mail user)")
        self.exe = exe
        self.name = f"dovecot {dovecot_version(exe)}"
        self.nobody = pwd.getpwnam("nobody")
        self.dir = d = os.path.join(workdir, "dovecot")
        os.makedirs(d, exist_ok=True)
        os.chmod(workdir, 0o755)
        os.chmod(d, 0o755)
        self.passwd = os.path.join(d, "passwd")
        with open(self.passwd, "w") as f:
            f.write(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
        self.proc: subprocess.Popen | None = None

    def start(self, template: str) -> int:
        d, nobody = self.dir, self.nobody
        mail = os.path.join(d, "mail")
        shutil.rmtree(mail, ignore_errors=True)
        shutil.copytree(template, os.path.join(mail, "example.org", "alice"))
        lock = os.path.join(mail, "example.org", "alice", "relay-pop3.lock")
        if os.path.exists(lock):
            os.unlink(lock)
        for dirpath, _dirnames, filenames in os.walk(mail):
            os.chown(dirpath, nobody.pw_uid, nobody.pw_gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        conf = os.path.join(d, "dovecot.conf")
        with open(conf, "w") as f:
            f.write(f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = pop3
listen = {HOST}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mail}/%d/%n
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd}
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={mail}/%d/%n allow_all_users=yes
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
""")
        self.proc = subprocess.Popen([self.exe, "-F", "-c", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(port, self.proc)
        return port

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def measure(server, template: str, want: dict[bytes, int]) -> tuple[float, int, int]:
    try:
        port = server.start(template)
        session(port, timed=False)
        return session(port, timed=True, want=want)
    finally:
        server.stop()


def proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def large_message(workdir: str, mb: int) -> tuple[float, int, int]:
    """RETR of one mb-MB message from our server: seconds, octets, RSS growth (KB, sampled)."""
    from relay.mailbox import maildir
    src = os.path.join(workdir, "large.eml")
    line = b"y" * 78 + b"\r\n"
    with open(src, "wb") as f:
        f.write(b"Subject: large\r\n\r\n")
        block = line * 1000
        for _ in range(mb * 1024 * 1024 // len(block)):
            f.write(block)
    root = os.path.join(workdir, "large-mail")
    maildir.deliver(root, "example.org", "alice", src, 0, b"")
    os.unlink(src)
    srv = OurServer(workdir)
    port = srv.start(None, root=root)
    try:
        s = socket.create_connection((HOST, port), timeout=60)
        f = s.makefile("rb")
        f.readline()
        s.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
        f.readline()
        f.readline()
        # scrypt at login briefly takes 16 MiB, so the peak (VmHWM) says
        # nothing here: sample the resident size while the message flows.
        base = proc_kb(srv.proc.pid, "VmRSS")
        peak = base
        t0 = time.perf_counter()
        s.sendall(b"RETR 1\r\n")
        octets = 0
        tail = b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = f.read1(1 << 20)
            if not chunk:
                break
            octets += len(chunk)
            tail = (tail + chunk)[-5:]
            if octets % (8 << 20) < len(chunk):
                peak = max(peak, proc_kb(srv.proc.pid, "VmRSS"))
        secs = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
        s.close()
    finally:
        srv.stop()
    return secs, octets, peak - base


def main() -> int:
    global HOST
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--large-mb", type=int, default=0,
                    help="also RETR one message of this many MB and report the server's peak RSS growth")
    ap.add_argument("--host", default=HOST, help="the loopback address both servers listen on")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON (for bench/run.py)")
    ap.add_argument("--serve", nargs=3, metavar=("ROOT", "USERS", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    HOST = args.host
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return 0
    workdir = tempfile.mkdtemp(prefix="pop3-bench-")
    errors: dict[str, str] = {}
    try:
        template = make_mailbox(os.path.join(workdir, "template"), args.messages, args.size)
        servers = [OurServer(workdir)]
        if not args.no_dovecot:
            exe = find_dovecot(not args.no_install)
            if exe is None:
                print("Dovecot not available: measuring twisted-relay only", file=sys.stderr)
            else:
                try:
                    servers.append(Dovecot(exe, workdir))
                except (RuntimeError, OSError, KeyError) as e:
                    print(f"Dovecot cannot run here: {e}", file=sys.stderr)
        want = delivered(template)
        if sum(want.values()) != args.messages or len(want) != args.messages:
            raise Mismatch(f"the template Maildir holds {sum(want.values())} messages "
                           f"({len(want)} distinct); {args.messages} were delivered")
        results: dict[str, list[tuple[float, int, int]]] = {srv.name: [] for srv in servers}
        for i in range(args.runs):
            # interleaved, so load changes hit both alike, and which goes first
            # alternates from round to round (AB BA ...)
            for srv in (list(servers) if i % 2 == 0 else list(reversed(servers))):
                try:
                    results[srv.name].append(measure(srv, template, want))
                except (RuntimeError, OSError, poplib.error_proto) as e:
                    print(f"{srv.name} FAILED: {e}", file=sys.stderr)
                    errors[srv.name] = str(e)
                    servers.remove(srv)
        rows = [(name, res) for name, res in results.items() if res]
        peer = len(rows) > 1
        print(f"POP3: one poplib session, LIST + RETR of {args.messages} x {args.size} B + QUIT, "
              f"median of {args.runs} runs")
        print(f"{'server':<18}{'seconds':>10}{'msg/s':>10}{'best':>8}   runs (msg/s)")
        rates = {}
        for name, res in rows:
            secs = statistics.median(t for t, _, _ in res)
            rate = args.messages / secs
            rates[name] = rate
            each = " ".join(f"{args.messages / t:.0f}" for t, _, _ in res)
            best = args.messages / min(t for t, _, _ in res)
            print(f"{name:<18}{secs:>10.3f}{rate:>10.0f}{best:>8.0f}   {each}")
            print(f"{'':<18}retrieved and compared with what was delivered, per run: "
                  + ", ".join(f"{n}/{c}" for _, n, c in res))
        if peer:
            names = list(rates)
            print(f"ratio ours/dovecot (median msg/s): {rates[names[0]] / rates[names[1]]:.2f}"
                  "   (the machine is shared: compare runs taken side by side)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"messages": args.messages, "size": args.size, "runs": args.runs,
                           "servers": {name: {"seconds": [t for t, _, _ in res],
                                              "retrieved": [n for _, n, _ in res],
                                              "compared": [c for _, _, c in res],
                                              "ours": name == OurServer.name}
                                       for name, res in results.items()},
                           "errors": errors}, f, indent=1)
        if args.large_mb:
            secs, octets, growth = large_message(workdir, args.large_mb)
            print(f"large message: RETR of {octets / 1e6:.0f} MB in {secs:.2f} s "
                  f"({octets / 1e6 / secs:.0f} MB/s); server RSS growth {growth / 1024:.1f} MB (sampled every 8 MB)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if errors:
        print("pop3_bench.py: FAILED: " + "; ".join(f"{k}: {e}" for k, e in errors.items()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
