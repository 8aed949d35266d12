"""SMTPUTF8 (RFC 6531, 6532) inbound, UTF-8 local users and POP3 UTF8 (RFC 6856).

Over real sockets on loopback: the relay in-process, the clients in a
thread (Python's smtplib and poplib, which speak SMTPUTF8 and UTF8, as the
independent clients; the raw client for malformed input).  What is checked:
the refusals without SMTPUTF8 (553 5.6.7, RFC 6531 3.7.4.1), bad UTF-8 and
bad characters, the U-label / A-label equivalence in policy (no open-relay
bypass by spelling a domain the other way), UTF-8 users (AUTH, POP3,
Maildir), aliases, relay-sendmail, queue show.
"""

from __future__ import annotations

import base64
import io
import os
import poplib
import shutil
import smtplib
import subprocess
import sys
import tempfile

import pytest
from twisted.trial import unittest

from relay import config as configmod
from relay.common.address import (
    NOT_ASCII,
    AddressError,
    display_address,
    login_key,
    parse_mailbox,
    parse_path,
    split_command_argument,
)
from relay.intake import dkim, submit
from relay.intake import sendmail as sm
from relay.mailbox import users as usersmod
from relay.queue import view as queueview
from relay.queue.spool import Envelope, State
from tests.support.relay import InProcessRelay, in_thread, toml_dumps
from tests.support.smtpclient import RawSMTP
from tests.support.wait import apoll

JOERG = "jörg@bücher.example"
JOERG_STORED = "jörg@xn--bcher-kva.example"
PW = "pässwörd"


# -- the address rules (pure) ------------------------------------------------------


def test_utf8_addresses_parsed_nfc_and_a_labels():
    a = parse_mailbox("jo\u0308rg@BÜCHER.Example", utf8=True)  # decomposed ö, upper-case U-label
    assert (a.local, a.domain, str(a), a.lower(), a.utf8) == ("jörg", "xn--bcher-kva.example", JOERG_STORED,
                                                               JOERG_STORED, True)
    assert parse_mailbox("JÖRG@xn--BCHER-kva.example", utf8=True).lower() == JOERG_STORED
    assert str(parse_mailbox('"jö rg"@x.example', utf8=True)) == '"jö rg"@x.example'
    assert str(parse_mailbox("δοκιμή@παράδειγμα.δοκιμή", utf8=True)) == "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp"
    assert not parse_mailbox("a@bücher.example", utf8=True).utf8  # the domain alone needs no SMTPUTF8


def test_non_ascii_without_utf8_is_5_6_7():
    for t in ("jörg@example.org", "a@bücher.example"):
        with pytest.raises(AddressError) as e:
            parse_mailbox(t)
        assert (e.value.status, str(e.value)) == ("5.6.7", NOT_ASCII)
    with pytest.raises(AddressError) as e:
        parse_path("<@bücher.example:a@b.example>")
    assert e.value.status == "5.6.7"


@pytest.mark.parametrize("text", [
    "j\u202eörg@x.example",  # bidi override
    "j\u2066örg@x.example",  # bidi isolate
    "jö\u0085rg@x.example",  # C1 control (NEL)
    "jö\u00a0rg@x.example",  # no-break space
    "jö\u2028rg@x.example",  # line separator
    "jö\ue000rg@x.example",  # private use
    "jö\udcffrg@x.example",  # a lone surrogate (surrogateescape of a bad byte)
    "ö" * 33 + "@x.example",  # 66 octets of local part
    "jö..rg@x.example",
    "jörg@bü cher.example",
    "jörg@xn--zz.example",
    "jörg@-bücher.example",
])
def test_bad_utf8_addresses(text):
    with pytest.raises(AddressError) as e:
        parse_mailbox(text, utf8=True)
    assert e.value.status.startswith("5.1."), e.value


def test_path_length_counts_octets():
    local = "ö" * 32  # 64 octets: the most a local part may have
    assert parse_path(f"<{local}@x.example>", utf8=True) is not None
    with pytest.raises(AddressError):
        parse_path("<" + "ö" * 32 + "@" + ".".join(["ü" * 20] * 6) + ".example>", utf8=True)


