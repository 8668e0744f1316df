"""``weighted-random`` picker: samples the first pick ∝ exp(score / temperature): several gateways do not herd."""

from __future__ import annotations

import math
from typing import Any

from scorers.base import EndpointState, RequestContext
from scorers.common import SeededPicker


class WeightedRandomPicker(SeededPicker):
    """Samples the first pick ∝ exp(score / temperature): several gateways do not herd."""

    type_name = "weighted-random"

    def __init__(self, temperature: float = 0.1, seed: int | None = None, **params: Any) -> None:
        super().__init__(seed, **params)
        if temperature <= 0:
            raise ValueError("weighted-random: temperature must be > 0")
        self.temperature = temperature

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        if not scored:
            return []
        top = max(s for _, s in scored)
        weights = [math.exp((s - top) / self.temperature) for _, s in scored]
        first = self.rng.choices(range(len(scored)), weights=weights)[0]
        rest = sorted((p for i, p in enumerate(scored) if i != first), key=lambda p: -p[1])
        return [scored[first][0]] + [e for e, _ in rest]

