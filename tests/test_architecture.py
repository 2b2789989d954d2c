"""The floor plan holds: imports point one way (face -> evaluation, serving -> retrieval,
training -> cluster), no package imports one above it, and there is no import cycle."""

from __future__ import annotations

import ast
import importlib.metadata
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

# What each package may import, besides itself.
ALLOWED = {
    "cluster": set(),
    "retrieval": {"cluster"},
    "training": {"cluster"},
    "serving": {"cluster", "retrieval", "training"},
    "evaluation": {"cluster", "retrieval"},
    "tunefetch": {"cluster", "retrieval", "training", "serving", "evaluation"},
}


def imports_of(path: Path) -> set[str]:
    """Modules a file imports (absolute, dotted), wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            graph[name] |= {m for m in imports_of(path) if m.split(".")[0] in ALLOWED}
    return graph


def test_packages_import_only_the_layers_below_them():
    arrows_up = [f"{module} imports {target}" for module, targets in module_graph().items() for target in targets
                 if target.split(".")[0] != module.split(".")[0]
                 and target.split(".")[0] not in ALLOWED[module.split(".")[0]]]
    assert not arrows_up, "\n".join(sorted(arrows_up))


def test_no_import_cycle_between_modules():
    graph = module_graph()
    modules = set(graph) | {t for targets in graph.values() for t in targets}

    def resolve(target: str) -> str:  # `from pkg.mod import name` names pkg.mod; a package its __init__
        return target if target in modules else target.rsplit(".", 1)[0]

    edges = {m: {resolve(t) for t in graph.get(m, ())} - {m} for m in modules}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in visiting:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(modules):
        visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_no_other_installed_distribution_ships_our_top_level_packages():
    """Our layer packages have generic names; in a shared environment another distribution with
    the same top-level name would shadow one. Our own environment must have none."""
    owners = importlib.metadata.packages_distributions()
    clashes = {name: dists for name in ALLOWED if (dists := set(owners.get(name, [])) - {"tunefetch"})}
    assert not clashes, clashes
