"""``approx-tree`` scorer: sglang-router's ``cache_aware`` policy, as a kvgate plugin.

The reference point for "approximate" prefix routing: a router that never hears from the
replicas' caches and keeps, per replica, a tree of the prompts it routed there. sglang-router
(``cache_aware``) matches each request against every replica's tree, sends it to the longest
match when that covers at least ``threshold`` of the prompt, and otherwise balances load; it
switches to pure load balancing while the fleet is imbalanced (max − min in-flight requests
above ``balance_abs_threshold`` and max above ``balance_rel_threshold`` × min), and bounds
each tree by size, least recently used leaves first. It never learns of an eviction on the
replica, a replica restarted empty, or what another router sent where: this plugin exists so
the benchmarks can show what the event-fed index (``precise-prefix``) buys over that.

Differences from sglang-router, and why:

* The tree is over the request's block keys (16-token blocks, chained over model, LoRA and
  cache salt) instead of raw characters: the gateway has them already, and because each key
  is chained over the whole prefix before it, a per-replica set of keys *is* the radix tree
  (a key's presence stands for its whole path). The match is block-granular; the prompt's
  last partial block is never matched, as on the replica itself.
* Below the threshold sglang-router picks the replica with the smallest tree (most room);
  here the least loaded (gateway-counted in-flight requests), as most approximate routers do.
* Eviction happens on insert (each tree stays within ``max_blocks``), not by a periodic
  sweep: memory is bounded at every instant. Touching a routed prompt's keys leaf first keeps
  every node more recent than its descendants, so the LRU victim is always a leaf and each
  tree stays prefix-closed, as with sglang-router's leaf-LRU eviction.
* Failed requests do not clear anything: sglang-router does not either (a worker's tree is
  left to LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Annotated, Any

from msgspec import Meta

from scorers.base import EndpointState, PluginParams, RequestContext, Scorer


class ReplicaTree:
    """The prompts routed to one replica: block keys in LRU order, bounded by count."""

    __slots__ = ("keys", "max_blocks")

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.keys: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def insert(self, keys: Sequence[int]) -> None:
        """Add (or refresh) a routed prompt's path; evict least recently used leaves past the bound."""
        store = self.keys
        for k in reversed(keys):  # leaf first: every ancestor ends up more recent than its descendants
            if k in store:
                store.move_to_end(k)
            else:
                store[k] = None
        while len(store) > self.max_blocks:
            store.popitem(last=False)

    def match(self, keys: Sequence[int]) -> int:
        """Leading blocks of ``keys`` in this tree (the longest routed prefix)."""
        store = self.keys
        n = 0
        for k in keys:
            if k not in store:
                break
            n += 1
        return n


class ApproxTreeScorer(Scorer):
    """sglang-router's ``cache_aware`` decision: longest routed prefix if it covers ``threshold``
    of the prompt, else the least loaded. Use it alone in a profile with the ``max`` picker: the
    scores are arranged so the top one is that decision (best match: 0.5 + 0.5 × load score,
    every other replica: 0.5 × load score; below the threshold: the load score alone), and the
    rest rank as fallbacks by load."""

    type_name = "approx-tree"

    class Params(PluginParams, frozen=True):
        #: least share of the prompt the longest routed prefix must cover to decide (sglang-router's
        #: ``cache_threshold``, default 0.3 in sglang-router 0.3)
        threshold: Annotated[float, Meta(ge=0, le=1)] = 0.3
        #: bound on each replica's tree, in blocks (2^17 blocks of 16 tokens = 2M tokens: like
        #: sglang-router's 2^26 characters, far more than a replica's KV cache holds)
        max_blocks: Annotated[int, Meta(ge=1)] = 131_072
        #: imbalanced when max − min in-flight requests exceeds this ... (sglang-router: 64)
        balance_abs_threshold: Annotated[int, Meta(ge=0)] = 64
        #: ... and max exceeds this × min; then the least loaded wins whatever the trees say (sglang-router: 1.5)
        balance_rel_threshold: Annotated[float, Meta(ge=1)] = 1.5

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        self.trees: dict[str, ReplicaTree] = {}

    def tree(self, endpoint_id: str) -> ReplicaTree:
        t = self.trees.get(endpoint_id)
        if t is None:
            t = self.trees[endpoint_id] = ReplicaTree(self.params.max_blocks)
        return t

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        if not endpoints:
            return {}
        loads = {e.id: e.total_inflight_requests for e in endpoints}
        lo, hi = min(loads.values()), max(loads.values())
        by_load = {k: (1.0 + lo) / (1.0 + v) for k, v in loads.items()}  # 1 for the least loaded
        p = self.params
        if hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo:
            return by_load
        keys = ctx.block_keys
        if not keys:
            return by_load
        matched = {e.id: (self.trees[e.id].match(keys) if e.id in self.trees else 0) for e in endpoints}
        best = max(matched.values())
        if best == 0:
            return by_load
        ratio = min(1.0, best * ctx.block_size / ctx.prompt_tokens) if ctx.prompt_tokens > 0 else best / len(keys)
        if ratio < p.threshold:
            return by_load
        return {k: (0.5 + 0.5 * s) if matched[k] == best else 0.5 * s for k, s in by_load.items()}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        if ctx.block_keys:
            self.tree(endpoint.id).insert(ctx.block_keys)
