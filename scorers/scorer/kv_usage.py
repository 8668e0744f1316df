"""``kv-usage`` scorer: scraped ``vllm:kv_cache_usage_perc`` (free KV memory means room to batch)."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext, Scorer


class KVUsageScorer(Scorer):
    """Scraped ``vllm:kv_cache_usage_perc``: free KV memory means room to batch."""

    type_name = "kv-usage"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return {e.id: max(0.0, min(1.0, 1.0 - e.kv_usage)) for e in endpoints}
