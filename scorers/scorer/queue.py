"""``queue`` scorer: scraped ``vllm:num_requests_waiting`` (running as a small tie-breaker)."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.common import relative_inverse


class QueueScorer(Scorer):
    """Scraped ``vllm:num_requests_waiting`` (running as a small tie-breaker)."""

    type_name = "queue"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return relative_inverse({e.id: e.waiting + 0.01 * e.running for e in endpoints})
