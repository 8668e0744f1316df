"""``model`` filter: keeps replicas that serve the request's base model (and LoRA adapter, if any)."""

from __future__ import annotations

from scorers.base import EndpointState, Filter, RequestContext


class ModelFilter(Filter):
    """Keeps replicas that serve the request's base model (and LoRA adapter, if any)."""

    type_name = "model"

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.serves(ctx.model, ctx.lora)]
