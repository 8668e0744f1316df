"""``random`` picker: scores ignored, a uniformly random order."""

from __future__ import annotations

import collections

import pytest

from scorers.base import Picker
from scorers.picker.random import RandomPicker
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    p = build(Picker, "random")
    assert isinstance(p, RandomPicker) and p.params == RandomPicker.Params(seed=None)


def test_unknown_params_rejected():
    assert config_error(Picker, {"type": "random", "params": {"sed": 1}}) == "random: unknown parameters ['sed']; known: seed"


def test_bad_values_rejected():
    assert config_error(Picker, {"type": "random", "seed": [1]}) == "random: parameter 'seed': expected `int | null`, got [1]"
    with pytest.raises(ValueError, match="random: parameter 'seed'"):
        RandomPicker(seed="1")


def test_uniform_order_ignoring_scores_and_seeded():
    fleet = eps(3)
    scored = [(fleet[0], 1.0), (fleet[1], 0.0), (fleet[2], 0.0)]
    rp = RandomPicker(seed=11)
    firsts = collections.Counter(rp.pick(ctx(), scored)[0].id for _ in range(600))
    assert set(firsts) == {"e0", "e1", "e2"} and max(firsts.values()) < 260  # ~200 each
    assert sorted(e.id for e in rp.pick(ctx(), scored)) == ["e0", "e1", "e2"]
    a, b = RandomPicker(seed=4), RandomPicker(seed=4)
    assert [[e.id for e in a.pick(ctx(), scored)] for _ in range(10)] == [[e.id for e in b.pick(ctx(), scored)] for _ in range(10)]
    assert rp.pick(ctx(), []) == []
