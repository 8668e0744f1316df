"""``precise-prefix`` scorer: cached fraction of the prompt per replica, from the KV-event index (GPU tier worth"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scorers.base import PHASE_DECODE, EndpointState, RequestContext, Scorer
from scorers.memory import RoutedPrefixMemory


class PrecisePrefixScorer(Scorer):
    """Cached fraction of the prompt per replica, from the KV-event index (GPU tier worth
    more than CPU/storage), topped up by speculative entries for what was just dispatched."""

    type_name = "precise-prefix"

    def __init__(self, gpu_weight: float = 1.0, cpu_weight: float = 0.5, speculative_ttl_s: float = 2.0, speculative_max_keys: int = 200_000, **params: Any) -> None:
        super().__init__(**params)
        self.gpu_weight = gpu_weight
        self.cpu_weight = cpu_weight
        self.speculative = RoutedPrefixMemory(speculative_ttl_s, speculative_max_keys) if speculative_ttl_s > 0 else None

    def set_clock(self, clock: Callable[[], float]) -> None:
        if self.speculative is not None:
            self.speculative.clock = clock

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        n = len(ctx.block_keys)
        if n == 0:
            return {e.id: 0.0 for e in endpoints}
        spec = self.speculative.match(ctx.block_keys) if self.speculative is not None else {}
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.prefix.get(e.id) if ctx.index_ok else None
            w = 0.0
            if m is not None:
                w = m.blocks * (self.gpu_weight if m.tier == "GPU" else self.cpu_weight)
            w = max(w, spec.get(e.id, 0) * self.gpu_weight)
            out[e.id] = min(1.0, w / (n * max(self.gpu_weight, self.cpu_weight, 1e-9)))
        return out

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if self.speculative is not None and ctx.block_keys and ctx.phase != PHASE_DECODE:
            self.speculative.remember(ctx.block_keys, endpoint.id)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok and self.speculative is not None:
            self.speculative.forget(endpoint.id)

