"""``queue`` scorer: scraped waiting requests, running ones as a tie-breaker."""

from __future__ import annotations

import pytest

from scorers.base import NoParams, Scorer
from scorers.scorer.queue import QueueScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none():
    sc = build(Scorer, {"type": "queue", "weight": 2})
    assert isinstance(sc, QueueScorer) and sc.params == NoParams()


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "queue", "params": {"scale": 2}}) == "queue: unknown parameters ['scale']; it takes none"


def test_bad_values_rejected():
    assert config_error(Scorer, {"type": "queue", "params": [1]}) == "params of 'queue' must be a mapping, got [1]"
    assert config_error(Scorer, {"type": "queue", "name": ["q"]}) == "queue: name must be a non-empty string, got ['q']"


def test_waiting_decides_running_breaks_ties():
    fleet = eps(3)
    fleet[0].waiting, fleet[1].waiting, fleet[2].waiting = 4, 0, 2
    assert QueueScorer().score(ctx(), fleet) == {"e0": 0.0, "e1": 1.0, "e2": 0.5}
    fleet[0].waiting = fleet[1].waiting = fleet[2].waiting = 1
    fleet[0].running, fleet[1].running, fleet[2].running = 10, 0, 20
    assert QueueScorer().score(ctx(), fleet) == {"e0": pytest.approx(0.5), "e1": 1.0, "e2": 0.0}
    fleet[0].running = fleet[2].running = 0
    assert QueueScorer().score(ctx(), fleet) == {"e0": 1.0, "e1": 1.0, "e2": 1.0}  # all equal: no preference
