"""README's routing section documents every plugin with its parameters, and its example config builds."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
import yaml

from scorers.base import Filter, Picker, Scorer
from scorers.registry import REGISTRY
from scorers.scheduler import Scheduler

README = Path(__file__).resolve().parents[2] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## Routing (scheduling profiles)")
    return text[start : text.index("\n## ", start + 1)]


def plugin_rows() -> dict[str, str]:
    rows = {}
    for line in section().splitlines():
        m = re.match(r"\| `([a-z-]+)` \| (filter|scorer|picker) \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def test_example_builds():
    block = re.search(r"```yaml\n(scheduling:.*?)```", section(), re.S)
    assert block
    s = Scheduler.from_config(yaml.safe_load(block.group(1))["scheduling"])
    assert [sc.name for sc, _ in s.profiles["mine"].scorers] == ["precise-prefix", "prefix-cpu-light", "inflight"]


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
def test_every_plugin_row_lists_its_params_and_defaults(type_name):
    row = plugin_rows().get(type_name)
    assert row, f"README has no row for {type_name!r}"
    cls = REGISTRY[type_name]
    kind = next(k for k in (Filter, Scorer, Picker) if issubclass(cls, k)).__name__.lower()
    assert row.startswith(f"| `{type_name}` | {kind} |"), row
    params_cell = row.rstrip(" |").rsplit("|", 1)[-1]
    fields = msgspec.structs.fields(cls.Params)
    if not fields:
        assert params_cell.strip() == "none"
    for f in fields:
        default = "null" if f.default is None else f"{f.default:g}"
        assert re.search(rf"`{f.name}` [^;]*, {re.escape(default)}(;|\s*$)", params_cell.strip()), (f.name, default, params_cell)
