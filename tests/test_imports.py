"""The import graph of rolehost/ has no cycles (issue 18: a layout that shows the
architecture). Imports inside functions count: they hide a cycle from the interpreter,
not from a reader. Imports under `if TYPE_CHECKING:` do not: nothing runs them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "rolehost"

# Cycles still to break, each as the sorted modules of one strongly connected part of
# the graph. Empty: none is left. An entry may only go (the test fails if one is
# resolved and stays listed); a new cycle fails the test rather than join the list.
KNOWN_CYCLES: list[list[str]] = []


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports, wherever in it (at the top, in
    a function, in a try), except in `if TYPE_CHECKING:` blocks (their `else:` counts).
    `from P import x` is an import of P, and of P.x when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_node(other)
                continue
            visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # P itself too: importing P.x runs P's __init__ first, and what it imports.
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return {module for module in found if module in known and module != name}


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (Tarjan), each sorted: every
    module in one can reach every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(edges[module]):
            if other not in index:
                connect(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            part = []
            while True:
                other = stack.pop()
                part.append(other)
                if other == module:
                    break
            if len(part) > 1:
                parts.append(sorted(part))

    for module in sorted(edges):
        if module not in index:
            connect(module)
    return sorted(parts)


def _describe(edges: dict[str, set[str]], part: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & set(part)))}" for m in part)


def test_no_import_cycles_among_rolehost_modules() -> None:
    edges = graph(PACKAGE)
    found = cycles(edges)
    new = [part for part in found if part not in KNOWN_CYCLES]
    assert not new, "import cycles: " + " | ".join(_describe(edges, p) for p in new)
    gone = [part for part in KNOWN_CYCLES if part not in found]
    assert not gone, f"no longer cycles, take them off KNOWN_CYCLES: {gone}"


def test_the_walk_sees_the_imports_it_must(tmp_path: Path) -> None:
    """The walk itself: without this, a walk that saw no import at all would pass."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import pkg.b\n",
        "b.py": "def later():\n    from pkg import c\n",  # function-local: counted
        "c.py": ("from typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from pkg import a\n"  # not counted
                 "else:\n    from .sub import d\n"),  # counted, relative
        "sub/__init__.py": "",
        "sub/d.py": "try:\n    from ..a import x\nexcept ImportError:\n    pass\n",
        "e.py": "import os\nfrom pkg.sub.d import y\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    edges = graph(package)
    # `from P import x` imports P as well: its __init__ runs first.
    assert edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.c"},
                     "pkg.c": {"pkg.sub", "pkg.sub.d"}, "pkg.sub": set(),
                     "pkg.sub.d": {"pkg.a"}, "pkg.e": {"pkg.sub.d"}}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d"]]
    edges["pkg.c"] = set()  # what TYPE_CHECKING alone would leave: no cycle
    assert cycles(edges) == []
