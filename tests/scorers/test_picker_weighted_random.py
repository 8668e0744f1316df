"""``weighted-random`` picker: first pick ∝ exp(score / temperature), the rest by score."""

from __future__ import annotations

import collections

import pytest

from scorers.base import Picker
from scorers.picker.weighted_random import WeightedRandomPicker
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    p = build(Picker, "weighted-random")
    assert isinstance(p, WeightedRandomPicker)
    assert p.params == WeightedRandomPicker.Params(temperature=0.1, seed=None)
    assert build(Picker, {"type": "weighted-random", "params": {"temperature": 0.05, "seed": 3}}).params == WeightedRandomPicker.Params(
        temperature=0.05, seed=3
    )


def test_unknown_params_rejected():
    assert config_error(Picker, {"type": "weighted-random", "temp": 1}) == "weighted-random: unknown parameters ['temp']; known: seed, temperature"


@pytest.mark.parametrize(
    "params,message",
    [
        ({"temperature": 0}, "parameter 'temperature': expected `float` > 0.0, got 0"),
        ({"temperature": -1}, "parameter 'temperature': expected `float` > 0.0, got -1"),
        ({"seed": "x"}, "parameter 'seed': expected `int | null`, got 'x'"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Picker, {"type": "weighted-random", "params": params}) == f"weighted-random: {message}"
    with pytest.raises(ValueError, match="weighted-random: parameter"):
        WeightedRandomPicker(**params)


def test_first_pick_follows_scores_fallbacks_by_score():
    fleet = eps(4)
    scored = [(e, 0.5) for e in fleet]
    wr = WeightedRandomPicker(temperature=0.05, seed=3)
    picks = collections.Counter(wr.pick(ctx(), [(fleet[0], 1.0), (fleet[1], 0.9), (fleet[2], 0.0)])[0].id for _ in range(500))
    assert picks["e0"] > picks["e1"] > picks["e2"]
    assert len(wr.pick(ctx(), scored)) == 4  # fallbacks follow the first pick
    ranked = wr.pick(ctx(), [(fleet[0], 0.1), (fleet[1], 0.3), (fleet[2], 0.2), (fleet[3], 0.0)])
    rest = [e.id for e in ranked[1:]]
    assert rest == sorted(rest, key=lambda i: -{"e0": 0.1, "e1": 0.3, "e2": 0.2, "e3": 0.0}[i])
    assert wr.pick(ctx(), []) == []


def test_temperature_controls_the_spread():
    fleet = eps(2)
    scored = [(fleet[0], 1.0), (fleet[1], 0.8)]
    cold_picker, hot_picker = WeightedRandomPicker(temperature=0.01, seed=1), WeightedRandomPicker(temperature=10, seed=1)
    cold = collections.Counter(cold_picker.pick(ctx(), scored)[0].id for _ in range(300))
    hot = collections.Counter(hot_picker.pick(ctx(), scored)[0].id for _ in range(300))
    assert cold["e1"] == 0  # exp(-20): never
    assert 100 < hot["e1"] < 200  # almost uniform
