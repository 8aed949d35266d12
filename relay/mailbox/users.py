"""Credentials: the users file, its hashes, and a twisted.cred checker.

The file holds one line per user, ``address:hash``, where hash is
``$scrypt$ln=14,r=8,p=1$<salt>$<key>`` (base64, no padding): a salted slow
hash, never a password.  It is written atomically with mode 0600 under an
exclusive lock, so ``relayctl user ...`` can edit it while the relay runs;
the relay notices a change by stat() (``UserDB.refresh``) and reloads it.

Verifying a password costs tens of milliseconds of CPU on purpose, so the
service runs it in a thread (``PasswordChecker``), never on the reactor.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass

from relay.common import fileio, privdrop
from relay.common.address import Address, AddressError, login_key, parse_mailbox
from relay.common.fileio import makedirs_durable

SCRYPT_LN = 14  # n = 2**14: ~16 MiB and ~40 ms per check
SCRYPT_R = 8
SCRYPT_P = 1


class UsersFileError(Exception):
    """The users file cannot be read or parsed; names the file and line."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii").rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s + "=" * (-len(s) % 4))


def hash_password(password: str, *, ln: int = SCRYPT_LN) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=2**ln, r=SCRYPT_R, p=SCRYPT_P,
        maxmem=2**ln * SCRYPT_R * 128 * 2, dklen=32,
    )
    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, scheme, params, salt, key = hashed.split("$")
        if scheme != "scrypt":
            return False
        p = dict(kv.split("=") for kv in params.split(","))
        ln, r, par = int(p["ln"]), int(p["r"]), int(p["p"])
        want = _unb64(key)
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=_unb64(salt), n=2**ln, r=r, p=par,
            maxmem=2**ln * r * 128 * 2, dklen=len(want),
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(got, want)


# A hash to check against for unknown users, so that a failed login costs
# the same time whether or not the account exists.
_DUMMY_HASH = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(8))
    return _DUMMY_HASH


def normalize_user(address: str, local_domains: tuple[str, ...] | None = None) -> str:
    """Canonical user name: the address with local part and domain lower-cased.

    A UTF-8 address (RFC 6531) is a user name too: its local part in NFC,
    its domain in A-labels (``jörg@bücher.example`` is the user
    ``jörg@xn--bcher-kva.example``), as relay.common.address stores it.

    Raises AddressError for anything that is not a plain mailbox in one of
    local_domains (when given), or whose local part could escape a Maildir
    root ("/", "..", NUL, leading ".").
    """
    try:
        addr: Address = parse_mailbox(address.strip(), utf8=True)
    except AddressError as e:
        raise AddressError(f"{address!r}: {e}", e.status)
    if addr.literal:
        raise AddressError(f"{address!r}: an address literal cannot be a user")
    if local_domains is not None and addr.domain not in local_domains:
        raise AddressError(
            f"{address!r}: domain {addr.domain} is not a local domain "
            f"(local.domains: {', '.join(local_domains) or 'none'})"
        )
    try:
        check_safe_local_part(addr.local)
    except AddressError as e:
        raise AddressError(f"{address!r}: {e}", e.status)
    if addr.has_routing:
        # policy refuses %, ! and @ in local parts (sender-specified routing),
        # so such a user could never receive mail
        raise AddressError(f"{address!r}: local part {addr.local!r} holds a routing character (%, ! or @)")
    if addr.local.startswith("#"):
        # the users file would read the line as a comment
        raise AddressError(f"{address!r}: a local part may not start with '#'")
    if '"' in addr.local:
        # its canonical form needs a backslash escape, which a mailbox name refuses
        raise AddressError(f"{address!r}: a local part may not contain '\"'")
    return addr.lower()


def unsafe_path_part(name: str, also: str = "") -> bool:
    """True for a name that is not safe as one path component below the
    mailbox root: empty, with "/" or "\\", a leading "." (".", ".." and
    hidden names), a control character (NUL included; C1 and DEL in a
    non-ASCII name) or a character of `also`.  Local parts here, domains in
    relay.mailbox.maildir."""
    return (not name or "/" in name or "\\" in name or name.startswith(".")
            or any(ord(c) < 32 or c in also for c in name)
            or (not name.isascii() and any(127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in name)))


