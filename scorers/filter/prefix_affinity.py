"""``prefix-affinity`` filter: llm-d's default: stick to replicas caching ≥ threshold of the prompt, unless they are"""

from __future__ import annotations

from typing import Any

from scorers.base import EndpointState, Filter, RequestContext
from scorers.common import est_queue_s


class PrefixAffinityFilter(Filter):
    """llm-d's default: stick to replicas caching ≥ threshold of the prompt, unless they are
    so much busier than the best cold replica that the cache no longer pays."""

    type_name = "prefix-affinity"

    def __init__(self, threshold: float = 0.8, margin_s: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        if not 0 < threshold <= 1:
            raise ValueError("prefix-affinity: threshold must be in (0, 1]")
        self.threshold = threshold
        self.margin_s = margin_s

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        if not ctx.prompt_tokens or not ctx.prefix:
            return endpoints
        warm = [e for e in endpoints if ctx.cached_tokens(e.id) >= self.threshold * ctx.prompt_tokens]
        cold = [e for e in endpoints if e not in warm]
        if not warm or not cold:
            return endpoints
        best_warm = min(est_queue_s(ctx, e) for e in warm)
        best_cold = min(est_queue_s(ctx, e) for e in cold)
        return endpoints if best_warm - best_cold > self.margin_s else warm

