"""``max`` picker: highest score first; equal scores are shuffled so ties spread the load."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext
from scorers.common import SeededPicker


class MaxPicker(SeededPicker):
    """Highest score first; equal scores are shuffled so ties spread the load."""

    type_name = "max"

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        keyed = [(round(s, 9), self.rng.random(), e) for e, s in scored]
        keyed.sort(key=lambda t: (-t[0], t[1]))
        return [e for _, _, e in keyed]
