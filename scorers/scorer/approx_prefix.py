"""``approx-prefix`` scorer: for replicas without KV events: what this gateway routed where (bounded, with TTL)."""

from __future__ import annotations

from typing import Any

from scorers.base import EndpointState, RequestContext, Scorer
from scorers.memory import RoutedPrefixMemory


class ApproxPrefixScorer(Scorer):
    """For replicas without KV events: what this gateway routed where (bounded, with TTL)."""

    type_name = "approx-prefix"

    def __init__(self, ttl_s: float = 300.0, max_keys: int = 500_000, **params: Any) -> None:
        super().__init__(**params)
        self.memory = RoutedPrefixMemory(ttl_s, max_keys)

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        n = len(ctx.block_keys)
        if n == 0:
            return {e.id: 0.0 for e in endpoints}
        m = self.memory.match(ctx.block_keys)
        return {e.id: m.get(e.id, 0) / n for e in endpoints}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if ctx.block_keys:
            self.memory.remember(ctx.block_keys, endpoint.id)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok:
            self.memory.forget(endpoint.id)

