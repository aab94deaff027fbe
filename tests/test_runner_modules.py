"""The runner's modules: every import points one way (no module imports one that imports it back)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside a function), for every ``.py`` under
    ``package``. Importing ``a.b.c`` imports the packages ``a.b`` and ``a`` too, so those count as well."""
    root = package.name
    modules = {}
    for path in package.rglob("*.py"):
        parts = [root, *path.relative_to(package).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]  # the package relative imports start in
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                base = base + (node.module.split(".") if node.module else [])
                if node.level == 0 and base[:1] != [root]:
                    continue  # outside the package
                for alias in node.names:  # a submodule (from . import client) or a name in base
                    sub = ".".join(base + [alias.name])
                    targets.add(sub if sub in modules else ".".join(base))
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == root}
        closed = set()
        for t in targets:  # the packages above an imported module run first
            parts = t.split(".")
            closed |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = {t for t in closed if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each module that reaches itself through the graph, with the path back to it."""
    cycles = []
    for start in sorted(graph):
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop()
            for nxt in sorted(graph.get(path[-1], ())):
                if nxt == start:
                    cycles.append(path + [start])
                    paths = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append(path + [nxt])
    return cycles


def test_no_runner_module_imports_one_that_imports_it_back():
    graph = import_graph(REPO / "runner")
    assert {"runner.cli", "runner.startup", "runner.sweep.command", "runner.sweep.pool"} <= set(graph)
    assert {"runner.client", "runner.startup", "runner.sweep.cells"} <= graph["runner.sweep.pool"]
    assert import_cycles(graph) == []


def test_the_plain_run_and_the_sweep_meet_only_in_shared_modules():
    graph = import_graph(REPO / "runner")
    assert not any(m.startswith("runner.sweep") for m in graph["runner.cli"])
    assert "runner.cli" not in set().union(*(graph[m] for m in graph if m.startswith("runner.sweep")))
    assert {"runner.cli", "runner.sweep.command"} <= graph["runner.__main__"]  # the dispatch


def test_the_check_sees_an_import_circle_closed_inside_a_function(tmp_path):
    # the old shape: the plain run hands off to the sweep lazily, the sweep imports back from it
    package = tmp_path / "runner"
    (package / "sweep").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("def main():\n    from .sweep import command\n    return command\n")
    (package / "sweep" / "__init__.py").write_text("")
    (package / "sweep" / "command.py").write_text("from ..cli import main\n")
    (package / "sweep" / "axes.py").write_text("from . import command\nimport os\n")
    graph = import_graph(package)
    assert graph["runner.sweep.axes"] == {"runner", "runner.sweep", "runner.sweep.command"}
    assert import_cycles(graph) == [["runner.cli", "runner.sweep.command", "runner.cli"],
                                    ["runner.sweep.command", "runner.cli", "runner.sweep.command"]]