def test_parameters_stay_ascii():
    with pytest.raises(AddressError) as e:
        split_command_argument("<a@b.example> SIZE=1\u00a0BODY=8BITMIME")
    assert e.value.status == "5.5.4"
    assert split_command_argument("<jörg@x.example> SMTPUTF8") == ("<jörg@x.example>", {"SMTPUTF8": None})


def test_login_key_and_display():
    assert login_key(" JÖRG@Bücher.Example ") == JOERG_STORED
    assert login_key("jo\u0308rg@xn--bcher-kva.example") == JOERG_STORED
    assert login_key("Alice@Local.Test") == "alice@local.test"  # ASCII: as always
    assert display_address(JOERG_STORED) == JOERG
    assert display_address("a@xn--zz.example") == "a@xn--zz.example"  # not IDNA: shown as stored


def test_normalize_user_accepts_utf8():
    assert usersmod.normalize_user("JÖRG@bücher.example", ("xn--bcher-kva.example",)) == JOERG_STORED
    for bad in ("j\u202eörg@xn--bcher-kva.example", "jö/rg@xn--bcher-kva.example", '"jö\\\\rg"@xn--bcher-kva.example'):
        with pytest.raises(AddressError):
            usersmod.normalize_user(bad, ("xn--bcher-kva.example",))
    assert usersmod.unsafe_path_part("jö\x9brg")  # C1 (CSI) in a path component


def test_users_file_and_aliases_in_either_spelling():
    h = "$scrypt$ln=1,r=8,p=1$AAAA$AAAA"  # only parsed here
    users, order = usersmod.UserDB.parse("users", f"JÖRG@bücher.example:{h}\n")
    assert order == [JOERG_STORED]
    with pytest.raises(usersmod.UsersFileError, match="listed twice"):
        usersmod.UserDB.parse("users", f"{JOERG}:{h}\njo\u0308rg@xn--bcher-kva.example:{h}\n")
    from relay.intake.aliases import AliasesFileError, AliasMap

    amap = AliasMap.parse("störung@Bücher.example: jörg\nJÜRGEN: δοκιμή@παράδειγμα.δοκιμή\n", "aliases",
                          ("xn--bcher-kva.example",))
    assert amap.lookup("störung@xn--bcher-kva.example") == ["jörg"]
    assert amap.lookup("jürgen@xn--bcher-kva.example") == ["δοκιμή@παράδειγμα.δοκιμή"]
    with pytest.raises(AliasesFileError, match="defined twice"):
        AliasMap.parse("störung@bücher.example: a\nSTÖRUNG@xn--bcher-kva.example: b\n", "aliases",
                       ("xn--bcher-kva.example",))
    with pytest.raises(AliasesFileError):
        AliasMap.parse("st\u202eörung: a\n", "aliases", ("xn--bcher-kva.example",))


def test_config_u_labels_normalised_to_a_labels():
    cfg = configmod.load(None, data={
        "local": {"domains": ["Bücher.example"]},
        "relay": {"domains": ["MÜNCHEN.example"], "routes": {"straße.example": "127.0.0.9:2525"},
                  "upstreams": {"up": {"hosts": ["127.0.0.8:25"]}},
                  "sender_routes": {"jörg@Bücher.example": "up", ".zürich.example": "up"}},
        "delivery": {"tls_policy": {"bücher.example": "encrypt"}},
    })
    assert cfg.local.domains == ("xn--bcher-kva.example",)
    assert cfg.relay.domains == ("xn--mnchen-3ya.example",)
    assert cfg.relay.route_for("xn--strae-oqa.example") is not None
    assert cfg.relay.sender_route_for(JOERG_STORED) == ("up", JOERG_STORED)
    assert cfg.relay.sender_route_for("JÖRG@xn--bcher-kva.example") == ("up", JOERG_STORED)
    assert cfg.relay.sender_route_for("a@mail.xn--zrich-kva.example") == ("up", ".xn--zrich-kva.example")
    assert dict(cfg.delivery.tls_policy).keys() == {"xn--bcher-kva.example"}


