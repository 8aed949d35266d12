"""workers = 2 with limits.redis: each worker talks to Redis as a node of the fleet (real relay processes)."""

from __future__ import annotations

import pytest

from tests.integration.test_ratelimit_workers import mails
from tests.integration.test_workers import make, only_worker
from tests.support import redis as redissupport
from tests.support.wait import poll

pytestmark = pytest.mark.skipif(bool(redissupport.available()), reason=str(redissupport.available()))


def test_two_workers_two_nodes_one_limit(tmp_path):
    redis = redissupport.RedisServer("127.0.0.5").start()
    try:
        relay, port = make(tmp_path, limits={"messages_per_ip": "60/1h", "redis": redis.url, "redis_prefix": "w:"})
        relay.start(wait_for=("127.0.0.1", port))
        try:
            # each worker is a node of its own in Redis (its own connection and heartbeat)
            poll(lambda: redis.command("ZCARD", "w:nodes") == b":2", 30, what="two nodes in Redis")
            assert relay.log().count("limits: shared with the fleet in Redis 127.0.0.5") == 2
            with only_worker(relay, 0):
                first = mails(port, 50)
            with only_worker(relay, 1):
                second = mails(port, 30)
            assert [c for c, _ in first] == [250] * 50
            assert [c for c, _ in second] == [250] * 10 + [450] * 20, second
            # counted in Redis, under the prefix
            assert redis.command("KEYS", "w:rate:limits.messages_per_ip:*127.0.0.1") != b"*0"
            assert "unavailable" not in relay.log()
        finally:
            relay.stop()
    finally:
        redis.close()
