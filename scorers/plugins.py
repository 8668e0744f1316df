"""The shipped filters, scorers and pickers (each registered under its YAML ``type``).

Scores are in [0, 1], 1 best, computed relative to the *current candidates* (so "least
loaded" means least loaded among the replicas that can actually take this request).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .base import (
    PHASE_ANY,
    PHASE_DECODE,
    PHASE_PREFILL,
    ROLE_BOTH,
    ROLE_DECODE,
    ROLE_PREFILL,
    EndpointState,
    Filter,
    Picker,
    RequestContext,
    Scorer,
)
from .memory import RoutedPrefixMemory

REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    REGISTRY[cls.type_name] = cls
    return cls


def _relative_inverse(values: dict[str, float]) -> dict[str, float]:
    """1 for the smallest value, falling linearly to 0 at the largest (all 1 if all equal)."""
    if not values:
        return {}
    hi, lo = max(values.values()), min(values.values())
    if hi <= lo:
        return {k: 1.0 for k in values}
    return {k: (hi - v) / (hi - lo) for k, v in values.items()}


def _smoothed_inverse(values: dict[str, float], scale: float) -> dict[str, float]:
    """1 for the least loaded, ``(scale + min) / (scale + v)`` for others: differences count
    in proportion to ``scale`` (a typical load), not to the spread among candidates."""
    if not values:
        return {}
    lo = min(values.values())
    return {k: (scale + lo) / (scale + v) for k, v in values.items()}


# ------------------------------------------------------------------------------------------------
# filters
# ------------------------------------------------------------------------------------------------


@register
class HealthyFilter(Filter):
    """Drops replicas whose circuit breaker is open."""

    type_name = "healthy"

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.healthy]


@register
class RoleFilter(Filter):
    """Keeps replicas whose P/D role fits the phase being scheduled."""

    type_name = "role"
    _ROLES = {PHASE_ANY: (ROLE_BOTH, ROLE_DECODE), PHASE_PREFILL: (ROLE_PREFILL, ROLE_BOTH), PHASE_DECODE: (ROLE_DECODE, ROLE_BOTH)}

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        roles = self._ROLES.get(ctx.phase, (ROLE_BOTH,))
        kept = [e for e in endpoints if e.role in roles]
        if not kept and ctx.phase == PHASE_ANY:
            return list(endpoints)  # only prefill-role replicas: any vLLM replica can still serve
        return kept


@register
class ModelFilter(Filter):
    """Keeps replicas that serve the request's base model (and LoRA adapter, if any)."""

    type_name = "model"

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        return [e for e in endpoints if e.serves(ctx.model, ctx.lora)]


def _est_queue_s(ctx: RequestContext, e: EndpointState) -> float:
    """Seconds of prefill work queued ahead of this request on ``e``, plus its own."""
    return (e.inflight_prefill_tokens + ctx.uncached_tokens(e.id)) / max(e.prefill_tokens_per_s, 1.0)


@register
class PrefixAffinityFilter(Filter):
    """llm-d's default: stick to replicas caching ≥ threshold of the prompt, unless they are
    so much busier than the best cold replica that the cache no longer pays."""

    type_name = "prefix-affinity"

    def __init__(self, threshold: float = 0.8, margin_s: float = 0.5, **params: Any) -> None:
        super().__init__(**params)
        if not 0 < threshold <= 1:
            raise ValueError("prefix-affinity: threshold must be in (0, 1]")
        self.threshold = threshold
        self.margin_s = margin_s

    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]:
        if not ctx.prompt_tokens or not ctx.prefix:
            return endpoints
        warm = [e for e in endpoints if ctx.cached_tokens(e.id) >= self.threshold * ctx.prompt_tokens]
        cold = [e for e in endpoints if e not in warm]
        if not warm or not cold:
            return endpoints
        best_warm = min(_est_queue_s(ctx, e) for e in warm)
        best_cold = min(_est_queue_s(ctx, e) for e in cold)
        return endpoints if best_warm - best_cold > self.margin_s else warm


# ------------------------------------------------------------------------------------------------
# scorers
# ------------------------------------------------------------------------------------------------


@register
class PrecisePrefixScorer(Scorer):
    """Cached fraction of the prompt per replica, from the KV-event index (GPU tier worth
    more than CPU/storage), topped up by speculative entries for what was just dispatched."""

    type_name = "precise-prefix"

    def __init__(self, gpu_weight: float = 1.0, cpu_weight: float = 0.5, speculative_ttl_s: float = 2.0, speculative_max_keys: int = 200_000, **params: Any) -> None:
        super().__init__(**params)
        self.gpu_weight = gpu_weight
        self.cpu_weight = cpu_weight
        self.speculative = RoutedPrefixMemory(speculative_ttl_s, speculative_max_keys) if speculative_ttl_s > 0 else None

    def set_clock(self, clock: Callable[[], float]) -> None:
        if self.speculative is not None:
            self.speculative.clock = clock

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        n = len(ctx.block_keys)
        if n == 0:
            return {e.id: 0.0 for e in endpoints}
        spec = self.speculative.match(ctx.block_keys) if self.speculative is not None else {}
        out: dict[str, float] = {}
        for e in endpoints:
            m = ctx.prefix.get(e.id) if ctx.index_ok else None
            w = 0.0
            if m is not None:
                w = m.blocks * (self.gpu_weight if m.tier == "GPU" else self.cpu_weight)
            w = max(w, spec.get(e.id, 0) * self.gpu_weight)
            out[e.id] = min(1.0, w / (n * max(self.gpu_weight, self.cpu_weight, 1e-9)))
        return out

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if self.speculative is not None and ctx.block_keys and ctx.phase != PHASE_DECODE:
            self.speculative.remember(ctx.block_keys, endpoint.id)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok and self.speculative is not None:
            self.speculative.forget(endpoint.id)


