"""``approx-prefix`` scorer: what this gateway routed where, for replicas without KV events."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import Scorer
from scorers.scorer.approx_prefix import ApproxPrefixScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_param_defaults():
    sc = build(Scorer, "approx-prefix")
    assert isinstance(sc, ApproxPrefixScorer)
    assert sc.params == ApproxPrefixScorer.Params(ttl_s=300.0, max_keys=500_000)
    assert (sc.memory.ttl_s, sc.memory.max_keys) == (300.0, 500_000)


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "approx-prefix", "ttl": 10}) == "approx-prefix: unknown parameters ['ttl']; known: ttl_s, max_keys"


@pytest.mark.parametrize(
    "params,message",
    [
        ({"ttl_s": 0}, "parameter 'ttl_s': expected `float` > 0.0, got 0"),
        ({"ttl_s": None}, "parameter 'ttl_s': expected `float`, got None"),
        ({"max_keys": 0}, "parameter 'max_keys': expected `int` >= 1, got 0"),
        ({"max_keys": "many"}, "parameter 'max_keys': expected `int`, got 'many'"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "approx-prefix", "params": params}) == f"approx-prefix: {message}"


def test_scores_what_was_routed_until_it_expires_or_fails():
    now = [0.0]
    sc = ApproxPrefixScorer(ttl_s=10)
    sc.memory.clock = lambda: now[0]
    fleet = eps(3)
    assert sc.score(ctx(), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}
    sc.on_dispatch(ctx(block_keys=list(range(4))), fleet[0])
    sc.on_dispatch(ctx(), fleet[1])
    # the index is not consulted: only what this gateway sent
    assert sc.score(ctx(prefix={"e2": PrefixMatch(10, "GPU")}), fleet) == {"e0": 0.4, "e1": 1.0, "e2": 0.0}
    assert sc.score(ctx(block_keys=[]), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}
    sc.on_complete(ctx(), fleet[1], ok=False)
    assert sc.score(ctx(), fleet)["e1"] == 0.0
    sc.on_complete(ctx(), fleet[0], ok=True)
    assert sc.score(ctx(), fleet)["e0"] == 0.4
    now[0] += 10.5
    assert sc.score(ctx(), fleet)["e0"] == 0.0
    sc.on_dispatch(ctx(block_keys=[]), fleet[2])  # nothing to remember
    assert len(sc.memory) == 10
