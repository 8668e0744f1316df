"""``estimated-ttft`` scorer: queued prefill + own uncached tokens over the rate, plus a decode term."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import Scorer
from scorers.scorer.estimated_ttft import EstimatedTTFTScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    sc = build(Scorer, "estimated-ttft")
    assert isinstance(sc, EstimatedTTFTScorer)
    assert sc.params == EstimatedTTFTScorer.Params(decode_penalty_s=0.002, floor_s=0.005)


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "estimated-ttft", "decode_penalty": 0.01}) == (
        "estimated-ttft: unknown parameters ['decode_penalty']; known: decode_penalty_s, floor_s"
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"decode_penalty_s": -0.001}, "parameter 'decode_penalty_s': expected `float` >= 0.0, got -0.001"),
        ({"floor_s": 0}, "parameter 'floor_s': expected `float` > 0.0, got 0"),
        ({"floor_s": "5ms"}, "parameter 'floor_s': expected `float`, got '5ms'"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "estimated-ttft", "params": params}) == f"estimated-ttft: {message}"


def test_trades_cache_against_queue():
    fleet = eps(2, prefill_tokens_per_s=1000.0)
    warm_busy = ctx(prompt_tokens=1600, prefix={"e0": PrefixMatch(100, "GPU")})
    fleet[0].inflight_prefill_tokens = 200  # 0.2 s of queued prefill on the warm replica
    s = EstimatedTTFTScorer().score(warm_busy, fleet)
    assert s["e0"] > s["e1"]  # 0.2 s queue beats recomputing 1.6 s
    fleet[0].inflight_prefill_tokens = 5000  # 5 s queue: the cold replica wins
    s = EstimatedTTFTScorer().score(warm_busy, fleet)
    assert s["e1"] > s["e0"]


def test_estimate_floor_and_decode_penalty():
    fleet = eps(2, prefill_tokens_per_s=1000.0)
    fleet[1].running, fleet[1].waiting, fleet[1].inflight_requests = 3, 2, 4
    sc = EstimatedTTFTScorer(decode_penalty_s=0.01, floor_s=0.05)
    cached = ctx(prefix={"e0": PrefixMatch(10, "GPU"), "e1": PrefixMatch(10, "GPU")})
    assert sc.estimate(cached, fleet[0]) == 0.05  # nothing to do: the floor
    assert sc.estimate(cached, fleet[1]) == pytest.approx(0.05)  # 5 × 0.01 = the floor too
    assert sc.estimate(ctx(), fleet[1]) == pytest.approx(0.16 + 0.05)  # 160 tokens at 1000/s + max(4, 3 + 2) × 0.01
    assert sc.score(ctx(), fleet) == {"e0": 1.0, "e1": pytest.approx(0.16 / 0.21)}
    assert sc.score(ctx(), []) == {}
