"""The size rules of issue 13: small modules with one job, short functions.

No module of relay/ is over 600 lines unless its docstring says why it is one
job (a line starting "Size:"), and no function or method is over 80 lines.
Read with ast: nothing is imported.
"""

from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_LINES = 600
FUNCTION_LINES = 80


def _modules() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "relay", "**", "*.py"), recursive=True))


def _tree(path: str) -> tuple[str, ast.Module]:
    with open(path, encoding="utf-8") as f:
        src = f.read()
    return src, ast.parse(src, path)


def test_no_module_over_the_limit_without_a_reason():
    over = []
    for path in _modules():
        src, tree = _tree(path)
        doc = ast.get_docstring(tree) or ""
        if src.count("\n") > MODULE_LINES and not any(ln.startswith("Size:") for ln in doc.splitlines()):
            over.append(f"{os.path.relpath(path, ROOT)}: {src.count(chr(10))} lines")
    assert not over, f"modules over {MODULE_LINES} lines with no 'Size:' reason in their docstring: {over}"


def test_no_function_over_the_limit():
    over = []
    for path in _modules():
        _, tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > FUNCTION_LINES:
                    over.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not over, f"functions over {FUNCTION_LINES} lines: {over}"
