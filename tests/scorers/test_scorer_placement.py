"""``placement`` scorer: new prefixes spread by count over the replicas; warm requests untouched."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import PHASE_DECODE, PHASE_PREFILL, Scorer
from scorers.scheduler import Scheduler
from scorers.scorer.placement import PlacementScorer
from tests.helpers.scorers import build, config_error, ctx, eps


def keys(family: int, n: int = 10) -> list[int]:
    """Block keys of a prompt of ``n`` blocks whose family (system prompt) is ``family``."""
    return [family * 1000 + i for i in range(n)]


def place(sc: PlacementScorer, fleet, family: int) -> str:
    """Score a new prompt of ``family``, dispatch it to the best-scored replica (ties: first)."""
    c = ctx(block_keys=keys(family))
    s = sc.score(c, fleet)
    best = max(fleet, key=lambda e: s[e.id])
    sc.on_dispatch(c, best)
    return best.id


def test_param_defaults_and_errors():
    sc = build(Scorer, {"type": "placement", "weight": 2})
    assert isinstance(sc, PlacementScorer)
    assert sc.params == PlacementScorer.Params(cold_fraction=0.5, window=64, halving=1.0, memory_ttl_s=2.0, memory_max_keys=100_000)
    assert config_error(Scorer, {"type": "placement", "cold_fraction": 0}) == "placement: parameter 'cold_fraction': expected `float` > 0.0, got 0"
    assert config_error(Scorer, {"type": "placement", "window": 0}) == "placement: parameter 'window': expected `int` >= 1, got 0"
    assert config_error(Scorer, {"type": "placement", "halving": -1}) == "placement: parameter 'halving': expected `float` > 0.0, got -1"


def test_new_prefixes_take_turns_over_the_replicas():
    sc, fleet = PlacementScorer(), eps(4)
    placed = [place(sc, fleet, f) for f in range(16)]
    assert sorted(sc.counts().values()) == [4, 4, 4, 4]
    assert len(set(placed[:4])) == 4


def test_score_halves_per_placement_above_the_fewest():
    sc, fleet = PlacementScorer(), eps(3)
    for f, e in enumerate([fleet[0], fleet[0], fleet[1]]):
        sc.on_dispatch(ctx(block_keys=keys(f)), e)
    assert sc.score(ctx(block_keys=keys(9)), fleet) == {"e0": 0.25, "e1": 0.5, "e2": 1.0}
    slow = PlacementScorer(halving=2)
    for f, e in enumerate([fleet[0], fleet[0], fleet[1]]):
        slow.on_dispatch(ctx(block_keys=keys(f)), e)
    assert slow.score(ctx(block_keys=keys(9)), fleet) == pytest.approx({"e0": 0.5, "e1": 0.5**0.5, "e2": 1.0})


def test_warm_requests_score_one_everywhere():
    sc, fleet = PlacementScorer(), eps(3)
    sc.on_dispatch(ctx(block_keys=keys(1)), fleet[0])
    half = ctx(block_keys=keys(2), prefix={"e1": PrefixMatch(5, "GPU")})  # a replica holds half of it
    assert sc.score(half, fleet) == {"e0": 1.0, "e1": 1.0, "e2": 1.0}
    less = ctx(block_keys=keys(2), prefix={"e1": PrefixMatch(4, "GPU")})  # 4 of 10: still new
    assert sc.score(less, fleet) == {"e0": 0.5, "e1": 1.0, "e2": 1.0}
    claimed = ctx(block_keys=keys(2), peer_prefix={"e2": 6})  # another gateway just routed it
    assert sc.score(claimed, fleet) == {"e0": 1.0, "e1": 1.0, "e2": 1.0}
    # the index is down: its matches say nothing, the request is new as far as routing knows
    down = ctx(block_keys=keys(2), prefix={"e1": PrefixMatch(9, "GPU")}, index_ok=False)
    assert sc.score(down, fleet) == {"e0": 0.5, "e1": 1.0, "e2": 1.0}
    assert sc.score(ctx(block_keys=[]), fleet) == {"e0": 1.0, "e1": 1.0, "e2": 1.0}
    # a decode hop follows its prefill: never a placement, never counted
    dec = ctx(block_keys=keys(3), phase=PHASE_DECODE)
    assert sc.score(dec, fleet) == {"e0": 1.0, "e1": 1.0, "e2": 1.0}
    sc.on_dispatch(dec, fleet[1])
    assert dict(sc.counts()) == {"e0": 1}
    sc.on_dispatch(ctx(block_keys=keys(4), phase=PHASE_PREFILL), fleet[1])  # a prefill hop places
    assert dict(sc.counts()) == {"e0": 1, "e1": 1}


def test_siblings_before_the_events_follow_instead_of_counting():
    now = [0.0]
    sc, fleet = PlacementScorer(), eps(2)
    sc.set_clock(lambda: now[0])
    first = ctx(block_keys=keys(1))
    sc.on_dispatch(first, fleet[0])
    sibling = ctx(block_keys=[*keys(1, 8), 77, 78])  # same system prompt, its own question
    assert sc.score(sibling, fleet) == {"e0": 1.0, "e1": 1.0}
    sc.on_dispatch(sibling, fleet[0])
    sc.on_dispatch(first, fleet[1])  # a retry of the first elsewhere: counted once
    assert dict(sc.counts()) == {"e0": 1}
    now[0] = 2.5  # the memory expired (the index holds the prompt by now, or it never came)
    sc.on_dispatch(sibling, fleet[1])
    assert dict(sc.counts()) == {"e0": 1, "e1": 1}


def test_a_failed_replica_loses_its_memory_not_its_count():
    sc, fleet = PlacementScorer(), eps(2)
    c = ctx(block_keys=keys(1))
    sc.on_dispatch(c, fleet[0])
    sc.on_complete(c, fleet[0], ok=False)
    sc.on_dispatch(c, fleet[1])  # the retry places it afresh
    assert dict(sc.counts()) == {"e0": 1, "e1": 1}


def test_only_the_last_window_counts():
    sc, fleet = PlacementScorer(window=3), eps(2)
    for f in range(3):
        sc.on_dispatch(ctx(block_keys=keys(f)), fleet[0])
    sc.on_dispatch(ctx(block_keys=keys(5)), fleet[1])
    assert dict(sc.counts()) == {"e0": 2, "e1": 1}
    for f in range(6, 9):
        sc.on_dispatch(ctx(block_keys=keys(f)), fleet[1])
    assert dict(sc.counts()) == {"e1": 3}


def test_other_gateways_placements_count():
    sc = PlacementScorer()
    fleet = eps(3)
    fleet[1].peer_placements = 2
    sc.on_dispatch(ctx(block_keys=keys(1)), fleet[0])
    assert sc.score(ctx(block_keys=keys(2)), fleet) == {"e0": 0.5, "e1": 0.25, "e2": 1.0}


def test_scheduler_sums_every_profiles_placements():
    profile = "default"
    sched = Scheduler.from_config({"profiles": {"mine": {"scorers": [{"type": "placement"}], "picker": {"type": "max"}}}})
    fleet = eps(2)
    a, b = ctx(block_keys=keys(1)), ctx(block_keys=keys(2))
    sched.on_dispatch(a, fleet[0], profile)
    sched.on_dispatch(b, fleet[0], "mine")
    assert sched.placement_counts() == {"e0": 2}
    # the default profile places the next new prefix on the other replica
    assert sched.schedule(ctx(block_keys=keys(3)), fleet, profile).chosen.id == "e1"


def test_a_lost_cache_takes_its_placements_along():
    sc, fleet = PlacementScorer(), eps(2)
    for f in range(3):
        sc.on_dispatch(ctx(block_keys=keys(f)), fleet[f % 2])
    sibling = ctx(block_keys=keys(0))
    assert sc.score(sibling, fleet) == {"e0": 1.0, "e1": 1.0}  # warm: its family was just placed on e0
    sc.on_cache_lost("e0")  # cleared or restarted: what was placed there is gone
    assert dict(sc.counts()) == {"e1": 1}
    assert sc.score(sibling, fleet) == {"e0": 1.0, "e1": 0.5}  # a new prefix again, e0 the emptier
    sc.on_cache_lost("e9")  # never placed on: nothing happens
    assert dict(sc.counts()) == {"e1": 1}


def test_the_scheduler_passes_a_lost_cache_to_every_profile():
    sched = Scheduler.from_config({"profiles": {"mine": {"scorers": [{"type": "placement"}], "picker": {"type": "max"}}}})
    fleet = eps(2)
    sched.on_dispatch(ctx(block_keys=keys(1)), fleet[0], "default")
    sched.on_dispatch(ctx(block_keys=keys(2)), fleet[0], "mine")
    sched.on_dispatch(ctx(block_keys=keys(3)), fleet[1], "mine")
    sched.on_cache_lost("e0")
    assert sched.placement_counts() == {"e1": 1}