def test_dkim_from_domain_in_either_form():
    for value in ("Jörg <jörg@bücher.example>", "jörg@BÜCHER.example",
                  "=?utf-8?q?J=C3=B6rg?= <a@xn--bcher-kva.example>"):
        assert dkim.from_domain(value.encode()) == "xn--bcher-kva.example", value
    # a key configured in U-labels is stored in A-labels: the two meet
    assert configmod.values.DOMAIN("Bücher.Example") == "xn--bcher-kva.example"


def test_queue_show_readable_and_neutralised():
    env = Envelope("0123456789ABCDEF", JOERG_STORED, [JOERG_STORED, "evil\u202e@x.example"], 1.0,
                   extra={"smtputf8": True})
    d = queueview.details(env, State.fresh(env), 10, "active", b"Subject: x\r\n")
    text = queueview.format_details(d, now=2.0)
    assert f"Sender:    <{JOERG_STORED}> ({JOERG})" in text
    assert f"  <{JOERG_STORED}> ({JOERG}): " in text
    assert "\u202e" not in text and "evil\\u202e@x.example" in text
    assert "SMTPUTF8:  yes" in text


# -- over real sockets -------------------------------------------------------------


class Base(unittest.TestCase):
    overrides: dict = {}

    async def setUp(self):
        tmp = tempfile.mkdtemp(prefix="relay-utf8-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.tmp = tmp
        users = os.path.join(tmp, "users")
        usersmod.add_user(users, "alice@local.test", "alice pw")
        usersmod.add_user(users, usersmod.normalize_user(JOERG), PW)
        with open(os.path.join(tmp, "aliases"), "w", encoding="utf-8") as f:
            f.write("störung@Bücher.example: jörg\nJürgen: jörg@bücher.example\n")
        data = {"local": {"domains": ["local.test", "bücher.example"], "aliases": os.path.join(tmp, "aliases")},
                "relay": {"domains": ["xn--mnchen-3ya.example", "Straße.example"], "networks": ["10.0.0.0/8"]},
                "pop3": {"listen": ["tcp:0:interface=127.0.0.1"]}}
        data.update(self.overrides)
        self.relay = InProcessRelay(tmp, data, deliver=self.deliver)
        await self.relay.start()
        self.addCleanup(self.relay.stop)
        self.host, self.port = self.relay.smtp

    deliver = False

    def session(self, fn):
        def run():
            with RawSMTP(self.host, self.port) as c:
                assert c.reply().code == 220
                return fn(c)

        return in_thread(run)

    def queued(self):
        sp = self.relay.service.spool
        out = []
        for qid in sp.queue_ids():
            env, off, _ = sp.read_envelope(qid)
            with open(sp.message_path(qid), "rb") as f:
                f.seek(off)
                out.append((env, f.read()))
        return out


class Dialogue(Base):
    async def test_ehlo_advertises_smtputf8(self):
        r = await self.session(lambda c: c.cmd("EHLO x"))
        self.assertIn("SMTPUTF8", r.lines)

    async def test_without_smtputf8_non_ascii_is_553_5_6_7(self):
        def fn(c):
            c.cmd("EHLO x")
            out = [c.cmd("MAIL FROM:<jörg@bücher.example>"), c.cmd("MAIL FROM:<a@bücher.example>")]
            c.cmd("MAIL FROM:<a@b.example>")
            out += [c.cmd("RCPT TO:<jörg@bücher.example>"), c.cmd("RCPT TO:<x@stra\xdfe.example>".encode("latin-1")),
                    c.cmd("RCPT TO:<alice@local.test>")]
            return out

        r = await self.session(fn)
        for x in r[:4]:
            self.assertEqual((x.code, x.lines), (553, [f"5.6.7 {NOT_ASCII}"]))
        self.assertEqual((r[4].code, r[4].lines), (250, ["2.1.5 Ok"]))

    async def test_smtputf8_with_a_value_and_after_helo(self):
        def fn(c):
            c.cmd("EHLO x")
            bad = c.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8=yes")
            c.cmd("HELO x")
            return bad, c.cmd("MAIL FROM:<a@b.example> SMTPUTF8")

        bad, helo = await self.session(fn)
        self.assertEqual((bad.code, bad.lines), (501, ["5.5.4 The SMTPUTF8 parameter takes no value"]))
        self.assertEqual(helo.code, 555)

    async def test_bad_utf8_and_bad_characters(self):
        def fn(c):
            c.cmd("EHLO x")
            out = [c.cmd(b"MAIL FROM:<j\xf6rg@x.example> SMTPUTF8"),  # latin-1, not UTF-8
                   c.cmd(b"MAIL FROM:<j\xc3\xb6\xc3@x.example> SMTPUTF8"),  # truncated sequence
                   c.cmd("MAIL FROM:<j\u202eörg@x.example> SMTPUTF8"),
                   c.cmd("MAIL FROM:<" + "ö" * 33 + "@x.example> SMTPUTF8"),
                   c.cmd(b"MAIL FROM:<\xc0\xafetc@x.example> SMTPUTF8")]  # overlong "/"
            out.append(c.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8"))
            out += [c.cmd(b"RCPT TO:<j\xf6rg@local.test>"), c.cmd("RCPT TO:<jö\u0085rg@bücher.example>"),
                    c.cmd("RCPT TO:<nobody\u00e9@bücher.example>"), c.cmd("RCPT TO:<../jörg@bücher.example>")]
            return out

        r = await self.session(fn)
        for x in r[:5]:
            self.assertEqual(x.code, 501, x)
            self.assertTrue(x.lines[0].startswith("5.1.7 Bad sender address syntax: "), x)
        self.assertIn("not valid UTF-8", r[0].lines[0])
        self.assertIn("U+202E", r[2].lines[0])
        self.assertIn("64 octets", r[3].lines[0])
        self.assertEqual(r[5].code, 250)
        self.assertEqual((r[6].code, r[6].lines[0][:5]), (501, "5.1.3"))
        self.assertEqual((r[7].code, r[7].lines[0][:5]), (501, "5.1.3"))
        self.assertEqual((r[8].code, r[8].lines[0][:5]), (550, "5.1.1"))  # a UTF-8 name, but no such user
        self.assertEqual(r[9].code, 501)

    async def test_smtputf8_message_queued_marked_and_with_utf8_headers(self):
        msg = ("From: Jörg <jörg@bücher.example>\r\nTo: Störung <störung@bücher.example>\r\n"
               "Subject: Grüße\r\n\r\nHallo\r\n").encode()

        def send():
            with smtplib.SMTP(self.host, self.port) as s:
                s.ehlo("client.example")
                assert s.has_extn("smtputf8")
                return s.sendmail("jörg@bücher.example", ["störung@BÜCHER.example", "alice@local.test"], msg,
                                  mail_options=["SMTPUTF8"])

        self.assertEqual(await in_thread(send), {})
        ((env, body),) = self.queued()
        self.assertTrue(env.smtputf8)
        self.assertEqual(env.sender, JOERG_STORED)
        self.assertEqual(env.recipients, [JOERG_STORED, "alice@local.test"])  # the alias expanded
        self.assertEqual(env.client["proto"], "UTF8SMTP")
        self.assertTrue(body.endswith(msg), body)

    async def test_ascii_transaction_with_smtputf8_is_marked_and_plain_one_is_not(self):
        def fn(c):
            c.cmd("EHLO x")
            out = []
            for opt in (" SMTPUTF8", ""):
                out.append(c.cmd(f"MAIL FROM:<a@b.example>{opt}"))
                c.cmd("RCPT TO:<alice@local.test>")
                c.cmd("DATA")
                c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
                out.append(c.reply())
            return out

        r = await self.session(fn)
        self.assertEqual([x.code for x in r], [250, 250, 250, 250])
        await apoll(lambda: len(self.queued()) == 2, what="both queued")
        marks = sorted(env.smtputf8 for env, _ in self.queued())
        self.assertEqual(marks, [False, True])


class OpenRelay(Base):
    """Untrusted client (127.0.0.1 is not in relay.networks here): relay.domains
    are given one in A-labels, one in U-labels; nothing else may be relayed,
    however its domain is spelled."""

    async def test_relay_domains_equal_in_both_forms(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example> SMTPUTF8")
            return [c.cmd(f"RCPT TO:<{r}>") for r in (
                "x@münchen.example", "x@MÜNCHEN.Example", "x@xn--mnchen-3ya.example", "x@XN--MNCHEN-3YA.EXAMPLE",
                "jörg@münchen.example.", "x@straße.example", "x@xn--strae-oqa.example", "x@STRASSE.example",
                "x@straße。example",
            )]

        r = await self.session(fn)
        # straße and strasse are two domains under IDNA 2008 (UTS 46 nontransitional): the latter is not ours
        self.assertEqual([x.code for x in r], [250, 250, 250, 250, 250, 250, 250, 554, 250])

    async def test_no_bypass_by_spelling(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example> SMTPUTF8")
            return [c.cmd(f"RCPT TO:<{r}>") for r in (
                "x@zürich.example", "x@xn--zrich-kva.example", "x@ZÜRICH.example",
                "x@münchen.example.evil.example", "x@evil.xn--mnchen-3ya.example", "x@münchen-example",
                "x@zürich.example\u200b", "x@m\u00fcnchen.example@evil.example",
                "x%evil.example@münchen.example", "x@[127.0.0.2]",
            )]

        r = await self.session(fn)
        codes = [x.code for x in r]
        self.assertEqual(codes[:6], [554] * 6, r)
        self.assertIn(codes[6], (501, 554))  # a zero-width space (UTS 46 drops it): still not ours
        self.assertEqual(codes[7], 501)
        self.assertEqual(codes[8], 554)  # sender-specified routing through a relay domain
        self.assertEqual(codes[9], 550)

    async def test_local_domain_in_either_form(self):
        def fn(c):
            c.cmd("EHLO x")
            c.cmd("MAIL FROM:<a@b.example> SMTPUTF8")
            return [c.cmd(f"RCPT TO:<{r}>") for r in (
                "jörg@xn--bcher-kva.example", "JÖRG@Bücher.Example", "jo\u0308rg@bücher.example",
                "jürgen@bücher.example", "nobody@bücher.example", "postmaster@xn--bcher-kva.example",
            )]

        r = await self.session(fn)
        self.assertEqual([x.code for x in r], [250, 250, 250, 250, 550, 250])


class Auth(Base):
    async def test_auth_plain_with_a_utf8_user(self):
        codes = []
        for name, pw in (("JÖRG@bücher.example", PW), (JOERG_STORED, PW), ("jo\u0308rg@BÜCHER.example", PW),
                         (JOERG, "wrong")):
            token = base64.b64encode(f"\0{name}\0{pw}".encode()).decode()

            def fn(c, token=token):
                c.cmd("EHLO x")
                return c.cmd(f"AUTH PLAIN {token}"), c.cmd("MAIL FROM:<jörg@bücher.example> SMTPUTF8")

            a, m = await self.session(fn)
            codes.append((a.code, m.code))
        # the last MAIL: unauthenticated, so not checked against a login (250 too)
        self.assertEqual(codes, [(235, 250), (235, 250), (235, 250), (535, 250)])

    async def test_auth_login_and_authzid_in_the_other_spelling(self):
        b64 = lambda t: base64.b64encode(t.encode()).decode()  # noqa: E731

        def fn(c):
            c.cmd("EHLO x")
            out = [c.cmd("AUTH LOGIN"), c.cmd(b64("jörg@BÜCHER.example")), c.cmd(b64(PW))]
            return out

        r = await self.session(fn)
        self.assertEqual([x.code for x in r], [334, 334, 235])

        def fn2(c):
            c.cmd("EHLO x")
            return c.cmd("AUTH PLAIN " + b64(f"JÖRG@bücher.example\0{JOERG_STORED}\0{PW}"))

        self.assertEqual((await self.session(fn2)).code, 235)

    async def test_authenticated_utf8_user_relays_and_owns_its_address(self):
        token = base64.b64encode(f"\0{JOERG}\0{PW}".encode()).decode()

        def fn(c):
            c.cmd("EHLO x")
            c.cmd(f"AUTH PLAIN {token}")
            other = c.cmd("MAIL FROM:<alice@local.test>")
            own = c.cmd("MAIL FROM:<JÖRG@xn--bcher-kva.example> SMTPUTF8")
            return other, own, c.cmd("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>")

        other, own, rcpt = await self.session(fn)
        self.assertEqual((other.code, own.code, rcpt.code), (553, 250, 250))


class EndToEnd(Base):
    """smtplib (SMTPUTF8) in, local delivery into the UTF-8 user's Maildir,
    poplib (UTF8, USER/PASS in UTF-8) out, byte for byte."""

    deliver = True

    async def test_smtputf8_into_maildir_and_out_by_pop3(self):
        msg = ("From: Jörg <jörg@bücher.example>\r\nTo: jörg@bücher.example\r\nSubject: Grüße aus Köln\r\n"
               "\r\nÄÖÜ äöü ß\r\n").encode()

        def send():
            with smtplib.SMTP(self.host, self.port) as s:
                return s.sendmail("alice@local.test", ["jörg@bücher.example"], msg, mail_options=["SMTPUTF8"])

        self.assertEqual(await in_thread(send), {})
        new = os.path.join(self.tmp, "mail", "xn--bcher-kva.example", "jörg", "new")
        await apoll(lambda: os.path.isdir(new) and os.listdir(new), timeout=20, what="local delivery")

        def fetch():
            c = poplib.POP3(*self.relay.ports["pop3"], timeout=10)
            caps = c.capa()
            utf8 = c.utf8()
            c.user("JÖRG@Bücher.example")
            c.pass_(PW)
            _, lines, _ = c.retr(1)
            c.quit()
            return caps, utf8, b"\r\n".join(lines) + b"\r\n"

        caps, utf8, got = await in_thread(fetch)
        self.assertEqual(caps.get("UTF8"), ["USER"])
        self.assertTrue(utf8.startswith(b"+OK"))
        self.assertTrue(got.startswith(f"Return-Path: <alice@local.test>\r\nDelivered-To: {JOERG_STORED}\r\n"
                                       .encode()), got[:200])
        self.assertTrue(got.endswith(msg))
        self.assertIn(b"with UTF8SMTP id ", got)
        self.assertIn(f"\r\n\tfor <{JOERG_STORED}>;".encode(), got)  # UTF-8 in the header (RFC 6532)

    async def test_pop3_utf8_command_only_before_login_and_bad_names(self):
        def fetch():
            c = poplib.POP3(*self.relay.ports["pop3"], timeout=10)
            out = []
            for name, pw in (("jö\u202erg@bücher.example", PW), ("jörg@bücher.example", "nope")):
                c.user(name)
                try:
                    c.pass_(pw)
                    out.append("ok")
                except poplib.error_proto as e:
                    out.append(e.args[0])
            token = base64.b64encode(f"\0JÖRG@xn--bcher-kva.example\0{PW}".encode()).decode()
            out.append(c._shortcmd("AUTH PLAIN " + token)[:3])  # SASL PLAIN carries the name in UTF-8 too
            try:
                c._shortcmd("UTF8")
                out.append("utf8 ok")
            except poplib.error_proto as e:
                out.append(e.args[0])
            c.quit()
            return out

        out = await in_thread(fetch)
        self.assertEqual(out[:2], [b"-ERR [AUTH] Authentication failed"] * 2)
        self.assertEqual(out[2], b"+OK")
        self.assertTrue(out[3].startswith(b"-ERR UTF8 is not valid in the TRANSACTION state"), out[3])


class Sendmail(Base):
    """relay-sendmail with UTF-8 addresses: through the drop directory and
    the pickup into the queue, marked smtputf8."""

    async def test_utf8_recipients_and_sender_queued_and_marked(self):
        cfg = os.path.join(self.tmp, "relay.toml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(toml_dumps(self.relay.data))
        msg = "Subject: Grüße\n\nHallo Jörg\n".encode()
        rc = await in_thread(sm.main, ["-C", cfg, "-f", "JÖRG@bücher.example", "-i", "störung@Bücher.example",
                                       "δοκιμή@παράδειγμα.δοκιμή"], stdin=io.BytesIO(msg))
        self.assertEqual(rc, 0)
        await apoll(lambda: self.queued(), timeout=15, what="the pickup")
        ((env, body),) = self.queued()
        self.assertTrue(env.smtputf8)
        self.assertEqual(env.sender, "JÖRG@xn--bcher-kva.example")
        self.assertEqual(env.recipients, [JOERG_STORED, "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp"])
        self.assertTrue(body.endswith(b"\r\n\r\nHallo J\xc3\xb6rg\r\n"), body)
        self.assertRegex(body, "\r\nFrom: [^\r]*<JÖRG@xn--bcher-kva.example>\r\n".encode())  # added, in UTF-8

    async def test_t_reads_utf8_recipients_from_the_headers(self):
        cfg = os.path.join(self.tmp, "relay.toml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(toml_dumps(self.relay.data))
        msg = "To: Jörg <jörg@bücher.example>, a@MÜNCHEN.example\nSubject: x\n\nx\n".encode()
        rc = await in_thread(sm.main, ["-C", cfg, "-t", "-i"], stdin=io.BytesIO(msg))
        self.assertEqual(rc, 0)
        await apoll(lambda: self.queued(), timeout=15, what="the pickup")
        ((env, _),) = self.queued()
        self.assertEqual(env.recipients, [JOERG_STORED, "a@xn--mnchen-3ya.example"])
        self.assertTrue(env.smtputf8)

    async def test_ascii_submission_is_not_marked(self):
        cfg = os.path.join(self.tmp, "relay.toml")
        with open(cfg, "w", encoding="utf-8") as f:
            f.write(toml_dumps(self.relay.data))
        rc = await in_thread(sm.main, ["-C", cfg, "-i", "alice@local.test"], stdin=io.BytesIO(b"Subject: x\n\nx\n"))
        self.assertEqual(rc, 0)
        await apoll(lambda: self.queued(), timeout=15, what="the pickup")
        ((env, _),) = self.queued()
        self.assertFalse(env.smtputf8)

    async def test_submission_over_smtp_uses_smtputf8(self):
        """relay-sendmail's fallback (no drop directory it may write): SMTP to the relay."""
        qid = await in_thread(submit.submit_smtp, self.relay.config, self._file(b"Subject: x\r\n\r\nx\r\n"), 15,
                              JOERG_STORED, [JOERG_STORED], False, [self.relay.smtp])
        self.assertTrue(qid)
        await apoll(lambda: self.queued(), timeout=15, what="queued")
        ((env, _),) = self.queued()
        self.assertTrue(env.smtputf8)
        self.assertEqual(env.client["proto"], "UTF8SMTP")

    def _file(self, data: bytes) -> str:
        path = os.path.join(self.tmp, "msg")
        with open(path, "wb") as f:
            f.write(data)
        return path


def test_relayctl_user_add_utf8(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[local]\ndomains = ["bücher.example"]\nusers = "users"\n', encoding="utf-8")

    def ctl(*args, input=None):
        return subprocess.run([sys.executable, "-m", "relay.admin.cli", "--config", str(cfg), "user", *args],
                              cwd=str(tmp_path), input=input, capture_output=True, text=True, encoding="utf-8",
                              env={**os.environ, "PYTHONPATH": os.getcwd()})

    r = ctl("add", "JO\u0308RG@Bücher.Example", "--password-stdin", input="pw\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"user {JOERG} (stored as {JOERG_STORED}) added\n"
    assert (tmp_path / "users").read_text(encoding="utf-8").startswith(JOERG_STORED + ":$scrypt$")
    r = ctl("add", JOERG_STORED, "--password-stdin", input="pw\n")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert ctl("list").stdout == JOERG_STORED + "\n"
    r = ctl("delete", "jörg@xn--bcher-kva.example")
    assert r.returncode == 0 and r.stderr == f"user {JOERG} (stored as {JOERG_STORED}) deleted (its mailbox is kept)\n"
    r = ctl("add", "jö/rg@bücher.example", "--password-stdin", input="pw\n")
    assert r.returncode == 1


class Route(Base):
    async def test_relayctl_route_takes_utf8_and_either_spelling(self):
        from relay.control import route as routecheck
        from relay.runtime import parts

        ctx = parts.offline_route_context(self.relay.config)
        r = routecheck.explain(ctx, "Störung@BÜCHER.example")
        self.assertTrue(r["accepted"], r)
        self.assertEqual([(d["kind"], d["recipient"]) for d in r["deliveries"]], [("local", JOERG_STORED)])
        self.assertFalse(routecheck.explain(ctx, "x@zürich.example", "192.0.2.1")["accepted"])
        self.assertTrue(routecheck.explain(ctx, "x@MÜNCHEN.example", "192.0.2.1")["accepted"])
