"""``random`` picker: ignores scores, a uniformly random order."""

from __future__ import annotations

from scorers.base import EndpointState, RequestContext
from scorers.common import SeededPicker


class RandomPicker(SeededPicker):
    """Ignores scores: a uniformly random order."""

    type_name = "random"

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        eps = [e for e, _ in scored]
        self.rng.shuffle(eps)
        return eps
