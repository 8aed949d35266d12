"""No import cycles among the relay's modules (issue 13: explicit dependencies).

Every ``import relay...`` / ``from relay... import`` counts, at module level
and inside functions alike: an import inside a function hides a cycle from
Python's import machinery, not from the reader.  The graph is read from the
source (ast), so nothing is imported.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relay_modules() -> dict[str, str]:
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "relay")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = relay_modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("relay"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("relay"))
        graph[name] = {d for d in deps if d in mods and d not in (name, "relay")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "relay.control.server" in graph and "relay.runtime.service" in graph  # the graph was read
    assert cycles(graph) == []


def test_control_side_does_not_reach_into_the_service():
    """The control socket, the protocol and the metrics get what they use as
    parameters: none imports the service that assembles them."""
    graph = import_graph()
    for name in ("relay.control.server", "relay.control.proto", "relay.control.amp", "relay.admin.client",
                 "relay.admin.commands", "relay.admin.reach", "relay.admin.queueverbs", "relay.runtime.metrics",
                 "relay.admin.cli", "relay.config.workerpaths"):
        assert "relay.runtime.service" not in graph[name], name
        assert "relay.runtime.master" not in graph[name], name


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module == "relay.config" else module


def test_no_cycle_among_packages():
    """The layout is the path of a message: smtp -> intake -> queue ->
    delivery -> outbound, with mailbox, config and common below and control,
    runtime and admin on top.  A package that imports a package which
    imports it back (directly or round a longer circle) would blur that."""
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        if name.count(".") < 2 and name != "relay.config":
            continue  # relay/__init__.py and the package faces
        p = _package(name)
        packages.setdefault(p, set()).update(_package(d) for d in deps if _package(d) != p)
    packages = {p: {d for d in ds if d in packages} for p, ds in packages.items()}
    assert "outbound" in packages and "delivery" in packages["queue"], packages  # the graph was read
    assert cycles(packages) == [], cycles(packages)
    assert "runtime" not in set().union(*(packages[p] for p in packages if p not in ("admin", "runtime")))
