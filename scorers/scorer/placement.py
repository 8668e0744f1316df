"""``placement`` scorer: a new prefix goes to the replica that took the fewest new prefixes lately."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from msgspec import Meta

from scorers.base import PHASE_DECODE, EndpointState, PluginParams, RequestContext, Scorer
from scorers.memory import RoutedPrefixMemory


class PlacementScorer(Scorer):
    """Where a prompt whose larger part no replica holds (a new system prompt, a new document)
    lands decides where every later request sharing it goes: prefix scoring keeps them there.
    Load scorers place such a prompt on whichever replica looks idlest at that instant, and on
    a burst of new prefixes "idlest" is noise: measured with 16 system prompts on 4 replicas,
    they settled 6/4/3/3, and the replica holding six served twice the requests of the others
    for the rest of the run (load spread 1.87) while its cache overflowed.

    So for a *placement* (the best cached fraction anywhere, counting the index, the other
    gateways' claims and this scorer's own recent placements, is below ``cold_fraction``)
    the score favours the replicas that took the fewest of the last ``window`` placements:
    1 for those, halved for every ``halving`` placements more. Every other request scores 1 everywhere,
    so warm routing is left exactly as it was. Counts are by placements, not by load: the
    load scorers still keep a new prefix off a replica that is busy now. With several gateways
    on one Redis index each publishes its counts with its load, read into
    ``EndpointState.peer_placements``. A replica whose cache is cleared, restarts or leaves
    loses its count (``on_cache_lost``): what was placed there is gone.
    """

    type_name = "placement"

    class Params(PluginParams, frozen=True):
        #: a request is a placement when no replica holds at least this fraction of its prompt
        cold_fraction: Annotated[float, Meta(gt=0, le=1)] = 0.5
        #: how many of this gateway's latest placements are counted
        window: Annotated[int, Meta(ge=1)] = 64
        #: every this many placements above the fewest halve a replica's score
        halving: Annotated[float, Meta(gt=0)] = 1.0
        #: a placement's siblings arriving before the replica's KV events follow it instead of
        #: counting as placements themselves
        memory_ttl_s: Annotated[float, Meta(gt=0)] = 2.0
        #: bound on that memory (block keys)
        memory_max_keys: Annotated[int, Meta(ge=1)] = 100_000

    params: Params

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        super().__init__(name=name, **params)
        p = self.params
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()
        self._placed = RoutedPrefixMemory(p.memory_ttl_s, p.memory_max_keys)

    def set_clock(self, clock: Callable[[], float]) -> None:
        self._placed.clock = clock

    def counts(self) -> Mapping[str, int]:
        """Per replica, how many of this scorer's last ``window`` placements went there."""
        return self._counts

    def is_placement(self, ctx: RequestContext) -> bool:
        n = len(ctx.block_keys)
        if n == 0 or ctx.phase == PHASE_DECODE:
            return False
        need = self.params.cold_fraction * n
        if ctx.index_ok and any(m.blocks >= need for m in ctx.prefix.values()):
            return False
        if any(d >= need for d in ctx.peer_prefix.values()):
            return False
        return not any(d >= need for d in self._placed.match(ctx.block_keys).values())

    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]:
        if not endpoints or not self.is_placement(ctx):
            return {e.id: 1.0 for e in endpoints}
        h = self.params.halving
        counts = {e.id: self._counts.get(e.id, 0) + e.peer_placements for e in endpoints}
        lo = min(counts.values())
        return {k: 0.5 ** ((c - lo) / h) for k, c in counts.items()}

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        # a retry of a placement finds the first attempt in the memory: counted once
        if not self.is_placement(ctx):
            return
        self._placed.remember(ctx.block_keys, endpoint.id)
        self._recent.append(endpoint.id)
        self._counts[endpoint.id] += 1
        if len(self._recent) > self.params.window:
            old = self._recent.popleft()
            left = self._counts[old] - 1
            if left:
                self._counts[old] = left
            else:
                del self._counts[old]

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        if not ok:  # its cache is in doubt: siblings of what it was given place afresh
            self._placed.forget(endpoint.id)

    def on_cache_lost(self, endpoint_id: str) -> None:
        """The prefixes placed there are gone with its cache: they no longer count against it."""
        self._placed.forget(endpoint_id)
        if self._counts.pop(endpoint_id, None) is not None:
            self._recent = deque(r for r in self._recent if r != endpoint_id)
