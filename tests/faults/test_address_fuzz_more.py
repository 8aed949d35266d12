"""More fuzzing of relay.common.address, for what tests/test_address.py does not
reach: its inputs stop at 80 characters, so the length limits (64-octet
local part, 63-octet labels, 253-octet domains, 256-octet paths) are never
approached.  Here inputs are built around those limits, and every accepted
address must respect them, re-parse to itself from its canonical form, and
that form must never be longer than what the client sent (so a path we
accept is one we can hand on).
"""

from __future__ import annotations

import unittest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.common.address import MAX_LOCAL, AddressError, parse_mailbox, parse_path, split_command_argument

_atext = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_label = st.integers(1, 66).flatmap(
    lambda n: st.text(alphabet="abcxyz019-", min_size=n, max_size=n)).filter(
    lambda s: not s.startswith("-") and not s.endswith("-"))
_domain = st.lists(_label, min_size=1, max_size=6).map(".".join) | st.integers(240, 262).map(
    lambda n: ".".join(["a" * 61] * 4)[:n].rstrip(".-") or "a")
_dot_local = st.integers(1, 70).flatmap(lambda n: st.text(alphabet=_atext + ".", min_size=n, max_size=n))
_quoted_content = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=70)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The strategies below give (text, valid): whether RFC 5321 and the limits
# allow it, decided here independently of relay.common.address (the generators only
# make inputs whose validity these few rules settle).
def _domain_ok(d: str) -> bool:
    return len(d) <= 253 and all(1 <= len(label) <= 63 for label in d.split("."))


def _dot_local_ok(lp: str) -> bool:
    return 1 <= len(lp) <= MAX_LOCAL and not lp.startswith(".") and not lp.endswith(".") and ".." not in lp


_local = st.one_of(_dot_local.map(lambda lp: (lp, _dot_local_ok(lp))),
                   _quoted_content.map(lambda c: (_quote(c), 1 <= len(c) <= MAX_LOCAL)))
_mailbox = st.builds(lambda lp, d: (f"{lp[0]}@{d}", lp[1] and _domain_ok(d)), _local, _domain)
_route = st.lists(_domain, min_size=1, max_size=3).map(
    lambda ds: (",".join("@" + d for d in ds), all(_domain_ok(d) for d in ds)))


def _with_route(r, m):
    inner = f"{r[0]}:{m[0]}"
    return f"<{inner}>", r[1] and m[1] and len(inner) <= 256


_path = st.one_of(
    _mailbox.map(lambda m: (f"<{m[0]}>", m[1] and len(m[0]) <= 256)),
    st.builds(_with_route, _route, _mailbox),
    st.builds(lambda m, pad: (f"<{m[0]}>" + pad, m[1] and len(m[0]) <= 256), _mailbox,
              st.sampled_from(["", " SIZE=1", " X=" + "v" * 300])),
)

_settings = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(test: unittest.TestCase, a, sent: str) -> None:
    test.assertLessEqual(len(a.local), MAX_LOCAL)
    test.assertTrue(a.local)
    if a.literal:
        test.assertTrue(a.domain.startswith("[") and a.domain.endswith("]"))
    else:
        test.assertLessEqual(len(a.domain), 253)
        for label in a.domain.split("."):
            test.assertTrue(1 <= len(label) <= 63, a.domain)
    canon = str(a)
    test.assertTrue(canon.isascii() and canon.isprintable(), canon)
    test.assertEqual(parse_mailbox(canon), a)
    if len(canon) <= 256:  # (a mailbox of 64 + 1 + 253 octets is not a valid path)
        test.assertEqual(parse_path(f"<{canon}>"), a)
    test.assertLessEqual(len(canon), len(sent), (canon, sent))


class Tally:
    """Counts accepted and refused cases, so that a parser refusing (or
    accepting) everything cannot pass: both must be a real share."""

    def __init__(self) -> None:
        self.accepted = self.refused = 0

    def assert_mix(self, test: unittest.TestCase, minimum: float = 0.15) -> None:
        n = self.accepted + self.refused
        test.assertGreater(n, 50)
        test.assertGreaterEqual(self.accepted / n, minimum, f"{self.accepted} of {n} accepted")
        test.assertGreaterEqual(self.refused / n, minimum, f"{self.refused} of {n} refused")


class LongInputs(unittest.TestCase):
    def test_mailbox_limits(self):
        tally = Tally()

        @_settings
        @given(_mailbox)
        def run(case):
            text, valid = case
            try:
                a = parse_mailbox(text)
            except AddressError as e:
                self.assertFalse(valid, f"valid {text!r} refused: {e}")
                tally.refused += 1
                return
            self.assertTrue(valid, f"invalid {text!r} accepted as {a}")
            tally.accepted += 1
            check(self, a, text)

        run()
        tally.assert_mix(self)

    def test_path_limits(self):
        tally = Tally()

        @_settings
        @given(_path)
        def run(case):
            text, valid = case
            try:
                path, params = split_command_argument(text)
                a = parse_path(path)
            except AddressError as e:
                self.assertFalse(valid, f"valid {text!r} refused: {e}")
                tally.refused += 1
                return
            self.assertTrue(valid, f"invalid {text!r} accepted as {a}")
            tally.accepted += 1
            self.assertLessEqual(len(path.strip().strip("<>")), 256)
            check(self, a, path)
            self.assertEqual(parse_path(f"<{a}>"), a)  # what we accepted as a path we can send as one
            for k, v in params.items():
                self.assertTrue(k.isupper() or not k.isalpha())
                self.assertTrue(v is None or v.isprintable())

        run()
        tally.assert_mix(self)

    @_settings
    @given(st.text(alphabet=_atext + '.@"\\<>[]: ', min_size=200, max_size=2000))
    def test_long_soup(self, text):
        for f in (parse_mailbox, lambda t: parse_path(t, allow_null=True), split_command_argument):
            try:
                f(text)
            except AddressError:
                pass
