"""``RoutedPrefixMemory``: the bounded, expiring memory behind precise-prefix's speculative entries and approx-prefix."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from scorers.memory import RoutedPrefixMemory


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


@pytest.mark.parametrize("ttl_s,max_keys", [(0, 10), (-1, 10), (1, 0)])
def test_routed_prefix_memory_rejects_non_positive_bounds(ttl_s, max_keys):
    with pytest.raises(ValueError, match="must be positive"):
        RoutedPrefixMemory(ttl_s=ttl_s, max_keys=max_keys)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["remember", "remember", "forget", "tick", "match", "match"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=5),
            st.sampled_from(["e0", "e1", "e2"]),
        ),
        max_size=40,
    )
)
@example([("remember", [1, 2], "e0"), ("remember", [1, 2, 3], "e1"), ("match", [1, 2, 3], "e0")])  # e0 drops out, e1 goes on
@example(
    [("remember", [1, 2], "e0"), ("tick", [0] * 4, "e0"), ("remember", [1], "e0"), ("tick", [0] * 2, "e0"), ("match", [1, 2], "e0")]
)  # block 2 expired, block 1 refreshed
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
