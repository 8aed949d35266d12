"""The README, ARCHITECTURE.md and docs/*.md stay true to the tree (issue 13, items 6 and 8).

- The README's Layout section names every module of relay/ and every folder
  a newcomer meets (tests/faults, tests/support, tests/integration, bench/, etc/).
- Every ``module.name`` or ``module.Class.method`` that ARCHITECTURE.md shows
  exists in that module (read with ast: nothing is imported).
- Every relative link of the pages points at a file or folder of the checkout,
  and every docs/ page is linked from the README.
- The places that name a README section in what the relay prints still find it.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import typing

import pytest

from relay import config as configmod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "ARCHITECTURE.md", *sorted(os.path.relpath(p, ROOT)
                                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def test_the_layout_section_names_every_module_and_folder():
    layout = _section(_read("README.md"), "Layout")
    spans = set(re.findall(r"`([^`]+)`", layout))
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "relay", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, os.path.join(ROOT, "relay"))
        if rel not in spans:
            missing.append(rel)
    for folder in ("tests/faults/", "tests/support/", "tests/integration/", "bench/", "etc/", "docs/",
                   "twisted/plugins/relay_plugin.py"):
        if not any(s.startswith(folder.rstrip("/")) for s in spans):
            missing.append(folder)
    assert not missing, f"README.md's Layout section does not name: {missing}"
    assert "ARCHITECTURE.md" in layout


def _definitions(path: str) -> set[str]:
    """Top-level names of a module, and Class.method for its classes."""
    tree = ast.parse(_read(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{sub.name}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    names.add(t.id)
    return names


def _module_file(name: str) -> str | None:
    for cand in (f"relay/{name}.py", f"relay/{name}/__init__.py"):
        if os.path.exists(os.path.join(ROOT, cand)):
            return cand
    return None


def _config_keys() -> set[str]:
    """``section.key`` of every config key (``delivery.max_concurrency``), not module names."""
    keys = set()
    for section, typ in typing.get_type_hints(configmod.Config).items():
        if dataclasses.is_dataclass(typ):
            keys.update(f"{section}.{f.name}" for f in dataclasses.fields(typ))
    return keys


def architecture_references(text: str) -> list[tuple[str, str]]:
    """(module file, dotted name) for each code span like ``spool.write_atomic``,
    ``smtp/client.deliver`` or ``queue.QueueManager.add`` (config keys left out)."""
    out = []
    keys = _config_keys()
    for span in re.findall(r"`([^`\s]+)`", text):
        m = re.fullmatch(r"([a-z][a-z0-9_]*(?:/[a-z][a-z0-9_]*)?)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)", span)
        if not m or m.group(1) in ("relay", "twistd") or span in keys:
            continue
        module = _module_file(m.group(1))
        if module is not None:
            out.append((module, m.group(2)))
    return out


def test_architecture_names_only_what_exists():
    refs = architecture_references(_read("ARCHITECTURE.md"))
    assert len(refs) > 40, refs  # the check itself sees the page's references
    wrong = [f"{mod}: {name}" for mod, name in refs if name not in _definitions(mod)]
    assert not wrong, f"ARCHITECTURE.md names what its module does not define: {wrong}"


def test_the_reference_check_catches_a_wrong_name():
    refs = architecture_references("`queue/spool.write_atomic`, `queue/manager.QueueManager.nonesuch`, "
                                   "`relay.toml`, `x.y`, `delivery.max_concurrency`")
    assert refs == [("relay/queue/spool.py", "write_atomic"), ("relay/queue/manager.py", "QueueManager.nonesuch")]
    assert "QueueManager.nonesuch" not in _definitions("relay/queue/manager.py")
    assert "QueueManager.add" in _definitions("relay/queue/manager.py")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = _read(page)
    here = os.path.dirname(os.path.join(ROOT, page))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path = target.split("#", 1)[0]
        if path and not os.path.exists(os.path.normpath(os.path.join(here, path))):
            broken.append(target)
    assert not broken, f"{page}: links to nothing: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = _read("README.md")
    for page in PAGES:
        if page.startswith("docs" + os.sep):
            assert f"]({page.replace(os.sep, '/')})" in readme, f"README.md does not link {page}"


def test_sections_named_in_the_relays_messages_exist():
    # relay/intake/sendmail.py tells a user whose message was not queued to see this README section
    assert 'see \\"Sending from local programs\\" in the README' in _read("relay/intake/sendmail.py")
    assert "\n## Sending from local programs (relay-sendmail)\n" in _read("README.md")
    assert "](docs/sendmail.md)" in _section(_read("README.md"), "Sending from local programs (relay-sendmail)")
