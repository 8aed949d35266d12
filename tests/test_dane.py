"""relay.outbound.dane: TLSA matching with trustme certificates (no sockets)."""

from __future__ import annotations

import datetime
import unittest

import trustme
from cryptography import x509

from relay.outbound import dane
from relay.outbound.dane import Tlsa

NOW = datetime.datetime.now(datetime.timezone.utc)


def _x509(blob) -> x509.Certificate:
    return x509.load_pem_x509_certificate(blob.bytes())


class Fixture:
    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        leaf = self.ca.issue_cert("mx1.example.com")
        self.leaf = _x509(leaf.cert_chain_pems[0])
        self.ca_cert = _x509(self.ca.cert_pem)
        self.other_ca_cert = _x509(self.other_ca.cert_pem)
        # an intermediate: leaf <- child <- ca
        self.child = self.ca.create_child_ca()
        ileaf = self.child.issue_cert("mx2.example.com")
        self.ichain = [_x509(b) for b in ileaf.cert_chain_pems] + [self.ca_cert]
        past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
        old = self.ca.issue_cert("old.example.com", not_before=past, not_after=past + datetime.timedelta(days=1))
        self.expired = _x509(old.cert_chain_pems[0])
        self.other_leaf = _x509(self.other_ca.issue_cert("mx1.example.com").cert_chain_pems[0])


F = Fixture()


class Records(unittest.TestCase):
    def test_usable(self):
        good = dane.record_for(F.leaf, 3, 1, 1)
        self.assertTrue(good.usable)
        self.assertTrue(dane.record_for(F.leaf, 2, 0, 2).usable)
        self.assertTrue(dane.record_for(F.leaf, 3, 0, 0).usable)
        for bad in (
            Tlsa(0, 1, 1, good.data),  # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)
            Tlsa(1, 1, 1, good.data),  # PKIX-EE
            Tlsa(4, 1, 1, good.data),  # unknown usage
            Tlsa(3, 2, 1, good.data),  # unknown selector
            Tlsa(3, 1, 3, good.data),  # unknown matching type
            Tlsa(3, 1, 1, good.data[:31]),  # wrong digest length
            Tlsa(3, 1, 2, good.data),  # SHA-512 with a SHA-256 digest
            Tlsa(3, 0, 0, b""),
        ):
            self.assertFalse(bad.usable, bad)
        self.assertEqual(dane.usable([Tlsa(0, 1, 1, good.data), good]), (good,))

    def test_parse_and_text(self):
        r = Tlsa.parse("3 1 1 " + "ab" * 32)
        self.assertEqual((r.usage, r.selector, r.mtype, r.data), (3, 1, 1, b"\xab" * 32))
        self.assertEqual(r.short(), "3 1 1 abababababababab...")
        self.assertEqual(str(r), "3 1 1 " + "ab" * 32)
        with self.assertRaises(ValueError):
            Tlsa.parse("3 1")

    def test_applies(self):
        r = dane.record_for(F.leaf, 3, 1, 1)
        self.assertTrue(dane.applies([r], True))
        self.assertFalse(dane.applies([r], False))  # insecure: MTA-STS may apply
        self.assertFalse(dane.applies([Tlsa(1, 1, 1, r.data)], True))
        self.assertFalse(dane.applies([], True))


