"""Every shell command README.md, ARCHITECTURE.md and docs/*.md show runs as
written, after the README's two set-up commands (``python3 -m venv .venv &&
.venv/bin/pip install ...``).

The commands are taken from the pages themselves (README.md first, then
ARCHITECTURE.md, then docs/*.md by name; "README" below means any of them):
fenced code blocks that are
not TOML/YAML, indented blocks (only the ``$ `` lines when a block has
prompts, since the rest is output), and inline code spans that start with
one of the programs the README tells a reader to run.  Each simple command
is then:

- run for real (``REAL``: quick, self-contained commands, in README order,
  against a relay of this checkout started for the test), or
- run with ``--help`` as written up to the first argument (the interpreter,
  the script, the verbs), and every option the README uses must be listed in
  that help, or
- left out for a reason (``ALLOWED``: needs root, systemd, a second install,
  a real network...).

A README command that fits none of these fails the test, so a new command in
the README gets checked or an explicit reason.  Everything runs in a temporary
directory that looks like the checkout after the set-up commands: links to the
checkout's files, ``.venv`` the virtualenv running this test, the system
``PATH`` (so ``python3`` is the system's interpreter, as for a reader) with
the venv's ``bin`` appended (``relayctl``, ``twistd``, ``relay-sendmail``)
and a directory where ``sendmail`` is relay-sendmail, as the README's
``ln -s`` makes it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.support.relay import ROOT, RelayProcess, free_port

README = os.path.join(ROOT, "README.md")
# The pages whose commands are checked, in the order their REAL commands run.
PAGES = [README, os.path.join(ROOT, "ARCHITECTURE.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
VENV = sys.prefix

# Programs the README tells the reader to run; an inline code span is a
# command when its first word is one of these (and it has arguments).
PROGRAMS = ("relayctl", "twistd", "relay-sendmail", "sendmail", "python", "python3", "sudo", "pip", "systemctl",
            "kill", ".venv/bin/", ".venv-new/bin/", "bench/")

PATH_PROGRAMS = tuple(p for p in PROGRAMS if p.endswith("/"))  # prefixes: ".venv/bin/relayctl"

# Indented blocks without a ``$`` prompt that are not shell, by their first line.
NOT_SHELL = [
    (re.compile(r"^import \w+"), "Python (poplib example)"),
    (re.compile(r"^failregex = "), "a fail2ban filter line"),
    (re.compile(r"^[0-9A-Z]{16}: "), "log lines"),
    (re.compile(r"^(\.\.\. |\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} )\[(w\d+ )?relay\.[\w.]+#\w+\] "), "log lines"),
    (re.compile(r'^\{"'), "a JSON log line"),
    (re.compile(r"^# 1\. publish this TXT record"), "relayctl dkim keygen's output"),
]
NOT_SHELL_LANGS = {"toml", "yaml", "yml", "json", "python", "ini", "dns"}  # dns: zone file records

# Simple commands not run, each with the reason; the pattern must match the
# whole simple command.  Every entry must still match a README command.
ALLOWED = [
    (r"python3 -m venv \.venv", "the set-up itself: this test runs in the venv it made"),
    (r"\.venv/bin/pip install .*", "the set-up itself: this test runs in the venv it made"),
    (r"pip install .*", "installs the package (the set-up command, or the editable install the README warns about)"),
    (r"systemctl .*", "needs systemd and root"),
    (r"(useradd|usermod|groupadd) .*", "needs root and changes the system's users"),
    (r"install -d .* /var/spool/relay /var/mail/relay|install -d -m 0755 /etc/relay", "needs root: system dirs"),
    (r"cp etc/examples/\S+ /etc/relay/relay\.toml|cp etc/relay\.service /etc/systemd/system/",
     "needs root: writes to /etc"),
    (r"chown relay:relay .*|chgrp relaydrop .*|chmod \d+ /var/spool/relay.*",
     "needs root and the relay user of a system install"),
    (r"ln -s /opt/twisted-relay/bin/relay-sendmail /usr/(s?bin|lib)/sendmail",
     "needs root; the test puts the same link on its own PATH"),
    (r"relayctl --config /etc/relay/relay\.toml user add alice@example\.org",
     "a system install's config; asks for a password on the terminal (user add --help is run instead)"),
    (r"kill -HUP PID", "needs the pid of a running relay (reload is tested in tests/integration/test_reload.py)"),
    (r"python3 -c import (smtplib|poplib); .*", "the five-minute tour: needs the tour's relay on the built-in "
     "defaults (ports 2525 and 1100; the same SMTP and POP3 exchanges are tested in tests/test_smtp_flow.py and "
     "tests/test_pop3.py)"),
    (r"curl -s http://127\.0\.0\.1:9025/metrics", "needs the metrics port 9025 free on this machine "
     "(the endpoint is tested in tests/test_metrics.py)"),
]

# Commands run as written (the whole line, pipes included) with the exit status
# the README gives them; in README order, against the relay started by the test.
REAL = {
    "relayctl --config bad.toml check": (1, "smtp.timeout: expected a duration"),
    "echo 's3cret' | relayctl user add bob@example.org --password-stdin": (0, ""),
    "relayctl user delete bob@example.org": (0, ""),
    "relayctl user list": (0, ""),
    "echo \"disk almost full\" | sendmail -i admin@example.org": (0, ""),
    "printf 'To: ops@example.org\\nSubject: backup\\n\\ndone\\n' | sendmail -t -i -F \"Backup job\"": (0, ""),
}

# Long commands also run as written but made tiny (the pattern's match replaced).
TINY = [
    (r"(bench/crash_harness\.py .*--kills )\d+", r"\g<1>1"),
]

# Standard tools in README pipelines; not the project's, not run by themselves.
TOOLS = {"echo", "printf", "grep", "head", "tail", "jq", "ls"}


@dataclasses.dataclass
class Command:
    line: int  # line number in its page
    text: str  # the command line as shown (prompt and comment removed)
    page: str = "README.md"  # the page, relative to the checkout

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _strip_comment(text: str) -> str:
    """The command without a trailing ``# comment`` (a '#' after white space,
    outside quotes)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def readme_commands(text: str, page: str = "README.md") -> list[Command]:
    """The shell commands shown in a page (see the module docstring)."""
    lines = text.split("\n")
    out: list[Command] = []
    unclassified: list[str] = []
    i = 0
    prev_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence:
            lang = fence.group(1).lower()
            j = i + 1
            body = []
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                body.append((j + 1, lines[j]))
                j += 1
            if lang not in NOT_SHELL_LANGS:
                out.extend(_block_commands(body, unclassified, page))
            i = j + 1
            prev_blank = False
            continue
        if prev_blank and line.startswith("    ") and line.strip():
            body = []
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                body.append((j + 1, lines[j][4:]))
                j += 1
            while body and not body[-1][1].strip():
                body.pop()
            out.extend(_block_commands(body, unclassified, page))
            i = j
            prev_blank = True
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            words = span.split()
            if len(words) > 1 and (words[0] in PROGRAMS or words[0].startswith(PATH_PROGRAMS)):
                out.append(Command(i + 1, span.strip(), page))
        prev_blank = not line.strip()
        i += 1
    assert not unclassified, ("README blocks neither shell nor known as something else (add to NOT_SHELL "
                              "or make them commands):\n" + "\n".join(unclassified))
    return out


