"""The package's import graph: no cycles, and each part of the executor imports only what it may.

The graph is read from the source with ``ast``, so nothing is imported to build it. Every
``import`` and ``from … import`` counts, also inside functions (lazy imports load modules just
the same), except those under ``if TYPE_CHECKING:``, which never run; so does the lazy export
table of ``codemode/__init__.py``. A module importing ``a.b.c`` depends on ``a.b.c`` alone,
not on the packages above it, and ``from a.b import c`` on ``a.b.c`` when that is a module.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "codemode"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Each module of ``package`` under ``src`` by dotted name (a package by its ``__init__``)."""
    modules: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _runtime_nodes(stmt)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The dotted names module ``name`` (source at ``path``) imports at run time.

    Names inside the package are modules of ``modules``; others (``os``, ``grpc.aio``) are
    kept as written.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Assign) and name == PACKAGE:
            # The top-level package's lazy exports: {"Name": "module.path", ...}.
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if "_EXPORTS" in targets and isinstance(node.value, ast.Dict):
                found.update(
                    v.value
                    for v in node.value.values
                    if isinstance(v, ast.Constant) and isinstance(v.value, str)
                )
    found.discard(name)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Each module of ``package`` and the names it imports at run time."""
    modules = module_files(src, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: one per strongly connected component, as a closed path.

    Each cycle is listed from its smallest module name back to itself (``[a, b, a]``).
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in sorted(components, key=min):
        start = min(component)
        inside = {n: [d for d in graph[n] if d in component] for n in component}
        path = _shortest_path(inside, start, start)
        cycles.append(path if path else sorted(component))
    return cycles


def _shortest_path(graph: Mapping[str, Iterable[str]], start: str, goal: str) -> list[str]:
    """The shortest path of at least one edge from ``start`` to ``goal``, or ``[]``."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for dep in sorted(graph.get(node, ())):
                if dep == goal:
                    path = [dep, node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if dep not in parents and dep != start:
                    parents[dep] = node
                    following.append(dep)
        frontier = following
    return []


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> dict[str, list[str]]:
    """Every name ``start`` imports, directly or through the package's modules, with its chain."""
    chains: dict[str, list[str]] = {}
    frontier = [[start]]
    while frontier:
        following = []
        for chain in frontier:
            for dep in sorted(graph.get(chain[-1], ())):
                if dep != start and dep not in chains:
                    chains[dep] = [*chain, dep]
                    if dep in graph:
                        following.append(chains[dep])
        frontier = following
    return chains


def violations(
    graph: Mapping[str, Iterable[str]],
    importers: str,
    banned: Iterable[str],
    *,
    exact: Iterable[str] = (),
    allowed_edges: Iterable[tuple[str, str]] = (),
) -> list[str]:
    """How modules under ``importers`` reach names they must not import: one chain per import.

    Banned are the names under one of ``banned`` and the names in ``exact``; a last step that
    is one of ``allowed_edges`` (importer, imported) is allowed. Each offending import is shown
    once, by the shortest chain that leads to it from ``importers``.
    """
    banned, exact, allowed = list(banned), set(exact), set(allowed_edges)

    def forbidden(name: str) -> bool:
        return name in exact or any(_within(name, b) for b in banned)

    found: dict[tuple[str, str], list[str]] = {}
    for module in sorted(m for m in graph if _within(m, importers)):
        for name, chain in reachable(graph, module).items():
            edge = (chain[-2], name)
            if edge in allowed or not forbidden(name) or any(map(forbidden, chain[1:-1])):
                continue
            if edge not in found or len(chain) < len(found[edge]):
                found[edge] = chain
    return [" -> ".join(found[edge]) for edge in sorted(found)]


def test_no_import_cycles() -> None:
    """No module of the package imports itself again through others, lazy imports included."""
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_find_cycles_reports_a_closed_path() -> None:
    """The cycle finder reports a three-module ring as one closed path and ignores outside names."""
    graph = {"a": {"b", "os"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_imports_of_resolves_submodules_and_skips_type_checking(tmp_path: Path) -> None:
    """`from pkg import mod` is the module, relative imports resolve, TYPE_CHECKING is skipped."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("X = 1\n")
    (pkg / "user.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from pkg import mod, X\n"
        "from . import mod as again\n"
        "if TYPE_CHECKING:\n"
        "    import hidden\n"
        "else:\n"
        "    import shown\n"
        "def lazy():\n"
        "    import os.path\n"
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.user"] == {"typing", "pkg.mod", "pkg", "shown", "os.path"}


def test_executor_parts_import_rules() -> None:
    """Each part of the executor, and the SDK, imports only what its folder's docstring allows."""
    graph = import_graph()
    modules = module_files()
    problems: list[str] = []

    # The guest runs inside the sandbox as the top-level package ``guest``: the standard
    # library, and its siblings imported relatively, are all it has.
    guest = "codemode.executor.guest"
    for module in sorted(m for m in modules if _within(m, guest)):
        for name in sorted(graph[module]):
            if name.split(".")[0] not in sys.stdlib_module_names and not _within(name, guest):
                problems.append(f"{module} -> {name} (the guest may import only the stdlib)")
        for node in _runtime_nodes(ast.parse(modules[module].read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if _within(name, PACKAGE):
                    problems.append(f"{module} -> {name} (the guest imports siblings relatively)")

    sdk = ["codemode.core", "codemode.tools", "codemode.integrations"]
    rules: dict[str, list[str]] = {
        "codemode.executor.sandbox": [
            "grpc",
            "codemode.wire",
            *sdk,
            "codemode.executor.run",
            "codemode.executor.service",
        ],
        "codemode.executor.run": ["grpc", "codemode.wire", *sdk, "codemode.executor.service"],
        "codemode.executor.service": sdk,
    }
    for importers, banned in rules.items():
        problems += violations(graph, importers, banned, exact=[PACKAGE])
    for importers in [*sdk, "codemode.config"]:
        problems += violations(
            graph,
            importers,
            ["codemode.executor"],
            allowed_edges=[("codemode.wire.names", "codemode.executor.guest.outcomes")],
        )
    assert not problems, "forbidden imports:\n" + "\n".join(sorted(set(problems)))
