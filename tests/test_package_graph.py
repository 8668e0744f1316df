"""The package graph points inward (gateway → scorers → kvindex) and never back up.

Checked twice: statically (every import statement in every module, lazy ones included) and
at run time (importing every module of a package loads none of the packages above it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level packages of this repository it must never import
FORBIDDEN = {
    "kvindex": {"scorers", "gateway", "simulator", "benchmarks"},
    "scorers": {"gateway", "simulator", "benchmarks"},
    "gateway": {"simulator", "benchmarks"},
    "simulator": {"gateway", "scorers", "benchmarks"},
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_package_above_it(package: str) -> None:
    bad = {
        f"{p.relative_to(ROOT)} imports {', '.join(sorted(hit))}"
        for p in (ROOT / package).rglob("*.py")
        if (hit := imported_top_levels(p) & FORBIDDEN[package])
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_nothing_above(package: str) -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in (ROOT / package).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(FORBIDDEN[package])!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_cli_finds_every_command_without_importing_them() -> None:
    code = (
        "import sys\nfrom gateway.cli import commands\n"
        "print(sorted(commands()))\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'simulator', 'benchmarks'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    names, loaded = out.stdout.splitlines()
    assert names == str(sorted(["bench", "demo", "extproc", "indexer", "serve", "sim"]))
    assert loaded == "[]"
