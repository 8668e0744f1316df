"""``least-loaded`` scorer: in-flight plus waiting requests, min..max across the candidates."""

from __future__ import annotations

from scorers.base import NoParams, Scorer
from scorers.scorer.least_loaded import LeastLoadedScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    sc = build(Scorer, "least-loaded")
    assert isinstance(sc, LeastLoadedScorer) and sc.params == NoParams()


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "least-loaded", "params": {"scale": 4}}) == "least-loaded: unknown parameters ['scale']; it takes none"


def test_bad_values_rejected():
    assert config_error(Scorer, {"type": "least-loaded", "params": 4}) == "params of 'least-loaded' must be a mapping, got 4"


def test_in_flight_plus_waiting_relative_to_candidates():
    fleet = eps(3)
    fleet[0].inflight_requests, fleet[0].waiting = 2, 2  # 4
    fleet[1].inflight_requests = 8  # 8
    fleet[2].waiting = 0  # 0
    assert LeastLoadedScorer().score(ctx(), fleet) == {"e0": 0.5, "e1": 0.0, "e2": 1.0}
    assert LeastLoadedScorer().score(ctx(), fleet[:2]) == {"e0": 1.0, "e1": 0.0}  # relative to who is left
    assert LeastLoadedScorer().score(ctx(), []) == {}