def _block_commands(body: list[tuple[int, str]], unclassified: list[str], page: str) -> list[Command]:
    body = [(n, t) for n, t in body if t.strip()]
    if not body:
        return []
    if any(t.startswith("$ ") for _, t in body):
        return [Command(n, _strip_comment(t[2:]), page) for n, t in body if t.startswith("$ ")]
    first = body[0][1]
    if any(p.match(first) for p, _ in NOT_SHELL):
        return []
    if not re.match(r"^[\w./-]+( |$)", first):
        unclassified.append(f"{page}:{body[0][0]}: {first}")
        return []
    return [Command(n, _strip_comment(t), page) for n, t in body if _strip_comment(t)]


def simple_commands(text: str) -> list[list[str]]:
    """The simple commands of a command line (split at |, &&, ||, ;), as words.

    A part that starts with an option is the other half of a usage synopsis
    (``retry ID... | --all``), not a command of its own."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    parts: list[list[str]] = [[]]
    for tok in lex:
        if tok in ("|", "&&", "||", ";"):
            parts.append([])
        else:
            parts[-1].append(tok)
    merged: list[list[str]] = []
    for p in parts:
        if p and p[0].startswith("-") and merged:
            merged[-1] = merged[-1] + p
        elif p:
            merged.append(p)
    return merged


def _options(words: list[str]) -> list[str]:
    """The options a synopsis or command uses: ``[--json]`` -> ``--json``."""
    opts = []
    for w in words:
        w = w.strip("[]")
        if re.match(r"^--?[a-zA-Z][\w-]*", w):
            opts.append(re.match(r"^--?[a-zA-Z][\w-]*", w).group(0))
    return opts


def help_invocation(words: list[str]) -> tuple[list[str], list[str]] | None:
    """(argv to run with --help, options that help must list), or None when
    words is not a project program (a standard tool)."""
    if words[0] == "sudo":
        words = words[1:]  # the test's own user runs it
    prog = words[0]
    base = prog.rsplit("/", 1)[-1]
    if prog.startswith(".venv-new/"):
        prog = ".venv/" + prog[len(".venv-new/"):]  # the new version's venv, made the same way
    if base == "xargs":
        rest = [w for w in words[1:] if not w.startswith("-")]
        return help_invocation(rest) if rest else None
    if base == "relayctl":
        argv, i = [prog], 1
        while i < len(words) and words[i] in ("--config", "-c"):
            argv += words[i:i + 2]
            i += 2
        verbs = []
        while i < len(words) and re.match(r"^[a-z]+$", words[i]) and len(verbs) < 2:
            verbs.append(words[i])
            i += 1
        return argv + verbs + ["--help"], [o for o in _options(words[i:]) if o not in ("--config", "-c")]
    if base == "twistd":
        if "relay" in words:
            k = words.index("relay")
            return [prog] + words[1:k + 1] + ["--help"], _options(words[k + 1:])
        return [prog, "--help"], _options(words[1:])
    if base in ("python", "python3"):
        if words[1:3] == ["-m", "pytest"]:
            return [prog, "-m", "pytest", "--help"], _options(words[3:])
        if len(words) > 2 and words[1] == "-m" and words[2].split(".")[0] == "relay":
            return [prog, "-m", words[2], "--help"], _options(words[3:])
        if len(words) > 1 and words[1].startswith("bench/"):
            return [prog, words[1], "--help"], _options(words[2:])
    if base in TOOLS:
        return None
    raise AssertionError(f"README command {' '.join(words)!r}: no rule for it in tests/test_readme_commands.py: "
                         "teach help_invocation() how to run it with --help, add it to REAL or TINY, or to ALLOWED "
                         "with the reason it cannot run here")


def _allowed(words: list[str]) -> str | None:
    text = " ".join(words)
    for pat, reason in ALLOWED:
        if re.fullmatch(pat, text):
            return reason
    return None


def page_commands(paths: list[str]) -> list[Command]:
    """The commands of every page that exists, page after page."""
    out: list[Command] = []
    for path in paths:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out.extend(readme_commands(f.read(), os.path.relpath(path, ROOT)))
    return out


COMMANDS = page_commands(PAGES)


def _help_runs() -> dict[tuple[str, ...], tuple[list[str], list[Command]]]:
    """Each distinct --help invocation, the options to find in it and where
    the README uses it."""
    runs: dict[tuple[str, ...], tuple[list[str], list[Command]]] = {}
    for cmd in COMMANDS:
        if cmd.text in REAL:
            continue
        for words in simple_commands(cmd.text):
            if _allowed(words):
                continue
            inv = help_invocation(words)
            if inv is None:
                continue
            argv, opts = inv
            opts_seen, where = runs.setdefault(tuple(argv), ([], []))
            opts_seen.extend(o for o in opts if o not in opts_seen)
            where.append(cmd)
    return runs


HELP_RUNS = _help_runs()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory that looks like the checkout after the README's set-up."""
    if not os.path.exists(os.path.join(VENV, "bin", "relayctl")):
        pytest.skip(f"not run from the venv the README's set-up makes ({VENV}/bin/relayctl is missing)")
    d = tmp_path_factory.mktemp("readme")
    for name in os.listdir(ROOT):
        if name not in (".venv", ".git") and not name.startswith(".venv"):
            os.symlink(os.path.join(ROOT, name), d / name)
    os.symlink(VENV, d / ".venv")
    os.symlink(VENV, d / ".venv-new")
    (d / "sbin").mkdir()
    os.symlink(os.path.join(VENV, "bin", "relay-sendmail"), d / "sbin" / "sendmail")
    return d