def check_safe_local_part(local: str) -> None:
    """Refuse local parts that could name a path outside the mailbox root."""
    if unsafe_path_part(local):
        raise AddressError(f"local part {local!r} is not allowed for a mailbox", "5.1.3")


@dataclass(frozen=True)
class _Stamp:
    ino: int
    size: int
    mtime_ns: int


class UserDB:
    """The users file as a read-only, reloadable mapping address -> hash."""

    def __init__(self, path: str):
        self.path = path
        self._users: dict[str, str] = {}
        self._order: list[str] = []
        self._stamp: _Stamp | None = None
        self._bad_stamp: _Stamp | None = None
        self.refresh()

    # -- reading ---------------------------------------------------------
    @staticmethod
    def parse(path: str, text: str) -> tuple[dict[str, str], list[str]]:
        users: dict[str, str] = {}
        order: list[str] = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.rpartition(":")
            if not sep or not name or not hashed.startswith("$scrypt$"):
                raise UsersFileError(f"{path}: line {n}: expected 'address:$scrypt$...'")
            name = login_key(name)
            if name in users:
                # which line would win is a guess, and `user passwd` rewrites one
                raise UsersFileError(f"{path}: line {n}: user {name} listed twice")
            users[name] = hashed
            order.append(name)
        return users, order

    def _stat(self) -> _Stamp | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UsersFileError(f"{self.path}: cannot read: {e.strerror}")
        return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)

    def refresh(self) -> bool:
        """Reload if the file changed since the last load; True if reloaded.

        A file that cannot be parsed raises UsersFileError and the previous
        users are kept; it raises once per bad version of the file, not on
        every call (the relay polls, and logs each error).
        """
        stamp = self._stat()
        if stamp == self._stamp and stamp is not None:
            return False
        if stamp is not None and stamp == self._bad_stamp:
            return False
        if stamp is None:
            changed = self._stamp is not None or self._users
            self._users, self._order, self._stamp = {}, [], None
            return bool(changed)
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            self._users, self._order, self._stamp = {}, [], None
            return True
        except (OSError, UnicodeDecodeError) as e:
            self._bad_stamp = stamp
            raise UsersFileError(f"{self.path}: cannot read: {e}")
        try:
            users, order = self.parse(self.path, text)
        except UsersFileError:
            self._bad_stamp = stamp
            raise
        self._users, self._order, self._stamp = users, order, stamp
        return True

    def exists(self, address: str) -> bool:
        return login_key(address) in self._users

    def users(self) -> list[str]:
        return list(self._order)

    def first_user_in(self, domain: str) -> str | None:
        for u in self._order:
            if u.rpartition("@")[2] == domain:
                return u
        return self._order[0] if self._order else None

    def check(self, address: str, password: str) -> bool:
        """Blocking (slow hash): call from a thread."""
        hashed = self._users.get(login_key(address))
        if hashed is None:
            verify_password(password, _dummy_hash())
            return False
        return verify_password(password, hashed)

    def __len__(self) -> int:
        return len(self._users)


# -- editing (relayctl) -------------------------------------------------------


@contextmanager
def locked(path: str):
    """Exclusive lock on <path>.lock, held while reading and rewriting path.

    As root, the whole edit runs as the user who controls the file's
    directory (relay.common.privdrop): a link planted there as the lock or as the
    file is never followed with root's rights, and the new file is that
    user's.  The lock is never opened through a link, nor unless it is a
    regular file."""
    lock_path = path + ".lock"
    d = os.path.dirname(os.path.abspath(path))
    try:
        with privdrop.as_controller(d):
            # 0755 whatever the umask: the relay (maybe another user) must reach the file, and
            # nobody else may put names in the directory
            _makedirs(d, 0o755)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             0o600)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UsersFileError(f"{lock_path} is a symbolic link: not following it (remove it)")
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise UsersFileError(f"{lock_path} is not a regular file: not using it (remove it)")
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)
    except privdrop.UnsafePath as e:
        raise UsersFileError(f"{path}: {e}")


def _makedirs(d: str, mode: int) -> None:
    """os.makedirs with ``mode`` for every directory it makes (os.makedirs
    gives the ones above the last 0777 less the umask)."""
    _makedirs_each(d, mode)
    # the users file must not vanish with a new directory in a power loss:
    # every parent fsynced (also when it exists: an earlier run may have
    # crashed before its fsync)
    makedirs_durable(d, mode)


