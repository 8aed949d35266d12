"""The intake (relay.intake.accept), the expander (relay.intake.aliases.Expander),
the SMTP AUTH exchange (relay.smtp.auth) and the pickup built from its parts:
the seams of issue 13's intake part, without a running relay."""

from __future__ import annotations

import base64
import os
import shutil
import tempfile

from twisted.internet import task
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from relay import config as configmod
from relay.intake import aliases as aliasesmod
from relay.intake.accept import Intake, Source
from relay.intake.dropfile import drop_line
from relay.intake.pickup import Pickup
from relay.queue import spool as spoolmod
from relay.queue.diskio import AsyncSpool, DiskPool
from relay.smtp import auth

SOURCE = Source(Logger(namespace="relay.test"), "{queue_id}: hand-off failed", state_file=False)


class Users:
    def __init__(self, *names: str):
        self.names = set(names)

    def exists(self, address: str) -> bool:
        return address in self.names

    def first_user_in(self, domain: str) -> str | None:
        return min((n for n in self.names if n.endswith("@" + domain)), default=None)


class IntakeTests(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="relay-accept-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.spool = spoolmod.Spool(os.path.join(tmp, "spool"))
        self.spool.create()
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.queued: list[spoolmod.QueueEntry] = []
        self.steps: list[str] = []

    def intake(self, expand=lambda a: [(a, a)], queued=None) -> Intake:
        return Intake(spool=AsyncSpool(self.spool, DiskPool(self.clock, inline=True)), expand=expand,
                      queued=queued if queued is not None else self.queued.append, clock=self.clock)

    def test_envelope_expands_and_drops_duplicates(self):
        table = {"team@l.test": [("a@l.test", "team@l.test"), ("b@l.test", "team@l.test")],
                 "a@l.test": [("a@l.test", "a@l.test")]}
        intake = self.intake(expand=lambda a: table.get(a, [(a, a)]))
        env = intake.envelope("s@x.example", ["team@l.test", "a@l.test", "r@x.example"], {"proto": "test"})
        self.assertEqual(env.recipients, ["a@l.test", "b@l.test", "r@x.example"])
        self.assertEqual(env.orcpts, ["team@l.test", "team@l.test", None])
        self.assertTrue(spoolmod.is_queue_id(env.queue_id))
        self.assertEqual(env.arrival, 1000)
        self.assertEqual(env.client, {"proto": "test"})
        given = intake.envelope("", ["r@x.example"], {}, queue_id=env.queue_id, arrival=5.0)
        self.assertEqual((given.queue_id, given.arrival), (env.queue_id, 5.0))

    def test_accept_is_durable_before_it_is_announced_and_queued(self):
        intake = self.intake(queued=lambda e: self.steps.append("queued"))
        env = intake.envelope("s@x.example", ["r@x.example"], {})
        inc = intake.receive(env)
        inc.write(b"Subject: x\r\n\r\nbody\r\n")

        def settle():
            self.steps.append("settle")
            assert os.path.exists(self.spool.message_path(env.queue_id))

        def announce(entry):
            self.steps.append("announce")
            self.assertEqual(entry.size, len(b"Subject: x\r\n\r\nbody\r\n"))

        d = intake.accept(inc, SOURCE, announce=announce, settle=settle, eight_bit=False)
        entry = self.successResultOf(d)
        self.assertEqual(self.steps, ["settle", "announce", "queued"])
        self.assertEqual(self.spool.queue_ids(), [env.queue_id])
        self.assertFalse(entry.state_file)
        self.assertIs(entry.eight_bit, False)
        self.assertEqual([r.address for r in entry.state.recipients], ["r@x.example"])

    def test_a_failed_hand_off_is_logged_and_the_message_stays_accepted(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def refuse(entry):
            raise RuntimeError("queue broken")

        intake = self.intake(queued=refuse)
        inc = intake.receive(intake.envelope("", ["r@x.example"], {}))
        inc.write(b"x\r\n")
        entry = self.successResultOf(intake.accept(inc, SOURCE, announce=lambda e: None))
        self.assertEqual(self.spool.queue_ids(), [entry.envelope.queue_id])
        failures = [e for e in events if e.get("log_format") == "{queue_id}: hand-off failed"]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["log_namespace"], "relay.test")
        self.flushLoggedErrors(RuntimeError)

    def test_a_commit_that_fails_goes_to_failed_and_nothing_is_queued(self):
        intake = self.intake()
        inc = intake.receive(intake.envelope("", ["r@x.example"], {}))
        inc.write(b"x\r\n")
        inc.abort()
        got = []
        d = intake.accept(inc, SOURCE, announce=lambda e: got.append("announce"),
                          failed=lambda f: got.append(f.type))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(got, [OSError])
        self.assertEqual(self.queued, [])
        self.assertEqual(self.spool.queue_ids(), [])


class ExpanderTests(unittest.TestCase):
    def test_expands_local_aliases_and_follows_a_reconfigure(self):
        tmp = tempfile.mkdtemp(prefix="relay-expander-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "aliases")
        with open(path, "w") as f:
            f.write("team: alice, bob@remote.example\n")
        aliases = aliasesmod.AliasFile(path, ("l.test",))
        ex = aliasesmod.Expander(local_domains=("l.test",), aliases=aliases, users=Users("alice@l.test"))
        self.assertEqual(ex.expand("team@l.test"),
                         [("alice@l.test", "team@l.test"), ("bob@remote.example", "team@l.test")])
        self.assertEqual(ex.expand("x@remote.example"), [("x@remote.example", "x@remote.example")])
        self.assertEqual(ex.expand("postmaster@l.test"), [("alice@l.test", "postmaster@l.test")])
        ex.reconfigure(local_domains=("other.test",), aliases=aliasesmod.AliasFile("", ("other.test",)),
                       users=Users())
        self.assertEqual(ex.expand("team@l.test"), [("team@l.test", "team@l.test")])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class SaslExchangeTests(unittest.TestCase):
    def test_plain_with_and_without_initial_response(self):
        self.assertEqual(auth.SaslExchange("PLAIN").start(b64(b"\0u@l.test\0pw")),
                         auth.Credentials(b"u@l.test", b"pw"))
        ex = auth.SaslExchange("PLAIN")
        self.assertEqual(ex.start(""), auth.Challenge(""))
        self.assertEqual(ex.step(b64(b"u@l.test\0u@l.test\0pw")), auth.Credentials(b"u@l.test", b"pw"))
        self.assertEqual(auth.SaslExchange("PLAIN").start(b64(b"other@l.test\0u@l.test\0pw")), auth.Denied())
        self.assertEqual(auth.SaslExchange("PLAIN").start(b64(b"no nul")),
                         auth.Refused(501, "5.5.2 Invalid PLAIN response"))

    def test_login_asks_for_the_user_then_the_password(self):
        ex = auth.SaslExchange("LOGIN")
        self.assertEqual(ex.start(""), auth.Challenge("VXNlcm5hbWU6"))
        self.assertEqual(ex.step(b64(b"u@l.test")), auth.Challenge("UGFzc3dvcmQ6"))
        self.assertEqual(ex.step(b64(b"pw")), auth.Credentials(b"u@l.test", b"pw"))

    def test_abort_and_bad_base64(self):
        self.assertEqual(auth.SaslExchange("LOGIN").step("*"), auth.Refused(501, "5.0.0 Authentication aborted"))
        self.assertEqual(auth.SaslExchange("PLAIN").step("!!!"), auth.Refused(501, "5.5.2 Cannot decode response"))


class PickupWithoutAService(unittest.TestCase):
    """The pickup is built from its parts (reactor, spool, disk pool, intake,
    config): no RelayService."""

    def test_a_drop_file_goes_through_the_intake(self):
        tmp = tempfile.mkdtemp(prefix="relay-pickup-unit-")
        self.addCleanup(shutil.rmtree, tmp, True)
        cfg = configmod.load(None, data={"hostname": "relay.test", "spool": tmp + "/spool",
                                         "local": {"domains": ["l.test"]}})
        sp = spoolmod.Spool(cfg.spool)
        sp.create()
        clock = task.Clock()
        disk = DiskPool(clock, inline=True)
        queued: list[spoolmod.QueueEntry] = []
        intake = Intake(spool=AsyncSpool(sp, disk), expand=lambda a: [(a, a)], queued=queued.append, clock=clock)
        qid = spoolmod.new_id()
        with open(os.path.join(sp.drop_dir, qid), "wb") as f:
            f.write(drop_line("s@x.example", ["r@x.example"], 0, "root", 1.0) + b"Subject: x\r\n\r\nhi\r\n")
        pickup = Pickup(reactor=clock, spool=sp, disk=disk, intake=intake, config=cfg, scan_interval=60.0)
        pickup.startService()
        self.addCleanup(pickup.stopService)
        self.assertEqual([e.envelope.queue_id for e in queued], [qid])
        self.assertEqual(os.listdir(sp.drop_dir), [])
        self.assertEqual(sp.queue_ids(), [qid])
        (entry,) = queued
        self.assertEqual(entry.envelope.client["proto"], "sendmail")
        self.assertTrue(entry.state_file)
        self.assertEqual(pickup.received, 1)
