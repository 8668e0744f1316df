"""Helpers shared by several plugins: score normalisation, the queue estimate, the seeded picker base."""

from __future__ import annotations

import random
from typing import Any

from scorers.base import EndpointState, Picker, PluginParams, RequestContext


def relative_inverse(values: dict[str, float]) -> dict[str, float]:
    """1 for the smallest value, falling linearly to 0 at the largest (all 1 if all equal)."""
    if not values:
        return {}
    hi, lo = max(values.values()), min(values.values())
    if hi <= lo:
        return {k: 1.0 for k in values}
    return {k: (hi - v) / (hi - lo) for k, v in values.items()}


def smoothed_inverse(values: dict[str, float], scale: float) -> dict[str, float]:
    """1 for the least loaded, ``(scale + min) / (scale + v)`` for others: differences count
    in proportion to ``scale`` (a typical load), not to the spread among candidates."""
    if not values:
        return {}
    lo = min(values.values())
    return {k: (scale + lo) / (scale + v) for k, v in values.items()}


def est_queue_s(ctx: RequestContext, e: EndpointState) -> float:
    """Seconds of prefill work queued ahead of this request on ``e``, plus its own."""
    return (e.total_inflight_prefill_tokens + ctx.uncached_tokens(e.id)) / max(e.prefill_tokens_per_s, 1.0)


class SeededPicker(Picker):
    """A picker with its own ``random.Random`` (``seed`` makes its choices reproducible)."""

    class Params(PluginParams, frozen=True):
        #: seed of the picker's random generator (None: seeded from the OS)
        seed: int | None = None

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        self.rng = random.Random(self.params.seed)
