"""The package's layout: sub-packages by role, and no import cycle.

Every import counts, also one inside a function (it runs on use, but it still means the
two modules know each other); only `if TYPE_CHECKING:` blocks are left out. A cycle is
what ties modules that should not know each other into one unit.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("retrieval", "classify")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def _imports(body: list[ast.stmt]):
    """Every import statement in `body`, at any depth, except under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _imports([n for n in inner if isinstance(n, (ast.stmt, ast.excepthandler))])


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(name, is_package, node.level, node.module) if node.level else node.module
                # `from pkg import mod` imports the module pkg.mod when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_sub_packages_by_role():
    graph = import_graph()
    for role in ("extraction", "engine", "serving", "evaluation", "cli"):
        assert f"retrieval.{role}" in graph, f"retrieval/{role}/ is missing"
    flat = sorted(m for m in graph if m.count(".") == 1 and m.startswith("retrieval."))
    # Only what every role shares stays at the top: configuration values, file writing,
    # SQLite connections per thread, Ray, the BLAS thread limit (extraction and engine).
    assert set(flat) <= {"retrieval.config", "retrieval.fileio", "retrieval.connections", "retrieval.cluster",
                         "retrieval.blas", *(
        f"retrieval.{r}" for r in ("extraction", "engine", "serving", "evaluation", "cli"))}, flat


def test_config_depends_on_nothing_of_the_package():
    assert import_graph()["retrieval.config"] == set()


def test_extraction_does_not_import_the_engine_or_serving():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("retrieval.extraction"):
            bad = {d for d in deps if d.startswith(("retrieval.engine", "retrieval.serving", "retrieval.cli"))}
            assert not bad, f"{module} reaches up into {sorted(bad)}"
