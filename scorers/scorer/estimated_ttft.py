"""``estimated-ttft`` scorer: cache and load priced in one unit, seconds to first token."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from scorers.base import EndpointState, PluginParams, RequestContext, Scorer
from scorers.common import est_queue_s


class EstimatedTTFTScorer(Scorer):
    """Cache and load in one unit, seconds (Dynamo-style cost): the prefill work queued ahead
    plus this request's own uncached tokens over the replica's rate, plus a decode-batch term.
    Score = best estimate / this estimate."""

    type_name = "estimated-ttft"

    class Params(PluginParams, frozen=True):
        #: seconds added per request already running or queued on the replica
        decode_penalty_s: Annotated[float, Meta(ge=0)] = 0.002
        #: lower bound of an estimate (keeps best / this finite)
        floor_s: Annotated[float, Meta(gt=0)] = 0.005

    params: Params

    def estimate(self, ctx: RequestContext, e: EndpointState) -> float:
        p = self.params
        return max(p.floor_s, est_queue_s(ctx, e) + p.decode_penalty_s * max(e.total_inflight_requests, e.running + e.waiting))

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        est = {e.id: self.estimate(ctx, e) for e in endpoints}
        if not est:
            return {}
        best = min(est.values())
        return {k: best / v for k, v in est.items()}
