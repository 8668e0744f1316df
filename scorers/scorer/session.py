"""``session`` scorer: affinity to the replica that served the request's session last."""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any

from msgspec import Meta

from scorers.base import PHASE_PREFILL, EndpointState, PluginParams, RequestContext, Scorer


class SessionScorer(Scorer):
    """Affinity by session id: 1 for the replica that served the session last."""

    type_name = "session"

    class Params(PluginParams, frozen=True):
        #: sessions remembered (least recently used forgotten first)
        max_sessions: Annotated[int, Meta(ge=1)] = 100_000

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        self._last: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        home = self._last.get(ctx.session_id) if ctx.session_id else None
        return {e.id: 1.0 if e.id == home else 0.0 for e in endpoints}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if ctx.session_id and ctx.phase != PHASE_PREFILL:
            self._last[ctx.session_id] = endpoint.id
            self._last.move_to_end(ctx.session_id)
            while len(self._last) > self.params.max_sessions:
                self._last.popitem(last=False)
