"""``token-load`` scorer: llm-d's token load, uncached prompt tokens in flight (plus this request's own)."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.common import relative_inverse


class TokenLoadScorer(Scorer):
    """llm-d's token load: uncached prompt tokens in flight (plus this request's own)."""

    type_name = "token-load"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return relative_inverse({e.id: float(e.total_inflight_prefill_tokens + ctx.uncached_tokens(e.id)) for e in endpoints})
