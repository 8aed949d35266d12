"""relay.common.connlimit: per-IP connection counts shared by the worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from relay.common import connlimit
from tests.support.relay import ROOT


@pytest.fixture
def table():
    t = connlimit.SharedTable.create(3, capacity=64)
    yield t
    t.close()


def test_local_counter():
    c = connlimit.LocalCounter()
    assert [c.acquire("1.2.3.4", 2) for _ in range(3)] == [(True, 0), (True, 1), (False, 2)]
    assert c.count("1.2.3.4") == 2 and c.counts() == {"1.2.3.4": 2}
    c.release("1.2.3.4")
    c.release("1.2.3.4")
    c.release("1.2.3.4")  # one too many: no negative count
    assert c.counts() == {} and c.acquire("1.2.3.4", 1) == (True, 0)


def test_the_limit_is_the_sum_of_every_worker(table):
    w0, w1 = table.counter("smtp", 0), table.counter("smtp", 1)
    assert w0.acquire("192.0.2.1", 3) == (True, 0)
    assert w1.acquire("192.0.2.1", 3) == (True, 1)
    assert w1.acquire("192.0.2.1", 3) == (True, 2)
    assert w0.acquire("192.0.2.1", 3) == (False, 3)
    assert w1.count("192.0.2.1") == 3
    assert w0.counts() == {"192.0.2.1": 1} and w1.counts() == {"192.0.2.1": 2}
    # protocols count apart
    assert table.counter("pop3", 0).acquire("192.0.2.1", 3) == (True, 0)
    w0.release("192.0.2.1")
    w0.release("192.0.2.1")  # not this worker's any more: ignored
    assert w1.count("192.0.2.1") == 2
    w1.release("192.0.2.1")
    w1.release("192.0.2.1")
    assert w1.count("192.0.2.1") == 0 and table._used() == 1  # the pop3 entry


def test_collisions_and_removal_keep_every_entry_findable(table):
    """Many keys in a small table (long probe chains): removing any of them
    (backward shift) must leave all others with their counts."""
    w = table.counter("smtp", 2)
    names = [f"2001:db8::{i:x}" for i in range(40)]  # 40 of 64 slots: chains wrap around
    for n, name in enumerate(names):
        for _ in range(n % 3 + 1):
            assert w.acquire(name, 10)[0]
    for k, gone in enumerate(names[::2]):
        for _ in range(names.index(gone) % 3 + 1):
            w.release(gone)
        for n, name in enumerate(names):
            expect = 0 if name in names[::2][:k + 1] else n % 3 + 1
            assert w.count(name) == expect, (gone, name)
    assert table._used() == 20


def test_a_full_table_refuses_new_addresses_and_says_so(table):
    w = table.counter("smtp", 0)
    for i in range(48):  # 3/4 of 64
        assert w.acquire(f"10.0.0.{i}", 5)[0]
    assert w.acquire("10.0.1.1", 5) == (False, 0)
    assert w.acquire("10.0.0.7", 5) == (True, 1)  # an address already in: still counted
    w.release("10.0.0.3")
    assert w.acquire("10.0.1.1", 5) == (True, 0)


def test_release_worker_frees_only_that_workers_connections(table):
    w0, w1, w2 = (table.counter("smtp", i) for i in range(3))
    for i in range(30):
        w0.acquire(f"198.51.100.{i}", 9)
        if i % 2:
            w1.acquire(f"198.51.100.{i}", 9)
            w1.acquire(f"198.51.100.{i}", 9)
    w2.acquire("198.51.100.0", 9)
    assert table.release_worker(1) == 30
    assert table.release_worker(1) == 0
    assert [w0.count(f"198.51.100.{i}") for i in range(30)] == [2] + [1] * 29
    assert table.release_worker(0) == 30
    assert table._used() == 1 and w2.count("198.51.100.0") == 1
    # the restarted worker starts from zero and counts again
    w1 = table.counter("smtp", 1)
    assert w1.acquire("198.51.100.0", 2) == (True, 1)
    assert w1.acquire("198.51.100.0", 2) == (False, 2)


def test_processes_sharing_the_table_never_admit_more_than_the_limit():
    """Two real processes (the table's descriptor inherited through exec, as
    the workers get it) race for the one slot of an address, over and over:
    never do both hold it, and the counts stay intact."""
    t = connlimit.SharedTable.create(2)
    try:
        prog = textwrap.dedent("""
            import sys, time
            from relay.common.connlimit import SharedTable
            t = SharedTable(int(sys.argv[1]))
            c = t.counter("smtp", int(sys.argv[2]))
            sys.stdin.readline()  # start together
            held = both = 0
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                for _ in range(100):
                    if c.acquire("203.0.113.9", 1)[0]:
                        held += 1
                        both += c.count("203.0.113.9") != 1
                        c.release("203.0.113.9")
            c.acquire("203.0.113.1", 10)
            print(held, both)
        """)
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs = [subprocess.Popen([sys.executable, "-c", prog, str(t.fd), str(i)], env=env, pass_fds=[t.fd],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in (0, 1)]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out = [p.communicate(timeout=120)[0].split() for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(int(held) > 0 for held, _ in out), out
        assert [both for _, both in out] == ["0", "0"], out
        w = t.counter("smtp", 0)
        assert w.count("203.0.113.9") == 0 and w.count("203.0.113.1") == 2 and t._used() == 1
    finally:
        t.close()


def test_a_descriptor_that_is_not_a_table_is_refused(tmp_path):
    with open(tmp_path / "x", "wb+") as f:
        f.write(b"\0" * 4096)
        f.flush()
        with pytest.raises(ValueError, match="not a connection table"):
            connlimit.SharedTable(f.fileno())
