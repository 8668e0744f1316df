"""``precise-prefix`` scorer: the cached fraction of the prompt per replica, from the KV-event index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from msgspec import Meta

from scorers.base import PHASE_DECODE, EndpointState, PluginParams, RequestContext, Scorer
from scorers.memory import RoutedPrefixMemory


class PrecisePrefixScorer(Scorer):
    """Cached fraction of the prompt per replica, from the KV-event index (GPU tier worth
    more than CPU/storage), topped up by speculative entries for what was just dispatched
    (by this gateway, or by another one sharing its Redis index: ``ctx.peer_prefix``)."""

    type_name = "precise-prefix"

    class Params(PluginParams, frozen=True):
        #: worth of one block cached in GPU memory
        gpu_weight: Annotated[float, Meta(ge=0)] = 1.0
        #: worth of one block offloaded to CPU/storage
        cpu_weight: Annotated[float, Meta(ge=0)] = 0.5
        #: how long a dispatch counts as cached before the replica's events confirm it; 0 = off
        speculative_ttl_s: Annotated[float, Meta(ge=0)] = 2.0
        #: bound on the speculative memory (block keys)
        speculative_max_keys: Annotated[int, Meta(ge=1)] = 200_000

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        p = self.params
        self.speculative = RoutedPrefixMemory(p.speculative_ttl_s, p.speculative_max_keys) if p.speculative_ttl_s > 0 else None

    def set_clock(self, clock: Callable[[], float]) -> None:
        if self.speculative is not None:
            self.speculative.clock = clock

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        n = len(ctx.block_keys)
        if n == 0:
            return {e.id: 0.0 for e in endpoints}
        gpu, cpu = self.params.gpu_weight, self.params.cpu_weight
        spec = self.speculative.match(ctx.block_keys) if self.speculative is not None else {}
        peer = ctx.peer_prefix if self.speculative is not None else {}  # what gateways sharing the Redis index just routed
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.prefix.get(e.id) if ctx.index_ok else None
            w = 0.0
            if m is not None:
                w = m.blocks * (gpu if m.tier == "GPU" else cpu)
            w = max(w, max(spec.get(e.id, 0), peer.get(e.id, 0)) * gpu)
            out[e.id] = min(1.0, w / (n * max(gpu, cpu, 1e-9)))
        return out

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if self.speculative is not None and ctx.block_keys and ctx.phase != PHASE_DECODE:
            self.speculative.remember(ctx.block_keys, endpoint.id)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok and self.speculative is not None:
            self.speculative.forget(endpoint.id)

    def on_cache_lost(self, endpoint_id: str) -> None:
        if self.speculative is not None:
            self.speculative.forget(endpoint_id)
