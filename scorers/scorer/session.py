"""``session`` scorer: affinity by session id: 1 for the replica that served the session last."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from scorers.base import PHASE_PREFILL, EndpointState, RequestContext, Scorer


class SessionScorer(Scorer):
    """Affinity by session id: 1 for the replica that served the session last."""

    type_name = "session"

    def __init__(self, max_sessions: int = 100_000, **params: Any) -> None:
        super().__init__(**params)
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, str] = OrderedDict()

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        home = self._last.get(ctx.session_id) if ctx.session_id else None
        return {e.id: 1.0 if e.id == home else 0.0 for e in endpoints}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if ctx.session_id and ctx.phase != PHASE_PREFILL:
            self._last[ctx.session_id] = endpoint.id
            self._last.move_to_end(ctx.session_id)
            while len(self._last) > self.max_sessions:
                self._last.popitem(last=False)

