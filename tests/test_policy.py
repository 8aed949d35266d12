"""relay.intake.policy: who may send what where.  Pure decisions, tested as plain Python.

No open relay, ever: every path to "relay" is either a relay.domains
recipient or a trusted client (relay.networks or authenticated), and
sender-specified routing never gets through from an untrusted client.
"""

from __future__ import annotations

import ipaddress
import unittest

from relay import config as configmod
from relay.common.address import Address, parse_path
from relay.intake.policy import Client, Decision, Policy, in_networks

NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.0/24"))
USERS = {"alice@local.test", "bob@local.test", "carol@second.test", '"odd user"@local.test'}
ALIASES = {"info@local.test", "sales@second.test"}

LAN = Client("192.168.1.20")
LOOPBACK = Client("127.0.0.1")
OUTSIDER = Client("203.0.113.9")
AUTHED = Client("203.0.113.9", authenticated="alice@local.test")


def make_policy(**kw) -> Policy:
    args = dict(
        local_domains=("local.test", "second.test"),
        relay_domains=("backup.test",),
        networks=NETS,
        user_exists=lambda a: a in USERS,
        alias_exists=lambda a: a in ALIASES,
        our_ips=lambda ip: ip in ("192.0.2.1", "2001:db8::1"),
    )
    args.update(kw)
    return Policy(**args)


