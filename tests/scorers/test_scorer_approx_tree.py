"""``approx-tree`` scorer: sglang-router's ``cache_aware`` policy (a per-replica tree of routed
prompts: longest match over a threshold, else least loaded, LRU-bounded, blind to evictions)."""

from __future__ import annotations

import pytest

from kvindex.index import PrefixMatch
from scorers.base import Scorer
from scorers.scheduler import Scheduler
from scorers.scorer.approx_tree import ApproxTreeScorer, ReplicaTree
from tests.helpers.scorers import build, config_error, ctx, eps

PROFILE = {"scorers": [{"type": "approx-tree"}], "picker": {"type": "max", "seed": 1}}


def top(sc: ApproxTreeScorer, c, fleet) -> str:
    scores = sc.score(c, fleet)
    best = max(scores.values())
    winners = [k for k, v in scores.items() if v == best]
    assert len(winners) == 1, scores
    return winners[0]


def test_param_defaults():
    sc = build(Scorer, "approx-tree")
    assert isinstance(sc, ApproxTreeScorer)
    assert sc.params == ApproxTreeScorer.Params(threshold=0.3, max_blocks=131_072, balance_abs_threshold=64, balance_rel_threshold=1.5)
    assert sc.name == "approx-tree" and sc.trees == {}


def test_named_instances_in_one_profile_keep_separate_trees():
    spec = {
        "scorers": [{"type": "approx-tree", "weight": 1}, {"type": "approx-tree", "name": "strict-tree", "weight": 1, "params": {"threshold": 0.9}}],
        "picker": {"type": "max"},
    }
    s = Scheduler.from_config({"profiles": {"t": spec}, "default_profile": "t"})
    (a, _), (b, _) = s.profiles["t"].scorers
    assert (a.name, b.name) == ("approx-tree", "strict-tree") and a.params.threshold == 0.3 and b.params.threshold == 0.9
    fleet = eps(2)
    s.on_dispatch(ctx(), fleet[1])
    assert isinstance(a, ApproxTreeScorer) and isinstance(b, ApproxTreeScorer) and a.trees is not b.trees
    decision = s.schedule(ctx(), fleet)
    assert decision.chosen is not None and decision.chosen.id == "e1"
    assert set(decision.breakdown) == {"approx-tree", "strict-tree"}
    same = {"profiles": {"t": {"scorers": [{"type": "approx-tree"}, {"type": "approx-tree"}]}}}
    with pytest.raises(ValueError, match=r"scorers\[1\]: name 'approx-tree' is already used"):
        Scheduler.from_config(same)


def test_unknown_params_rejected():
    assert config_error(Scorer, {"type": "approx-tree", "cache_threshold": 0.5}) == (
        "approx-tree: unknown parameters ['cache_threshold']; known: threshold, max_blocks, balance_abs_threshold, balance_rel_threshold"
    )
    with pytest.raises(ValueError, match=r"unknown parameters \['ttl_s'\]"):
        ApproxTreeScorer(ttl_s=10)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"threshold": 1.5}, "parameter 'threshold': expected `float` <= 1.0, got 1.5"),
        ({"threshold": -0.1}, "parameter 'threshold': expected `float` >= 0.0, got -0.1"),
        ({"threshold": "half"}, "parameter 'threshold': expected `float`, got 'half'"),
        ({"max_blocks": 0}, "parameter 'max_blocks': expected `int` >= 1, got 0"),
        ({"max_blocks": 2e5}, "parameter 'max_blocks': expected `int`, got 200000.0"),
        ({"balance_abs_threshold": -1}, "parameter 'balance_abs_threshold': expected `int` >= 0, got -1"),
        ({"balance_rel_threshold": 0.5}, "parameter 'balance_rel_threshold': expected `float` >= 1.0, got 0.5"),
        ({"balance_rel_threshold": float("inf")}, "parameter 'balance_rel_threshold': expected a finite number, got inf"),
    ],
)
def test_bad_values_rejected(params, message):
    assert config_error(Scorer, {"type": "approx-tree", "params": params}) == f"approx-tree: {message}"