def _env(workdir, config: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    # The system PATH, as for a reader who has not activated the venv: `python3`
    # is the system's interpreter; then the venv's programs.  Only `sendmail`
    # comes first: the README's `ln -s` replaces the system's.
    path = env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
    path = os.pathsep.join(p for p in path.split(os.pathsep) if not p.startswith(VENV))
    env["PATH"] = os.pathsep.join([str(workdir / "sbin"), path, os.path.join(VENV, "bin")])
    # The checkout's code, not a copy installed earlier (same as RelayProcess);
    # it cannot make twisted importable for an interpreter without it.
    env["PYTHONPATH"] = ROOT
    env["HOME"] = str(workdir)
    if config:
        env["RELAY_CONFIG"] = config
    else:
        env.pop("RELAY_CONFIG", None)
    return env


def test_readme_commands_are_found():
    """The extraction sees the README's commands (guards the test itself)."""
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("relayctl queue show ID") for t in texts)
    assert any("bench/crash_harness.py --kills 20" in t for t in texts)
    assert any(t.startswith("useradd --system") for t in texts)
    assert any("sendmail -i admin@example.org" in t for t in texts)
    assert len(COMMANDS) > 40, texts
    # the guides under docs/ are read too, not only the README
    pages = {c.page for c in COMMANDS}
    assert "README.md" in pages and any(p.startswith("docs" + os.sep) for p in pages), pages


