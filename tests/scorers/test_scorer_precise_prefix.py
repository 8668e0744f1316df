"""``precise-prefix`` scorer: the index's cached fraction, GPU over CPU, speculative entries for event lag."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import Scorer
from scorers.scorer.precise_prefix import PrecisePrefixScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    sc = build(Scorer, {"type": "precise-prefix", "weight": 3})
    assert isinstance(sc, PrecisePrefixScorer) and sc.name == "precise-prefix"
    assert sc.params == PrecisePrefixScorer.Params(gpu_weight=1.0, cpu_weight=0.5, speculative_ttl_s=2.0, speculative_max_keys=200_000)
    assert sc.speculative is not None and (sc.speculative.ttl_s, sc.speculative.max_keys) == (2.0, 200_000)
    assert build(Scorer, {"type": "precise-prefix", "params": {"cpu_weight": 0.3}}).params.cpu_weight == 0.3
    assert build(Scorer, {"type": "precise-prefix", "cpu_weight": 0.3}).params.cpu_weight == 0.3  # beside type


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "precise-prefix", "params": {"cpu_weigth": 0.3}}) == (
        "precise-prefix: unknown parameters ['cpu_weigth']; known: gpu_weight, cpu_weight, speculative_ttl_s, speculative_max_keys"
    )
    with pytest.raises(ValueError, match=r"unknown parameters \['tier'\]"):
        PrecisePrefixScorer(tier="GPU")


@pytest.mark.parametrize(
    "params,message",
    [
        ({"gpu_weight": -1}, "parameter 'gpu_weight': expected `float` >= 0.0, got -1"),
        ({"cpu_weight": "half"}, "parameter 'cpu_weight': expected `float`, got 'half'"),
        ({"cpu_weight": True}, "parameter 'cpu_weight': expected `float`, got True"),
        ({"speculative_ttl_s": -2}, "parameter 'speculative_ttl_s': expected `float` >= 0.0, got -2"),
        ({"speculative_max_keys": 0}, "parameter 'speculative_max_keys': expected `int` >= 1, got 0"),
        ({"speculative_max_keys": 2e5}, "parameter 'speculative_max_keys': expected `int`, got 200000.0"),
        ({"gpu_weight": float("inf")}, "parameter 'gpu_weight': expected a finite number, got inf"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "precise-prefix", "params": params}) == f"precise-prefix: {message}"


def test_prefers_longest_gpu_match():
    fleet = eps(3)
    c = ctx(prefix={"e0": PrefixMatch(4, "GPU"), "e1": PrefixMatch(8, "CPU"), "e2": PrefixMatch(6, "GPU")})
    s = PrecisePrefixScorer(speculative_ttl_s=0).score(c, fleet)
    assert s == {"e0": 0.4, "e1": 0.4, "e2": 0.6}
    assert PrecisePrefixScorer().score(ctx(index_ok=False, prefix=c.prefix), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}
    assert PrecisePrefixScorer().score(ctx(block_keys=[]), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}


def test_tier_weights_scale_against_the_larger():
    fleet = eps(2)
    c = ctx(prefix={"e0": PrefixMatch(10, "GPU"), "e1": PrefixMatch(10, "CPU")})
    assert PrecisePrefixScorer(cpu_weight=0.25, speculative_ttl_s=0).score(c, fleet) == {"e0": 1.0, "e1": 0.25}
    # CPU worth more than GPU: the CPU match is the full score, GPU blocks count half
    assert PrecisePrefixScorer(gpu_weight=1, cpu_weight=2, speculative_ttl_s=0).score(c, fleet) == {"e0": 0.5, "e1": 1.0}


def test_speculative_entries_cover_event_lag_then_expire():
    now = [100.0]
    sc = PrecisePrefixScorer(speculative_ttl_s=2.0)
    sc.set_clock(lambda: now[0])
    fleet = eps(3)
    c = ctx()
    sc.on_dispatch(c, fleet[1])
    assert sc.score(ctx(), fleet)["e1"] == 1.0  # the index knows nothing yet, the memory does
    assert sc.score(ctx(block_keys=[*range(5), 99, 98]), fleet)["e1"] == pytest.approx(5 / 7)
    now[0] += 2.5
    assert sc.score(ctx(), fleet)["e1"] == 0.0
    sc.on_dispatch(c, fleet[2])
    sc.on_complete(c, fleet[2], ok=False)  # a failed dispatch is forgotten
    assert sc.score(ctx(), fleet)["e2"] == 0.0
    sc.on_dispatch(c, fleet[0])
    sc.on_cache_lost("e0")  # its cache cleared or restarted before the events came: forgotten too
    assert sc.score(ctx(), fleet)["e0"] == 0.0


def test_speculative_off_and_decode_hops_not_remembered():
    fleet = eps(2)
    off = PrecisePrefixScorer(speculative_ttl_s=0)
    assert off.speculative is None
    off.on_dispatch(ctx(), fleet[0])
    off.set_clock(lambda: 0.0)  # nothing to set: no error
    assert off.score(ctx(), fleet) == {"e0": 0.0, "e1": 0.0}
    on = PrecisePrefixScorer()
    on.on_dispatch(ctx(phase="decode"), fleet[0])  # the decode replica receives the KV, it does not compute it
    assert on.score(ctx(), fleet) == {"e0": 0.0, "e1": 0.0}
    on.on_dispatch(ctx(phase="prefill"), fleet[1])
    on.on_complete(ctx(), fleet[1], ok=True)  # success keeps the entries
    assert on.score(ctx(), fleet) == {"e0": 0.0, "e1": 1.0}
