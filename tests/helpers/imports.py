"""Every import statement of some Python sources, read with ``ast`` in a fresh interpreter.

CPython 3.11.7's ``ast.parse`` can fail with "AST constructor recursion depth mismatch" when
called deep inside a long-running process (seen in the suite, not reproducible alone), so the
parsing happens in a subprocess that does nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

_SCRIPT = r"""
import ast, json, sys
out = []
for source in json.load(sys.stdin):
    records = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            records += [[None, 0, a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            records += [[node.module, node.level, a.name] for a in node.names]
    out.append(records)
json.dump(out, sys.stdout)
"""


@dataclass(frozen=True, slots=True)
class ImportRecord:
    """``import name`` (module None, level 0) or ``from [.*level]module import name``."""

    module: str | None
    level: int
    name: str


def import_records(sources: list[str]) -> list[list[ImportRecord]]:
    """For each source, its import statements anywhere (top level, functions, TYPE_CHECKING)."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(sources), capture_output=True, text=True, timeout=120, check=True)
    return [[ImportRecord(*r) for r in records] for records in json.loads(done.stdout)]
