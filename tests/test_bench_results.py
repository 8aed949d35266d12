"""The benchmark's figures say the truth (issue 12, item 18).

- Every number the benchmark summary of docs/benchmarks.md quotes is one of the committed
  bench/RESULTS.md, and the summary is the one bench/summary.py makes from it.
- The committed results come from the benchmark as it is now: the commit it
  measured, ours and the peer alternating, the 100k spool cold and warm, and
  the POP3 messages retrieved and compared.
- bench/pop3_bench.py refuses a figure from a server that lists or returns
  other messages than were delivered (a real server over a real socket).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import pop3_bench  # noqa: E402
import summary  # noqa: E402


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_every_number_in_the_readme_benchmark_summary_is_in_results_md():
    # the summary moved from README.md to docs/benchmarks.md (issue 13)
    readme, results = _read("docs/benchmarks.md"), _read("bench/RESULTS.md")
    region = summary.readme_region(readme)
    assert region, "docs/benchmarks.md has no benchmark results summary"
    assert summary.numbers(region), "the summary quotes no figures at all"
    assert summary.missing_numbers(region, results) == [], (
        "docs/benchmarks.md's benchmark summary quotes figures that bench/RESULTS.md does not have")


def test_the_readme_summary_is_generated_from_results_md():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "summary.py"), "--check"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    region = summary.readme_region(_read("docs/benchmarks.md"))
    assert region.startswith(summary.START) and region.endswith(summary.END)
    # the table is RESULTS.md's, line for line
    results_lines = set(_read("bench/RESULTS.md").splitlines())
    table = [x for x in region.splitlines() if x.startswith("|")]
    assert len(table) > 5
    assert all(x in results_lines for x in table)


def test_the_number_check_catches_a_figure_not_in_the_results():
    results = "| 1. relay rate (msg/s) | 1023 | 943 | 1.08x |\n"
    assert summary.missing_numbers("rate 1023 vs 943 (1.08x)", results) == []
    assert summary.missing_numbers("its rate was 1.0x-1.4x Postfix's, 970 to 1440", results) == \
        ["1.0x", "1.4x", "970", "1440"]
    assert summary.missing_numbers("1.0", results) == ["1.0"]  # not a part of 1.08x
    assert summary.numbers("commit 2239e2b50a, relay 4ffaab0: 614 msg/s") == ["614"]


def test_committed_results_come_from_the_current_benchmark():
    results = _read("bench/RESULTS.md")
    m = re.search(r"^- Commit measured: ([0-9a-f]{7,40})(.*)$", results, re.M)
    assert m, "RESULTS.md does not say which commit it measured"
    assert "uncommitted" not in m.group(2), "RESULTS.md measured uncommitted code"
    assert "ours and the peer alternate within each round" in results
    # the load of the shared machine, and what else ran, are on record
    assert re.search(r"^- Load average at the start: [\d.]+ ", results, re.M)
    assert re.search(r"^- Other work on the machine during the run: about \d+% of the \d+ cores", results, re.M)
    # who went first, per run: both sides went first at least once
    for bench in ("relay", "accept"):
        for who in ("ours", "postfix"):
            table = results.split(f"**{bench} / {who}**", 1)[1].split("\n\n", 2)[1]
            head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
            col = head.index("order")
            orders = {row.strip("|").split("|")[col].strip() for row in table.splitlines()[2:]}
            assert orders == {"1", "2"} or "- Runs: median of 1 " in results, (bench, who, orders)
    assert re.search(r"^\| 5\. [\d,]+ deferred, cold cache: start -> mail accepted", results, re.M)
    assert re.search(r"^\| 5\. [\d,]+ deferred, warm cache: start -> mail accepted", results, re.M)
    m = re.search(r"^\| 6\. POP3 LIST\+RETR (\d+) x", results, re.M)
    assert m
    n = m.group(1)
    row = re.search(r"^\| 6\. POP3 messages retrieved and equal to those delivered.*$", results, re.M)
    assert row, "RESULTS.md does not count the POP3 messages retrieved and compared"
    cells = [c.strip() for c in row.group(0).strip("|").split("|")]
    assert cells[1] == n and cells[2] == n, cells
    assert "## Where the two do different work" in results
    assert "stays in\n  memory only" in results


# -- pop3_bench.py refuses a wrong mailbox ------------------------------------------------


@pytest.fixture
def pop3(tmp_path):
    pop3_bench.HOST = "127.0.0.67"
    template = pop3_bench.make_mailbox(str(tmp_path / "template"), 20, 1024)
    want = pop3_bench.delivered(template)
    srv = pop3_bench.OurServer(str(tmp_path))
    yield srv, template, want
    srv.stop()


def _serve_copy(srv, template: str, tmp_path, change=None) -> int:
    root = tmp_path / "served"
    shutil.rmtree(root, ignore_errors=True)
    box = root / "example.org" / "alice"
    shutil.copytree(template, box)
    if change:
        change(str(box))
    return srv.start(None, root=str(root))


def test_pop3_bench_counts_and_compares_every_message(pop3, tmp_path):
    srv, template, want = pop3
    assert len(want) == 20 and sum(want.values()) == 20  # distinct messages
    port = _serve_copy(srv, template, tmp_path)
    secs, retrieved, compared = pop3_bench.session(port, timed=True, want=want)
    assert (retrieved, compared) == (20, 20)
    assert secs > 0


def test_pop3_bench_fails_on_a_missing_message(pop3, tmp_path):
    srv, template, want = pop3

    def drop_one(box: str) -> None:
        os.unlink(os.path.join(box, "new", sorted(os.listdir(os.path.join(box, "new")))[0]))

    port = _serve_copy(srv, template, tmp_path, drop_one)
    with pytest.raises(pop3_bench.Mismatch, match="LIST shows 19 messages; 20 were delivered"):
        pop3_bench.session(port, timed=True, want=want)


def test_pop3_bench_fails_on_a_changed_message(pop3, tmp_path):
    srv, template, want = pop3

    def change_one(box: str) -> None:
        new = os.path.join(box, "new")
        path = os.path.join(new, sorted(os.listdir(new))[3])
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:  # same size, one octet different
            f.write(data.replace(b"quick", b"quack", 1))

    port = _serve_copy(srv, template, tmp_path, change_one)
    with pytest.raises(pop3_bench.Mismatch, match="match no delivered message"):
        pop3_bench.session(port, timed=True, want=want)


def test_pop3_bench_fails_on_a_message_returned_twice(pop3, tmp_path):
    srv, template, want = pop3

    def duplicate_one(box: str) -> None:
        new = os.path.join(box, "new")
        names = sorted(os.listdir(new))
        shutil.copy(os.path.join(new, names[0]), os.path.join(new, names[1]))

    port = _serve_copy(srv, template, tmp_path, duplicate_one)
    with pytest.raises(pop3_bench.Mismatch, match="or one already retrieved"):
        pop3_bench.session(port, timed=True, want=want)


def _pop3_script(tmp_path, *extra: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path:
        env["PATH"] = f"{path}:{env.get('PATH', '')}"
    return subprocess.run([sys.executable, os.path.join(BENCH, "pop3_bench.py"), "--messages", "5", "--runs", "1",
                           "--host", "127.0.0.67", "--no-install", "--json", str(tmp_path / "pop3.json"), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_pop3_bench_script_reports_what_it_retrieved_and_compared(tmp_path):
    r = _pop3_script(tmp_path, "--no-dovecot")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "retrieved and compared with what was delivered, per run: 5/5" in r.stdout
    data = json.loads((tmp_path / "pop3.json").read_text())
    assert data["servers"]["twisted-relay"]["retrieved"] == [5]
    assert data["servers"]["twisted-relay"]["compared"] == [5]
    assert data["errors"] == {}


@pytest.mark.skipif(os.geteuid() != 0, reason="pop3_bench.py starts the peer only as root")
def test_pop3_bench_script_exits_non_zero_when_the_peer_fails(tmp_path):
    """A peer that fails is an error in the JSON and exit status 1, not a table without it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dovecot").write_text('#!/bin/sh\n[ "$1" = --version ] && { echo 0.0.fake; exit 0; }\nexit 3\n')
    (fake / "dovecot").chmod(0o755)
    r = _pop3_script(tmp_path, path=str(fake))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pop3_bench.py: FAILED: dovecot 0.0.fake: server exited with 3" in r.stderr
    data = json.loads((tmp_path / "pop3.json").read_text())
    assert data["errors"] == {"dovecot 0.0.fake": "server exited with 3"}


def test_rounds_alternate_who_goes_first():
    import run

    assert [run.round_order(i, True) for i in range(4)] == [
        ("ours", "postfix"), ("postfix", "ours"), ("ours", "postfix"), ("postfix", "ours")]
    assert run.round_order(1, False) == ("ours",)
