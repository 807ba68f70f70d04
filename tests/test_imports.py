"""No module of rrome_cli imports, directly or through others, a module that imports it: not at
the top, not inside a function, not for type checking only. A circle hides which module a
piece belongs to, and a deferred import that dodges it breaks when the import order changes."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The rrome_cli modules a file imports anywhere (``from a import b``: a.b if that is a
    module, else a)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            }
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "rrome_cli").rglob("*.py")}
    modules = set(files)
    return {m: imported(ast.parse(p.read_text()), modules) - {m} for m, p in files.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` as a path that ends where it starts, or [] if there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return []
        for other in sorted(graph[module]):
            if circle := visit(other, [*path, module]):
                return circle
        done.add(module)
        return []

    for module in sorted(graph):
        if circle := visit(module, []):
            return circle
    return []


def test_the_circle_finder_finds_a_circle() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) == []


def test_no_module_of_rrome_cli_imports_itself_through_others() -> None:
    graph = import_graph()
    assert "rrome_cli.models.loading" in graph and graph["rrome_cli.run"]  # the graph is read
    assert find_circle(graph) == [], " -> ".join(find_circle(graph))
