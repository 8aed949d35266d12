#!/usr/bin/env python3
"""The benchmark summary of docs/benchmarks.md, generated from bench/RESULTS.md.

    python3 bench/summary.py            # rewrite the summary in docs/benchmarks.md from bench/RESULTS.md
    python3 bench/summary.py --check    # exit 1 when docs/benchmarks.md's summary is not the generated one

The page quotes the committed results and nothing else: the header lines
(date, command, commit measured, load, runs, sizes), the table as it is,
and the notes on where ours and the peer do different work, all copied
line for line.  bench/run.py rewrites it after each full run;
tests/test_bench_results.py checks that every number in the summary is
one of RESULTS.md's and that the summary is the one this script makes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "RESULTS.md")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")  # the summary was in README.md before issue 13

START = "<!-- bench-results: generated from bench/RESULTS.md by `python3 bench/summary.py`; edit that, not this -->"
END = "<!-- /bench-results -->"
HEADER_KEYS = ("Date", "Command", "Commit measured", "Load average", "Other work", "Runs", "Sizes")
NOTES = "## Where the two do different work"


class SummaryError(ValueError):
    pass


def _section(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    try:
        i = lines.index(heading)
    except ValueError:
        raise SummaryError(f"bench/RESULTS.md has no {heading!r} section") from None
    out = []
    for line in lines[i + 1:]:
        if line.startswith("## "):
            break
        out.append(line)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def block(results: str) -> str:
    """The summary (between its markers) for this RESULTS.md text."""
    lines = results.splitlines()
    header = []
    for key in HEADER_KEYS:
        found = [x for x in lines if x.startswith(f"- {key}")]
        if not found:
            raise SummaryError(f"bench/RESULTS.md has no '- {key}' line (made by an older bench/run.py?)")
        header.append(found[0])
    try:
        t = next(i for i, x in enumerate(lines) if x.startswith("| metric |"))
    except StopIteration:
        raise SummaryError("bench/RESULTS.md has no results table") from None
    table = []
    for x in lines[t:]:
        if not x.startswith("|"):
            break
        table.append(x)
    notes = _section(results, NOTES)
    out = [START,
           "**Results on our machine**: the last full run, copied from bench/RESULTS.md (which has every",
           "run's raw numbers and how each figure was measured); ratio = ours / peer, each figure a median.",
           "", *header, "", *table, "",
           "Where the two do different work (from the same file):", "", *notes, END]
    return "\n".join(out)


def readme_region(readme: str) -> str | None:
    """The page's results summary: between the markers, or (a page from
    before they existed) the paragraph that starts with **Results."""
    if START in readme and END in readme:
        a = readme.index(START)
        return readme[a:readme.index(END, a) + len(END)]
    m = re.search(r"^\*\*Results.*?(?=\n\s*\n)", readme, re.S | re.M)
    return m.group(0) if m else None


def update(readme: str, results: str) -> str:
    new = block(results)
    if START in readme and END in readme:
        a = readme.index(START)
        b = readme.index(END, a) + len(END)
        return readme[:a] + new + readme[b:]
    old = readme_region(readme)
    if old is None:
        raise SummaryError("docs/benchmarks.md has no results summary to replace (no markers, no **Results "
                           "paragraph)")
    return readme.replace(old, new, 1)


NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*x?(?!\w)")  # not a part of a word (a commit id)


def numbers(text: str) -> list[str]:
    return [m.group(0) for m in NUMBER.finditer(text)]


def missing_numbers(region: str, results: str) -> list[str]:
    """The numbers in region that RESULTS.md does not have (as a whole token)."""
    miss = []
    for tok in dict.fromkeys(numbers(region)):
        if not re.search(r"(?<![\w.])" + re.escape(tok) + r"(?![\w]|\.\d)", results):
            miss.append(tok)
    return miss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when docs/benchmarks.md is out of date")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--page", "--readme", dest="page", default=PAGE,
                    help="the page with the summary (default docs/benchmarks.md)")
    args = ap.parse_args()
    with open(args.results) as f:
        results = f.read()
    with open(args.page) as f:
        readme = f.read()
    try:
        new = update(readme, results)
    except SummaryError as e:
        print(f"bench/summary.py: {e}", file=sys.stderr)
        return 1
    if args.check:
        if new != readme:
            print(f"{os.path.relpath(args.page)}'s benchmark summary is not the one bench/RESULTS.md gives: "
                  "run python3 bench/summary.py", file=sys.stderr)
            return 1
        return 0
    if new != readme:
        with open(args.page, "w") as f:
            f.write(new)
        print(f"{os.path.relpath(args.page)}: benchmark summary rewritten from {os.path.relpath(args.results)}")
    else:
        print(f"{os.path.relpath(args.page)}: benchmark summary already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
