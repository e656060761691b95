"""The shape of the source tree: no import circles, and families that keep their weight.

Every import statement in ``src/`` counts (module level and inside functions alike), except
those under ``if TYPE_CHECKING:``, which never run. ``from a.b import c`` is an edge to
``a.b.c`` when that is a module, else to ``a.b``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "blackbox_vqa"


def _module_names(root: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = ("blackbox_vqa", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run: everything but the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _runtime_imports(node)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of this package it imports`` for every module under ``root``."""
    modules = _module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert node.level == 0, f"{name}: relative import"
                base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_circle_in_src() -> None:
    assert cycles(import_graph()) == []


def test_the_circle_finder_finds_a_circle(tmp_path: Path) -> None:
    # The check above must be able to fail: a two-module circle inside a function body,
    # and a TYPE_CHECKING-only back edge, which is not a circle.
    (tmp_path / "a.py").write_text("def f():\n    from blackbox_vqa.b import g\n")
    (tmp_path / "b.py").write_text("from blackbox_vqa import a\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from blackbox_vqa.a import f\n")
    (tmp_path / "d.py").write_text("from blackbox_vqa.c import x\n")
    assert cycles(import_graph(tmp_path)) == [["blackbox_vqa.a", "blackbox_vqa.b"]]


def test_the_onnx_family_imports_no_torch() -> None:
    # Statically: nothing reachable from adapters/onnx imports torch ...
    graph = import_graph()
    reach, todo = set(), [m for m in graph if m.startswith("blackbox_vqa.adapters.onnx")]
    while todo:
        module = todo.pop()
        if module not in reach:
            reach.add(module)
            todo.extend(graph[module])
    modules = _module_names(PACKAGE)
    torch_users = sorted(
        m for m in reach
        for node in _runtime_imports(ast.parse(modules[m].read_text(encoding="utf-8")))
        if any(n == "torch" or n.startswith("torch.") for n in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module or ""])))
    assert torch_users == []
    # ... and for real: loading the ONNX adapter leaves torch unloaded.
    code = ("import sys, blackbox_vqa.adapters.onnx.runtime as r; "
            "assert 'torch' not in sys.modules, 'torch loaded'; print(r.OnnxAdapter.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "OnnxAdapter", done.stderr
