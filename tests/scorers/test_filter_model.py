"""``model`` filter: base model and LoRA adapter."""

from __future__ import annotations

from scorers.base import Filter, NoParams
from scorers.filter.model import ModelFilter
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    f = build(Filter, "model")
    assert isinstance(f, ModelFilter) and f.params == NoParams() and f.name == "model"


def test_unknown_params_rejected():
    assert config_error(Filter, {"type": "model", "model": "m"}) == "model: unknown parameters ['model']; it takes none"


def test_bad_values_rejected():
    assert config_error(Filter, {"type": "model", "params": 1}) == "params of 'model' must be a mapping, got 1"
    assert config_error(Filter, {"type": "model", "name": 7}) == "model: name must be a non-empty string, got 7"


def test_keeps_replicas_serving_the_model_and_adapter():
    fleet = eps(3)
    fleet[1].models = frozenset({"other"})
    fleet[2].loras = frozenset({"sql"})
    assert [e.id for e in ModelFilter().filter(ctx(), fleet)] == ["e0", "e2"]
    assert [e.id for e in ModelFilter().filter(ctx(lora="sql"), fleet)] == ["e2"]
    assert ModelFilter().filter(ctx(lora="nope"), fleet) == []
    assert ModelFilter().filter(ctx(model="unknown"), fleet) == []
