"""Imports point one way (DESIGN.md §9): no cycle among the package's modules, every module imports
alone, and an import inside a function is there for start-up time only.

The cycle check reads every import statement, at module level or inside a function, as Python would
resolve it; the import check runs each module in a fresh interpreter, so that an order-dependent
cycle ("cannot import name ... from partially initialized module") fails here whichever module a
user happens to import first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "tempflow_cli")
LAZY_NOTE = "for start-up time"
LAZY_PACKAGE_IMPORTS = {
    # rewards/__init__ is read when the CLI parses --reward (it must not load torch); its model and
    # remote kinds load transformers and http clients, so they are imported when such a reward is asked for
    "stages.rewards": {"stages.rewards.models", "stages.rewards.remote"},
}
"""Imports of the package's own modules inside a function of ``stages``, each with its reason."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports: at its top level, and inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    at_top, inside = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = resolve(name, path.name == "__init__.py", node, known)
        (at_top if id(node) in top else inside).update(targets)
    return at_top, inside


def resolve(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The package modules an import statement loads (``from a import b`` is ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".") if is_package else name.split(".")[:-1]
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for candidate in candidates:
        while candidate and candidate not in known:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    """Every import edge between the package's modules; a package's ``__init__`` importing its own
    children is not an edge (Python runs the child after the package, whatever the order)."""
    known = modules()
    edges = {}
    for name, path in known.items():
        at_top, inside = imports(name, path, known)
        edges[name] = {t for t in at_top | inside if not (path.name == "__init__.py" and t.startswith(name + "."))}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    """The check below can fail: two modules importing each other, one of them inside a function."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_packages_modules():
    assert cycles(graph()) == []


def test_the_cli_points_one_way_main_to_rec():
    edges = graph()
    assert "tempflow_cli.rec" in edges["tempflow_cli.main"]
    assert not any(t.startswith("tempflow_cli.main") for t in edges["tempflow_cli.rec"])
    stages_edges = {t for name, targets in edges.items() if name.startswith("stages") for t in targets}
    assert not any(t.startswith("tempflow_cli") for t in stages_edges), "stages never imports the CLI"


def test_a_stage_never_imports_another_stage():
    """The stage modules (one command each) share helpers through the modules below them."""
    stage_modules = {f"stages.{name}" for name in ("rollout", "score", "update", "evaluate", "pretrain", "report")}
    edges = graph()
    assert {name: edges[name] & stage_modules for name in stage_modules} == {name: set() for name in stage_modules}


def test_support_modules_import_nothing_of_the_package_above_them():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("stages.support."):
            assert all(t.startswith("stages.support.") for t in targets), (name, targets)


def test_every_import_inside_a_function_is_for_start_up_time():
    """An import inside a function loads a library (or, from the CLI, a stage) when it is used, and
    the module says so once; ``stages`` imports its own modules at the top, but for the listed ones."""
    known = modules()
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        lazy = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]
        if not lazy:
            continue
        assert LAZY_NOTE in path.read_text(encoding="utf-8"), f"{path}: imports inside functions, and does not say why"
        if name.startswith("stages"):
            _, inside = imports(name, path, known)
            assert inside <= LAZY_PACKAGE_IMPORTS.get(name, set()), f"{path} imports {inside} inside a function"


def _import_alone(name: str) -> tuple[str, int, str]:
    done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
    return name, done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [result for result in pool.map(_import_alone, sorted(modules())) if result[1] != 0]
    assert failed == []
