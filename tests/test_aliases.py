"""relay.intake.aliases: the aliases file, its errors (file and line), expansion, reloads."""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from unittest import mock

from relay.intake.aliases import MAX_DEPTH, AliasesFileError, AliasFile, AliasMap, expand

LOCAL = ("local.test", "second.test")
USERS = ["alice@local.test", "bob@local.test", "carol@local.test", "dave@second.test"]

SAMPLE = """\
# company aliases
info: alice, bob@Remote.Example        # local part: every local domain
Sales@Local.Test.: carol
team: alice,
    bob,
\tcarol
postmaster: root
root: alice
loop1: loop2
loop2: loop1
copy: copy, archive@backup.example
"""


def parse(text: str) -> AliasMap:
    return AliasMap.parse(text, "/etc/relay/aliases", LOCAL)


def run_expand(address: str, amap: AliasMap, users=USERS) -> list[str]:
    def first_user_in(domain):
        for u in users:
            if u.endswith("@" + domain):
                return u
        return users[0] if users else None

    out = expand(address, amap, is_local_domain=lambda d: d in LOCAL, user_exists=lambda a: a in users,
                 first_user_in=first_user_in)
    assert all(e.original == address for e in out)  # each final recipient names where it came from
    return [e.address for e in out]


class Parsing(unittest.TestCase):
    def test_sample(self):
        m = parse(SAMPLE)
        self.assertEqual(m.lookup("info@local.test"), ["alice", "bob@Remote.Example"])
        self.assertEqual(m.lookup("info@second.test"), ["alice", "bob@Remote.Example"])
        self.assertEqual(m.lookup("sales@local.test"), ["carol"])
        self.assertIsNone(m.lookup("sales@second.test"))
        self.assertEqual(m.lookup("team@local.test"), ["alice", "bob", "carol"])
        self.assertTrue(m.has("root@second.test"))
        self.assertFalse(m.has("alice@local.test"))
        self.assertEqual(len(m), 8)

    def test_names_case_insensitive(self):
        m = parse("Info: alice\n")
        self.assertTrue(m.has("info@local.test"))

    def test_empty_file(self):
        self.assertEqual(len(parse("")), 0)
        self.assertEqual(len(parse("# nothing\n\n   \n")), 0)

    def error(self, text: str, line: int, *words: str) -> str:
        with self.assertRaises(AliasesFileError, msg=text) as cm:
            parse(text)
        msg = str(cm.exception)
        self.assertTrue(msg.startswith(f"/etc/relay/aliases: line {line}: "), msg)
        for w in words:
            self.assertIn(w, msg)
        return msg

    def test_errors_name_file_and_line(self):
        self.error("info alice\n", 1, "expected 'name: target")
        self.error("ok: a\n: alice\n", 2)
        self.error("\n\ninfo:\n", 3, "no targets")
        self.error("info: ,\n", 1, "no targets")
        self.error("  alice\n", 1, "continuation")
        self.error("info: a\nINFO: b\n", 2, "defined twice")
        self.error("x@local.test: a\nX@Local.Test.: b\n", 2, "defined twice")
        self.error("info: alice bob\n", 1, "'alice bob'", "not an address")
        self.error("info: bad@@x.example\n", 1, "bad@@x.example")
        self.error("info: a@-x.example\n", 1)
        self.error("x@remote.example: alice\n", 1, "not in a local domain", "local.test, second.test")
        self.error("a b: alice\n", 1, "not a local part or address")
        self.error("x@[127.0.0.1]: alice\n", 1, "not in a local domain")

    def test_pipes_files_includes_refused(self):
        for t in ("|/usr/bin/procmail", "/var/mail/x", ":include:/etc/list", '"|cmd"'):
            self.error(f"info: alice, {t}\n", 1, "not supported")

    def test_continuation_line_numbers(self):
        # the logical line is reported by its first physical line
        self.error("ok: a\nteam: alice,\n  bad target\n", 2, "'bad target'")


