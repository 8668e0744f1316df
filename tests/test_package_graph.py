"""The package graph points inward (gateway → scorers → kvindex) and never back up.

Checked twice: statically (every import statement in every module, lazy ones included) and
at run time (importing every module of a package loads none of the packages above it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.imports import import_records

ROOT = Path(__file__).resolve().parents[1]

#: package -> top-level packages of this repository it must never import
FORBIDDEN = {
    "kvindex": {"scorers", "gateway", "simulator", "benchmarks"},
    "scorers": {"gateway", "simulator", "benchmarks"},
    "gateway": {"simulator", "benchmarks"},
    "simulator": {"gateway", "scorers", "benchmarks"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_package_above_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    bad = set()
    for path, records in zip(files, import_records([p.read_text() for p in files]), strict=True):
        # absolute imports only: a relative one stays inside the package
        hit = {(r.name if r.module is None else r.module).split(".")[0] for r in records if r.level == 0} & FORBIDDEN[package]
        if hit:
            bad.add(f"{path.relative_to(ROOT)} imports {', '.join(sorted(hit))}")
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
    assert names == str(sorted(["bench", "demo", "extproc", "indexer", "serve", "sidecar", "sim"]))
    assert loaded == "[]"
