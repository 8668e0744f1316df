"""``prefix-affinity`` filter: stick to warm replicas unless they are overloaded."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import Filter
from scorers.filter.prefix_affinity import PrefixAffinityFilter
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    f = build(Filter, "prefix-affinity")
    assert isinstance(f, PrefixAffinityFilter)
    assert f.params == PrefixAffinityFilter.Params(threshold=0.8, margin_s=0.5)
    assert build(Filter, {"type": "prefix-affinity", "threshold": 1}).params.threshold == 1.0


def test_unknown_params_rejected():
    assert config_error(Filter, {"type": "prefix-affinity", "params": {"treshold": 0.5}}) == (
        "prefix-affinity: unknown parameters ['treshold']; known: threshold, margin_s"
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"threshold": 0}, "parameter 'threshold': expected `float` > 0.0, got 0"),
        ({"threshold": 1.5}, "parameter 'threshold': expected `float` <= 1.0, got 1.5"),
        ({"threshold": "high"}, "parameter 'threshold': expected `float`, got 'high'"),
        ({"margin_s": -0.1}, "parameter 'margin_s': expected `float` >= 0.0, got -0.1"),
        ({"margin_s": float("nan")}, "parameter 'margin_s': expected `float` >= 0.0, got nan"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Filter, {"type": "prefix-affinity", "params": params}) == f"prefix-affinity: {message}"
    with pytest.raises(ValueError, match=message.split(":")[0]):
        PrefixAffinityFilter(**params)


def test_releases_when_warm_is_overloaded():
    fleet = eps(2, prefill_tokens_per_s=1000.0)
    c = ctx(prompt_tokens=160, prefix={"e0": PrefixMatch(10, "GPU")})
    f = PrefixAffinityFilter(threshold=0.8, margin_s=0.5)
    assert [e.id for e in f.filter(c, fleet)] == ["e0"]
    fleet[0].inflight_prefill_tokens = 2000
    assert len(f.filter(c, fleet)) == 2


def test_threshold_and_margin_are_honoured():
    fleet = eps(3, prefill_tokens_per_s=1000.0)
    c = ctx(prompt_tokens=160, prefix={"e0": PrefixMatch(10, "GPU"), "e1": PrefixMatch(6, "GPU")})
    assert [e.id for e in PrefixAffinityFilter(threshold=0.8).filter(c, fleet)] == ["e0"]
    assert [e.id for e in PrefixAffinityFilter(threshold=0.5).filter(c, fleet)] == ["e0", "e1"]
    # warm e0 has 0.4 s queued; the best cold replica, e1 (6 of 10 blocks cached), needs 0.064 s
    fleet[0].inflight_prefill_tokens = 400
    assert [e.id for e in PrefixAffinityFilter(threshold=0.8, margin_s=0.35).filter(c, fleet)] == ["e0"]
    assert len(PrefixAffinityFilter(threshold=0.8, margin_s=0.3).filter(c, fleet)) == 3


def test_no_prefix_or_all_warm_keeps_everyone():
    fleet = eps(2)
    f = PrefixAffinityFilter()
    assert f.filter(ctx(), fleet) == fleet  # the index knows nothing
    assert f.filter(ctx(prompt_tokens=0, prefix={"e0": PrefixMatch(10, "GPU")}), fleet) == fleet
    assert f.filter(ctx(prefix={"e0": PrefixMatch(10, "GPU"), "e1": PrefixMatch(10, "CPU")}), fleet) == fleet
