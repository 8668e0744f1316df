"""``healthy`` filter: drops replicas whose circuit breaker is open."""

from __future__ import annotations

from scorers.base import Filter, NoParams
from scorers.filter.healthy import HealthyFilter
from tests.helpers.scorers import build, config_error, ctx, eps


def test_params_none_and_name_defaults_to_type():
    f = build(Filter, "healthy")
    assert isinstance(f, HealthyFilter) and f.params == NoParams() and f.name == "healthy"
    assert build(Filter, {"type": "healthy", "name": "breaker"}).name == "breaker"


def test_unknown_params_rejected():
    assert config_error(Filter, {"type": "healthy", "params": {"strict": True}}) == "healthy: unknown parameters ['strict']; it takes none"
    assert config_error(Filter, {"type": "healthy", "strict": True}) == "healthy: unknown parameters ['strict']; it takes none"


def test_bad_values_rejected():
    assert config_error(Filter, {"type": "healthy", "params": ["strict"]}) == "params of 'healthy' must be a mapping, got ['strict']"
    assert config_error(Filter, {"type": "healthy", "weight": 1}) == "only scorers take a 'weight'"
    assert config_error(Filter, {"type": "healthy", "name": ""}) == "healthy: name must be a non-empty string, got ''"


def test_drops_unhealthy_keeps_order():
    fleet = eps(4)
    fleet[1].healthy = False
    fleet[3].healthy = False
    assert [e.id for e in HealthyFilter().filter(ctx(), fleet)] == ["e0", "e2"]
    for e in fleet:
        e.healthy = False
    assert HealthyFilter().filter(ctx(), fleet) == []