def _makedirs_each(d: str, mode: int) -> None:
    if os.path.isdir(d):
        return
    parent = os.path.dirname(d)
    if parent != d:
        _makedirs_each(parent, mode)
    try:
        os.mkdir(d)
    except FileExistsError:
        return
    os.chmod(d, mode)


def _keep_owner(fd: int, path: str) -> None:
    """As root, give the new file the old one's owner: relayctl run by root
    must not turn a users file the relay (running as its own user) reads
    into one it cannot read."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if (st.st_uid, st.st_gid) != (0, 0):
        os.fchown(fd, st.st_uid, st.st_gid)


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write path durably: temp file, fsync, rename, fsync the directory
    (relay.common.fileio); mode whatever the umask, the old file's owner kept."""
    fileio.write_atomic(path, data, tmp_path=os.path.join(os.path.dirname(os.path.abspath(path)),
                                                          fileio.temp_name(os.path.basename(path), pid=True)),
                        mode=mode, chmod=True, setup=lambda fd: _keep_owner(fd, path))


class UserExists(Exception):
    pass


class NoSuchUser(Exception):
    pass


def _read_lines(path: str) -> list[str]:
    text = _read_text(path)
    UserDB.parse(path, text)  # refuse to rewrite a file we cannot parse
    return text.splitlines()


def _write_lines(path: str, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8") if lines else b""
    atomic_write(path, data, 0o600)


def _line_user(line: str) -> str | None:
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    return login_key(s.rpartition(":")[0])


def add_user(path: str, address: str, password: str) -> None:
    hashed = hash_password(password)
    with locked(path):
        lines = _read_lines(path)
        if any(_line_user(ln) == address for ln in lines):
            raise UserExists(address)
        lines.append(f"{address}:{hashed}")
        _write_lines(path, lines)


def set_password(path: str, address: str, password: str) -> None:
    hashed = hash_password(password)
    with locked(path):
        lines = _read_lines(path)
        for i, ln in enumerate(lines):
            if _line_user(ln) == address:
                lines[i] = f"{address}:{hashed}"
                break
        else:
            raise NoSuchUser(address)
        _write_lines(path, lines)


def delete_user(path: str, address: str) -> None:
    with locked(path):
        lines = _read_lines(path)
        kept = [ln for ln in lines if _line_user(ln) != address]
        if len(kept) == len(lines):
            raise NoSuchUser(address)
        _write_lines(path, kept)


def list_users(path: str) -> list[str]:
    try:
        with privdrop.as_controller(os.path.dirname(os.path.abspath(path))):
            text = _read_text(path)
    except privdrop.UnsafePath as e:
        raise UsersFileError(f"{path}: {e}")
    users, order = UserDB.parse(path, text)
    return order


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UsersFileError(f"{path}: permission denied")
        raise UsersFileError(f"{path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise UsersFileError(f"{path}: not valid UTF-8: {e}")


def file_mode_ok(path: str) -> bool:
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    except FileNotFoundError:
        return True


# -- twisted.cred -------------------------------------------------------------


def make_checker(db: UserDB, threadpool=None, reactor=None):
    """A twisted.cred checker for IUsernamePassword over db (hash in a thread)."""
    from twisted.cred import credentials, error
    from twisted.cred.checkers import ICredentialsChecker
    from twisted.internet import threads
    from zope.interface import implementer

    @implementer(ICredentialsChecker)
    class PasswordChecker:
        credentialInterfaces = (credentials.IUsernamePassword,)

        def requestAvatarId(self, creds):
            user = creds.username
            pw = creds.password
            if isinstance(user, bytes):
                user = user.decode("utf-8", "replace")
            if isinstance(pw, bytes):
                pw = pw.decode("utf-8", "replace")
            name = login_key(user)

            def check():
                return db.check(name, pw)

            if threadpool is not None:
                from twisted.internet import reactor as default_reactor

                d = threads.deferToThreadPool(reactor or default_reactor, threadpool, check)
            else:
                d = threads.deferToThread(check)

            def done(ok):
                if ok:
                    return name
                raise error.UnauthorizedLogin("bad credentials")

            return d.addCallback(done)

    return PasswordChecker()
