"""``healthy`` filter: drops replicas whose circuit breaker is open."""

from __future__ import annotations

from scorers.base import EndpointState, Filter, RequestContext


class HealthyFilter(Filter):
    """Drops replicas whose circuit breaker is open."""

    type_name = "healthy"

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.healthy]
