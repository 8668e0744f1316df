"""kvindex's modules import each other without a cycle, lazy imports included.

The graph is read statically with ``ast``: every ``import`` / ``from ... import`` anywhere in a
module (top level, inside functions, under ``if TYPE_CHECKING``) that names a kvindex module is an
edge. An import moved into a function to dodge a cycle therefore still counts as one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tests.helpers.imports import ImportRecord, import_records

PACKAGE = "kvindex"
ROOT = Path(__file__).resolve().parents[2]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (``__init__`` as the package)."""
    out = {}
    for p in sorted((root / package).rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def _resolve(target: str, known: set[str]) -> str | None:
    """The known module a dotted import target names (``a.b.attr`` -> ``a.b``), if any."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(module: str, source: str, known: set[str], *, is_package: bool = False) -> set[str]:
    """The modules of ``known`` that ``module``'s source imports anywhere (lazy imports included)."""
    return resolve_imports(module, import_records([source])[0], known, is_package=is_package)


def resolve_imports(module: str, records: list[ImportRecord], known: set[str], *, is_package: bool = False) -> set[str]:
    here = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for r in records:
        if r.module is None and r.level == 0:  # import a.b.c
            target = r.name
        else:
            if r.level:
                base = here
                for _ in range(r.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{r.module}" if r.module else base
            else:
                mod = r.module or ""
            # ``from pkg import name``: name may be a submodule or an attribute of pkg
            target = f"{mod}.{r.name}"
        hit = _resolve(target, known)
        if hit is not None and hit != module:
            out.add(hit)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = module_names(root, package)
    known = set(files)
    records = import_records([p.read_text() for p in files.values()])
    return {m: resolve_imports(m, recs, known, is_package=p.name == "__init__.py") for (m, p), recs in zip(files.items(), records, strict=True)}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (cycle := visit(n)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def test_kvindex_import_graph_is_acyclic() -> None:
    graph = import_graph(ROOT, PACKAGE)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_interface_is_below_both_backends_and_the_factory_above() -> None:
    graph = import_graph(ROOT, PACKAGE)
    assert {"kvindex.memory_index", "kvindex.redis_index"} <= graph["kvindex.backends"]
    for backend in ("kvindex.memory_index", "kvindex.redis_index"):
        assert {"kvindex.index", "kvindex.event_rules"} <= graph[backend]
    assert "kvindex.memory_index" not in graph["kvindex.redis_index"]
    assert "kvindex.redis_index" not in graph["kvindex.memory_index"]
    assert graph["kvindex.index"] <= {"kvindex.events"}


def test_the_checker_sees_lazy_relative_and_package_imports() -> None:
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d"}
    assert imports_of("pkg.a", "def f():\n    from .b import x\n", known) == {"pkg.b"}
    assert imports_of("pkg.a", "from . import c\nimport pkg.sub.d\n", known) == {"pkg.c", "pkg.sub.d"}
    assert imports_of("pkg.sub.d", "from ..b import x\nfrom . import y\n", known) == {"pkg.b", "pkg.sub"}
    assert imports_of("pkg.sub", "from .d import x\n", known, is_package=True) == {"pkg.sub.d"}
    assert imports_of("pkg.a", "from pkg.b import x\nimport json\n", known) == {"pkg.b"}
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}) is None
    assert find_cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
