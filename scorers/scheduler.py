"""Profiles of filters → weighted scorers → picker, built from the YAML ``scheduling:`` section.

Built-in profiles exist so benchmarks and operators can compare policies by name; a profile
in the YAML with the same name replaces the built-in one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .base import Decision, EndpointState, Filter, Picker, RequestContext, Scorer
from .registry import REGISTRY

PROFILE_HEADER = "x-kvgate-profile"

_BASE_FILTERS = [{"type": "healthy"}, {"type": "role"}, {"type": "model"}]

#: Built-in profiles. ``default`` is ours: the event-fed prefix match (with speculative entries
#: covering event lag) weighed against an estimated-TTFT cost that already prices the
#: uncached tokens and the prefill work queued on each replica, plus the exact in-flight
#: count and session stickiness. Weights chosen with `kvgate bench --scheduling` on the
#: simulated fleet (shared-prefix, multi-turn, long-doc QA): 3/2/1 had the highest hit ratio
#: and throughput on all three once `inflight` was smoothed (2/2/2 and 2/3/1 lost 2–20 points
#: of hit ratio on long documents by spreading a document's first burst).
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "filters": _BASE_FILTERS,
        "scorers": [
            {"type": "precise-prefix", "weight": 3},
            {"type": "estimated-ttft", "weight": 2},
            {"type": "inflight", "weight": 1},
            {"type": "session", "weight": 0.5},
        ],
        "picker": {"type": "max"},
    },
    "precise-prefix": {"filters": _BASE_FILTERS, "scorers": [{"type": "precise-prefix", "weight": 1}], "picker": {"type": "max"}},
    "precise-prefix+load": {
        "filters": _BASE_FILTERS,
        "scorers": [{"type": "precise-prefix", "weight": 3}, {"type": "queue", "weight": 2}, {"type": "kv-usage", "weight": 2}],
        "picker": {"type": "max"},
    },
    "approx-prefix": {"filters": _BASE_FILTERS, "scorers": [{"type": "approx-prefix", "weight": 3}, {"type": "inflight", "weight": 2}], "picker": {"type": "max"}},
    "estimated-ttft": {"filters": _BASE_FILTERS, "scorers": [{"type": "estimated-ttft", "weight": 1}], "picker": {"type": "max"}},
    "llm-d": {
        "filters": _BASE_FILTERS + [{"type": "prefix-affinity", "params": {"threshold": 0.8}}],
        "scorers": [{"type": "token-load", "weight": 1}],
        "picker": {"type": "max"},
    },
    "round-robin": {"filters": _BASE_FILTERS, "scorers": [], "picker": {"type": "round-robin"}},
    "random": {"filters": _BASE_FILTERS, "scorers": [], "picker": {"type": "random"}},
    "least-loaded": {"filters": _BASE_FILTERS, "scorers": [{"type": "least-loaded", "weight": 1}], "picker": {"type": "max"}},
}


def build_plugin(spec: Any, kind: type, where: str):
    """One plugin from ``{type: name, params: {...}}`` (params may also sit beside ``type``)."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"{where}: expected a mapping with a 'type', got {spec!r}")
    name = spec["type"]
    cls = REGISTRY.get(name)
    if cls is None or not issubclass(cls, kind):
        known = sorted(k for k, v in REGISTRY.items() if issubclass(v, kind))
        raise ValueError(f"{where}: unknown {kind.__name__.lower()} {name!r}; known: {', '.join(known)}")
    params = dict(spec.get("params") or {})
    params.update({k: v for k, v in spec.items() if k not in ("type", "params", "weight")})
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"{where}: bad parameters for {name!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass
class Profile:
    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> Profile:
        where = f"scheduling.profiles.{name}"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(spec) - {"filters", "scorers", "picker"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        filters = [build_plugin(f, Filter, f"{where}.filters[{i}]") for i, f in enumerate(spec.get("filters", _BASE_FILTERS))]
        scorers = []
        for i, s in enumerate(spec.get("scorers", [])):
            weight = s.get("weight", 1.0) if isinstance(s, Mapping) else 1.0
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"{where}.scorers[{i}]: weight must be a number >= 0, got {weight!r}")
            scorers.append((build_plugin(s, Scorer, f"{where}.scorers[{i}]"), float(weight)))
        picker = build_plugin(spec.get("picker", {"type": "max"}), Picker, f"{where}.picker")
        return cls(name, filters, scorers, picker)

    def plugins(self):
        yield from self.filters
        for s, _ in self.scorers:
            yield s
        yield self.picker


class Scheduler:
    def __init__(self, profiles: dict[str, Profile], default_profile: str = "default", allow_header_override: bool = False) -> None:
        if default_profile not in profiles:
            raise ValueError(f"scheduling.default_profile: unknown profile {default_profile!r}; known: {', '.join(sorted(profiles))}")
        self.profiles = profiles
        self.default_profile = default_profile
        self.allow_header_override = allow_header_override

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Scheduler:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"default_profile", "allow_header_override", "profiles"}
        if unknown:
            raise ValueError(f"scheduling: unknown keys {sorted(unknown)}")
        specs = copy.deepcopy(BUILTIN_PROFILES)
        user = cfg.get("profiles") or {}
        if not isinstance(user, Mapping):
            raise ValueError("scheduling.profiles: expected a mapping of name → profile")
        specs.update(user)
        profiles = {name: Profile.from_spec(name, spec) for name, spec in specs.items()}
        return cls(profiles, cfg.get("default_profile", "default"), bool(cfg.get("allow_header_override", False)))

    def profile_names(self) -> list[str]:
        return sorted(self.profiles)

    def profile_for(self, headers: Mapping[str, str]) -> str:
        if self.allow_header_override:
            wanted = headers.get(PROFILE_HEADER)
            if wanted in self.profiles:
                return wanted
        return self.default_profile

    def schedule(self, ctx: RequestContext, endpoints: list[EndpointState], profile: str | None = None) -> Decision:
        prof = self.profiles[profile or self.default_profile]
        cands = list(endpoints)
        for f in prof.filters:
            cands = f.filter(ctx, cands)
            if not cands:
                return Decision([], {}, {}, prof.name)
        breakdown: dict[str, dict[str, float]] = {}
        total = {e.id: 0.0 for e in cands}
        wsum = sum(w for _, w in prof.scorers)
        for scorer, w in prof.scorers:
            s = scorer.score(ctx, cands)
            breakdown[scorer.type_name] = s
            if wsum > 0:
                for k in total:
                    total[k] += w * s.get(k, 0.0) / wsum
        ranked = prof.picker.pick(ctx, [(e, total[e.id]) for e in cands])
        return Decision(ranked, total, breakdown, prof.name)

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState, profile: str | None = None) -> None:
        for p in self.profiles[profile or self.default_profile].plugins():
            p.on_dispatch(ctx, endpoint)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool, profile: str | None = None) -> None:
        for p in self.profiles[profile or self.default_profile].plugins():
            p.on_complete(ctx, endpoint, ok)
