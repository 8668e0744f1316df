"""``inflight`` scorer: the gateway's own in-flight count (exact at dispatch, unlike scraped gauges)."""

from __future__ import annotations

from typing import Any

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.common import smoothed_inverse


class InflightScorer(Scorer):
    """The gateway's own in-flight count (exact at dispatch, unlike scraped gauges)."""

    type_name = "inflight"

    def __init__(self, token_weight: float = 0.5, requests_scale: float = 4.0, tokens_scale: float = 4096.0, **params: Any) -> None:
        super().__init__(**params)
        self.token_weight = token_weight
        self.requests_scale = requests_scale
        self.tokens_scale = tokens_scale

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        # smoothed, not min..max: one request in flight against an idle replica is a small
        # difference, and must not outweigh a long cached prefix
        req = smoothed_inverse({e.id: float(e.inflight_requests) for e in endpoints}, self.requests_scale)
        tok = smoothed_inverse({e.id: float(e.inflight_decode_tokens) for e in endpoints}, self.tokens_scale)
        w = self.token_weight
        return {k: (1 - w) * req[k] + w * tok[k] for k in req}

