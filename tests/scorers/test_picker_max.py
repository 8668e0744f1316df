"""``max`` picker: highest score first, ties shuffled."""

from __future__ import annotations

import collections

import pytest

from scorers.base import Picker
from scorers.picker.max import MaxPicker
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    p = build(Picker, {"type": "max"})
    assert isinstance(p, MaxPicker) and p.params == MaxPicker.Params(seed=None) and p.name == "max"
    assert build(Picker, {"type": "max", "seed": 7}).params.seed == 7


def test_unknown_params_rejected():
    assert config_error(Picker, {"type": "max", "params": {"temperature": 0.1}}) == "max: unknown parameters ['temperature']; known: seed"


@pytest.mark.parametrize(
    "params,message",
    [({"seed": "one"}, "parameter 'seed': expected `int | null`, got 'one'"), ({"seed": 1.5}, "parameter 'seed': expected `int | null`, got 1.5")],
)
def test_bad_values_rejected(params, message):
    assert config_error(Picker, {"type": "max", "params": params}) == f"max: {message}"
    assert config_error(Picker, {"type": "max", "weight": 1}) == "only scorers take a 'weight'"


def test_highest_first_ties_spread():
    fleet = eps(4)
    scored = [(e, 0.5) for e in fleet]
    mp = MaxPicker(seed=1)
    firsts = collections.Counter(mp.pick(ctx(), scored)[0].id for _ in range(400))
    assert set(firsts) == {"e0", "e1", "e2", "e3"}  # ties spread
    assert MaxPicker().pick(ctx(), [(fleet[0], 0.1), (fleet[1], 0.9)])[0].id == "e1"
    assert MaxPicker().pick(ctx(), []) == []


def test_full_order_by_score_and_seed_reproducible():
    fleet = eps(4)
    scored = [(fleet[0], 0.2), (fleet[1], 0.9), (fleet[2], 0.2 + 1e-12), (fleet[3], 0.5)]
    order = [e.id for e in MaxPicker(seed=5).pick(ctx(), scored)]
    assert order[:2] == ["e1", "e3"] and set(order[2:]) == {"e0", "e2"}  # equal to 9 digits: a tie
    runs = [[[e.id for e in p.pick(ctx(), [(e, 0.5) for e in fleet])] for _ in range(20)] for p in (MaxPicker(seed=3), MaxPicker(seed=3))]
    assert runs[0] == runs[1]
