"""``inflight`` scorer: the gateway's own in-flight requests and tokens, smoothed."""

from __future__ import annotations

import pytest

from scorers.base import Scorer
from scorers.scorer.inflight import InflightScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    sc = build(Scorer, {"type": "inflight", "weight": 2})
    assert isinstance(sc, InflightScorer)
    assert sc.params == InflightScorer.Params(token_weight=0.5, requests_scale=4.0, tokens_scale=4096.0)


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "inflight", "params": {"bogus": 1}}) == (
        "inflight: unknown parameters ['bogus']; known: token_weight, requests_scale, tokens_scale"
    )


@pytest.mark.parametrize(
    "params,message",
    [
        ({"token_weight": 1.5}, "parameter 'token_weight': expected `float` <= 1.0, got 1.5"),
        ({"token_weight": -0.5}, "parameter 'token_weight': expected `float` >= 0.0, got -0.5"),
        ({"requests_scale": 0}, "parameter 'requests_scale': expected `float` > 0.0, got 0"),
        ({"tokens_scale": -4096}, "parameter 'tokens_scale': expected `float` > 0.0, got -4096"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "inflight", "params": params}) == f"inflight: {message}"


def test_load_scores_relative_to_candidates():
    fleet = eps(3)
    fleet[0].inflight_requests, fleet[1].inflight_requests, fleet[2].inflight_requests = 0, 5, 10
    s = InflightScorer(token_weight=0, requests_scale=5).score(ctx(), fleet)
    assert s == {"e0": 1.0, "e1": 0.5, "e2": pytest.approx(1 / 3)}  # (5 + 0) / (5 + load)
    assert InflightScorer().score(ctx(), eps(2)) == {"e0": 1.0, "e1": 1.0}  # idle fleet: no preference
    # one request more than an idle replica is a small difference, not 1 → 0
    fleet[1].inflight_requests = 1
    assert InflightScorer(token_weight=0).score(ctx(), fleet[:2])["e1"] == pytest.approx(0.8)


def test_token_weight_mixes_tokens_in():
    fleet = eps(2)
    fleet[0].inflight_requests, fleet[0].inflight_decode_tokens = 0, 4096
    fleet[1].inflight_requests, fleet[1].inflight_decode_tokens = 4, 0
    assert InflightScorer(token_weight=1).score(ctx(), fleet) == {"e0": 0.5, "e1": 1.0}  # 4096 / (4096 + 4096)
    assert InflightScorer(token_weight=0).score(ctx(), fleet) == {"e0": 1.0, "e1": 0.5}  # 4 / (4 + 4)
    assert InflightScorer().score(ctx(), fleet) == {"e0": 0.75, "e1": 0.75}
    assert InflightScorer().score(ctx(), []) == {}
