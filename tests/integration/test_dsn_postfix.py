"""A third-party peer: a private Postfix instance (as bench/ runs one) as our
relay's next hop.  Postfix offers DSN, so our relay carries RET, ENVID,
NOTIFY and ORCPT to it; Postfix relays on to a sink that offers DSN too and
passes on what it understood from us: the sink's transcript shows that a
real implementation read our parameters as we meant them.  Skipped (with
the reason) without Postfix or without root (its daemons drop to the
postfix user)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from unittest import mock

from tests.integration.test_dsn import DsnCase
from tests.support.relay import ROOT, in_thread
from tests.support.wait import apoll
from tests.test_dsn import check_report

PF_IP = "127.0.0.7"
POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)


def _skip_reason() -> str | None:
    if POSTFIX is None:
        return "Postfix is not installed (apt-get install -y postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons run as the postfix user)"
    try:
        import pwd
        pwd.getpwnam("postfix")
    except KeyError:
        return "no postfix user"
    return None


class PostfixNextHop(DsnCase):
    skip = _skip_reason()

    def more_config(self):
        self.pf_port = None
        return {}

    async def start_postfix(self, next_hop=None, main_cf: str = ""):
        """A private Postfix on PF_IP relaying to next_hop (default: the sink on 127.0.0.3); main_cf: more
        main.cf lines.  The one place the Postfix tests (DSN, CHUNKING, SMTPUTF8) start it."""
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        self.addCleanup(sys.path.remove, os.path.join(ROOT, "bench"))
        import mta
        import procs

        workdir = tempfile.mkdtemp(prefix="relay-dsn-pf-")
        self.addCleanup(shutil.rmtree, workdir, True)
        env = mta.Env(root=ROOT, venv="", python=sys.executable, twistd="", relayctl="", smtp_source="",
                      smtp_sink="", postfix=POSTFIX, postconf=POSTFIX.replace("postfix", "postconf"), dovecot=None)
        reg = procs.Registry()
        pf = mta.Postfix(reg, env, workdir, PF_IP, next_hop=next_hop or ("127.0.0.3", self.port), main_cf=main_cf)
        with mock.patch.object(procs.CpuCgroup, "create", return_value=None), \
                mock.patch.object(mta.CpuCgroup, "create", return_value=None):
            await in_thread(pf.start)
        self.addCleanup(in_thread, pf.stop)
        return pf

    async def route_to_postfix(self, pf) -> None:
        """Our relay again, now with pf.example routed to that Postfix (plaintext)."""
        from tests.support.relay import InProcessRelay

        await self.relay.stop()
        self.relay = InProcessRelay(self.tmp, {
            "delivery": {"nameservers": [f"127.0.0.1:{self.dns.port}"], "port": self.port, "retry_min": 1,
                         "tls": "none"},
            "relay": {"routes": {"pf.example": f"{PF_IP}:{pf.port}"}},
        })
        await self.relay.start()

    async def test_postfix_receives_and_passes_on_our_dsn_parameters(self):
        pf = await self.start_postfix()
        await self.route_to_postfix(pf)
        await self.transaction([("a@pf.example", ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;first@pf.example"]),
                                ("b@pf.example", [])], ["RET=HDRS", "ENVID=abc+2Bdef"])
        await apoll(lambda: self.sinks["127.0.0.3"].transactions, timeout=60, what="Postfix relaying to the sink")
        await apoll(self.queue_empty, timeout=20, what="our queue empty")
        cmds = self.sinks["127.0.0.3"].transactions[0].session.commands
        params = {c.split(">")[0] + ">": set(c.split(">", 1)[1].split())
                  for c in cmds if c.startswith(("MAIL", "RCPT"))}
        self.assertLessEqual({"RET=HDRS", "ENVID=abc+2Bdef"}, params["MAIL FROM:<sender@client.example>"])
        self.assertEqual(params["RCPT TO:<a@pf.example>"], {"NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;first@pf.example"})
        self.assertEqual(params["RCPT TO:<b@pf.example>"], {"ORCPT=rfc822;b@pf.example"})
        self.assertEqual(self.notices(), [])  # the next hops offer DSN: nobody sends "relayed"


    async def test_postfix_as_our_client(self):
        """Postfix relays a client's DSN request to us; we deliver locally and
        send the success notice with the ENVID and ORCPT Postfix passed on."""
        pf = await self.start_postfix(next_hop=self.relay.smtp)
        await self.transaction([("alice@local.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;first+2Bx@local.test"])],
                               ["RET=HDRS", "ENVID=pf+2Bid"], relay=_At(PF_IP, pf.port))
        await apoll(lambda: self.notices(), timeout=60, what="our success notice")
        per_msg, (blk,) = check_report(self.notices()[0])
        self.assertEqual(per_msg["Original-Envelope-Id"], "pf+id")
        self.assertEqual(blk["Action"], "delivered")
        self.assertEqual(blk["Original-Recipient"], "rfc822; first+x@local.test")


class _At:
    """Where DsnCase.transaction connects: Postfix's listener."""

    def __init__(self, host: str, port: int):
        self.smtp = (host, port)