def test_longest_routed_prefix_wins():
    sc = ApproxTreeScorer()
    fleet = eps(3)
    sc.on_dispatch(ctx(block_keys=[0, 1, 2, 3]), fleet[0])  # 4 of the prompt's 10 blocks
    sc.on_dispatch(ctx(block_keys=[0, 1, 2, 3, 4, 5, 6, 70, 80]), fleet[1])  # 7: shares 0..6
    sc.on_dispatch(ctx(block_keys=[9, 1, 2]), fleet[2])  # no common first block: no match
    assert [sc.trees[e.id].match(list(range(10))) for e in fleet] == [4, 7, 0]
    scores = sc.score(ctx(), fleet)
    assert scores == {"e0": 0.5, "e1": 1.0, "e2": 0.5}  # equal load: best match 0.5 + 0.5, others 0.5 x 1
    # the index is not consulted: only what this gateway sent
    assert sc.score(ctx(prefix={"e2": PrefixMatch(10, "GPU")}), fleet) == scores
    # the best match wins even when it is busier (the balance check aside)
    fleet[1].inflight_requests = 5
    assert top(sc, ctx(), fleet) == "e1"
    # among equal matches the least loaded wins
    sc.on_dispatch(ctx(), fleet[1])
    sc.on_dispatch(ctx(), fleet[2])
    assert top(sc, ctx(), fleet) == "e2"
    assert sc.score(ctx(), fleet) == {"e0": 0.5, "e1": 0.5 + 0.5 / 6, "e2": 1.0}


def test_threshold_on_the_share_of_the_prompt():
    sc = ApproxTreeScorer(threshold=0.5)
    fleet = eps(2)
    fleet[0].inflight_requests = 1  # e1 is the least loaded
    sc.on_dispatch(ctx(block_keys=[0, 1, 2, 3]), fleet[0])  # 4 blocks x 16 = 64 of 160 tokens: 0.4
    assert sc.score(ctx(), fleet) == {"e0": 1 / 2, "e1": 1.0}  # below 0.5: load alone
    sc.on_dispatch(ctx(block_keys=[0, 1, 2, 3, 4]), fleet[0])  # 80 of 160: 0.5 is enough
    assert top(sc, ctx(), fleet) == "e0"
    assert top(sc, ctx(prompt_tokens=161), fleet) == "e1"  # the partial last block counts against the match
    assert top(ApproxTreeScorer(threshold=0.0), ctx(), fleet) == "e1"  # nothing routed: load
    strict = ApproxTreeScorer(threshold=1.0)
    strict.on_dispatch(ctx(), fleet[0])
    assert top(strict, ctx(), fleet) == "e0"  # all 10 blocks of 160 tokens
    assert top(strict, ctx(prompt_tokens=170), fleet) == "e1"


def test_load_fallback_and_imbalance():
    sc = ApproxTreeScorer(balance_abs_threshold=4, balance_rel_threshold=2.0)
    fleet = eps(3)
    fleet[0].inflight_requests, fleet[1].inflight_requests, fleet[2].inflight_requests = 3, 1, 2
    assert sc.score(ctx(), fleet) == {"e0": 0.5, "e1": 1.0, "e2": 2 / 3}  # nothing routed yet
    assert sc.score(ctx(block_keys=[]), fleet) == {"e0": 0.5, "e1": 1.0, "e2": 2 / 3}  # no full block
    sc.on_dispatch(ctx(), fleet[0])
    assert top(sc, ctx(), fleet) == "e0"
    fleet[0].inflight_requests = 6  # 6 - 1 = 5 > 4 and 6 > 2 x 1: imbalanced, the least loaded wins
    assert top(sc, ctx(), fleet) == "e1"
    fleet[1].inflight_requests = 3  # 6 - 2 = 4, not > 4: balanced again, the tree decides
    assert top(sc, ctx(), fleet) == "e0"
    fleet[2].inflight_requests = 1  # 6 - 1 = 5 > 4 and 6 > 2 x 1: imbalanced
    assert top(sc, ctx(), fleet) == "e2"
    # a big gap between big numbers is no imbalance (30 is not > 2 x 20)
    fleet[0].inflight_requests, fleet[1].inflight_requests, fleet[2].inflight_requests = 30, 20, 20
    assert top(sc, ctx(), fleet) == "e0"
    # other gateways' published in-flight counts are load too
    fleet[0].inflight_requests, fleet[1].inflight_requests, fleet[2].inflight_requests = 0, 0, 0
    fleet[0].peer_inflight_requests = 9
    assert sc.score(ctx(), fleet) == {"e0": 0.1, "e1": 1.0, "e2": 1.0}
    assert sc.score(ctx(), []) == {}


