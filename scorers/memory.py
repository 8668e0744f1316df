"""What the gateway itself routed where: bounded, expiring prefix memory.

Two plugins need it. ``precise-prefix`` keeps a short-lived copy (~2 s) of each dispatch's
block keys so that a burst of requests sharing a prefix follows the first one before the
replica's KV events reach the index (their lag is the classic cause of a cache-aware router
spraying one prefix across the fleet). ``approx-prefix`` keeps a longer one for replicas that
publish no events at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence


class RoutedPrefixMemory:
    """block key → {endpoint id: expiry}, LRU-bounded by key count."""

    def __init__(self, ttl_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_keys <= 0:
            raise ValueError("ttl_s and max_keys must be positive")
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[int, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def remember(self, keys: Sequence[int], endpoint: str) -> None:
        expiry = self.clock() + self.ttl_s
        store = self._keys
        for k in keys:
            holders = store.get(k)
            if holders is None:
                store[k] = {endpoint: expiry}
            else:
                holders[endpoint] = expiry
                store.move_to_end(k)
        while len(store) > self.max_keys:
            store.popitem(last=False)

    def forget(self, endpoint: str) -> None:
        for holders in self._keys.values():
            holders.pop(endpoint, None)

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Per endpoint, the longest consecutive prefix of ``keys`` routed there and not expired."""
        now = self.clock()
        store = self._keys
        alive: dict[str, int] | None = None
        for i, k in enumerate(keys):
            holders = store.get(k)
            if not holders:
                break
            current = {e for e, exp in holders.items() if exp > now}
            if alive is None:
                alive = {e: 1 for e in current}
                if not alive:
                    break
                continue
            still = False
            for e in list(alive):
                if alive[e] == i and e in current:
                    alive[e] = i + 1
                    still = True
            if not still:
                break
        return alive or {}
