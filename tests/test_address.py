"""relay.common.address: RFC 5321 paths and mailboxes, normalising, routing detection.

Plain Python (no reactor).  The hypothesis tests fuzz the parser: whatever
a client sends, the parser either returns a canonical Address that parses
back to itself, or raises AddressError; nothing else, and no CR, LF or NUL
ever survives into an Address (they would end up in headers and logs).
"""

from __future__ import annotations

import unittest

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.common.address import (
    Address,
    AddressError,
    normalize_domain,
    parse_mailbox,
    parse_path,
    quote_local,
    split_command_argument,
)


class ParseMailbox(unittest.TestCase):
    def ok(self, text: str, local: str, domain: str, literal: bool = False) -> Address:
        a = parse_mailbox(text)
        self.assertEqual((a.local, a.domain, a.literal), (local, domain, literal), text)
        return a

    def bad(self, text: str, status: str = "5.1.3") -> AddressError:
        with self.assertRaises(AddressError, msg=repr(text)) as cm:
            parse_mailbox(text)
        self.assertEqual(cm.exception.status, status, text)
        return cm.exception

    def test_plain(self):
        a = self.ok("alice@example.org", "alice", "example.org")
        self.assertEqual(str(a), "alice@example.org")

    def test_domain_lowercased_trailing_dot_dropped_local_case_kept(self):
        a = self.ok("Alice.Smith@EXAMPLE.Org.", "Alice.Smith", "example.org")
        self.assertEqual(str(a), "Alice.Smith@example.org")
        self.assertEqual(a.lower(), "alice.smith@example.org")

    def test_atext_specials_allowed_unquoted(self):
        self.ok("a+tag!#$&'*/=?^_`{|}~-@x.example", "a+tag!#$&'*/=?^_`{|}~-", "x.example")

    def test_needless_quotes_removed(self):
        a = self.ok('"alice"@example.org', "alice", "example.org")
        self.assertEqual(str(a), "alice@example.org")
        self.ok('"\\a\\l\\i\\c\\e"@example.org', "alice", "example.org")

    def test_quoted_local_keeps_quotes_when_needed(self):
        a = self.ok('"john doe"@example.org', "john doe", "example.org")
        self.assertEqual(str(a), '"john doe"@example.org')
        a = self.ok('"a\\"b"@example.org', 'a"b', "example.org")
        self.assertEqual(str(a), '"a\\"b"@example.org')
        a = self.ok('"a\\\\b"@example.org', "a\\b", "example.org")
        self.assertEqual(str(a), '"a\\\\b"@example.org')
        a = self.ok('"a..b"@example.org', "a..b", "example.org")
        self.assertEqual(str(a), '"a..b"@example.org')

    def test_bad_dot_strings(self):
        for t in ("a.@x.org", ".a@x.org", "a..b@x.org", "a b@x.org", "a(b)@x.org", "a,b@x.org",
                  "a;b@x.org", "<a@x.org>", "a[b]@x.org", 'a"b@x.org', "a\\b@x.org"):
            self.bad(t)

    def test_missing_parts(self):
        self.assertIn("missing @domain", str(self.bad("alice")))
        self.assertIn("missing domain", str(self.bad("alice@")))
        self.bad("@example.org")
        self.bad('""@example.org')
        self.bad('"alice@example.org')
        self.bad('"alice"example.org')
        self.bad('"alice" @example.org')

    def test_several_at_signs(self):
        self.assertIn("more than one @", str(self.bad("a@b@example.org")))

    def test_quoted_at_sign_is_routing(self):
        a = self.ok('"a@b"@example.org', "a@b", "example.org")
        self.assertTrue(a.has_routing)
        self.assertEqual(str(a), '"a@b"@example.org')

    def test_percent_and_bang_are_routing(self):
        self.assertTrue(parse_mailbox("user%other.example@relay.example").has_routing)
        self.assertTrue(parse_mailbox("other.example!user@relay.example").has_routing)
        self.assertFalse(parse_mailbox("plain.user@relay.example").has_routing)

    def test_length_limits(self):
        self.ok("a" * 64 + "@x.org", "a" * 64, "x.org")
        self.assertIn("64", str(self.bad("a" * 65 + "@x.org")))
        self.bad('"' + "a" * 65 + '"@x.org')
        self.ok("a@" + "b" * 63 + ".org", "a", "b" * 63 + ".org")
        self.bad("a@" + "b" * 64 + ".org")
        long_domain = ".".join(["a" * 60] * 4) + ".org"  # 248 chars: fine
        self.ok("a@" + long_domain, "a", long_domain)
        self.bad("a@" + ".".join(["a" * 62] * 4) + ".org")  # 256 chars: too long

    def test_bad_domains(self):
        for d in ("-x.org", "x-.org", "x..org", ".x.org", "x.org..", "x_y.org", "x y.org", "[x.org",
                  "x.org]", "xn--.org", "xn--zz.org", "x.org:25"):
            self.bad("a@" + d)

    def test_domain_whitespace_refused(self):
        self.bad('"a"@ example.org')
        self.bad('"a"@example.org ')
        self.bad('"a b"@exa mple.org')

    def test_idna_a_labels_checked_and_lowercased(self):
        self.ok("a@XN--BCHER-KVA.Example", "a", "xn--bcher-kva.example")

    def test_non_ascii_refused_with_smtputf8_status(self):
        self.bad("jörg@example.org", "5.6.7")
        self.bad("a@bücher.example", "5.6.7")

    def test_control_characters_refused(self):
        for t in ("a\r@x.org", "a@x.org\r\n", "a\n@x.org", "a@x\x00.org", '"a\\\r"@x.org',
                  '"a\\\x00"@x.org', '"a\x00"@x.org', "a\t@x.org", "a\x7f@x.org", '"a\x7f"@x.org'):
            self.bad(t)

    def test_ipv4_literal(self):
        a = self.ok("a@[192.0.2.1]", "a", "[192.0.2.1]", True)
        self.assertEqual(a.literal_ip, "192.0.2.1")
        self.bad("a@[192.0.2]")
        self.bad("a@[192.0.2.256]")
        self.bad("a@[01.2.3.4]")
        self.bad("a@[]")
        self.bad("a@[example.org]")

    def test_ipv6_literal_canonical(self):
        a = self.ok("a@[ipv6:2001:DB8:0::1]", "a", "[IPv6:2001:db8::1]", True)
        self.assertEqual(a.literal_ip, "2001:db8::1")
        self.assertEqual(str(a), "a@[IPv6:2001:db8::1]")
        self.bad("a@[2001:db8::1]")  # RFC 5321: the IPv6: tag is required
        self.bad("a@[IPv6:192.0.2.1]")
        self.bad("a@[IPv6:::1%eth0]")  # no scope ids
        self.bad('"a"@[IPv6:::1% ]')

    def test_literal_ip_of_domain_is_none(self):
        self.assertIsNone(parse_mailbox("a@example.org").literal_ip)