class DaneEE(unittest.TestCase):
    def auth(self, chain, records, names=("mx1.example.com",), now=NOW):
        return dane.authenticate(chain, records, list(names), now)

    def test_ee_matching_each_selector_and_type(self):
        for sel in (0, 1):
            for mt in (0, 1, 2):
                res = self.auth([F.leaf], [dane.record_for(F.leaf, 3, sel, mt)])
                self.assertTrue(res.ok, (sel, mt, res))

    def test_ee_no_name_and_no_date_check(self):
        # DANE-EE: the key is the identity (RFC 7672 3.1.1)
        res = self.auth([F.expired], [dane.record_for(F.expired, 3, 1, 1)], names=("other.example",))
        self.assertTrue(res.ok)

    def test_ee_not_matching(self):
        rec = dane.record_for(F.other_leaf, 3, 1, 1)
        res = self.auth([F.leaf], [rec])
        self.assertFalse(res.ok)
        self.assertIn("no TLSA record matches the certificate (3 1 1 ", res.problem)

    def test_one_matching_record_of_several_is_enough(self):
        res = self.auth([F.leaf], [dane.record_for(F.other_leaf, 3, 1, 1), dane.record_for(F.leaf, 3, 1, 2)])
        self.assertTrue(res.ok)
        self.assertEqual(res.record, dane.record_for(F.leaf, 3, 1, 2))

    def test_unusable_records_never_match(self):
        r = dane.record_for(F.leaf, 3, 1, 1)
        res = self.auth([F.leaf], [Tlsa(1, 1, 1, r.data), Tlsa(0, 1, 1, r.data)])
        self.assertFalse(res.ok)
        self.assertEqual(res.problem, "no usable TLSA record")

    def test_no_certificate(self):
        self.assertFalse(self.auth([], [dane.record_for(F.leaf, 3, 1, 1)]).ok)


class DaneTA(unittest.TestCase):
    def auth(self, chain, records, names=("mx1.example.com",), now=NOW):
        return dane.authenticate(chain, records, list(names), now)

    def test_ta_matching_the_ca(self):
        for sel, mt in ((0, 1), (1, 1), (0, 2), (0, 0)):
            res = self.auth([F.leaf, F.ca_cert], [dane.record_for(F.ca_cert, 2, sel, mt)])
            self.assertTrue(res.ok, (sel, mt, res))

    def test_ta_through_an_intermediate(self):
        res = self.auth(F.ichain, [dane.record_for(F.ca_cert, 2, 0, 1)], names=("mx2.example.com",))
        self.assertTrue(res.ok, res)
        # the intermediate as the trust anchor works as well
        res = self.auth(F.ichain, [dane.record_for(F.ichain[1], 2, 1, 1)], names=("mx2.example.com",))
        self.assertTrue(res.ok, res)

    def test_ta_other_ca(self):
        res = self.auth([F.leaf, F.ca_cert], [dane.record_for(F.other_ca_cert, 2, 0, 1)])
        self.assertFalse(res.ok)
        self.assertIn("no TLSA record matches", res.problem)

    def test_ta_not_presented(self):
        # the server must send the TA certificate for a digest record (RFC 7671 5.2.2)
        res = self.auth([F.leaf], [dane.record_for(F.ca_cert, 2, 0, 1)])
        self.assertFalse(res.ok)

    def test_ta_chain_not_signed_by_anchor(self):
        # an attacker's leaf sent along with the real CA certificate
        res = self.auth([F.other_leaf, F.ca_cert], [dane.record_for(F.ca_cert, 2, 0, 1)])
        self.assertFalse(res.ok)
        self.assertIn("not signed by", res.problem)

    def test_ta_name_check(self):
        rec = dane.record_for(F.ca_cert, 2, 0, 1)
        res = self.auth([F.leaf, F.ca_cert], [rec], names=("mx9.example.com",))
        self.assertFalse(res.ok)
        self.assertIn("does not name mx9.example.com", res.problem)
        # the next-hop domain is a reference identifier too (RFC 7672 3.2.2)
        res = self.auth([F.leaf, F.ca_cert], [rec], names=("mx9.example.com", "mx1.example.com"))
        self.assertTrue(res.ok)

    def test_ta_leaf_dates_checked(self):
        rec = dane.record_for(F.ca_cert, 2, 0, 1)
        res = self.auth([F.expired, F.ca_cert], [rec], names=("old.example.com",))
        self.assertFalse(res.ok)
        self.assertIn("validity", res.problem)

    def test_ta_record_matching_only_the_leaf_is_no_anchor(self):
        res = self.auth([F.leaf], [dane.record_for(F.leaf, 2, 0, 1)])
        self.assertFalse(res.ok)


if __name__ == "__main__":
    unittest.main()
