"""OpenDKIM's verifier (Debian's opendkim-tools) as a second, independent check of our signatures.

``opendkim-testmsg`` verifies a message read from stdin and looks the key
up in DNS through the C library's resolver: /etc/resolv.conf, port 53, no
way to point it elsewhere.  So it runs in its own user, mount and network
namespaces (``unshare -rmn``, no privilege needed where user namespaces are
allowed): there the loopback is brought up, a resolv.conf naming 127.0.0.1
is bind-mounted over /etc/resolv.conf, and a small DNS server answering the
test's TXT records listens on 127.0.0.1:53.  Nothing outside the namespace
sees any of it.

    from tests.support import opendkim
    reason = opendkim.unavailable()          # None, or why the tests skip
    records = {"sel._domainkey.example.org": ["v=DKIM1; k=rsa; ", "p=..."]}
    rc, out = opendkim.verify(message, records)                       # opendkim-testmsg
    rc, out = opendkim.run(["opendkim-testkey", "-d", ...], records)  # any command

In the namespace this module runs as ``python -m tests.support.opendkim
RECORDS.json STDIN-FILE COMMAND...`` and exits with the command's status.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTMSG = "opendkim-testmsg"


def _tool() -> str | None:
    return shutil.which(TESTMSG) or (f"/usr/sbin/{TESTMSG}" if os.path.exists(f"/usr/sbin/{TESTMSG}") else None)


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why opendkim-testmsg cannot be run here (None: it can)."""
    if _tool() is None:
        return f"{TESTMSG} is not installed (Debian: apt-get install opendkim-tools)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    r = subprocess.run(["unshare", "-rmn", "true"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"user namespaces are not allowed here (unshare -rmn: {r.stderr.strip()})"
    return None


def run(argv: list[str], records: dict[str, list[str]], stdin: bytes = b"", timeout: float = 60) -> tuple[int, str]:
    """(exit status, stderr and stdout) of argv run in the namespaces, with
    records (name -> the TXT record's strings) as the only DNS there is."""
    with tempfile.TemporaryDirectory() as d:
        rec_path, in_path = os.path.join(d, "records.json"), os.path.join(d, "stdin")
        with open(rec_path, "w") as f:
            json.dump(records, f)
        with open(in_path, "wb") as f:
            f.write(stdin)
        r = subprocess.run(["unshare", "-rmn", sys.executable, "-m", "tests.support.opendkim", rec_path, in_path,
                            *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stderr


def verify(message: bytes, records: dict[str, list[str]], timeout: float = 60) -> tuple[int, str]:
    """opendkim-testmsg's (exit status, output) for message: 0 when its (first) signature verifies."""
    tool = _tool()
    assert tool is not None, unavailable()
    return run([tool], records, message, timeout)


def testkey(domain: str, selector: str, keyfile: str, records: dict[str, list[str]]) -> tuple[int, str]:
    """opendkim-testkey's (exit status, output): 0 when the record published
    for domain/selector matches keyfile's private key.  It resolves through
    libunbound, not resolv.conf: an unbound configuration forwards every
    name to the namespace's DNS server on 127.0.0.1."""
    with tempfile.TemporaryDirectory() as d:
        unbound, conf = os.path.join(d, "unbound.conf"), os.path.join(d, "opendkim.conf")
        with open(unbound, "w") as f:
            f.write('server:\n  do-ip6: no\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
                    'forward-zone:\n  name: "."\n  forward-addr: 127.0.0.1\n')
        with open(conf, "w") as f:
            f.write(f"ResolverConfiguration {unbound}\n")
        tool = shutil.which("opendkim-testkey") or "/usr/sbin/opendkim-testkey"
        return run([tool, "-x", conf, "-d", domain, "-s", selector, "-k", keyfile, "-vvv"], records)


# ---------------------------------------------------------------- inside the namespace

def _loopback_up() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", ifr)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    finally:
        s.close()


def _bind_resolv_conf(path: str) -> None:
    MS_BIND = 4096
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(path.encode(), b"/etc/resolv.conf", None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind mount over /etc/resolv.conf")


def _serve(sock: socket.socket, records: dict[str, list[str]]) -> None:
    zone = {name.lower().rstrip("."): strings for name, strings in records.items()}
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            q = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - a test server: ignore what it cannot read
            continue
        r = dns.message.make_response(q)
        r.flags |= 0x400  # AA
        question = q.question[0]
        name = question.name.to_text().lower().rstrip(".")
        if name in zone and question.rdtype == dns.rdatatype.TXT:
            txt = " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in zone[name])
            r.answer.append(dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, dns.rdatatype.TXT, txt))
        elif name not in zone:
            r.set_rcode(3)  # NXDOMAIN
        sock.sendto(r.to_wire(max_size=65535), peer)


def main(argv: list[str]) -> int:
    rec_path, in_path, *command = argv
    with open(rec_path) as f:
        records = json.load(f)
    _loopback_up()
    conf = rec_path + ".resolv.conf"
    with open(conf, "w") as f:
        f.write("nameserver 127.0.0.1\noptions edns0\n")
    _bind_resolv_conf(conf)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    threading.Thread(target=_serve, args=(sock, records), daemon=True).start()
    with open(in_path, "rb") as stdin:
        r = subprocess.run(command, stdin=stdin, capture_output=True)
    sys.stderr.write(r.stderr.decode("utf-8", "replace") + r.stdout.decode("utf-8", "replace"))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
