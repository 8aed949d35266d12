"""relayctl as a real subprocess: check, user add/passwd/delete/list, exit codes.

Exit status: 0 ok, 1 a failed action, 2 usage.  Messages name the key, the
file or the address.  The last tests run a relay in-process and show that it
sees users and aliases changed by relayctl (or an editor) within seconds,
without a restart.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest

from twisted.logger import globalLogPublisher
from twisted.trial import unittest as trial

from relay.mailbox import users as usersmod
from tests.support.certs import cert_files
from tests.support.ctlprobe import probe_imports
from tests.support.relay import InProcessRelay, in_thread, toml_dumps
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relayctl(*args: str, cwd: str, input: str | None = None, env: dict | None = None,
             stdin_devnull: bool = False) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    e["PYTHONPATH"] = ROOT
    e.update(env or {})
    kw: dict = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "relay.admin.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=120, **kw)


class CtlCase(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="relay-ctl-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def ctl(self, *args, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", self.dir)
        return relayctl(*args, **kw)

    def assertExit(self, r: subprocess.CompletedProcess, code: int, *in_stderr: str) -> None:
        self.assertEqual(r.returncode, code, f"stdout={r.stdout!r} stderr={r.stderr!r}")
        for s in in_stderr:
            self.assertIn(s, r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return path


class Check(CtlCase):
    def test_defaults_ok(self):
        r = self.ctl("check")
        self.assertExit(r, 0)
        self.assertEqual(r.stdout, "config OK: built-in defaults\n")

    def test_bad_config_reasons_and_exit_1(self):
        path = self.write("relay.toml", '[smtp]\ntimeout = "soon"\nlisten = ["tcp:x"]\n[relay]\nnetworks = ["x"]\n')
        r = self.ctl("check")
        self.assertExit(r, 1, f"{path}: smtp.timeout: expected a duration", f"{path}: smtp.listen:",
                        f"{path}: relay.networks:")
        self.assertEqual(r.stdout, "")

    def test_not_toml(self):
        path = self.write("relay.toml", "[smtp\n")
        self.assertExit(self.ctl("check"), 1, f"{path}: not valid TOML")

    def test_bad_aliases_file(self):
        aliases = self.write("aliases", "info: alice\nbroken\n")
        self.write("relay.toml", '[local]\naliases = "aliases"\n')
        self.assertExit(self.ctl("check"), 1, f"{aliases}: line 2")

    def test_missing_aliases_file_is_a_warning(self):
        path = self.write("relay.toml", '[local]\naliases = "aliases"\n')
        r = self.ctl("check")
        self.assertExit(r, 0, "warning:", "local.aliases", os.path.join(self.dir, "aliases"))
        self.assertEqual(r.stdout, f"config OK: {path}\n")

    def test_broken_users_file(self):
        users = self.write("users", "alice@localhost:plaintext-password\n")
        self.assertExit(self.ctl("check"), 1, f"{users}: line 1")

    def test_users_file_mode_warning(self):
        self.assertExit(self.ctl("user", "add", "alice@localhost", "--password-stdin", input="pw\n"), 0)
        os.chmod(os.path.join(self.dir, "users"), 0o644)
        self.assertExit(self.ctl("check"), 0, "warning:", "0600")

    def test_missing_tls_files(self):
        self.write("relay.toml", '[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n')
        self.assertExit(self.ctl("check"), 1, "tls.certificate", os.path.join(self.dir, "c.pem"))

    def test_good_tls_files(self):
        files = cert_files("localhost")
        self.write("relay.toml", f'[tls]\ncertificate = "{files.cert_pem}"\nkey = "{files.key_pem}"\n')
        self.assertExit(self.ctl("check"), 0)

    def test_missing_smarthost_password_file(self):
        self.write("relay.toml", '[relay]\nsmarthost = "h.example:587"\nsmarthost_username = "u"\n'
                                 'smarthost_password_file = "pw"\n')
        self.assertExit(self.ctl("check"), 1, "relay.smarthost_password_file", os.path.join(self.dir, "pw"))


class Discovery(CtlCase):
    """--config FILE > $RELAY_CONFIG > ./relay.toml > built-in defaults."""

    def test_order(self):
        for d in ("explicit", "env", "cwd"):
            os.mkdir(os.path.join(self.dir, d))
        explicit = self.write("explicit/relay.toml", "")
        env = self.write("env/relay.toml", "")
        cwd = self.write("cwd/relay.toml", "")
        work = os.path.join(self.dir, "cwd")
        self.assertEqual(self.ctl("check", cwd=self.dir).stdout, "config OK: built-in defaults\n")
        self.assertEqual(self.ctl("check", cwd=work).stdout, f"config OK: {cwd}\n")
        self.assertEqual(self.ctl("check", cwd=work, env={"RELAY_CONFIG": env}).stdout, f"config OK: {env}\n")
        self.assertEqual(self.ctl("--config", explicit, "check", cwd=work, env={"RELAY_CONFIG": env}).stdout,
                         f"config OK: {explicit}\n")
        self.assertEqual(self.ctl("-c", explicit, "check", cwd=work).stdout, f"config OK: {explicit}\n")

    def test_user_verbs_follow_the_config(self):
        # users = relative to the config file's directory, whatever the cwd
        conf = self.write("etc/relay.toml", '[local]\ndomains = ["example.org"]\nusers = "passwd"\n')
        r = self.ctl("--config", conf, "user", "add", "alice@example.org", "--password-stdin", input="pw\n")
        self.assertExit(r, 0)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "etc", "passwd")))
        r = self.ctl("user", "list", env={"RELAY_CONFIG": conf}, cwd="/")
        self.assertEqual(r.stdout, "alice@example.org\n")
        # without a config: ./users and the local domain localhost
        self.assertExit(self.ctl("user", "add", "alice@example.org", "--password-stdin", input="pw\n"), 1,
                        "not a local domain")
        self.assertExit(self.ctl("user", "add", "bob@localhost", "--password-stdin", input="pw\n"), 0)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "users")))

    def test_missing_explicit_config(self):
        self.assertExit(self.ctl("--config", "nope.toml", "check"), 1, "nope.toml: no such file")
        self.assertExit(self.ctl("--config", "nope.toml", "user", "list"), 1, "nope.toml: no such file")
        self.assertExit(self.ctl("user", "list", env={"RELAY_CONFIG": os.path.join(self.dir, "gone.toml")}), 1,
                        "gone.toml: no such file")


class Users(CtlCase):
    def users_path(self) -> str:
        return os.path.join(self.dir, "users")

    def db(self) -> usersmod.UserDB:
        return usersmod.UserDB(self.users_path())

    def add(self, address: str, password: str = "pw") -> subprocess.CompletedProcess:
        return self.ctl("user", "add", address, "--password-stdin", input=password + "\n")

    def test_add_list_passwd_delete(self):
        r = self.add("Alice@LocalHost.", "correct horse")
        self.assertExit(r, 0, "alice@localhost added")
        self.assertEqual(r.stdout, "")
        self.assertEqual(stat.S_IMODE(os.stat(self.users_path()).st_mode), 0o600)
        with open(self.users_path()) as f:
            text = f.read()
        self.assertNotIn("correct horse", text)
        self.assertTrue(text.startswith("alice@localhost:$scrypt$"))
        self.assertTrue(self.db().check("alice@localhost", "correct horse"))
        self.assertExit(self.add("bob@localhost"), 0)
        r = self.ctl("user", "list")
        self.assertExit(r, 0)
        self.assertEqual(r.stdout, "alice@localhost\nbob@localhost\n")

        r = self.ctl("user", "passwd", "ALICE@localhost", "--password-stdin", input="battery staple\n")
        self.assertExit(r, 0, "alice@localhost")
        self.assertTrue(self.db().check("alice@localhost", "battery staple"))
        self.assertFalse(self.db().check("alice@localhost", "correct horse"))
        self.assertEqual(stat.S_IMODE(os.stat(self.users_path()).st_mode), 0o600)

        self.assertExit(self.ctl("user", "delete", "alice@localhost"), 0, "alice@localhost deleted")
        self.assertEqual(self.ctl("user", "list").stdout, "bob@localhost\n")
        self.assertExit(self.ctl("user", "delete", "bob@localhost"), 0)
        r = self.ctl("user", "list")
        self.assertExit(r, 0)
        self.assertEqual(r.stdout, "")
        self.assertEqual(stat.S_IMODE(os.stat(self.users_path()).st_mode), 0o600)

    def test_list_without_file(self):
        r = self.ctl("user", "list")
        self.assertExit(r, 0)
        self.assertEqual(r.stdout, "")

    def test_password_stdin_strips_only_the_newline(self):
        self.assertExit(self.ctl("user", "add", "a@localhost", "--password-stdin", input="  sp ace \n"), 0)
        self.assertTrue(self.db().check("a@localhost", "  sp ace "))
        self.assertExit(self.ctl("user", "add", "b@localhost", "--password-stdin", input="crlf\r\n"), 0)
        self.assertTrue(self.db().check("b@localhost", "crlf"))
        self.assertExit(self.ctl("user", "add", "c@localhost", "--password-stdin", input="no-newline"), 0)
        self.assertTrue(self.db().check("c@localhost", "no-newline"))
        self.assertExit(self.ctl("user", "add", "d@localhost", "--password-stdin", input="first\nsecond\n"), 0)
        self.assertTrue(self.db().check("d@localhost", "first"))
        self.assertExit(self.ctl("user", "add", "e@localhost", "--password-stdin", input="pässwörd\n"), 0)
        self.assertTrue(self.db().check("e@localhost", "pässwörd"))

    def test_empty_password_refused(self):
        for data in ("\n", ""):
            self.assertExit(self.ctl("user", "add", "a@localhost", "--password-stdin", input=data), 1, "password")
        self.assertFalse(os.path.exists(self.users_path()))

    def test_without_password_stdin_and_no_terminal_is_usage(self):
        self.assertExit(self.ctl("user", "add", "a@localhost"), 2, "--password-stdin")
        self.assertFalse(os.path.exists(self.users_path()))

    def test_add_existing(self):
        self.assertExit(self.add("alice@localhost", "one"), 0)
        self.assertExit(self.add("ALICE@localhost", "two"), 1, "alice@localhost already exists")
        self.assertTrue(self.db().check("alice@localhost", "one"))

    def test_passwd_and_delete_unknown(self):
        self.assertExit(self.add("alice@localhost"), 0)
        self.assertExit(self.ctl("user", "passwd", "bob@localhost", "--password-stdin", input="x\n"), 1,
                        "no such user: bob@localhost")
        self.assertExit(self.ctl("user", "delete", "bob@localhost"), 1, "no such user: bob@localhost")
        self.assertEqual(self.ctl("user", "list").stdout, "alice@localhost\n")

    def test_outside_local_domains_refused(self):
        for a in ("bob@example.org", "bob@[127.0.0.1]", "bob@sub.localhost"):
            self.assertExit(self.add(a), 1, a)
        self.assertFalse(os.path.exists(self.users_path()))
        self.write("relay.toml", '[local]\ndomains = ["a.example", "b.example"]\n')
        self.assertExit(self.add("x@localhost"), 1, "x@localhost", "a.example, b.example")
        self.assertExit(self.add("x@B.Example"), 0)

    def test_path_escape_local_parts_refused(self):
        for a in ('"../../etc/passwd"@localhost', '"a/b"@localhost', '".."@localhost', '".hidden"@localhost',
                  '"a\\\\b"@localhost', "a%b@localhost", "a!b@localhost", '"a@b"@localhost', "#x@localhost"):
            self.assertExit(self.add(a), 1, a if "\\" not in a else "is not allowed")
        self.assertFalse(os.path.exists(self.users_path()))

    def test_not_an_address(self):
        # "jörg@localhost" was refused here until issue 17: a UTF-8 user is
        # a user now (tests/test_smtputf8.py); what stays refused is below
        for a in ("alice", "alice@", "@localhost", "a b@localhost", "a@@localhost"):
            self.assertExit(self.add(a), 1, a)
        for a in ("j\u202eörg@localhost", "jö\x85rg@localhost"):
            self.assertExit(self.add(a), 1, "is not allowed in an address")

    def test_broken_users_file_is_not_rewritten(self):
        path = self.write("users", "alice@localhost:plaintext\n")
        self.assertExit(self.add("bob@localhost"), 1, f"{path}: line 1")
        self.assertExit(self.ctl("user", "list"), 1, f"{path}: line 1")
        self.assertExit(self.ctl("user", "delete", "alice@localhost"), 1, f"{path}: line 1")
        with open(path) as f:
            self.assertEqual(f.read(), "alice@localhost:plaintext\n")

    def test_users_file_not_utf8(self):
        path = os.path.join(self.dir, "users")
        with open(path, "wb") as f:
            f.write(b"\xff\n")
        self.assertExit(self.ctl("user", "list"), 1, path)
        self.assertExit(self.add("bob@localhost"), 1, path)

    def test_users_file_location_unusable(self):
        self.write("relay.toml", '[local]\nusers = "notadir/users"\n')
        self.write("notadir", "a file, not a directory")
        self.assertExit(self.add("bob@localhost"), 1, "notadir")

    def test_bad_config_fails_user_verbs(self):
        path = self.write("relay.toml", "[local]\ndomains = 5\n")
        self.assertExit(self.add("bob@localhost"), 1, f"{path}: local.domains")


class Usage(CtlCase):
    def test_usage_errors_exit_2(self):
        for args in ((), ("frob",), ("user",), ("user", "frob"), ("user", "add"), ("user", "delete"),
                     ("user", "passwd"), ("user", "add", "a@localhost", "extra"), ("check", "extra"),
                     ("--bogus", "check"), ("user", "list", "--password-stdin"), ("--config",)):
            r = self.ctl(*args)
            self.assertExit(r, 2)
            self.assertIn("usage: relayctl", r.stderr)

    def test_help_exit_0(self):
        r = self.ctl("--help")
        self.assertExit(r, 0)
        for verb in ("check", "user"):
            self.assertIn(verb, r.stdout)
        r = self.ctl("user", "--help")
        self.assertExit(r, 0)
        for verb in ("add", "passwd", "delete", "list"):
            self.assertIn(verb, r.stdout)


# ---------------------------------------------------------------------------
# what relayctl imports (relay.admin.cli's promise: no Twisted on these verbs)

def queue_verbs(qid: str) -> list[tuple[tuple[str, ...], int]]:
    """The queue, status, reload, check (no TLS) and user verbs, with their
    exit status on a stopped relay."""
    return [(("queue",), 0), (("queue", "--json"), 0), (("queue", "show", qid), 0),
            (("queue", "show", "0" * 16), 1), (("queue", "hold", qid), 0), (("queue", "release", qid), 0),
            (("queue", "retry", "--all"), 0), (("queue", "delete", "0" * 16), 1), (("status",), 1),
            (("reload",), 1), (("check",), 0), (("user", "list"), 0)]


class Imports(CtlCase):
    """relayctl's queue, status, reload, user verbs and check of a config
    without TLS import no Twisted module at all (relay.admin.cli's docstring):
    neither with one queue nor with the queues of several workers (whose
    paths relay.runtime.master also uses)."""

    def spool_with_a_message(self, root: str) -> str:
        from relay.queue import spool as spoolmod
        os.makedirs(os.path.dirname(root), mode=0o700, exist_ok=True)
        sp = spoolmod.Spool(root)
        sp.create()
        env = spoolmod.Envelope(spoolmod.new_id(), "a@client.test", ["x@dest.test"], time.time())
        sp.inject(env, b"Subject: x\r\n\r\nbody\r\n")
        return env.queue_id

    def check_verbs(self, qid: str) -> None:
        for args, code in queue_verbs(qid):
            seen, r = probe_imports("--config", os.path.join(self.dir, "relay.toml"), *args, cwd=self.dir)
            self.assertEqual(seen["rc"], code, f"relayctl {' '.join(args)}: {r.stderr}")
            self.assertEqual(seen["twisted"], [], f"relayctl {' '.join(args)} imported Twisted")

    def test_one_queue(self):
        self.write("relay.toml", 'spool = "spool"\nworkers = 1\n')
        self.check_verbs(self.spool_with_a_message(os.path.join(self.dir, "spool")))

    def test_workers(self):
        self.write("relay.toml", 'spool = "spool"\nworkers = 2\n')
        self.check_verbs(self.spool_with_a_message(os.path.join(self.dir, "spool", "w1")))

    def test_workers_that_never_ran(self):
        """No worker's spool exists yet: every queue is empty, an id is in none
        (this crashed with a traceback for ``show`` and the actions)."""
        self.write("relay.toml", 'spool = "spool"\nworkers = 2\n')
        r = self.ctl("queue", "show", "0" * 16)
        self.assertExit(r, 1, "0000000000000000: no such message in the queue")
        r = self.ctl("queue", "hold", "0" * 16, "1" * 16)
        self.assertExit(r, 1, "0000000000000000: no such message in the queue",
                        "1111111111111111: no such message in the queue")
        self.assertEqual(self.ctl("queue").stdout, "Mail queue is empty\n")


# ---------------------------------------------------------------------------
# a running relay sees relayctl's changes


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class LiveReload(trial.TestCase):
    timeout = 120

    async def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="relay-live-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.aliases = os.path.join(self.dir, "aliases")
        self.relay = InProcessRelay(self.dir, {"local": {"aliases": self.aliases}})
        self.config_path = os.path.join(self.dir, "relay.toml")
        with open(self.config_path, "w") as f:
            f.write(toml_dumps(self.relay.data))
        await self.relay.start()
        self.addCleanup(self.stop_relay)
        self.host, self.port = self.relay.smtp

    async def stop_relay(self):
        # a cleanup, not tearDown: trial (26.10) runs cleanups before tearDown,
        # and the relay must stop before its directory is removed
        await self.relay.stop()

    async def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        r = await in_thread(relayctl, "--config", self.config_path, *args, cwd="/", input=input)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def rcpt_code(self, address: str) -> int:
        with RawSMTP(self.host, self.port) as c:
            c.reply()
            c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<someone@remote.example>")
            code = c.cmd(f"RCPT TO:<{address}>").code
            c.cmd("QUIT")
            return code

    def auth_code(self, user: str, password: str) -> int:
        with RawSMTP(self.host, self.port) as c:
            c.reply()
            c.cmd("EHLO client.example")
            return c.cmd(f"AUTH PLAIN {_plain(user, password)}").code

    async def until(self, fn, *args, want: int, what: str) -> None:
        await apoll(lambda: in_thread(fn, *args).addCallback(lambda code: code == want),
                    timeout=15, interval=0.2, what=what)

    async def test_users_added_changed_deleted(self):
        addr = "newbie@local.test"
        self.assertEqual(await in_thread(self.rcpt_code, addr), 550)
        await self.ctl("user", "add", addr, "--password-stdin", input="first-pw\n")
        await self.until(self.rcpt_code, addr, want=250, what="RCPT to the new user accepted")
        self.assertEqual(await in_thread(self.auth_code, addr, "first-pw"), 235)

        await self.ctl("user", "passwd", addr, "--password-stdin", input="second-pw\n")
        await self.until(self.auth_code, addr, "second-pw", want=235, what="AUTH with the new password")
        self.assertEqual(await in_thread(self.auth_code, addr, "first-pw"), 535)

        await self.ctl("user", "delete", addr)
        await self.until(self.rcpt_code, addr, want=550, what="RCPT to the deleted user refused")
        self.assertEqual(await in_thread(self.auth_code, addr, "second-pw"), 535)

    async def test_new_user_and_alias_accepted_at_once(self):
        # no wait for the poll: the first RCPT after `user add` is accepted
        await self.ctl("user", "add", "quick@local.test", "--password-stdin", input="pw\n")
        self.assertEqual(await in_thread(self.rcpt_code, "quick@local.test"), 250)
        with open(self.aliases + ".new", "w") as f:
            f.write("fast: quick\n")
        os.rename(self.aliases + ".new", self.aliases)
        self.assertEqual(await in_thread(self.rcpt_code, "fast@local.test"), 250)

    async def test_aliases_file_edits(self):
        await self.ctl("user", "add", "alice@local.test", "--password-stdin", input="pw\n")
        self.assertEqual(await in_thread(self.rcpt_code, "sales@local.test"), 550)
        with open(self.aliases + ".new", "w") as f:
            f.write("sales: alice\n")
        os.rename(self.aliases + ".new", self.aliases)
        await self.until(self.rcpt_code, "sales@local.test", want=250, what="RCPT to the new alias accepted")
        # an in-place edit (as an editor may do it)
        with open(self.aliases, "w") as f:
            f.write("support: alice\n")
        await self.until(self.rcpt_code, "sales@local.test", want=550, what="RCPT to the removed alias refused")
        self.assertEqual(await in_thread(self.rcpt_code, "support@local.test"), 250)
        # a broken edit is logged and keeps the previous aliases
        errors: list[dict] = []

        def observe(event):
            if "aliases file not reloaded" in (event.get("log_format") or ""):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        with open(self.aliases, "w") as f:
            f.write("support: alice\nthis line is broken\n")
        await apoll(lambda: errors, timeout=15, interval=0.2, what="the broken aliases file logged")
        self.assertIn(f"{self.aliases}: line 2", errors[0]["error"])
        self.assertEqual(await in_thread(self.rcpt_code, "support@local.test"), 250)
        os.unlink(self.aliases)
        await self.until(self.rcpt_code, "support@local.test", want=550, what="aliases file removed")
        self.assertEqual(len(errors), 1)  # logged once, not at every poll


if __name__ == "__main__":
    unittest.main()