class NormalizeDomain(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(normalize_domain("Example.ORG."), "example.org")
        self.assertEqual(normalize_domain("  example.org  "), "example.org")
        self.assertEqual(normalize_domain("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(normalize_domain("BÜCHER.example"), "xn--bcher-kva.example")
        self.assertEqual(normalize_domain("xn--bcher-kva.example"), "xn--bcher-kva.example")

    def test_idna_and_ascii_forms_compare_equal(self):
        self.assertEqual(normalize_domain("bücher.example."), normalize_domain("XN--BCHER-KVA.EXAMPLE"))

    def test_bad(self):
        for d in ("", ".", "..", "a..b", "-a", "a_b", "a b", "☃" * 70, "xn--zz", 5, None):
            with self.assertRaises(AddressError, msg=repr(d)):
                normalize_domain(d)  # type: ignore[arg-type]


class ParsePath(unittest.TestCase):
    def test_plain_and_null(self):
        self.assertEqual(parse_path("<a@x.org>"), Address("a", "x.org"))
        self.assertIsNone(parse_path("<>", allow_null=True))
        with self.assertRaises(AddressError):
            parse_path("<>")

    def test_empty_text_is_not_the_null_path(self):
        # "MAIL FROM:" with nothing after it is a syntax error, not <>.
        for t in ("", "   "):
            with self.assertRaises(AddressError, msg=repr(t)):
                parse_path(t, allow_null=True)

    def test_bare_mailbox_accepted(self):
        self.assertEqual(parse_path("a@x.org"), Address("a", "x.org"))

    def test_brackets_must_match(self):
        for t in ("<a@x.org", "a@x.org>", "<<a@x.org>>", "<a@x.org>>", "< a@x.org>"):
            with self.assertRaises(AddressError, msg=t):
                parse_path(t)

    def test_source_route_dropped(self):
        self.assertEqual(parse_path("<@relay1.example,@relay2.example:a@x.org>"), Address("a", "x.org"))
        self.assertEqual(parse_path("<@relay1.example:a@x.org>"), Address("a", "x.org"))
        for t in ("<@relay1.example,relay2.example:a@x.org>", "<@relay1.example a@x.org>",
                  "<@bad..example:a@x.org>", "<@:a@x.org>"):
            with self.assertRaises(AddressError, msg=t):
                parse_path(t)

    def test_path_length_limit(self):
        local = "a" * 64
        domain = ".".join(["b" * 60] * 3) + ".example1"  # 64 + 1 + 191 = 256
        self.assertEqual(parse_path(f"<{local}@{domain}>").local, local)
        with self.assertRaises(AddressError):
            parse_path(f"<{local}@{domain}x>")

    def test_quoted_gt_inside_path(self):
        self.assertEqual(parse_path('<"a>b"@x.org>'), Address("a>b", "x.org"))


class SplitCommandArgument(unittest.TestCase):
    def test_path_and_params(self):
        self.assertEqual(split_command_argument("<a@x.org> SIZE=100 body=8BITMIME SMTPUTF8"),
                         ("<a@x.org>", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}))

    def test_leading_space_tolerated(self):
        self.assertEqual(split_command_argument(" <a@x.org>"), ("<a@x.org>", {}))

    def test_null_path_with_params(self):
        self.assertEqual(split_command_argument("<> SIZE=5"), ("<>", {"SIZE": "5"}))

    def test_bare_path_with_params(self):
        self.assertEqual(split_command_argument("a@x.org SIZE=5"), ("a@x.org", {"SIZE": "5"}))
        self.assertEqual(split_command_argument("a@x.org"), ("a@x.org", {}))

    def test_quoted_gt_and_escaped_quote(self):
        self.assertEqual(split_command_argument('<"a>b"@x.org> X=1'), ('<"a>b"@x.org>', {"X": "1"}))
        self.assertEqual(split_command_argument('<"a\\">b"@x.org>'), ('<"a\\">b"@x.org>', {}))

    def test_errors_are_syntax_errors(self):
        for t in ("<a@x.org", "<a@x.org>SIZE=1", "<a@x.org> SIZE=", "<a@x.org> =5", "<a@x.org> S\xe9=1",
                  "<a@x.org> -X=1", "<a@x.org> X=a=b", "<a@x.org> X=\x01"):
            with self.assertRaises(AddressError, msg=repr(t)) as cm:
                split_command_argument(t)
            self.assertEqual(cm.exception.status, "5.5.4", t)


class QuoteLocal(unittest.TestCase):
    def test_quote(self):
        self.assertEqual(quote_local("a.b"), "a.b")
        self.assertEqual(quote_local("a b"), '"a b"')
        self.assertEqual(quote_local('a"b\\c'), '"a\\"b\\\\c"')
        self.assertEqual(quote_local(".a"), '".a"')


# ---------------------------------------------------------------------------
# fuzzing

_PIECES = [
    "a", "Z", "0", ".", "@", '"', "\\", "<", ">", "[", "]", ":", ",", "%", "!", " ", "-", "_", "+",
    "\r", "\n", "\x00", "\t", "\x7f", "é", "☃", "IPv6:", "ipv6:", "::1", "%eth0", "1.2.3.4",
    "xn--", "xn--bcher-kva", "example.org", "postmaster", "=", "\u2028", "\x85",
]
_soup = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)

_atom = st.text(alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=10)
_qtext = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x80), max_size=12)
_local = st.one_of(
    st.lists(_atom, min_size=1, max_size=4).map(".".join),
    _qtext.map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    _qtext.map(lambda s: '"' + s + '"'),
)
_label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
_domain = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.lists(_label, min_size=1, max_size=4).map(lambda ls: ".".join(ls) + "."),
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded}]"),
    st.sampled_from(["[IPv6:::1%eth0]", "[IPv6:::1% ]", "[1.2.3.4 ]", " x.org", "x.org ", "XN--BCHER-KVA.org"]),
)
_mailbox = st.builds(lambda lp, d: f"{lp}@{d}", _local, _domain)
_path = st.one_of(
    _mailbox.map(lambda m: f"<{m}>"),
    st.builds(lambda r, m: f"<@{r}:{m}>", _label, _mailbox),
    _mailbox,
)
_any_text = st.one_of(st.text(max_size=80), _soup, _mailbox, _path)

