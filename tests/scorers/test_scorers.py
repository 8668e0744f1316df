"""Routing plugins on hand-built fleets, config validation, and a toy fleet simulation."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvindex.index import PrefixMatch
from scorers.base import EndpointState, RequestContext
from scorers.memory import RoutedPrefixMemory
from scorers.plugins import (
    EstimatedTTFTScorer,
    InflightScorer,
    MaxPicker,
    PrecisePrefixScorer,
    PrefixAffinityFilter,
    RoleFilter,
    RoundRobinPicker,
    SessionScorer,
    WeightedRandomPicker,
)
from scorers.scheduler import Scheduler


def eps(n: int = 3, **kw) -> list[EndpointState]:
    return [EndpointState(id=f"e{i}", url=f"http://e{i}", models=frozenset({"m"}), **kw) for i in range(n)]


def ctx(**kw) -> RequestContext:
    base = dict(request_id="r", model="m", prompt_tokens=160, block_size=16, block_keys=list(range(10)))
    base.update(kw)
    return RequestContext(**base)


def test_filters_health_role_model_and_lora():
    fleet = eps(4)
    fleet[0].healthy = False
    fleet[1].role = "prefill"
    fleet[2].role = "decode"
    fleet[3].models = frozenset({"other"})
    s = Scheduler.from_config(None)
    assert [e.id for e in s.schedule(ctx(), fleet).ranked] == ["e2"]
    assert [e.id for e in s.schedule(ctx(phase="prefill"), fleet).ranked] == ["e1"]
    fleet[2].loras = frozenset({"sql"})
    assert [e.id for e in s.schedule(ctx(phase="decode", lora="sql"), fleet).ranked] == ["e2"]
    assert s.schedule(ctx(phase="decode", lora="nope"), fleet).ranked == []
    # only prefill-role replicas left: a one-hop request may still use them
    only_prefill = [e for e in eps(2, role="prefill")]
    assert len(RoleFilter().filter(ctx(), only_prefill)) == 2


def test_precise_prefix_prefers_longest_gpu_match():
    fleet = eps(3)
    c = ctx(prefix={"e0": PrefixMatch(4, "GPU"), "e1": PrefixMatch(8, "CPU"), "e2": PrefixMatch(6, "GPU")})
    s = PrecisePrefixScorer(speculative_ttl_s=0).score(c, fleet)
    assert s == {"e0": 0.4, "e1": 0.4, "e2": 0.6}
    assert PrecisePrefixScorer().score(ctx(index_ok=False, prefix=c.prefix), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}
    assert PrecisePrefixScorer().score(ctx(block_keys=[]), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 0.0}


def test_speculative_entries_cover_event_lag_then_expire():
    now = [100.0]
    sc = PrecisePrefixScorer(speculative_ttl_s=2.0)
    sc.set_clock(lambda: now[0])
    fleet = eps(3)
    c = ctx()
    sc.on_dispatch(c, fleet[1])
    assert sc.score(ctx(), fleet)["e1"] == 1.0  # the index knows nothing yet, the memory does
    assert sc.score(ctx(block_keys=list(range(5)) + [99, 98]), fleet)["e1"] == pytest.approx(5 / 7)
    now[0] += 2.5
    assert sc.score(ctx(), fleet)["e1"] == 0.0
    sc.on_dispatch(c, fleet[2])
    sc.on_complete(c, fleet[2], ok=False)  # a failed dispatch is forgotten
    assert sc.score(ctx(), fleet)["e2"] == 0.0


def test_routed_prefix_memory_is_bounded():
    m = RoutedPrefixMemory(ttl_s=10, max_keys=50)
    for i in range(100):
        m.remember(list(range(i * 10, i * 10 + 10)), "e0")
    assert len(m) == 50
    assert m.match(list(range(990, 1000))) == {"e0": 10}
    assert m.match(list(range(0, 10))) == {}


def test_routed_prefix_memory_forget_is_per_endpoint_and_does_not_walk_keys():
    m = RoutedPrefixMemory(ttl_s=10, max_keys=100_000, clock=lambda: 5.0)
    for i in range(50_000):
        m.remember([i, i + 1], "e0")
    m.remember([1, 2, 3], "e1")
    m.forget("e0")
    assert m.match([1, 2, 3]) == {"e1": 3}  # e1 keeps its entries
    assert m.match([7, 8]) == {}  # e0's are gone
    m.remember([7, 8], "e0")  # a new dispatch after the failure counts again
    assert m.match([7, 8]) == {"e0": 2}
    m.forget("e0")
    m.forget("never-seen")
    assert m.match([7, 8]) == {}
    m.remember([1, 2, 3], "e0")
    assert m.match([1, 2, 3]) == {"e0": 3, "e1": 3}
    assert set(m._keys[1]) == {"e1", "e0#2"}  # dead slots pruned when a key is touched


def test_load_scorers_relative_to_candidates():
    fleet = eps(3)
    fleet[0].inflight_requests, fleet[1].inflight_requests, fleet[2].inflight_requests = 0, 5, 10
    s = InflightScorer(token_weight=0, requests_scale=5).score(ctx(), fleet)
    assert s == {"e0": 1.0, "e1": 0.5, "e2": pytest.approx(1 / 3)}  # (5 + 0) / (5 + load)
    assert InflightScorer().score(ctx(), eps(2)) == {"e0": 1.0, "e1": 1.0}  # idle fleet: no preference
    # one request more than an idle replica is a small difference, not 1 → 0
    fleet[1].inflight_requests = 1
    assert InflightScorer(token_weight=0).score(ctx(), fleet[:2])["e1"] == pytest.approx(0.8)


def test_estimated_ttft_trades_cache_against_queue():
    fleet = eps(2, prefill_tokens_per_s=1000.0)
    warm_busy = ctx(prompt_tokens=1600, prefix={"e0": PrefixMatch(100, "GPU")})
    fleet[0].inflight_prefill_tokens = 200  # 0.2 s of queued prefill on the warm replica
    s = EstimatedTTFTScorer().score(warm_busy, fleet)
    assert s["e0"] > s["e1"]  # 0.2 s queue beats recomputing 1.6 s
    fleet[0].inflight_prefill_tokens = 5000  # 5 s queue: the cold replica wins
    s = EstimatedTTFTScorer().score(warm_busy, fleet)
    assert s["e1"] > s["e0"]


def test_prefix_affinity_releases_when_warm_is_overloaded():
    fleet = eps(2, prefill_tokens_per_s=1000.0)
    c = ctx(prompt_tokens=160, prefix={"e0": PrefixMatch(10, "GPU")})
    f = PrefixAffinityFilter(threshold=0.8, margin_s=0.5)
    assert [e.id for e in f.filter(c, fleet)] == ["e0"]
    fleet[0].inflight_prefill_tokens = 2000
    assert len(f.filter(c, fleet)) == 2


def test_session_affinity():
    sc = SessionScorer(max_sessions=2)
    fleet = eps(3)
    sc.on_dispatch(ctx(session_id="a"), fleet[2])
    assert sc.score(ctx(session_id="a"), fleet) == {"e0": 0.0, "e1": 0.0, "e2": 1.0}
    sc.on_dispatch(ctx(session_id="b"), fleet[0])
    sc.on_dispatch(ctx(session_id="c"), fleet[0])
    assert sc.score(ctx(session_id="a"), fleet)["e2"] == 0.0  # evicted: bounded


def test_pickers():
    fleet = eps(4)
    scored = [(e, 0.5) for e in fleet]
    mp = MaxPicker(seed=1)
    firsts = collections.Counter(mp.pick(ctx(), scored)[0].id for _ in range(400))
    assert set(firsts) == {"e0", "e1", "e2", "e3"}  # ties spread
    assert MaxPicker().pick(ctx(), [(fleet[0], 0.1), (fleet[1], 0.9)])[0].id == "e1"
    rr = RoundRobinPicker()
    assert [rr.pick(ctx(), scored)[0].id for _ in range(5)] == ["e0", "e1", "e2", "e3", "e0"]
    wr = WeightedRandomPicker(temperature=0.05, seed=3)
    picks = collections.Counter(wr.pick(ctx(), [(fleet[0], 1.0), (fleet[1], 0.9), (fleet[2], 0.0)])[0].id for _ in range(500))
    assert picks["e0"] > picks["e1"] > picks["e2"]
    assert len(wr.pick(ctx(), scored)) == 4  # fallbacks follow the first pick
    assert MaxPicker().pick(ctx(), []) == []


@pytest.mark.parametrize(
    "cfg,fragment",
    [
        ({"profiles": {"p": {"scorers": [{"type": "nope"}]}}}, "unknown scorer 'nope'"),
        ({"profiles": {"p": {"scorers": [{"type": "inflight", "weight": -1}]}}}, "weight"),
        ({"profiles": {"p": {"scorers": [{"type": "inflight", "params": {"bogus": 1}}]}}}, "unknown parameters ['bogus']"),
        ({"profiles": {"p": {"picker": {"type": "weighted-random", "params": {"temperature": 0}}}}}, "temperature"),
        ({"profiles": {"p": {"filters": [{"type": "precise-prefix"}]}}}, "unknown filter"),
        ({"default_profile": "missing"}, "unknown profile"),
        ({"profiles": {"p": {"scorer": []}}}, "unknown keys"),
        ({"nonsense": 1}, "unknown keys"),
    ],
)
def test_config_errors_are_clear(cfg, fragment):
    with pytest.raises(ValueError) as e:
        Scheduler.from_config(cfg)
    assert fragment in str(e.value)


def test_header_override_only_when_allowed():
    assert Scheduler.from_config(None).profile_for({"x-kvgate-profile": "random"}) == "default"
    s = Scheduler.from_config({"allow_header_override": True})
    assert s.profile_for({"x-kvgate-profile": "random"}) == "random"
    assert s.profile_for({"x-kvgate-profile": "unknown"}) == "default"


def _toy_fleet_run(profile: str, seed: int = 0, scheduling: dict | None = None, cache_groups: int = 8) -> tuple[float, float]:
    """A pure-Python fleet: per-endpoint LRU caches holding ``cache_groups`` prefix groups, and
    in-flight counts. Requests from 24 groups arrive (cache pressure: 24 > 8 per endpoint, but
    24 <= 4 × 8 fleet-wide); a request is a hit when its endpoint still caches its group.
    Requests finish after a few later dispatches. Returns (hit rate, max/min requests served).
    """
    rng = random.Random(seed)
    s = Scheduler.from_config(scheduling)
    for prof in s.profiles.values():  # deterministic tie-breaks
        if hasattr(prof.picker, "rng"):
            prof.picker.rng.seed(seed)
    fleet = eps(4, prefill_tokens_per_s=5000.0)
    seen: dict[str, collections.OrderedDict] = {e.id: collections.OrderedDict() for e in fleet}
    served = collections.Counter()
    inflight: collections.deque = collections.deque()
    hits = total = 0
    for i in range(1200):
        g = rng.randrange(24)
        keys = [g * 1000 + j for j in range(20)]
        prefix = {e.id: PrefixMatch(20, "GPU") for e in fleet if g in seen[e.id]}
        c = ctx(request_id=str(i), block_keys=keys, prompt_tokens=330, prefix=prefix)
        e = s.schedule(c, fleet, profile).ranked[0]
        s.on_dispatch(c, e, profile)
        e.inflight_requests += 1
        e.inflight_prefill_tokens += c.uncached_tokens(e.id)
        hits += g in seen[e.id]
        total += 1
        seen[e.id][g] = True
        seen[e.id].move_to_end(g)
        if len(seen[e.id]) > cache_groups:
            seen[e.id].popitem(last=False)
        served[e.id] += 1
        inflight.append((c, e))
        if len(inflight) > 8:
            c0, e0 = inflight.popleft()
            e0.inflight_requests -= 1
            e0.inflight_prefill_tokens = max(0, e0.inflight_prefill_tokens - c0.uncached_tokens(e0.id))
            s.on_complete(c0, e0, True, profile)
    return hits / total, max(served.values()) / max(1, min(served.values()))


def test_default_beats_round_robin_on_hits_with_load_spread():
    # affinity assigns whole prefix groups (of random popularity) to replicas, so the request
    # spread cannot be as flat as round-robin's; measured 1.21–1.60 over these seeds
    for seed in range(6):
        hit_default, spread_default = _toy_fleet_run("default", seed)
        hit_rr, spread_rr = _toy_fleet_run("round-robin", seed)
        assert hit_default >= 0.95 and hit_rr <= 0.5  # cache pressure defeats blind spreading
        assert spread_default <= 1.7 and spread_rr <= 1.05
        hit_pp, _ = _toy_fleet_run("precise-prefix", seed)
        assert hit_pp > hit_rr


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["remember", "remember", "forget", "tick", "match", "match"]), st.lists(st.integers(0, 3), min_size=1, max_size=5), st.sampled_from(["e0", "e1", "e2"])), max_size=40))
@example([("remember", [1, 2], "e0"), ("remember", [1, 2, 3], "e1"), ("match", [1, 2, 3], "e0")])  # e0 drops out, e1 goes on
@example([("remember", [1, 2], "e0"), ("tick", [0] * 4, "e0"), ("remember", [1], "e0"), ("tick", [0] * 2, "e0"), ("match", [1, 2], "e0")])  # block 2 expired, block 1 refreshed
def test_routed_prefix_memory_match_equals_brute_force(ops):
    now = [0.0]
    m = RoutedPrefixMemory(ttl_s=3.0, max_keys=10_000, clock=lambda: now[0])
    model: dict[tuple[int, str], float] = {}  # (key, endpoint) → expiry
    for op, keys, ep in ops:
        if op == "remember":
            m.remember(keys, ep)
            for k in keys:
                model[(k, ep)] = now[0] + 3.0
        elif op == "forget":
            m.forget(ep)
            model = {kv: exp for kv, exp in model.items() if kv[1] != ep}
        elif op == "tick":
            now[0] += len(keys) * 0.5
        else:
            expected = {}
            for e in ("e0", "e1", "e2"):
                n = 0
                while n < len(keys) and model.get((keys[n], e), 0.0) > now[0]:
                    n += 1
                if n:
                    expected[e] = n
            assert m.match(keys) == expected


def test_two_scorers_of_one_type_keep_separate_breakdowns():
    s = Scheduler.from_config(
        {
            "profiles": {
                "two": {
                    "scorers": [
                        {"type": "precise-prefix", "weight": 1, "params": {"speculative_ttl_s": 0}},
                        {"type": "precise-prefix", "name": "pp-cpu-light", "weight": 1, "cpu_weight": 0.1, "speculative_ttl_s": 0},
                    ]
                }
            }
        }
    )
    scorers = [sc for sc, _ in s.profiles["two"].scorers]
    assert [sc.name for sc in scorers] == ["precise-prefix", "pp-cpu-light"]
    fleet = eps(2)
    d = s.schedule(ctx(prefix={"e0": PrefixMatch(10, "CPU"), "e1": PrefixMatch(4, "GPU")}), fleet, "two")
    assert d.breakdown == {"precise-prefix": {"e0": 0.5, "e1": 0.4}, "pp-cpu-light": {"e0": pytest.approx(0.1), "e1": 0.4}}
    assert d.scores == {"e0": pytest.approx(0.3), "e1": pytest.approx(0.4)}
    assert d.chosen is not None and d.chosen.id == "e1"
    with pytest.raises(ValueError, match=r"scheduling\.profiles\.p\.scorers\[1\]: name 'precise-prefix' is already used by scheduling\.profiles\.p\.scorers\[0\]; give one of them a distinct 'name'"):
        Scheduler.from_config({"profiles": {"p": {"scorers": [{"type": "precise-prefix"}, {"type": "precise-prefix", "cpu_weight": 0.1}]}}})
