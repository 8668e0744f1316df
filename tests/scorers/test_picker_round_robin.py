"""``round-robin`` picker: scores ignored, the next candidate in id order."""

from __future__ import annotations

from scorers.base import NoParams, Picker
from scorers.picker.round_robin import RoundRobinPicker
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    p = build(Picker, "round-robin")
    assert isinstance(p, RoundRobinPicker) and p.params == NoParams() and p.name == "round-robin"


def test_unknown_params_rejected():
    assert config_error(Picker, {"type": "round-robin", "seed": 1}) == "round-robin: unknown parameters ['seed']; it takes none"


def test_bad_values_rejected():
    assert config_error(Picker, {"type": "round-robin", "params": [1]}) == "params of 'round-robin' must be a mapping, got [1]"


def test_cycles_in_id_order_ignoring_scores():
    fleet = eps(4)
    scored = [(e, 0.5) for e in fleet]
    rr = RoundRobinPicker()
    assert [rr.pick(ctx(), scored)[0].id for _ in range(5)] == ["e0", "e1", "e2", "e3", "e0"]
    rr = RoundRobinPicker()
    shuffled = [(fleet[2], 0.0), (fleet[0], 1.0), (fleet[1], 0.3)]
    assert [e.id for e in rr.pick(ctx(), shuffled)] == ["e0", "e1", "e2"]
    assert [e.id for e in rr.pick(ctx(), shuffled)] == ["e1", "e2", "e0"]  # the rest follow as fallbacks
    assert rr.pick(ctx(), []) == []
