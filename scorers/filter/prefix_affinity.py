"""``prefix-affinity`` filter: llm-d's default cache affinity, released when the warm replicas are overloaded."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from scorers.base import EndpointState, Filter, PluginParams, RequestContext
from scorers.common import est_queue_s


class PrefixAffinityFilter(Filter):
    """llm-d's default: stick to replicas caching ≥ threshold of the prompt, unless they are
    so much busier than the best cold replica that the cache no longer pays."""

    type_name = "prefix-affinity"

    class Params(PluginParams, frozen=True):
        #: fraction of the prompt a replica must cache to count as warm
        threshold: Annotated[float, Meta(gt=0, le=1)] = 0.8
        #: seconds of extra queued prefill on the best warm replica (over the best cold one) tolerated
        margin_s: Annotated[float, Meta(ge=0)] = 0.5

    params: Params

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        if not ctx.prompt_tokens or not ctx.prefix:
            return endpoints
        need = self.params.threshold * ctx.prompt_tokens
        warm = [e for e in endpoints if ctx.cached_tokens(e.id) >= need]
        cold = [e for e in endpoints if e not in warm]
        if not warm or not cold:
            return endpoints
        best_warm = min(est_queue_s(ctx, e) for e in warm)
        best_cold = min(est_queue_s(ctx, e) for e in cold)
        return endpoints if best_warm - best_cold > self.params.margin_s else warm
