"""``weighted-random`` picker: the first pick sampled ∝ exp(score / temperature), so several gateways do not herd."""

from __future__ import annotations

import math
from typing import Annotated

from msgspec import Meta

from scorers.base import EndpointState, RequestContext
from scorers.common import SeededPicker


class WeightedRandomPicker(SeededPicker):
    """Samples the first pick ∝ exp(score / temperature): several gateways do not herd."""

    type_name = "weighted-random"

    class Params(SeededPicker.Params, frozen=True):
        #: softmax temperature: lower sticks to the best score, higher spreads
        temperature: Annotated[float, Meta(gt=0)] = 0.1

    params: Params

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        if not scored:
            return []
        t = self.params.temperature
        top = max(s for _, s in scored)
        weights = [math.exp((s - top) / t) for _, s in scored]
        first = self.rng.choices(range(len(scored)), weights=weights)[0]
        rest = sorted((p for i, p in enumerate(scored) if i != first), key=lambda p: -p[1])
        return [scored[first][0]] + [e for e, _ in rest]
