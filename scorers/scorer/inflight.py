"""``inflight`` scorer: the gateway's own in-flight requests and tokens, smoothed."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from scorers.base import EndpointState, PluginParams, RequestContext, Scorer
from scorers.common import smoothed_inverse


class InflightScorer(Scorer):
    """The gateway's own in-flight count (exact at dispatch, unlike scraped gauges), plus what
    the other gateways sharing its Redis index published (``index.share_load``)."""

    type_name = "inflight"

    class Params(PluginParams, frozen=True):
        #: share of the score from in-flight tokens (the rest from in-flight requests)
        token_weight: Annotated[float, Meta(ge=0, le=1)] = 0.5
        #: a typical request load: differences count in proportion to it
        requests_scale: Annotated[float, Meta(gt=0)] = 4.0
        #: a typical token load (prompt + max_tokens of requests still generating)
        tokens_scale: Annotated[float, Meta(gt=0)] = 4096.0

    params: Params

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        # smoothed, not min..max: one request in flight against an idle replica is a small
        # difference, and must not outweigh a long cached prefix
        p = self.params
        req = smoothed_inverse({e.id: float(e.total_inflight_requests) for e in endpoints}, p.requests_scale)
        tok = smoothed_inverse({e.id: float(e.total_inflight_decode_tokens) for e in endpoints}, p.tokens_scale)
        w = p.token_weight
        return {k: (1 - w) * req[k] + w * tok[k] for k in req}
