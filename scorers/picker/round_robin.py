"""``round-robin`` picker: ignores scores, each request goes to the next candidate in id order."""

from __future__ import annotations

from typing import Any

from scorers.base import EndpointState, Picker, RequestContext


class RoundRobinPicker(Picker):
    """Ignores scores: each request goes to the next candidate in id order (no parameters)."""

    type_name = "round-robin"

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        self._next = 0

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        eps = sorted((e for e, _ in scored), key=lambda e: e.id)
        if not eps:
            return []
        i = self._next % len(eps)
        self._next += 1
        return eps[i:] + eps[:i]
