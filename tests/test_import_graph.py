"""No import cycles in common/, worker/, api/: every import counts, a function-local one too
(one is usually there to dodge a cycle, which then only moves to run time)."""

from __future__ import annotations

import ast
from pathlib import Path

from common.family_names import CLASSES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "worker", "api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names: `from a import b` is a.b where b is a module,
    else a (resolved against the set of modules by the caller)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of common/, worker/, api/ it imports anywhere in its source."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, set())
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = imported(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # `from a import b`: the submodule a.b where there is one, else a itself
                base, *members = names
                targets = [m for m in members if m in files] or [base]
            else:
                targets = names
            edges.update(t for t in targets if t in files and t != module)
    # the family registry imports each family's file by name (common/family_names.py)
    graph["common.ml.families"] |= {path.partition(":")[0] for path in CLASSES.values()}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_sees_function_local_imports() -> None:
    """The parser counts an import inside a function body, where cycles hide."""
    tree = ast.parse("def f():\n    from common.jobs import claim_job\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert imported(node, "common.x", False) == ["common.jobs", "common.jobs.claim_job"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    two = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}
    assert cycles(two) == [["a", "b", "a"], ["c", "d", "c"]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each group of modules that all reach each other (strongly connected)."""
    reach = {node: _reachable(graph, node) for node in graph}
    found, seen = [], set()
    for node in sorted(graph):
        if node in seen or node not in reach[node]:  # not on any cycle
            continue
        group = {m for m in reach[node] if node in reach[m]}
        seen |= group
        cycle = find_cycle({m: graph[m] & group for m in group})
        assert cycle is not None
        found.append(cycle)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_no_import_cycles() -> None:
    """common/, worker/ and api/ import each other without a cycle."""
    graph = import_graph()
    assert "common.jobs" in graph and "api.main" in graph
    assert "common.ml.families.lm" in graph["common.ml.families"]
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
