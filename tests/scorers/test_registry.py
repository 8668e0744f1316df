"""The type registry, the one-module-per-plugin layout and the compatibility re-exports."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import msgspec
import pytest

import scorers
import scorers.plugins
from scorers.base import Filter, Picker, Plugin, PluginParams, Scorer
from scorers.registry import BUILTINS, REGISTRY, register

PACKAGE = Path(scorers.__file__).parent
KINDS = {"filter": Filter, "scorer": Scorer, "picker": Picker}


def test_every_builtin_is_registered_under_its_type():
    assert REGISTRY == {cls.type_name: cls for cls in BUILTINS}
    assert sorted(k for k, v in REGISTRY.items() if issubclass(v, Filter)) == ["healthy", "model", "prefix-affinity", "role"]
    assert sorted(k for k, v in REGISTRY.items() if issubclass(v, Scorer)) == [
        "approx-prefix", "approx-tree", "estimated-ttft", "inflight", "kv-usage", "least-loaded", "placement", "precise-prefix", "queue", "session", "token-load",
    ]  # fmt: skip
    assert sorted(k for k, v in REGISTRY.items() if issubclass(v, Picker)) == ["max", "random", "round-robin", "weighted-random"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_module_per_plugin_each_listed(kind):
    for path in sorted((PACKAGE / kind).glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"scorers.{kind}.{path.stem}")
        defined = [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Plugin) and c.__module__ == module.__name__]
        assert len(defined) == 1, (path, defined)
        cls = defined[0]
        assert issubclass(cls, KINDS[kind]) and cls in BUILTINS
        assert path.stem == cls.type_name.replace("-", "_"), (path, cls.type_name)


@pytest.mark.parametrize("type_name", sorted(REGISTRY))
def test_params_are_frozen_strict_structs_with_defaults(type_name):
    cls = REGISTRY[type_name]
    assert issubclass(cls.Params, PluginParams)
    config = cls.Params.__struct_config__
    assert config.frozen and config.forbid_unknown_fields
    plugin = cls()  # every parameter has a default
    assert plugin.name == type_name and plugin.params == cls.Params()
    with pytest.raises(AttributeError):
        plugin.params.anything = 1  # type: ignore[attr-defined]
    with pytest.raises(msgspec.ValidationError, match="unknown field `bogus`"):
        msgspec.convert({"bogus": 1}, cls.Params)
    with pytest.raises(ValueError, match=rf"^{type_name}: unknown parameters \['bogus'\]"):
        cls(bogus=1)
    assert cls(name="other").name == "other"


def test_register_rejects_clashes_and_non_plugins():
    class Clash(Scorer):
        type_name = "inflight"

        def score(self, ctx, endpoints):
            return {}

    class Nameless(Scorer):
        def score(self, ctx, endpoints):
            return {}

    with pytest.raises(ValueError, match="type 'inflight' is already InflightScorer"):
        register(Clash)
    with pytest.raises(ValueError, match="type_name is empty"):
        register(Nameless)

    class Bare(Plugin):
        type_name = "bare"

    with pytest.raises(ValueError, match="not a Filter, Scorer or Picker"):
        register(Bare)
    assert register(REGISTRY["inflight"]) is REGISTRY["inflight"]  # idempotent for the same class
    assert "bare" not in REGISTRY and REGISTRY["inflight"].__name__ == "InflightScorer"


def test_plugins_module_reexports_everything():
    assert scorers.plugins.REGISTRY is REGISTRY
    for cls in BUILTINS:
        assert getattr(scorers.plugins, cls.__name__) is cls
    assert set(scorers.plugins.__all__) == {c.__name__ for c in BUILTINS} | {"BUILTINS", "REGISTRY", "register"}
