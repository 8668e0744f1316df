"""README's configuration block is the operator's reference: it must parse as a valid config,
and it must name every knob the schema has (a new field without documentation fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import yaml

from gateway.config import GatewayConfig, parse_config

README = Path(__file__).resolve().parents[2] / "README.md"


def config_block() -> str:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "README's Configuration section has a ```yaml block"
    return match.group(1)


def test_readme_config_block_is_a_valid_config():
    parse_config(yaml.safe_load(config_block()))


def _fields(struct: type, prefix: str = "") -> list[str]:
    out = []
    for f in msgspec.structs.fields(struct):
        path = f"{prefix}{f.name}"
        out.append(path)
        inner = f.type
        args = getattr(inner, "__args__", ())
        for t in (inner, *args):
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                out += _fields(t, path + ".")
    return out


def test_every_config_field_is_documented():
    block = config_block()
    # a field is documented when its key appears in the block, set or shown in a comment
    keys = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*):", block))
    missing = [p for p in _fields(GatewayConfig) if p.rsplit(".", 1)[-1] not in keys]
    assert not missing, f"README's configuration block does not mention: {missing}"