def test_a_docs_page_command_without_a_rule_is_found(tmp_path):
    """A command in a docs/ page is extracted with its page and line, like the README's."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("# X\n\nText.\n\n    $ relayctl queue --json\n    output\n")
    cmds = page_commands([str(tmp_path / "docs" / "x.md")])
    assert [(c.line, c.text) for c in cmds] == [(5, "relayctl queue --json")]
    assert str(cmds[0]).endswith("x.md:5: relayctl queue --json")


def test_every_command_has_a_rule():
    """Each simple command is run, run with --help, a standard tool in a
    pipeline, or allowed with a reason; each ALLOWED and REAL entry is used."""
    used_allowed = set()
    for cmd in COMMANDS:
        assert not re.match(r"^(sudo )?python ", cmd.text), (
            f"{cmd}: `python` is not on a Debian machine (and is not the venv's): use .venv/bin/python or python3")
        if cmd.text in REAL:
            continue
        for words in simple_commands(cmd.text):
            reason = _allowed(words)
            if reason:
                used_allowed.add(reason)
                continue
            help_invocation(words)  # raises for a program without a rule
    unused = {r for _, r in ALLOWED} - used_allowed
    assert not unused, f"ALLOWED entries no README command needs: {unused}"
    texts = {c.text for c in COMMANDS}
    assert not set(REAL) - texts, f"REAL commands no longer in the README: {set(REAL) - texts}"


@pytest.mark.parametrize("argv", sorted(HELP_RUNS), ids=lambda a: " ".join(a))
def test_command_runs_with_help(workdir, argv):
    opts, where = HELP_RUNS[argv]
    p = subprocess.run(list(argv), cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=60)
    shown = "\n".join(str(c) for c in where)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}, for\n{shown}\n{p.stdout}{p.stderr}"
    missing = [o for o in opts if not re.search(r"(^|[\s,\[])" + re.escape(o) + r"\b", p.stdout + p.stderr)]
    assert not missing, (f"{' '.join(argv)}: the README uses {missing}, the help does not list them:\n"
                         f"{shown}\n{p.stdout}")


TINY_RUNS = [(c, re.sub(p, r, c.text)) for c in COMMANDS for p, r in TINY if re.search(p, c.text)]


def test_tiny_runs_are_found():
    assert TINY_RUNS, "no README command matches TINY"


@pytest.mark.parametrize("cmd,text", TINY_RUNS, ids=lambda x: getattr(x, "text", x))
def test_long_command_runs_small(workdir, cmd, text):
    """A long README command, as written but with small counts, exits 0."""
    p = subprocess.run(["sh", "-c", text], cwd=workdir, env=_env(workdir), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, f"{cmd}: `{text}` exited {p.returncode}\n{p.stdout}{p.stderr}"


def test_real_commands(workdir):
    """The README's self-contained commands, as written, in README order."""
    port = free_port()
    data = {
        "hostname": "relay.test",
        "spool": str(workdir / "spool"),
        "smtp": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
        "local": {"domains": ["example.org"], "mailboxes": str(workdir / "mail"),
                  "users": str(workdir / "users")},
        "pop3": {"listen": []},
    }
    (workdir / "bad.toml").write_text('[smtp]\ntimeout = "soon"\n')
    relay = RelayProcess(str(workdir), data).start(wait_for=("127.0.0.1", port))
    try:
        env = _env(workdir, relay.config_path)
        ran = []
        for cmd in COMMANDS:
            if cmd.text not in REAL or cmd.text in ran:
                continue
            ran.append(cmd.text)
            rc, expect = REAL[cmd.text]
            p = subprocess.run(["sh", "-c", cmd.text], cwd=workdir, env=env, capture_output=True, text=True,
                               timeout=60)
            assert p.returncode == rc, f"{cmd}: exit {p.returncode}, README says {rc}\n{p.stdout}{p.stderr}"
            assert expect in p.stdout + p.stderr, f"{cmd}: {expect!r} not in\n{p.stdout}{p.stderr}"
        assert sorted(ran) == sorted(REAL)
    finally:
        relay.stop()
