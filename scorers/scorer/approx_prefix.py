"""``approx-prefix`` scorer: prefix affinity from what this gateway routed where (replicas without KV events)."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from scorers.base import EndpointState, PluginParams, RequestContext, Scorer
from scorers.memory import RoutedPrefixMemory


class ApproxPrefixScorer(Scorer):
    """For replicas without KV events: what this gateway routed where (bounded, with TTL)."""

    type_name = "approx-prefix"

    class Params(PluginParams, frozen=True):
        #: how long a dispatched prefix is assumed to stay cached
        ttl_s: Annotated[float, Meta(gt=0)] = 300.0
        #: bound on the memory (block keys)
        max_keys: Annotated[int, Meta(ge=1)] = 500_000

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        self.memory = RoutedPrefixMemory(self.params.ttl_s, self.params.max_keys)

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
