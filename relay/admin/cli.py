"""relayctl: the administrator's command.

Exit status: 0 done, 1 a failed action, 2 usage.  Messages go to stderr,
data to stdout.  The config is found like the relay finds it (--config,
$RELAY_CONFIG, ./relay.toml, built-in defaults), so relayctl always acts on
the same spool and users file as the relay it sits next to.

relayctl is a short-lived command: its ``queue``, ``status``, ``reload`` and
``user`` verbs, and ``check`` of a config without ``[tls]``, import no
Twisted at all (importing Twisted's AMP costs about 0.4 s before any work):
it speaks AMP to the relay itself (relay.admin.client, relay.control.proto), and the
workers' paths come from relay.config.workerpaths, not from the Twisted-based
relay.runtime.master.  Only ``route`` (its DNS look-ups, relay.delivery.mx) and ``check`` of
a TLS certificate (relay.common.tls) import parts of Twisted, at the verb.
tests/test_relayctl.py::Imports checks this.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from relay import config as configmod
from relay.admin import commands as ctlcmds
from relay.common.address import AddressError, display_address
from relay.intake.aliases import AliasesFileError, AliasFile
from relay.mailbox import users as usersmod

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class Fail(Exception):
    """A failed action: message for stderr, exit status 1."""


class Usage(Exception):
    """Bad usage: message for stderr, exit status 2."""


def err(msg: str) -> None:
    print(f"relayctl: {msg}", file=sys.stderr)


def load_config(args) -> configmod.Config:
    try:
        return configmod.load_effective(args.config)
    except configmod.ConfigError as e:
        raise Fail("bad config:\n" + str(e))


# -- check -------------------------------------------------------------------


def cmd_check(args) -> int:
    problems: list[str] = []
    warnings: list[str] = []
    try:
        cfg = configmod.load_effective(args.config)
    except configmod.ConfigError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return EXIT_FAIL
    if cfg.tls.enabled:
        # only here: relay.common.tls imports OpenSSL and Twisted's TLS (measured: 0.43 s, 258
        # modules), which the other verbs, and a config without [tls], do not need
        from relay.common.tls import TLSConfigError, load_server_tls

        try:
            t = load_server_tls(cfg.tls.certificate, cfg.tls.key)
            if t.expired:
                warnings.append(f"{cfg.source}: tls.certificate: {cfg.tls.certificate} expired on "
                                f"{t.not_after.isoformat()}")
        except TLSConfigError as e:
            problems.append(f"{cfg.source}: {e}")
    try:
        db = usersmod.UserDB(cfg.local.users)
        if not usersmod.file_mode_ok(cfg.local.users):
            warnings.append(f"{cfg.local.users}: readable by group or others; should be mode 0600")
        for u in db.users():
            if u.rpartition("@")[2] not in cfg.local.domains:
                warnings.append(f"{cfg.local.users}: user {u} is not in a local domain")
    except usersmod.UsersFileError as e:
        problems.append(str(e))
    if cfg.local.aliases:
        if not os.path.exists(cfg.local.aliases):
            warnings.append(f"{cfg.source}: local.aliases: {cfg.local.aliases} does not exist")
        else:
            try:
                AliasFile(cfg.local.aliases, cfg.local.domains)
            except AliasesFileError as e:
                problems.append(str(e))
    if cfg.dkim.keys:
        from relay.runtime.parts import PartError, load_dkim_keys  # only with keys: cryptography's import

        try:
            warnings += [w for k in load_dkim_keys(cfg) for w in k.warnings]
        except PartError as e:
            problems.append(str(e))
    if cfg.relay.smarthost_ca_file:
        try:
            with open(cfg.relay.smarthost_ca_file, "rb") as f:
                if b"-----BEGIN CERTIFICATE-----" not in f.read():
                    problems.append(f"{cfg.source}: relay.smarthost_ca_file: {cfg.relay.smarthost_ca_file} "
                                    "holds no PEM certificate")
        except OSError as e:
            problems.append(f"{cfg.source}: relay.smarthost_ca_file: {cfg.relay.smarthost_ca_file}: {e.strerror}")
    if cfg.relay.smarthost_password_file:
        try:
            with open(cfg.relay.smarthost_password_file, "rb"):
                pass
        except OSError as e:
            problems.append(f"{cfg.source}: relay.smarthost_password_file: "
                            f"{cfg.relay.smarthost_password_file}: {e.strerror}")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return EXIT_FAIL
    print(f"config OK: {cfg.source}")
    return EXIT_OK


# -- user ----------------------------------------------------------------------


def _read_password(args, confirm: bool = True) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            raise Fail("no password on standard input")
        return line
    if not sys.stdin.isatty():
        raise Usage("standard input is not a terminal: use --password-stdin")
    pw = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Again: ") != pw:
        raise Fail("the passwords do not match")
    if not pw:
        raise Fail("empty password")
    return pw


def _user_address(cfg, address: str) -> str:
    try:
        return usersmod.normalize_user(address, cfg.local.domains)
    except AddressError as e:
        raise Fail(str(e))


def _shown(address: str) -> str:
    """A user name as people read it: with U-labels, and the stored
    A-label form after it when the two differ (ASCII names: as they are)."""
    readable = display_address(address)
    return address if readable == address else f"{readable} (stored as {address})"


def cmd_user(args) -> int:
    cfg = load_config(args)
    path = cfg.local.users
    try:
        if args.user_cmd == "list":
            for u in usersmod.list_users(path):
                print(u)
            return EXIT_OK
        address = _user_address(cfg, args.address)
        if args.user_cmd == "add":
            pw = _read_password(args)
            try:
                usersmod.add_user(path, address, pw)
            except usersmod.UserExists:
                raise Fail(f"user {address} already exists (use: relayctl user passwd {address})")
            print(f"user {_shown(address)} added", file=sys.stderr)
        elif args.user_cmd == "passwd":
            if not usersmod.UserDB(path).exists(address):
                raise Fail(f"no such user: {address}")
            pw = _read_password(args)
            try:
                usersmod.set_password(path, address, pw)
            except usersmod.NoSuchUser:
                raise Fail(f"no such user: {address}")
            print(f"password of {_shown(address)} changed", file=sys.stderr)
        elif args.user_cmd == "delete":
            try:
                usersmod.delete_user(path, address)
            except usersmod.NoSuchUser:
                raise Fail(f"no such user: {address}")
            print(f"user {_shown(address)} deleted (its mailbox is kept)", file=sys.stderr)
    except usersmod.UsersFileError as e:
        raise Fail(str(e))
    except PermissionError as e:
        raise Fail(f"{e.filename or path}: permission denied")
    except OSError as e:
        raise Fail(f"{e.filename or path}: {e.strerror}")
    return EXIT_OK


# -- parser --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit status 2 with our prefix
        self.print_usage(sys.stderr)
        err(message)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="relayctl", description="Administer a twisted-relay mail relay.")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="config file (default: $RELAY_CONFIG, else ./relay.toml, else built-in defaults)")
    p.add_argument("--fleet", action="store_true",
                   help="queue (the listing) and status of every node in control.fleet, one merged view")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("check", help="validate the config; exit non-zero with the reasons")
    c.set_defaults(func=cmd_check)

    u = sub.add_parser("user", help="manage mailbox users (add, passwd, delete, list)")
    usub = u.add_subparsers(dest="user_cmd", metavar="ACTION", parser_class=_Parser)
    usub.required = True
    for name, helptext in (("add", "add a user"), ("passwd", "change a user's password")):
        x = usub.add_parser(name, help=helptext)
        x.add_argument("address", metavar="ADDRESS")
        x.add_argument("--password-stdin", action="store_true",
                       help="read the password as one line from standard input")
    x = usub.add_parser("delete", help="delete a user (the mailbox is kept)")
    x.add_argument("address", metavar="ADDRESS")
    usub.add_parser("list", help="list users")
    u.set_defaults(func=cmd_user)

    ctlcmds.add_commands(sub)  # queue, route, status, reload
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Fail as e:
        err(str(e))
        return EXIT_FAIL
    except Usage as e:
        err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