class Expansion(unittest.TestCase):
    def setUp(self):
        self.m = parse(SAMPLE)

    def test_plain_user_is_itself(self):
        self.assertEqual(run_expand("alice@local.test", self.m), ["alice@local.test"])

    def test_local_part_alias_takes_the_domain_of_the_address(self):
        self.assertEqual(run_expand("info@local.test", self.m), ["alice@local.test", "bob@remote.example"])
        self.assertEqual(run_expand("info@second.test", self.m), ["alice@second.test", "bob@remote.example"])

    def test_full_address_alias(self):
        self.assertEqual(run_expand("sales@local.test", self.m), ["carol@local.test"])

    def test_recursive_and_deduplicated(self):
        m = parse("all: team, info, alice\nteam: alice, bob\ninfo: bob, x@remote.example, X@REMOTE.example\n")
        self.assertEqual(run_expand("all@local.test", m), ["alice@local.test", "bob@local.test", "x@remote.example",
                                                           "X@remote.example"])

    def test_postmaster_alias_chain(self):
        self.assertEqual(run_expand("postmaster@local.test", self.m), ["alice@local.test"])

    def test_postmaster_without_alias(self):
        m = parse("")
        self.assertEqual(run_expand("postmaster@second.test", m), ["dave@second.test"])
        self.assertEqual(run_expand("postmaster@local.test", m, users=USERS + ["postmaster@local.test"]),
                         ["postmaster@local.test"])
        self.assertEqual(run_expand("postmaster@second.test", m, users=["alice@local.test"]), ["alice@local.test"])
        self.assertEqual(run_expand("postmaster@local.test", m, users=[]), ["postmaster@local.test"])

    def test_loops_terminate(self):
        self.assertEqual(run_expand("loop1@local.test", self.m), ["loop1@local.test"])
        self.assertEqual(run_expand("copy@local.test", self.m), ["copy@local.test", "archive@backup.example"])

    def test_depth_limit(self):
        text = "".join(f"d{i}: d{i + 1}\n" for i in range(MAX_DEPTH + 10))
        out = run_expand("d0@local.test", parse(text))
        self.assertEqual(len(out), 1)
        self.assertTrue(out[0].startswith("d"))

    def test_shared_sub_aliases_expanded_once(self):
        # a diamond chain: every alias names the next one four times.  Walking
        # every path would take 4**20 steps; each alias is expanded once.
        text = "".join(f"b{i}: b{i + 1}, B{i + 1}, b{i + 1}@local.test, b{i + 1}\n" for i in range(40))
        m = parse(text + "b40: alice\n")
        with mock.patch.object(m, "lookup", wraps=m.lookup) as lookup:
            out = run_expand("b0@local.test", m)
        self.assertLess(lookup.call_count, 200)
        self.assertEqual(len(out), 1)

    def test_diamond_delivers_once(self):
        m = parse("all: sales, support\nsales: alice, bob\nsupport: bob, carol\n")
        self.assertEqual(run_expand("all@local.test", m), ["alice@local.test", "bob@local.test", "carol@local.test"])

    def test_remote_address_untouched(self):
        self.assertEqual(run_expand("Info@Remote.Example", self.m), ["Info@Remote.Example"])


class Reloading(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="relay-aliases-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "aliases")

    def write(self, text: str, in_place: bool = False) -> None:
        if in_place:
            with open(self.path, "w") as f:
                f.write(text)
            return
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.rename(self.path + ".new", self.path)

    def test_no_path(self):
        a = AliasFile("", LOCAL)
        self.assertFalse(a.refresh())
        self.assertEqual(len(a.map), 0)

    def test_missing_file_then_created_then_removed(self):
        a = AliasFile(self.path, LOCAL)
        self.assertEqual(len(a.map), 0)
        self.assertFalse(a.refresh())
        self.write("info: alice\n")
        self.assertTrue(a.refresh())
        self.assertTrue(a.map.has("info@local.test"))
        self.assertFalse(a.refresh())
        os.unlink(self.path)
        self.assertTrue(a.refresh())
        self.assertFalse(a.map.has("info@local.test"))
        self.assertFalse(a.refresh())

    def test_in_place_edit_seen(self):
        self.write("info: alice\n")
        a = AliasFile(self.path, LOCAL)
        self.write("info: alice, bob\nsales: carol\n", in_place=True)
        self.assertTrue(a.refresh())
        self.assertTrue(a.map.has("sales@local.test"))

    def test_bad_file_at_start_raises(self):
        self.write("garbage\n")
        with self.assertRaises(AliasesFileError) as cm:
            AliasFile(self.path, LOCAL)
        self.assertIn(f"{self.path}: line 1", str(cm.exception))

    def test_bad_edit_keeps_previous_and_reports_once(self):
        self.write("info: alice\n")
        a = AliasFile(self.path, LOCAL)
        self.write("info: alice\nbroken line\n")
        with self.assertRaises(AliasesFileError):
            a.refresh()
        self.assertTrue(a.map.has("info@local.test"))
        self.assertFalse(a.refresh())  # not every poll
        self.write("sales: carol\n")
        self.assertTrue(a.refresh())
        self.assertFalse(a.map.has("info@local.test"))
        self.assertTrue(a.map.has("sales@local.test"))

    def test_not_utf8(self):
        with open(self.path, "wb") as f:
            f.write(b"info: \xff\n")
        with self.assertRaises(AliasesFileError) as cm:
            AliasFile(self.path, LOCAL)
        self.assertIn(self.path, str(cm.exception))

    def test_stat_error_is_an_aliases_file_error(self):
        self.write("info: alice\n")
        a = AliasFile(self.path, LOCAL)
        with mock.patch("os.stat", side_effect=PermissionError(13, "Permission denied", self.path)):
            with self.assertRaises(AliasesFileError) as cm:
                a.refresh()
        self.assertIn(self.path, str(cm.exception))
        self.assertTrue(a.map.has("info@local.test"))


if __name__ == "__main__":
    unittest.main()
