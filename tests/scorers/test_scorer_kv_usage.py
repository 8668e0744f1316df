"""``kv-usage`` scorer: free KV-cache memory."""

from __future__ import annotations

import pytest

from scorers.base import NoParams, Scorer
from scorers.scorer.kv_usage import KVUsageScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    sc = build(Scorer, "kv-usage")
    assert isinstance(sc, KVUsageScorer) and sc.params == NoParams() and sc.name == "kv-usage"


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "kv-usage", "threshold": 0.9}) == "kv-usage: unknown parameters ['threshold']; it takes none"


def test_bad_values_rejected():
    assert config_error(Scorer, {"type": "kv-usage", "params": "full"}) == "params of 'kv-usage' must be a mapping, got 'full'"


def test_free_fraction_clamped():
    fleet = eps(4)
    for e, usage in zip(fleet, [0.0, 0.25, 1.0, 1.2], strict=True):
        e.kv_usage = usage
    assert KVUsageScorer().score(ctx(), fleet) == {"e0": 1.0, "e1": pytest.approx(0.75), "e2": 0.0, "e3": 0.0}
    fleet[0].kv_usage = -0.1  # a bogus scrape stays in range
    assert KVUsageScorer().score(ctx(), fleet)["e0"] == 1.0