@register
class ApproxPrefixScorer(Scorer):
    """For replicas without KV events: what this gateway routed where (bounded, with TTL)."""

    type_name = "approx-prefix"

    def __init__(self, ttl_s: float = 300.0, max_keys: int = 500_000, **params: Any) -> None:
        super().__init__(**params)
        self.memory = RoutedPrefixMemory(ttl_s, max_keys)

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        n = len(ctx.block_keys)
        if n == 0:
            return {e.id: 0.0 for e in endpoints}
        m = self.memory.match(ctx.block_keys)
        return {e.id: m.get(e.id, 0) / n for e in endpoints}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if ctx.block_keys:
            self.memory.remember(ctx.block_keys, endpoint.id)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok:
            self.memory.forget(endpoint.id)


@register
class InflightScorer(Scorer):
    """The gateway's own in-flight count (exact at dispatch, unlike scraped gauges)."""

    type_name = "inflight"

    def __init__(self, token_weight: float = 0.5, requests_scale: float = 4.0, tokens_scale: float = 4096.0, **params: Any) -> None:
        super().__init__(**params)
        self.token_weight = token_weight
        self.requests_scale = requests_scale
        self.tokens_scale = tokens_scale

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        # smoothed, not min..max: one request in flight against an idle replica is a small
        # difference, and must not outweigh a long cached prefix
        req = _smoothed_inverse({e.id: float(e.inflight_requests) for e in endpoints}, self.requests_scale)
        tok = _smoothed_inverse({e.id: float(e.inflight_decode_tokens) for e in endpoints}, self.tokens_scale)
        w = self.token_weight
        return {k: (1 - w) * req[k] + w * tok[k] for k in req}


@register
class QueueScorer(Scorer):
    """Scraped ``vllm:num_requests_waiting`` (running as a small tie-breaker)."""

    type_name = "queue"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return _relative_inverse({e.id: e.waiting + 0.01 * e.running for e in endpoints})


@register
class KVUsageScorer(Scorer):
    """Scraped ``vllm:kv_cache_usage_perc``: free KV memory means room to batch."""

    type_name = "kv-usage"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return {e.id: max(0.0, min(1.0, 1.0 - e.kv_usage)) for e in endpoints}


@register
class LeastLoadedScorer(Scorer):
    """In-flight plus scraped waiting requests: the classic least-loaded baseline."""

    type_name = "least-loaded"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return _relative_inverse({e.id: e.inflight_requests + e.waiting for e in endpoints})


@register
class TokenLoadScorer(Scorer):
    """llm-d's token load: uncached prompt tokens in flight (plus this request's own)."""

    type_name = "token-load"

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        return _relative_inverse({e.id: float(e.inflight_prefill_tokens + ctx.uncached_tokens(e.id)) for e in endpoints})


@register
class EstimatedTTFTScorer(Scorer):
    """Cache and load in one unit, seconds (Dynamo-style cost): the prefill work queued ahead
    plus this request's own uncached tokens over the replica's rate, plus a decode-batch term.
    Score = best estimate / this estimate."""

    type_name = "estimated-ttft"

    def __init__(self, decode_penalty_s: float = 0.002, floor_s: float = 0.005, **params: Any) -> None:
        super().__init__(**params)
        self.decode_penalty_s = decode_penalty_s
        self.floor_s = floor_s

    def estimate(self, ctx: RequestContext, e: EndpointState) -> float:
        return max(self.floor_s, _est_queue_s(ctx, e) + self.decode_penalty_s * max(e.inflight_requests, e.running + e.waiting))

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        est = {e.id: self.estimate(ctx, e) for e in endpoints}
        if not est:
            return {}
        best = min(est.values())
        return {k: best / v for k, v in est.items()}


@register
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


# ------------------------------------------------------------------------------------------------
# pickers
# ------------------------------------------------------------------------------------------------


class _SeededPicker(Picker):
    def __init__(self, seed: int | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.rng = random.Random(seed)


@register
class MaxPicker(_SeededPicker):
    """Highest score first; equal scores are shuffled so ties spread the load."""

    type_name = "max"

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        keyed = [(round(s, 9), self.rng.random(), e) for e, s in scored]
        keyed.sort(key=lambda t: (-t[0], t[1]))
        return [e for _, _, e in keyed]


@register
class WeightedRandomPicker(_SeededPicker):
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


@register
class RoundRobinPicker(Picker):
    """Ignores scores: each request goes to the next candidate in id order."""

    type_name = "round-robin"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._next = 0

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        eps = sorted((e for e, _ in scored), key=lambda e: e.id)
        if not eps:
            return []
        i = self._next % len(eps)
        self._next += 1
        return eps[i:] + eps[:i]


@register
class RandomPicker(_SeededPicker):
    """Ignores scores: a uniformly random order."""

    type_name = "random"

    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]:
        eps = [e for e, _ in scored]
        self.rng.shuffle(eps)
        return eps