# Valid by construction (RFC 5321 syntax, within the limits): must parse.
_valid_label = _label.filter(lambda s: not s.lower().startswith("xn--"))
_valid_local = st.one_of(
    st.lists(_atom, min_size=1, max_size=4).map(lambda atoms: (".".join(atoms), ".".join(atoms))),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12).map(
        lambda s: ('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"', s)),
)
_valid_domain = st.one_of(
    st.lists(_valid_label, min_size=1, max_size=4).map(lambda ls: (".".join(ls), ".".join(ls).lower())),
    st.lists(_valid_label, min_size=1, max_size=4).map(lambda ls: (".".join(ls) + ".", ".".join(ls).lower())),
    st.ip_addresses(v=4).map(lambda ip: (f"[{ip}]", f"[{ip}]")),
    st.ip_addresses(v=6).map(lambda ip: (f"[IPv6:{ip.exploded}]", f"[IPv6:{ip.compressed}]")),
)
# (text, local part it names, canonical domain)
_valid_mailbox = st.builds(lambda lp, d: (f"{lp[0]}@{d[0]}", lp[1], d[1]), _valid_local, _valid_domain)


class Tally:
    """Accepted/refused counts over a property's examples: a parser that
    refuses everything must not pass a test that only checks what it accepts."""

    def __init__(self) -> None:
        self.accepted = self.refused = 0

    def assert_accepted_share(self, test: unittest.TestCase, minimum: float) -> None:
        n = self.accepted + self.refused
        test.assertGreater(n, 50)
        test.assertGreaterEqual(self.accepted / n, minimum, f"only {self.accepted} of {n} accepted")


