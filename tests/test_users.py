"""relay.mailbox.users: the credentials file, its hashes, editing under a lock, reloads."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import unittest
from unittest import mock

from twisted.cred import credentials, error
from twisted.trial import unittest as trial

from relay.common.address import AddressError
from relay.mailbox import users as usersmod

LOCAL = ("local.test", "second.test")


class Hashes(unittest.TestCase):
    def test_hash_format_and_verify(self):
        h = usersmod.hash_password("s3cret", ln=10)
        self.assertRegex(h, r"^\$scrypt\$ln=10,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$")
        self.assertNotIn("s3cret", h)
        self.assertTrue(usersmod.verify_password("s3cret", h))
        self.assertFalse(usersmod.verify_password("s3cret ", h))
        self.assertFalse(usersmod.verify_password("", h))

    def test_default_cost_is_slow(self):
        self.assertTrue(usersmod.hash_password("x").startswith(f"$scrypt$ln={usersmod.SCRYPT_LN},"))
        self.assertGreaterEqual(usersmod.SCRYPT_LN, 14)

    def test_salted(self):
        self.assertNotEqual(usersmod.hash_password("x", ln=4), usersmod.hash_password("x", ln=4))

    def test_unicode_password(self):
        h = usersmod.hash_password("pässwörd☃", ln=4)
        self.assertTrue(usersmod.verify_password("pässwörd☃", h))
        self.assertFalse(usersmod.verify_password("passwort", h))

    def test_malformed_hashes_never_verify(self):
        for h in ("", "plain", "$scrypt$", "$bcrypt$ln=4,r=8,p=1$AAAA$AAAA", "$scrypt$ln=x,r=8,p=1$AAAA$AAAA",
                  "$scrypt$r=8,p=1$AAAA$AAAA", "$scrypt$ln=4,r=8,p=1$!!!$AAAA", "$scrypt$ln=4=1,r=8,p=1$AA$AA"):
            self.assertFalse(usersmod.verify_password("x", h), h)


class NormalizeUser(unittest.TestCase):
    def test_canonical(self):
        self.assertEqual(usersmod.normalize_user(" Alice@LOCAL.Test. ", LOCAL), "alice@local.test")
        self.assertEqual(usersmod.normalize_user('"Alice"@local.test', LOCAL), "alice@local.test")
        self.assertEqual(usersmod.normalize_user('"John Doe"@second.test', LOCAL), '"john doe"@second.test')
        self.assertEqual(usersmod.normalize_user("any@where.example"), "any@where.example")

    def refused(self, address: str, *words: str) -> str:
        with self.assertRaises(AddressError, msg=address) as cm:
            usersmod.normalize_user(address, LOCAL)
        msg = str(cm.exception)
        self.assertIn(repr(address), msg)  # every message names the address
        for w in words:
            self.assertIn(w, msg)
        return msg

    def test_outside_local_domains(self):
        self.refused("bob@remote.example", "not a local domain", "local.test, second.test")

    def test_not_an_address(self):
        self.refused("bob")
        self.refused("bob@")
        self.refused("a b@local.test")
        self.refused("bob@local.test@x")
        self.refused("")

    def test_literal(self):
        self.refused("bob@[127.0.0.1]", "literal")

    def test_path_escapes(self):
        for a in ('"../x"@local.test', '"a/b"@local.test', '".."@local.test', '".x"@local.test',
                  '"a\\\\b"@local.test', '"/etc"@local.test'):
            self.refused(a, "not allowed")

    def test_routing_characters(self):
        for a in ("a%b@local.test", "a!b@local.test", '"a@b"@local.test'):
            self.refused(a, "routing")

    def test_comment_character(self):
        self.refused("#bob@local.test", "'#'")

    def test_quote_in_local_part(self):
        # canonical form "a\"b"@... holds a backslash: local delivery would refuse the mailbox
        self.refused('"a\\"b"@local.test', "'\"'")


class UsersFileCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-users-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "etc", "users")
        # cheap hashes: these tests are about the file, not the hash cost
        p = mock.patch.object(usersmod, "SCRYPT_LN", 4)
        p.start()
        self.addCleanup(p.stop)
        h = mock.patch.object(usersmod, "hash_password",
                              lambda pw, ln=None, _h=usersmod.hash_password: _h(pw, ln=4))
        h.start()
        self.addCleanup(h.stop)

    def mode(self) -> int:
        return stat.S_IMODE(os.stat(self.path).st_mode)

    def text(self) -> str:
        with open(self.path) as f:
            return f.read()

    def leftovers(self) -> list[str]:
        d = os.path.dirname(self.path)
        return sorted(n for n in os.listdir(d) if n not in ("users", "users.lock"))


class Editing(UsersFileCase):
    def test_add_creates_file_0600_and_directory(self):
        old = os.umask(0)
        try:
            usersmod.add_user(self.path, "alice@local.test", "pw-a")
        finally:
            os.umask(old)
        self.assertEqual(self.mode(), 0o600)
        self.assertEqual(self.leftovers(), [])
        self.assertEqual(usersmod.list_users(self.path), ["alice@local.test"])
        self.assertNotIn("pw-a", self.text())
        db = usersmod.UserDB(self.path)
        self.assertTrue(db.check("alice@local.test", "pw-a"))
        self.assertTrue(db.check(" ALICE@local.test ", "pw-a"))
        self.assertFalse(db.check("alice@local.test", "pw-b"))

    def test_rewrite_restores_mode_0600(self):
        usersmod.add_user(self.path, "alice@local.test", "pw")
        os.chmod(self.path, 0o644)
        self.assertFalse(usersmod.file_mode_ok(self.path))
        usersmod.add_user(self.path, "bob@local.test", "pw")
        self.assertEqual(self.mode(), 0o600)
        self.assertTrue(usersmod.file_mode_ok(self.path))

    def test_add_twice_refused(self):
        usersmod.add_user(self.path, "alice@local.test", "pw")
        with self.assertRaises(usersmod.UserExists):
            usersmod.add_user(self.path, "alice@local.test", "pw2")
        self.assertTrue(usersmod.UserDB(self.path).check("alice@local.test", "pw"))

    def test_passwd(self):
        usersmod.add_user(self.path, "alice@local.test", "old")
        usersmod.add_user(self.path, "bob@local.test", "bobs")
        ino = os.stat(self.path).st_ino
        usersmod.set_password(self.path, "alice@local.test", "new")
        db = usersmod.UserDB(self.path)
        self.assertTrue(db.check("alice@local.test", "new"))
        self.assertFalse(db.check("alice@local.test", "old"))
        self.assertTrue(db.check("bob@local.test", "bobs"))
        self.assertEqual(db.users(), ["alice@local.test", "bob@local.test"])
        self.assertNotEqual(os.stat(self.path).st_ino, ino)  # replaced by rename, never rewritten in place
        with self.assertRaises(usersmod.NoSuchUser):
            usersmod.set_password(self.path, "carol@local.test", "x")

    def test_delete(self):
        usersmod.add_user(self.path, "alice@local.test", "a")
        usersmod.add_user(self.path, "bob@local.test", "b")
        usersmod.delete_user(self.path, "alice@local.test")
        self.assertEqual(usersmod.list_users(self.path), ["bob@local.test"])
        with self.assertRaises(usersmod.NoSuchUser):
            usersmod.delete_user(self.path, "alice@local.test")
        usersmod.delete_user(self.path, "bob@local.test")
        self.assertEqual(usersmod.list_users(self.path), [])
        self.assertEqual(self.mode(), 0o600)

    def test_comments_and_blank_lines_kept(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("# admins\n\nalice@local.test:" + usersmod.hash_password("a") + "\n")
        usersmod.add_user(self.path, "bob@local.test", "b")
        usersmod.delete_user(self.path, "alice@local.test")
        self.assertTrue(self.text().startswith("# admins\n\nbob@local.test:$scrypt$"))

    def test_refuses_to_rewrite_a_broken_file(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("alice@local.test:plaintext\n")
        with self.assertRaises(usersmod.UsersFileError) as cm:
            usersmod.add_user(self.path, "bob@local.test", "b")
        self.assertIn(f"{self.path}: line 1", str(cm.exception))
        self.assertEqual(self.text(), "alice@local.test:plaintext\n")

    def test_not_utf8_is_a_users_file_error(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"\xff\xfe:$scrypt$\n")
        for fn in (lambda: usersmod.add_user(self.path, "bob@local.test", "b"),
                   lambda: usersmod.list_users(self.path),
                   lambda: usersmod.UserDB(self.path)):
            with self.assertRaises(usersmod.UsersFileError) as cm:
                fn()
            self.assertIn(self.path, str(cm.exception))

    def test_unreadable_file(self):
        # simulated: the tests may run as root, who reads everything
        usersmod.add_user(self.path, "alice@local.test", "a")
        real_open = open

        def deny(path, *a, **kw):
            if path == self.path:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *a, **kw)

        with mock.patch("builtins.open", deny):
            with self.assertRaises(usersmod.UsersFileError) as cm:
                usersmod.list_users(self.path)
            self.assertEqual(str(cm.exception), f"{self.path}: permission denied")
            with self.assertRaises(usersmod.UsersFileError):
                usersmod.add_user(self.path, "bob@local.test", "b")

    def test_failed_write_leaves_old_file_and_no_temp(self):
        usersmod.add_user(self.path, "alice@local.test", "a")
        before = self.text()
        with mock.patch("os.rename", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                usersmod.add_user(self.path, "bob@local.test", "b")
        self.assertEqual(self.text(), before)
        self.assertEqual(self.leftovers(), [])
        with mock.patch("os.fsync", side_effect=OSError(5, "Input/output error")):
            with self.assertRaises(OSError):
                usersmod.delete_user(self.path, "alice@local.test")
        self.assertEqual(self.text(), before)
        self.assertEqual(self.leftovers(), [])

    def test_concurrent_adds_all_land(self):
        # the lock serialises read-modify-write cycles: no add is lost
        errors = []

        def add(i):
            try:
                usersmod.add_user(self.path, f"user{i}@local.test", f"pw{i}")
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=add, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(sorted(usersmod.list_users(self.path)), sorted(f"user{i}@local.test" for i in range(12)))


class Reading(UsersFileCase):
    def write(self, text: str) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.rename(self.path + ".new", self.path)

    def test_missing_file_is_no_users(self):
        db = usersmod.UserDB(self.path)
        self.assertEqual((len(db), db.users()), (0, []))
        self.assertFalse(db.exists("alice@local.test"))
        self.assertFalse(db.check("alice@local.test", "x"))
        self.assertIsNone(db.first_user_in("local.test"))
        self.assertFalse(db.refresh())

    def test_parse_errors_name_file_and_line(self):
        h = usersmod.hash_password("x")
        for text, line in (("alice@local.test\n", 1), (f"# c\nalice@local.test:{h}\nbob\n", 3),
                           (f":{h}\n", 1), ("alice@local.test:$2b$10$xx\n", 1),
                           (f"alice@local.test:{h}\nALICE@local.test:{h}\n", 2)):
            with self.assertRaises(usersmod.UsersFileError, msg=text) as cm:
                usersmod.UserDB.parse(self.path, text)
            self.assertIn(f"{self.path}: line {line}:", str(cm.exception))

    def test_refresh_sees_add_change_delete(self):
        db = usersmod.UserDB(self.path)
        usersmod.add_user(self.path, "alice@local.test", "a")
        self.assertTrue(db.refresh())
        self.assertTrue(db.exists("Alice@Local.Test"))
        self.assertFalse(db.refresh())
        usersmod.set_password(self.path, "alice@local.test", "b")
        self.assertTrue(db.refresh())
        self.assertTrue(db.check("alice@local.test", "b"))
        usersmod.delete_user(self.path, "alice@local.test")
        self.assertTrue(db.refresh())
        self.assertFalse(db.exists("alice@local.test"))
        os.unlink(self.path)
        db.refresh()
        self.assertFalse(db.refresh())
        usersmod.add_user(self.path, "bob@local.test", "b")
        self.assertTrue(db.refresh())
        os.unlink(self.path)
        self.assertTrue(db.refresh())
        self.assertEqual(len(db), 0)

    def test_bad_reload_keeps_previous_users_and_reports_once(self):
        usersmod.add_user(self.path, "alice@local.test", "a")
        db = usersmod.UserDB(self.path)
        self.write("garbage\n")
        with self.assertRaises(usersmod.UsersFileError):
            db.refresh()
        self.assertTrue(db.exists("alice@local.test"))
        self.assertFalse(db.refresh())  # same bad file: no error every poll
        self.assertTrue(db.exists("alice@local.test"))
        self.write(f"bob@local.test:{usersmod.hash_password('b')}\n")
        self.assertTrue(db.refresh())
        self.assertEqual(db.users(), ["bob@local.test"])

    def test_unreachable_directory_is_a_users_file_error(self):
        # (a directory without x permission; simulated, the tests may run as root)
        usersmod.add_user(self.path, "alice@local.test", "a")
        db = usersmod.UserDB(self.path)
        with mock.patch("os.stat", side_effect=PermissionError(13, "Permission denied", self.path)):
            with self.assertRaises(usersmod.UsersFileError) as cm:
                db.refresh()
        self.assertIn(self.path, str(cm.exception))
        self.assertTrue(db.exists("alice@local.test"))

    def test_first_user_in(self):
        for u in ("zed@second.test", "alice@local.test", "bob@local.test"):
            usersmod.add_user(self.path, u, "x")
        db = usersmod.UserDB(self.path)
        self.assertEqual(db.first_user_in("local.test"), "alice@local.test")
        self.assertEqual(db.first_user_in("second.test"), "zed@second.test")
        self.assertEqual(db.first_user_in("third.test"), "zed@second.test")

    def test_unknown_user_check_costs_a_hash(self):
        db = usersmod.UserDB(self.path)
        with mock.patch.object(usersmod, "verify_password", wraps=usersmod.verify_password) as v:
            self.assertFalse(db.check("nobody@local.test", "x"))
        self.assertEqual(v.call_count, 1)


class Checker(trial.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-users-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "users")
        with open(self.path, "w") as f:
            f.write(f"alice@local.test:{usersmod.hash_password('pw', ln=4)}\n")
        self.checker = usersmod.make_checker(usersmod.UserDB(self.path))

    async def test_good(self):
        for name in (b"alice@local.test", "Alice@Local.Test", b" alice@local.test "):
            avatar = await self.checker.requestAvatarId(credentials.UsernamePassword(name, b"pw"))
            self.assertEqual(avatar, "alice@local.test")

    async def test_bad(self):
        for name, pw in ((b"alice@local.test", b"nope"), (b"bob@local.test", b"pw"), (b"", b""),
                         (b"alice@local.test", b"\xff\xfe")):
            with self.assertRaises(error.UnauthorizedLogin):
                await self.checker.requestAvatarId(credentials.UsernamePassword(name, pw))


if __name__ == "__main__":
    unittest.main()


@unittest.skipIf(os.geteuid() != 0, "needs root to change file owners")
class RootEdits(unittest.TestCase):
    def test_root_editing_keeps_the_relay_users_ownership(self):
        """relayctl run by root must leave the file readable by the relay's own user."""
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "users")
        usersmod.add_user(path, "a@x.test", "pw")
        os.chown(path, 65534, 65534)
        usersmod.add_user(path, "b@x.test", "pw")
        usersmod.set_password(path, "a@x.test", "pw2")
        st = os.stat(path)
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (65534, 65534, 0o600))
