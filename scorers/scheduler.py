"""Profiles of filters → weighted scorers → picker, built from the YAML ``scheduling:`` section.

Built-in profiles exist so benchmarks and operators can compare policies by name; a profile
in the YAML with the same name replaces the built-in one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from .base import Decision, EndpointState, Filter, Picker, Plugin, RequestContext, Scorer
from .registry import REGISTRY
from .scorer.placement import PlacementScorer

PROFILE_HEADER = "x-kvgate-profile"

_BASE_FILTERS = [{"type": "healthy"}, {"type": "role"}, {"type": "model"}]

#: Built-in profiles. ``default`` is ours: the event-fed prefix match (with speculative entries
#: covering event lag) weighed against an estimated-TTFT cost that already prices the
#: uncached tokens and the prefill work queued on each replica, plus the exact in-flight
#: count and session stickiness. Weights chosen with `kvgate bench --scheduling` on the
#: simulated fleet (shared-prefix, multi-turn, long-doc QA): 3/2/1 had the highest hit ratio
#: and throughput on all three once `inflight` was smoothed (2/2/2 and 2/3/1 lost 2–20 points
#: of hit ratio on long documents by spreading a document's first burst). ``placement`` (2)
#: spreads new prefixes by count: 16 system prompts on 4 replicas settled 4/4/4/4 in 6 of 6
#: runs where the others alone split them unevenly in 5 of 6 (load spread 1.67-2.5); it scores 1
#: everywhere for any request some replica already holds half of.
BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "filters": _BASE_FILTERS,
        "scorers": [
            {"type": "precise-prefix", "weight": 3},
            {"type": "estimated-ttft", "weight": 2},
            {"type": "inflight", "weight": 1},
            {"type": "session", "weight": 0.5},
            {"type": "placement", "weight": 2},
        ],
        "picker": {"type": "max"},
    },
    "precise-prefix": {"filters": _BASE_FILTERS, "scorers": [{"type": "precise-prefix", "weight": 1}], "picker": {"type": "max"}},
    "precise-prefix+load": {
        "filters": _BASE_FILTERS,
        "scorers": [{"type": "precise-prefix", "weight": 3}, {"type": "queue", "weight": 2}, {"type": "kv-usage", "weight": 2}],
        "picker": {"type": "max"},
    },
    "approx-prefix": {
        "filters": _BASE_FILTERS,
        "scorers": [{"type": "approx-prefix", "weight": 3}, {"type": "inflight", "weight": 2}],
        "picker": {"type": "max"},
    },
    "estimated-ttft": {"filters": _BASE_FILTERS, "scorers": [{"type": "estimated-ttft", "weight": 1}], "picker": {"type": "max"}},
    "llm-d": {
        "filters": [*_BASE_FILTERS, {"type": "prefix-affinity", "params": {"threshold": 0.8}}],
        "scorers": [{"type": "token-load", "weight": 1}],
        "picker": {"type": "max"},
    },
    "round-robin": {"filters": _BASE_FILTERS, "scorers": [], "picker": {"type": "round-robin"}},
    "random": {"filters": _BASE_FILTERS, "scorers": [], "picker": {"type": "random"}},
    "least-loaded": {"filters": _BASE_FILTERS, "scorers": [{"type": "least-loaded", "weight": 1}], "picker": {"type": "max"}},
}


def build_plugin(spec: Any, kind: type[Plugin], where: str) -> Plugin:
    """One plugin from ``{type: t, name: n, params: {...}}`` (params may also sit beside ``type``;
    ``name`` defaults to the type).

    ``where`` (the YAML location) prefixes every error. ``weight`` is the profile's business
    and is skipped here for scorers; filters and pickers have none."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"{where}: expected a mapping with a 'type', got {spec!r}")
    type_name = spec["type"]
    cls = REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None or not issubclass(cls, kind):
        known = sorted(k for k, v in REGISTRY.items() if issubclass(v, kind))
        raise ValueError(f"{where}: unknown {kind.__name__.lower()} {type_name!r}; known: {', '.join(known)}")
    params = spec.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: params of {type_name!r} must be a mapping, got {params!r}")
    if "weight" in spec and not issubclass(kind, Scorer):
        raise ValueError(f"{where}: only scorers take a 'weight'")
    if "name" in params:
        raise ValueError(f"{where}: 'name' goes beside 'type', not in 'params'")
    beside = {k: v for k, v in spec.items() if k not in ("type", "name", "params", "weight")}
    twice = sorted((k for k in beside if k in params), key=str)
    if twice:
        raise ValueError(f"{where}: {type_name!r} parameters {twice} given both in 'params' and beside 'type'")
    merged = {**params, **beside}
    not_str = [k for k in merged if not isinstance(k, str)]
    if not_str:
        raise ValueError(f"{where}: {type_name}: parameter names must be strings, got {not_str!r}")
    try:
        return cls(name=spec.get("name"), **merged)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _as_list(spec: Mapping[str, Any], key: str, default: list[Any], where: str) -> list[Any]:
    value = spec.get(key, default)
    if not isinstance(value, list):
        raise ValueError(f"{where}.{key}: expected a list, got {value!r}")
    return value


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
        filters = [cast(Filter, build_plugin(f, Filter, f"{where}.filters[{i}]")) for i, f in enumerate(_as_list(spec, "filters", _BASE_FILTERS, where))]
        scorers = []
        for i, s in enumerate(_as_list(spec, "scorers", [], where)):
            weight = s.get("weight", 1.0) if isinstance(s, Mapping) else 1.0
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"{where}.scorers[{i}]: weight must be a number >= 0, got {weight!r}")
            scorers.append((cast(Scorer, build_plugin(s, Scorer, f"{where}.scorers[{i}]")), float(weight)))
        picker = cast(Picker, build_plugin(spec.get("picker", {"type": "max"}), Picker, f"{where}.picker"))
        seen: dict[str, str] = {}
        located: list[tuple[Plugin, str]] = [(p, f"{where}.filters[{i}]") for i, p in enumerate(filters)]
        located += [(p, f"{where}.scorers[{i}]") for i, (p, _) in enumerate(scorers)]
        located.append((picker, f"{where}.picker"))
        for plugin, at in located:
            if plugin.name in seen:
                raise ValueError(f"{at}: name {plugin.name!r} is already used by {seen[plugin.name]}; give one of them a distinct 'name'")
            seen[plugin.name] = at
        return cls(name, filters, scorers, picker)

    def plugins(self) -> Iterator[Plugin]:
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
        #: every profile's ``placement`` scorers, found once: their counts are read with each
        #: load publish (per request with several gateways) and each scrape
        self._placement = [sc for prof in profiles.values() for sc, _ in prof.scorers if isinstance(sc, PlacementScorer)]

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
            breakdown[scorer.name] = s
            if wsum > 0:
                for k in total:
                    total[k] += w * s.get(k, 0.0) / wsum
        ranked = prof.picker.pick(ctx, [(e, total[e.id]) for e in cands])
        return Decision(ranked, total, breakdown, prof.name)

    def placement_counts(self) -> dict[str, int]:
        """Per replica, this gateway's recent new-prefix placements (every profile's
        ``placement`` scorers summed): what it publishes to the gateways sharing its Redis."""
        out: dict[str, int] = {}
        for scorer in self._placement:
            for rid, n in scorer.counts().items():
                out[rid] = out.get(rid, 0) + n
        return out

    def on_cache_lost(self, endpoint_id: str) -> None:
        """The replica's prefix cache is gone: every profile's plugins drop what they built on it."""
        for prof in self.profiles.values():
            for p in prof.plugins():
                p.on_cache_lost(endpoint_id)

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState, profile: str | None = None) -> None:
        for p in self.profiles[profile or self.default_profile].plugins():
            p.on_dispatch(ctx, endpoint)

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool, profile: str | None = None) -> None:
        for p in self.profiles[profile or self.default_profile].plugins():
            p.on_complete(ctx, endpoint, ok)
