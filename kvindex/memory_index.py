"""The embedded index backend: plain Python containers on the gateway's event loop.

Layout (all O(1) per block, no locks: everything runs on one asyncio loop):

* ``_blocks``: dict ``our key -> {replica: mask | epoch << 3}``, bounded by ``max_blocks``.
  The value dicts are copy-on-write, never changed in place: the blocks of one BlockStored
  event share one dict, which makes bulk ingest a C-level ``dict.update`` and lets lookups
  skip per-replica checks on an identity test.
  Insertion order is the LRU order: storing a block pops and reinserts it, and a lookup that
  matches blocks marks them in ``_touched`` (one C-level ``set.update``; moving every hit to
  the end of the dict would cost the lookup more). Eviction gives marked entries a second
  chance (reinserted at the young end, mark spent) and removes the oldest unmarked ones,
  so a hot prefix that vLLM stored once and never re-announces (a cache hit publishes
  nothing) stays indexed while it is being hit: approximate LRU (CLOCK), O(1) amortised.
  Eviction removes the oldest entries in bulk (down to ``max_blocks - max_blocks // 32``)
  rather than one at a time, because finding a dict's first live entry means skipping every deleted slot before
  it: evicting one entry per insert was measured to be quadratic (minutes for 2M stores at a
  200k bound), in bulk it is one scan per ~max/32 inserts. OrderedDict avoids that too but
  cost ~40% more per stored block.
* ``mask`` is the tier bitmask (``TIER_GPU | TIER_CPU | TIER_STORAGE``) and ``epoch`` the
  replica's trust epoch when the entry was written. An entry counts only while its epoch is the
  replica's current one, so ``mark_untrusted`` and ``drop_replica`` are O(1): they hand the
  replica a fresh epoch and the old entries fall invisible (and are overwritten or evicted
  later). Epochs come from one index-wide counter, so a replica that is dropped and comes
  back can never resurrect its old entries.
* ``_replicas``: per replica, the engine-hash -> our-key map that resolves BlockRemoved and
  chains BlockStored events whose parent was stored earlier. Entries leave it when their
  block leaves every tier; the ``max_blocks`` bound (oldest inserted first) only catches
  leaks from lost events.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice, repeat
from typing import Any

from .event_rules import BEST_TIER, SLOWEST_TIER_NAME, evict_oldest, is_primary_group, lookahead_of, stored_keys
from .events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EventBatch
from .index import ApplyStats, KVIndex, PrefixMatch, medium_tier


class _Replica:
    """What the index keeps per replica: its trust epoch and engine-hash -> key map."""

    __slots__ = ("epoch", "hashes")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.hashes: dict[BlockHash, int] = {}


class MemoryIndex(KVIndex):
    """Bounded in-process index (the default backend)."""

    def __init__(self, max_blocks: int = 2_000_000) -> None:
        super().__init__()
        if max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        self.max_blocks = max_blocks
        self._blocks: dict[int, dict[str, int]] = {}
        self._replicas: dict[str, _Replica] = {}
        self._epochs: dict[str, int] = {}  # replica -> current epoch (mirrors _replicas, for lookup)
        self._next_epoch = 0
        self._touched: set[int] = set()  # keys matched by lookups since the last eviction

    # ---------------------------------------------------------------- replica state

    def _replica(self, replica: str) -> _Replica:
        st = self._replicas.get(replica)
        if st is None:
            st = self._replicas[replica] = _Replica(self._new_epoch())
            self._epochs[replica] = st.epoch
        return st

    def _new_epoch(self) -> int:
        self._next_epoch += 1
        return self._next_epoch

    # ---------------------------------------------------------------- writes

    async def apply(self, replica: str, batch: EventBatch, *, model: str) -> ApplyStats:
        stats = ApplyStats()
        st = self._replica(replica)
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                if is_primary_group(ev.group_idx):
                    self._store(replica, st, ev, model, stats)
            elif isinstance(ev, BlockRemoved):
                if is_primary_group(ev.group_idx):
                    self._remove(replica, st, ev, stats)
            elif isinstance(ev, AllBlocksCleared):
                self._forget(replica)
                st = self._replica(replica)
                stats.cleared += 1
        self._evict()
        return stats

    def _store(self, replica: str, st: _Replica, ev: BlockStored, model: str, stats: ApplyStats) -> None:
        """Key the event's blocks and record ``replica`` on each.

        Hot path, written for bulk events: the blocks are popped with one C-level ``map`` and,
        when none was indexed yet (the usual case), reinserted with one ``dict.update``, all
        sharing one value dict (values are copy-on-write, see ``_blocks``).
        """
        hashes = st.hashes
        parent = ev.parent_block_hash
        block_hashes = ev.block_hashes
        if parent is None:
            keys = stored_keys(ev, None, model, hashes.get(block_hashes[0]) if block_hashes else None, self._root_checks.get(model))
        else:
            keys = stored_keys(ev, hashes.get(parent), model, check=self._root_checks.get(model))
        if keys is None:
            stats.orphaned += len(block_hashes)
            return
        self._note_block_size(model, ev.block_size, lookahead_of(ev))
        if len(keys) != len(block_hashes):  # token_ids and hashes disagree: key what both cover
            stats.orphaned += max(0, len(block_hashes) - len(keys))
            keys = keys[: len(block_hashes)]
        # The map needs no LRU refresh: entries leave it on BlockRemoved; the bound only
        # catches leaks from lost events, so oldest-inserted-first is good enough.
        hashes.update(zip(block_hashes, keys, strict=False))  # keys may be fewer (orphaned tail)
        tier = medium_tier(ev.medium)
        epoch = st.epoch
        fresh = tier | epoch << 3
        shared = {replica: fresh}
        blocks = self._blocks
        olds = list(map(blocks.pop, keys, repeat(None)))  # popped: reinsertion refreshes the LRU
        if olds.count(None) == len(olds):
            blocks.update(zip(keys, repeat(shared), strict=False))  # repeat() is endless
        else:
            last_old: dict[str, int] | None = None
            last_new: dict[str, int] = shared
            for k, old in zip(keys, olds, strict=True):
                if old is None:
                    blocks[k] = shared
                elif old is last_old:  # shared before, shared after: same result
                    blocks[k] = last_new
                else:
                    v = old.get(replica)
                    new = v | tier if v is not None and v >> 3 == epoch else fresh
                    if new == v:
                        d = old
                    else:
                        d = old.copy()
                        d[replica] = new
                    blocks[k] = last_new = d
                    last_old = old
        stats.stored += len(keys)
        if len(hashes) > self.max_blocks:
            evict_oldest(hashes, self.max_blocks)

    def _remove(self, replica: str, st: _Replica, ev: BlockRemoved, stats: ApplyStats) -> None:
        """Clear one tier bit per resolved block; forget the hash once no tier holds it."""
        hashes = st.hashes
        blocks = self._blocks
        keep = ~medium_tier(ev.medium)
        n = 0
        last_old: dict[str, int] | None = None
        last_new: dict[str, int] = {}
        for h in ev.block_hashes:
            k = hashes.get(h)
            if k is None:
                continue
            n += 1
            old = blocks.get(k)
            if old is None or (v := old.get(replica)) is None:  # the block key was evicted from the index: nothing left to clear
                del hashes[h]
                continue
            v &= keep
            if v & 7 == 0:
                del hashes[h]
            if old is not last_old:  # copy-on-write, once per distinct shared value
                last_old = old
                last_new = old.copy()
                if v & 7:
                    last_new[replica] = v
                else:
                    del last_new[replica]
            if last_new:
                blocks[k] = last_new  # an existing key keeps its LRU position
            else:
                del blocks[k]
        stats.removed += n

    def _forget(self, replica: str) -> None:
        self._replicas.pop(replica, None)
        if self._epochs.pop(replica, None) is not None:
            self.cache_lost(replica)

    def _evict(self) -> None:
        """Down to ``max_blocks - max_blocks // 32`` entries, oldest first, except that entries
        matched by a lookup since they were last passed over are moved to the young end instead
        (their mark is spent)."""
        blocks = self._blocks
        if len(blocks) <= self.max_blocks:
            return
        touched = self._touched
        if not touched:
            evict_oldest(blocks, self.max_blocks)
            return
        target = self.max_blocks - self.max_blocks // 32
        pop = blocks.pop
        while len(blocks) > target:  # each pass deletes or unmarks every candidate: terminates
            for k in list(islice(blocks, len(blocks) - target)):
                if k in touched:
                    touched.discard(k)
                    blocks[k] = pop(k)  # second chance: now the youngest
                else:
                    del blocks[k]

    async def drop_replica(self, replica: str) -> None:
        self._forget(replica)

    async def mark_untrusted(self, replica: str) -> None:
        st = self._replicas.get(replica)
        if st is not None:
            st.epoch = self._epochs[replica] = self._new_epoch()
            self.cache_lost(replica)

    # ---------------------------------------------------------------- reads

    async def lookup(self, keys: Sequence[int], *, model: str = "") -> dict[str, PrefixMatch]:
        """Longest consecutive prefix per replica. ``model`` is implied by the keys' root."""
        return self.lookup_now(keys)

    def lookup_now(self, keys: Sequence[int]) -> dict[str, PrefixMatch]:
        """Synchronous lookup (the memory backend never waits); see ``lookup``.

        Walks the keys once, carrying the replicas still consecutive as parallel lists, and
        stops at the first key none of them holds in its current epoch. Fast path: when a
        block's value is the previous block's (the same shared dict, or an equal one: C-level
        tests, the usual case along a shared prefix), every carried replica holds it in the
        same tiers, so the per-replica checks are skipped.
        """
        if not keys:
            return {}
        blocks = self._blocks
        prev = blocks.get(keys[0])
        if not prev:
            return {}
        names, expect, worst = self._carried(prev)
        if not names:
            return {}
        out: dict[str, PrefixMatch] = {}
        best = BEST_TIER
        depth = 1
        for d in map(blocks.get, islice(keys, 1, None)):
            if d is not prev:
                if d is None:
                    break
                if d != prev:
                    dget = d.get
                    lost = False
                    for j, r in enumerate(names):
                        v = dget(r)
                        if v is not None and v >> 3 == expect[j]:
                            worst[j] |= best[v & 7]
                        else:
                            out[r] = PrefixMatch(depth, SLOWEST_TIER_NAME[worst[j]])
                            expect[j] = -1
                            lost = True
                    if lost:
                        keep = [j for j, e in enumerate(expect) if e >= 0]
                        if not keep:
                            break
                        names = [names[j] for j in keep]
                        expect = [expect[j] for j in keep]
                        worst = [worst[j] for j in keep]
                prev = d  # equal or not: later blocks of this run share d itself
            depth += 1
        if names and expect[0] >= 0:  # still carried at the end (not all lost at a break)
            for r, w in zip(names, worst, strict=True):
                out[r] = PrefixMatch(depth, SLOWEST_TIER_NAME[w])
        if out:
            touched = self._touched
            touched.update(keys[: max(m.blocks for m in out.values())])
            if len(touched) > self.max_blocks:  # bound it when evictions are rare
                touched.clear()
        return out

    def _carried(self, first: dict[str, int]) -> tuple[list[str], list[int], list[int]]:
        """Replicas holding the first block in their current epoch: names, epochs, tier bits."""
        epochs = self._epochs
        names: list[str] = []
        expect: list[int] = []
        worst: list[int] = []
        for r, v in first.items():
            ep = epochs.get(r)
            if ep is not None and v >> 3 == ep:
                names.append(r)
                expect.append(ep)
                worst.append(BEST_TIER[v & 7])
        return names, expect, worst

    async def block_count(self) -> int:
        return len(self._blocks)

    async def ping(self) -> bool:
        """Always reachable (kept for symmetry with RedisIndex.ping)."""
        return True

    def stats(self) -> dict[str, Any]:
        """Sizes for debugging and gauges."""
        return {
            "blocks": len(self._blocks),
            "replicas": len(self._replicas),
            "hash_map_entries": sum(len(s.hashes) for s in self._replicas.values()),
        }
