"""``estimated-ttft`` scorer: cache and load in one unit, seconds (Dynamo-style cost): the prefill work queued ahead"""

from __future__ import annotations

from typing import Any

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.common import est_queue_s


class EstimatedTTFTScorer(Scorer):
    """Cache and load in one unit, seconds (Dynamo-style cost): the prefill work queued ahead
    plus this request's own uncached tokens over the replica's rate, plus a decode-batch term.
    Score = best estimate / this estimate."""

    type_name = "estimated-ttft"

    def __init__(self, decode_penalty_s: float = 0.002, floor_s: float = 0.005, **params: Any) -> None:
        super().__init__(**params)
        self.decode_penalty_s = decode_penalty_s
        self.floor_s = floor_s

    def estimate(self, ctx: RequestContext, e: EndpointState) -> float:
        return max(self.floor_s, est_queue_s(ctx, e) + self.decode_penalty_s * max(e.inflight_requests, e.running + e.waiting))

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        est = {e.id: self.estimate(ctx, e) for e in endpoints}
        if not est:
            return {}
        best = min(est.values())
        return {k: best / v for k, v in est.items()}