def _check_address(test: unittest.TestCase, a: Address) -> None:
    text = a.local + a.domain
    for bad in ("\r", "\n", "\x00"):
        test.assertNotIn(bad, text)
    test.assertNotIn("\r", str(a))
    test.assertNotIn("\n", str(a))
    test.assertTrue(str(a).isascii())
    # the canonical form is a fixed point
    test.assertEqual(parse_mailbox(str(a)), a)
    test.assertEqual(parse_path(f"<{a}>"), a)
    # the lookup form is canonical too
    low = parse_mailbox(a.lower())
    test.assertEqual(low.lower(), a.lower())
    test.assertEqual(low.domain, a.domain)


_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Fuzz(unittest.TestCase):
    def test_parse_mailbox_only_raises_address_error(self):
        tally = Tally()

        @_settings
        @given(_any_text)
        @example('"x"@[IPv6:::1% ]')
        @example('"a"@ b.org')
        def run(text):
            try:
                a = parse_mailbox(text)
            except AddressError:
                tally.refused += 1
                return
            tally.accepted += 1
            _check_address(self, a)

        run()
        tally.assert_accepted_share(self, 0.03)  # (about a tenth; none is the failure)

    def test_parse_path_only_raises_address_error(self):
        tally = Tally()

        @_settings
        @given(_any_text, st.booleans())
        @example("", True)
        def run(text, allow_null):
            try:
                a = parse_path(text, allow_null=allow_null)
            except AddressError:
                tally.refused += 1
                return
            tally.accepted += 1
            if a is None:
                self.assertTrue(allow_null)
                self.assertEqual(text.strip(), "<>")
                return
            _check_address(self, a)

        run()
        tally.assert_accepted_share(self, 0.03)

    @_settings
    @given(_valid_mailbox, st.sampled_from(["{}", "<{}>", "<@relay.example:{}>", "<@a.example,@b.example:{}>"]))
    def test_valid_mailboxes_parse(self, case, form):
        """Valid addresses (dot-atom or quoted local part, names, trailing dot,
        IP literals) in every form a path may take are accepted, as what they name."""
        text, local, domain = case
        a = parse_path(form.format(text))
        self.assertEqual((a.local, a.domain), (local, domain), text)
        self.assertEqual(parse_mailbox(text), a)
        _check_address(self, a)

    def test_command_argument_then_path(self):
        tally = Tally()

        @_settings
        @given(st.one_of(_path, _soup, st.text(max_size=60)),
               st.lists(st.one_of(_soup, st.sampled_from(["SIZE=10", "BODY=8BITMIME", "X", "A=<>"])), max_size=3))
        def run(path, params):
            arg = " ".join([path, *params])
            try:
                p, kw = split_command_argument(arg)
            except AddressError:
                tally.refused += 1
                return
            for k, v in kw.items():
                self.assertTrue(k.isupper() or not k.isalpha())
                self.assertNotIn("\r", k + (v or ""))
                self.assertNotIn("\n", k + (v or ""))
            try:
                a = parse_path(p, allow_null=True)
            except AddressError:
                tally.refused += 1
                return
            tally.accepted += 1
            if a is not None:
                _check_address(self, a)

        run()
        tally.assert_accepted_share(self, 0.03)

    def test_normalize_domain_only_raises_address_error(self):
        tally = Tally()

        @_settings
        @given(st.one_of(st.text(max_size=80), _domain))
        def run(text):
            try:
                d = normalize_domain(text)
            except AddressError:
                tally.refused += 1
                return
            tally.accepted += 1
            self.assertTrue(d.isascii())
            self.assertEqual(d, d.lower())
            self.assertEqual(normalize_domain(d), d)
            self.assertEqual(parse_mailbox(f"a@{d}").domain, d)

        run()
        tally.assert_accepted_share(self, 0.03)

    @_settings
    @given(_valid_mailbox)
    def test_structured_mailboxes_round_trip(self, case):
        text, _local, _domain = case
        a = parse_mailbox(text)  # valid by construction: an AddressError fails the test
        _check_address(self, a)
        self.assertEqual(parse_mailbox(str(a)), a)


if __name__ == "__main__":
    unittest.main()
