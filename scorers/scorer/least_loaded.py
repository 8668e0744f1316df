"""``least-loaded`` scorer: in-flight plus scraped waiting requests, the classic least-loaded baseline."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.common import relative_inverse


class LeastLoadedScorer(Scorer):
    """In-flight plus scraped waiting requests: the classic least-loaded baseline."""

    type_name = "least-loaded"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return relative_inverse({e.id: e.total_inflight_requests + e.waiting for e in endpoints})
