"""Where the relay's time goes: a summary of a ``py-spy record -f raw --threads`` file.

    python3 bench/pyspy_summary.py FILE [--top 25]

Lines look like ``thread (TID): NAME;frame;frame;... COUNT`` with frames
``function (file:line)``.  Prints the samples per thread, then for the main
(reactor) thread the functions by self time (the innermost frame), by
inclusive time (anywhere on the stack), and the source files by self time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _parse(path: str) -> list[tuple[str, list[str], int]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            parts = stack.split(";")
            # with --subprocesses: "process PID:CMDLINE" frames first (the
            # command line may itself contain ";"): keep from the thread on
            for k, part in enumerate(parts):
                if part.startswith("thread ("):
                    parts = parts[k:]
                    break
            thread = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread") else "?"
            frames = []
            for fr in parts[1:] if parts[0].startswith("thread") else parts:
                m = _FRAME.match(fr)
                frames.append(f"{m.group(1)} ({m.group(2)})" if m else fr)
            out.append((thread, frames, int(count)))
    return out


def _short(name: str) -> str:
    return re.sub(r"\(.*?site-packages/", "(", name)


def summary(path: str, top: int = 25) -> str:
    rows = _parse(path)
    if not rows:
        return f"{path}: no samples"
    per_thread: Counter = Counter()
    for thread, _frames, n in rows:
        per_thread[re.sub(r"-\d+$", "-N", thread)] += n
    total = sum(per_thread.values())
    main = [(frames, n) for thread, frames, n in rows if thread == "MainThread"]
    main_total = sum(n for _, n in main) or 1
    self_t: Counter = Counter()
    incl: Counter = Counter()
    files: Counter = Counter()
    for frames, n in main:
        if not frames:
            continue
        self_t[frames[-1]] += n
        m = _FRAME.match(frames[-1])
        files[m.group(2) if m else frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    out = [f"py-spy samples (active only): {total}; by thread: "
           + ", ".join(f"{t} {n} ({100 * n / total:.0f}%)" for t, n in per_thread.most_common())]
    out.append(f"\nmain thread, self time (innermost frame), top {top}:")
    for fr, n in self_t.most_common(top):
        out.append(f"  {100 * n / main_total:5.1f}%  {_short(fr)}")
    out.append(f"\nmain thread, inclusive time (below 95%), top {top}:")
    shown = 0
    for fr, n in incl.most_common():
        if n / main_total > 0.95:
            continue
        out.append(f"  {100 * n / main_total:5.1f}%  {_short(fr)}")
        shown += 1
        if shown >= top:
            break
    out.append("\nmain thread, self time by source file:")
    for fl, n in files.most_common(15):
        out.append(f"  {100 * n / main_total:5.1f}%  {_short('(' + fl + ')')[1:-1]}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(summary(args.file, args.top))


if __name__ == "__main__":
    main()