def test_eviction_by_capacity_least_recently_used_leaves_first():
    sc = ApproxTreeScorer(max_blocks=6)
    fleet = eps(2)
    sc.on_dispatch(ctx(block_keys=[1, 2, 3, 4]), fleet[0])
    sc.on_dispatch(ctx(block_keys=[1, 2, 5]), fleet[0])  # shares 1, 2: 5 blocks in the tree
    assert len(sc.trees["e0"]) == 5 and "e1" not in sc.trees
    sc.on_dispatch(ctx(block_keys=[1, 2, 6, 7]), fleet[0])  # 7 > 6: the oldest leaf (4) goes first
    tree = sc.trees["e0"]
    assert len(tree) == 6 and list(tree.keys) == [3, 5, 7, 6, 2, 1]
    assert tree.match([1, 2, 3, 4]) == 3 and tree.match([1, 2, 5]) == 3 and tree.match([1, 2, 6, 7]) == 4
    sc.on_dispatch(ctx(block_keys=[8, 9]), fleet[0])  # evicts 3 and 5; the shared 1, 2 stay (recently used)
    assert tree.match([1, 2, 3]) == 2 and tree.match([1, 2, 5]) == 2 and tree.match([1, 2, 6, 7]) == 4 and tree.match([8, 9]) == 2
    assert len(tree) == 6
    # bounded per replica: the other replica's tree is untouched by e0's evictions
    sc.on_dispatch(ctx(block_keys=[1, 2]), fleet[1])
    assert sc.trees["e1"].match([1, 2, 3]) == 2


def test_prefix_closed_under_eviction():
    """Random routed paths through a small tree: whatever survives, every surviving key's
    ancestors survive too (the LRU victim is always a leaf)."""
    import random

    rng = random.Random(7)
    tree = ReplicaTree(max_blocks=40)
    parent: dict[int, int | None] = {}
    paths: list[list[int]] = []
    for i in range(300):
        if paths and rng.random() < 0.6:
            base = rng.choice(paths)
            path = base[: rng.randint(1, len(base))] + [1000 + i * 10 + j for j in range(rng.randint(0, 4))]
        else:
            path = [1000 + i * 10 + j for j in range(rng.randint(1, 6))]
        for a, b in zip([None, *path], path, strict=False):
            parent[b] = a
        paths.append(path)
        tree.insert(path)
        assert len(tree) <= 40
        for k in tree.keys:
            assert parent[k] is None or parent[k] in tree.keys


def test_never_sees_failures_or_evictions_on_the_replica():
    sc = ApproxTreeScorer()
    fleet = eps(2)
    sc.on_dispatch(ctx(), fleet[0])
    sc.on_complete(ctx(), fleet[0], ok=False)  # sglang-router keeps a failed worker's tree too
    assert top(sc, ctx(), fleet) == "e0"
    fleet[0].kv_usage = 0.0  # a replica restarted empty looks the same to it
    assert top(sc, ctx(index_ok=False), fleet) == "e0"


def test_as_a_profile_it_routes_like_cache_aware():
    s = Scheduler.from_config({"profiles": {"tree": PROFILE}, "default_profile": "tree"})
    fleet = eps(3)
    seen = []
    for prompt in range(3):  # three prompts, each new: least loaded each time
        c = ctx(block_keys=[prompt * 100 + i for i in range(10)])
        chosen = s.schedule(c, fleet).chosen
        assert chosen is not None
        s.on_dispatch(c, chosen)
        chosen.inflight_requests += 1
        seen.append(chosen.id)
    assert sorted(seen) == ["e0", "e1", "e2"]
    for prompt in range(3):  # the same prompts again follow their first request
        c = ctx(block_keys=[prompt * 100 + i for i in range(10)] + [7777])
        d = s.schedule(c, fleet)
        assert d.ranked[0].id == seen[prompt] and len(d.ranked) == 3