class Recipient(unittest.TestCase):
    def setUp(self):
        self.p = make_policy()

    def rcpt(self, client: Client, path: str) -> Decision:
        return self.p.recipient(client, parse_path(path))

    def assertAccepted(self, d: Decision, kind: str, address: str) -> None:
        self.assertTrue(d.ok, d)
        self.assertEqual((d.code, d.status, d.kind, d.address), (250, "2.1.5", kind, address))
        self.assertEqual(d.reply, "250 2.1.5 Ok")

    def assertUnknown(self, d: Decision) -> None:
        self.assertFalse(d.ok, d)
        self.assertEqual((d.code, d.status), (550, "5.1.1"))
        self.assertIn("User unknown", d.text)

    def assertDenied(self, d: Decision) -> None:
        self.assertFalse(d.ok, d)
        self.assertEqual(d.code // 100, 5)
        self.assertEqual(d.status, "5.7.1")
        self.assertEqual(d.kind, "")

    # -- local domains --------------------------------------------------------
    def test_local_user_from_anyone(self):
        for c in (OUTSIDER, LAN, AUTHED):
            self.assertAccepted(self.rcpt(c, "<alice@local.test>"), "local", "alice@local.test")
            self.assertAccepted(self.rcpt(c, "<carol@second.test>"), "local", "carol@second.test")

    def test_local_lookup_is_case_insensitive_and_canonical(self):
        d = self.rcpt(OUTSIDER, "<Alice@LOCAL.Test.>")
        self.assertAccepted(d, "local", "alice@local.test")
        self.assertAccepted(self.rcpt(OUTSIDER, '<"alice"@local.test>'), "local", "alice@local.test")
        self.assertAccepted(self.rcpt(OUTSIDER, '<"Odd User"@local.test>'), "local", '"odd user"@local.test')

    def test_unknown_local_user_is_550_at_rcpt(self):
        d = self.rcpt(LAN, "<nobody@local.test>")
        self.assertUnknown(d)
        self.assertIn("<nobody@local.test>", d.text)
        self.assertUnknown(self.rcpt(AUTHED, "<alice@second.test>"))  # users are per domain

    def test_alias_accepted(self):
        self.assertAccepted(self.rcpt(OUTSIDER, "<INFO@local.test>"), "local", "info@local.test")
        self.assertAccepted(self.rcpt(OUTSIDER, "<sales@second.test>"), "local", "sales@second.test")

    def test_postmaster_always_accepted(self):
        p = make_policy(user_exists=lambda a: False, alias_exists=lambda a: False)
        for local in ("postmaster", "PostMaster", "POSTMASTER"):
            for dom in ("local.test", "second.test"):
                d = p.recipient(OUTSIDER, parse_path(f"<{local}@{dom}>"))
                self.assertAccepted(d, "local", f"postmaster@{dom}")

    def test_routing_in_local_domain_is_unknown(self):
        # "alice%elsewhere.example@local.test" must never be relayed to elsewhere.example
        for path in ("<alice%elsewhere.example@local.test>", "<elsewhere.example!alice@local.test>",
                     '<"alice@elsewhere.example"@local.test>', "<@hop.example:alice%x.example@local.test>"):
            for c in (OUTSIDER, LAN, AUTHED):
                self.assertUnknown(self.rcpt(c, path))

    def test_path_escaping_local_parts_refused_even_if_a_lookup_says_yes(self):
        p = make_policy(user_exists=lambda a: True, alias_exists=lambda a: True)
        for path in ('<"../../etc"@local.test>', '<"a/b"@local.test>', '<".hidden"@local.test>',
                     '<"a\\\\b"@local.test>', '<".."@local.test>'):
            self.assertUnknown(p.recipient(LAN, parse_path(path)))

    # -- relay domains (backup MX) ------------------------------------------------
    def test_relay_domain_from_anyone(self):
        self.assertAccepted(self.rcpt(OUTSIDER, "<Someone@BACKUP.test>"), "relay", "Someone@backup.test")

    def test_relay_domain_routing_only_from_trusted(self):
        for path in ("<a%evil.example@backup.test>", "<evil.example!a@backup.test>", '<"a@evil.example"@backup.test>'):
            d = self.rcpt(OUTSIDER, path)
            self.assertDenied(d)
            self.assertIn("sender-specified routing", d.text)
            self.assertTrue(self.rcpt(LAN, path).ok)

    def test_relay_domain_is_exact_not_a_suffix(self):
        self.assertDenied(self.rcpt(OUTSIDER, "<a@notbackup.test>"))
        self.assertDenied(self.rcpt(OUTSIDER, "<a@backup.test.evil.example>"))

    # -- everything else -----------------------------------------------------------
    def test_no_open_relay(self):
        for path in ("<victim@remote.example>", "<victim@REMOTE.example.>", "<@local.test:victim@remote.example>",
                     "<victim%local.test@remote.example>"):
            d = self.rcpt(OUTSIDER, path)
            self.assertDenied(d)
            self.assertIn("Relay access denied", d.text)

    def test_trusted_networks_may_relay(self):
        for ip in ("127.0.0.1", "127.9.9.9", "::1", "192.168.1.200", "::ffff:192.168.1.7", "::ffff:127.0.0.1"):
            d = self.rcpt(Client(ip), "<victim@Remote.Example>")
            self.assertAccepted(d, "relay", "victim@remote.example")

    def test_untrusted_networks(self):
        for ip in ("192.168.2.1", "10.0.0.1", "::2", "2001:db8::5", "::ffff:10.0.0.1", "", "garbage"):
            self.assertDenied(self.rcpt(Client(ip), "<victim@remote.example>"))

    def test_authenticated_client_may_relay_from_anywhere(self):
        self.assertAccepted(self.rcpt(AUTHED, "<x@remote.example>"), "relay", "x@remote.example")

    def test_empty_authenticated_name_is_not_trust(self):
        self.assertDenied(self.rcpt(Client("203.0.113.9", authenticated=""), "<x@remote.example>"))

    def test_relay_keeps_local_part_case(self):
        self.assertEqual(self.rcpt(LAN, "<John.Doe@Remote.Example>").address, "John.Doe@remote.example")

    def test_no_networks_no_relay(self):
        p = make_policy(networks=())
        self.assertDenied(p.recipient(LOOPBACK, parse_path("<x@remote.example>")))

    # -- address literals -------------------------------------------------------------
    def test_literal_of_ours_is_the_first_local_domain(self):
        self.assertAccepted(self.rcpt(OUTSIDER, "<alice@[192.0.2.1]>"), "local", "alice@local.test")
        self.assertAccepted(self.rcpt(OUTSIDER, "<postmaster@[IPv6:2001:DB8::1]>"), "local", "postmaster@local.test")
        self.assertUnknown(self.rcpt(OUTSIDER, "<nobody@[192.0.2.1]>"))
        self.assertUnknown(self.rcpt(LAN, "<a%remote.example@[192.0.2.1]>"))

    def test_literal_not_ours_refused_for_everyone(self):
        for c in (OUTSIDER, LAN, AUTHED):
            d = self.rcpt(c, "<x@[198.51.100.7]>")
            self.assertDenied(d)
            self.assertIn("address literals", d.text)

    def test_literal_without_local_domains_refused(self):
        p = make_policy(local_domains=())
        self.assertDenied(p.recipient(LAN, parse_path("<x@[192.0.2.1]>")))

    def test_with_config_objects(self):
        cfg = configmod.load(None, data={"local": {"domains": ["Bücher.Example"]},
                                         "relay": {"domains": ["B.example."], "networks": ["10.0.0.0/8"]}})
        p = Policy(cfg.local.domains, cfg.relay.domains, cfg.relay.networks,
                   user_exists=lambda a: a == "jo@xn--bcher-kva.example", alias_exists=lambda a: False)
        self.assertTrue(p.recipient(OUTSIDER, parse_path("<JO@XN--BCHER-KVA.EXAMPLE>")).ok)
        self.assertTrue(p.recipient(OUTSIDER, parse_path("<x@b.example>")).ok)
        self.assertTrue(p.recipient(Client("10.1.2.3"), parse_path("<x@c.example>")).ok)
        self.assertFalse(p.recipient(LOOPBACK, parse_path("<x@c.example>")).ok)


class Sender(unittest.TestCase):
    def setUp(self):
        self.p = make_policy()

    def mail(self, client: Client, path: str) -> Decision:
        return self.p.sender(client, parse_path(path, allow_null=True))

    def test_null_sender_always(self):
        for c in (OUTSIDER, LAN, AUTHED):
            d = self.mail(c, "<>")
            self.assertTrue(d.ok)
            self.assertEqual((d.code, d.status), (250, "2.1.0"))

    def test_unauthenticated_not_restricted(self):
        for path in ("<alice@local.test>", "<bob@local.test>", "<anyone@remote.example>"):
            self.assertTrue(self.mail(LAN, path).ok)
            self.assertTrue(self.mail(OUTSIDER, path).ok)

    def test_authenticated_own_address(self):
        self.assertTrue(self.mail(AUTHED, "<alice@local.test>").ok)
        self.assertTrue(self.mail(AUTHED, "<ALICE@Local.Test.>").ok)
        self.assertTrue(self.p.sender(Client("1.2.3.4", "Alice@Local.Test"), Address("alice", "local.test")).ok)

    def test_authenticated_own_domain_not_another_user(self):
        self.assertTrue(self.mail(AUTHED, "<alice.smith@local.test>").ok)
        self.assertTrue(self.mail(AUTHED, "<info@local.test>").ok)  # an alias, not a user
        self.assertTrue(self.mail(AUTHED, "<postmaster@local.test>").ok)

    def test_authenticated_may_not_forge(self):
        for path in ("<bob@local.test>", "<BOB@local.test>", '<"odd user"@local.test>', "<carol@second.test>",
                     "<someone@second.test>", "<alice@remote.example>", "<alice@[192.0.2.1]>"):
            d = self.mail(AUTHED, path)
            self.assertFalse(d.ok, path)
            self.assertEqual((d.code, d.status), (553, "5.7.1"))
            self.assertIn("alice@local.test", d.text)


class InNetworks(unittest.TestCase):
    def test_cases(self):
        self.assertTrue(in_networks("127.0.0.1", NETS))
        self.assertTrue(in_networks("::1", NETS))
        self.assertTrue(in_networks("::ffff:192.168.1.1", NETS))
        self.assertTrue(in_networks("fe80::1%eth0", [ipaddress.ip_network("fe80::/10")]))
        self.assertFalse(in_networks("192.168.10.1", NETS))
        self.assertFalse(in_networks("not an ip", NETS))
        self.assertFalse(in_networks("127.0.0.1", []))


if __name__ == "__main__":
    unittest.main()
