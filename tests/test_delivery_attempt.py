"""relay.delivery.attempt.Deliverer with its parts given explicitly (no service
object), and the one relay.outbound.request.Outbound it builds for the client.

Delivery itself is tested end to end in tests/integration/test_delivery.py;
here, what reaches the client and what a reload changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from twisted.internet import defer, task

from relay import config as configmod
from relay.delivery import local as localmod
from relay.delivery import routing
from relay.delivery.attempt import Deliverer
from relay.outbound.request import MessageFile, Outbound, Timeouts, TLSPolicy


@dataclass
class Env:
    sender: str


@dataclass
class Msg:
    qid: str
    env: Env
    size: int
    offset: int
    eight_bit: bool | None = None
    data: bytes | None = None


class Spool:
    def message_path(self, qid: str) -> str:
        return os.path.join("/spool/queue", qid)


class Disk:
    pool = None

    def __init__(self):
        self.calls = []

    def run(self, fn, *args, **kw):
        self.calls.append((fn, args, kw))
        return defer.succeed(localmod.LocalResult("delivered", "2.0.0", "250 2.0.0 ok"))


class Users:
    def __init__(self, names):
        self.names = set(names)

    def exists(self, address: str) -> bool:
        return address in self.names


class Listeners:
    def is_self(self, ip: str, port: int) -> bool:
        return False


def load(tmp_path, **relay):
    return configmod.load(None, data={
        "hostname": "relay.test", "spool": str(tmp_path / "spool"),
        "local": {"domains": ["local.test"], "users": str(tmp_path / "users")},
        "delivery": {"max_per_destination": 3, "connect_timeout": "7s"},
        "relay": relay,
    })


def make(tmp_path, config=None, **kw) -> Deliverer:
    return Deliverer(task.Clock(), resolver=None, spool=Spool(), disk=Disk(), users=Users(["u@local.test"]),
                     listeners=Listeners(), config=config or load(tmp_path), **kw)


def test_outbound_for_mx(tmp_path):
    d = make(tmp_path)
    msg = Msg("Q1", Env("s@origin.test"), size=120, offset=40, eight_bit=False, data=b"x" * 120)
    dest = routing.route(d.config, "r@dest.test")
    out = d._outbound(msg, dest, ["r@dest.test", "r2@dest.test"], None)
    assert out == Outbound(
        sender="s@origin.test", recipients=("r@dest.test", "r2@dest.test"),
        message=MessageFile("/spool/queue/Q1", 120, 40, b"x" * 120, False), helo="relay.test",
        tls=TLSPolicy(d.config.delivery.tls, None, None), auth=None, connect_timeout=7.0,
        timeouts=Timeouts(), queue_id="Q1",
    )


def test_outbound_for_the_smarthost(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    d = make(tmp_path, load(tmp_path, smarthost="smart.test:2525", smarthost_tls="verify", smarthost_ca_file=str(ca)),
             timeouts=Timeouts.uniform(2.0))
    dest = routing.route(d.config, "r@dest.test")
    out = d._outbound(Msg("Q2", Env(""), 10, 0), dest, ["r@dest.test"], ("user", "pw"))
    assert out.tls == TLSPolicy("verify", "smart.test", str(ca))
    assert (out.auth, out.timeouts) == (("user", "pw"), Timeouts.uniform(2.0))
    # a trust root given to the Deliverer wins (tests inject their CA)
    d.trust_root = "/other/ca.pem"
    assert d._outbound(Msg("Q2", Env(""), 10, 0), dest, ["r@dest.test"], None).tls.trust_root == "/other/ca.pem"


def test_reconfigure_replaces_config_and_users(tmp_path):
    d = make(tmp_path)
    assert d.host_limit._limit() == 3
    new = configmod.load(None, data={
        "hostname": "relay.test", "spool": str(tmp_path / "spool"),
        "local": {"domains": ["local.test"], "users": str(tmp_path / "users")},
        "delivery": {"max_per_destination": 5},
    })
    users = Users(["v@local.test"])
    d.reconfigure(new, users)
    assert d.config is new and d.host_limit._limit() == 5
    dest = routing.route(new, "v@local.test")
    outcomes = d.attempt(Msg("Q3", Env("s@x.test"), 10, 0), dest, ["v@local.test"]).result
    assert [(o.address, o.kind, o.relay) for o in outcomes] == [("v@local.test", "delivered", "local")]
    _fn, _args, kw = d.disk.calls[-1]
    assert kw["user_exists"] == users.exists and kw["message_path"] == "/spool/queue/Q3"


def test_set_resolver(tmp_path):
    d = make(tmp_path)
    r = object()
    d.set_resolver(r)
    assert d.resolver is r


def test_tls_policy_and_message_file():
    with pytest.raises(ValueError):
        TLSPolicy("sometimes")
    assert MessageFile("/m", 3, data=b"abc").in_memory == b"abc"
    assert MessageFile("/m", 4, data=b"abc").in_memory is None  # not the whole message: read the file
