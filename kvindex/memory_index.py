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

from .events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EventBatch
from .hashing import chain_keys, root_key
from .index import TIER_NAMES, ApplyStats, KVIndex, PrefixMatch, medium_tier

#: Fastest tier bit held, indexed by a 3-bit tier mask (0 = nothing held).
BEST_TIER = (0, 1, 2, 1, 4, 1, 2, 1)
#: Name of the slowest tier in an OR of best-tier bits, indexed by that 3-bit value.
SLOWEST_TIER_NAME = tuple(TIER_NAMES[1 << (v.bit_length() - 1)] if v else "GPU" for v in range(8))


def event_salt(ev: BlockStored) -> str | None:
    """The cache salt of a prompt's first BlockStored event, from block 0's extra keys.

    vLLM hashes ``cache_salt`` into block 0 only, as an extra key. Two encodings are accepted:

    * tagged entries (vLLM 0.33's hashing form): block 0's extra keys contain
      ``("cache_salt", salt)`` (a list after msgpack) -> that salt;
    * untagged (what 0.33 events carry): block 0's extra keys are plain values such as
      ``[lora_name, salt]`` or ``[salt]``; vLLM appends the salt after the LoRA name and the
      multimodal ``[identifier, offset]`` pairs (prompt-embedding hashes, bytes, may follow),
      so we take the last string entry that is not the event's LoRA name. Caveat: a bare
      string that is not a salt (a future extra key) is taken for one; such prompts get a key
      no request matches (a missed hit, never a wrong one);
    * typed (vLLM builds that publish ``ExtraKey`` structs): entries are maps such as
      ``{"type": "cache_salt", "salt": salt}`` next to ``{"type": "lora", "name": ...}``.
    """
    extra = ev.extra_keys
    if not extra:
        return None
    first = extra[0]
    if isinstance(first, str):
        return first if first != ev.lora_name else None
    if not isinstance(first, (list, tuple)):
        return None
    fallback: str | None = None
    for entry in first:
        if isinstance(entry, (list, tuple)):
            if len(entry) == 2 and entry[0] == "cache_salt" and isinstance(entry[1], str):
                return entry[1]
        elif isinstance(entry, dict):
            if entry.get("type") == "cache_salt" and isinstance(entry.get("salt"), str):
                return entry["salt"]
        elif isinstance(entry, str) and entry != ev.lora_name:
            fallback = entry
    return fallback


def is_primary_group(group_idx: int | None) -> bool:
    """Whether an event belongs to KV-cache group 0 (or carries no group, as older vLLM).

    Hybrid models publish one event stream per KV-cache group with the same token blocks; a
    sliding-window group evicts blocks the full-attention group keeps, so only group 0 is
    indexed (ordinary models have only group 0).
    """
    return group_idx is None or group_idx == 0


def needs_known_first(ev: BlockStored) -> bool:
    """Whether a prompt-starting event lacks what its root key needs (no extra keys, so no
    cache salt): true of events from pools other than the GPU one, e.g. CPU offloading."""
    return ev.parent_block_hash is None and not ev.extra_keys and bool(ev.block_hashes)


def stored_keys(
    ev: BlockStored, parent_key: int | None, model: str, known_first: int | None = None
) -> list[int] | None:
    """Our chained keys for a BlockStored event, or None if it cannot be keyed.

    ``parent_key`` is the resolved key of ``ev.parent_block_hash`` (ignored when the event
    starts a prompt). ``known_first`` is the key the replica's map already holds for the
    event's first engine hash, if any: for a prompt-starting event without extra keys (a
    CPU-offload copy of a salted prompt says nothing of the salt) it is the better source,
    since the engine hash already covers the salt. None is returned for an unknown parent
    or a malformed block size.
    """
    bs = ev.block_size
    if not isinstance(bs, int) or bs <= 0:
        return None
    if ev.parent_block_hash is None:
        if known_first is not None and needs_known_first(ev):
            if len(ev.token_ids) < bs:
                return []
            return [known_first, *chain_keys(known_first, ev.token_ids[bs:], bs)]
        lora = ev.lora_name
        if lora is None and ev.lora_id is not None:
            # the oldest events carry only the adapter's int id: keep its blocks apart from the
            # base model's (requests name adapters, so they miss; they never match wrongly)
            lora = f"\x00lora-id:{ev.lora_id}"
        parent_key = root_key(model, lora, event_salt(ev))
    if parent_key is None:
        return None
    return chain_keys(parent_key, ev.token_ids, bs)


def evict_oldest(d: dict[Any, Any], bound: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict down to ``bound - bound // 32``."""
    target = bound - bound // 32
    for k in list(islice(d, len(d) - target)):
        del d[k]


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
            keys = stored_keys(ev, None, model, hashes.get(block_hashes[0]) if block_hashes else None)
        else:
            keys = stored_keys(ev, hashes.get(parent), model)
        if keys is None:
            stats.orphaned += len(block_hashes)
            return
        self._note_block_size(model, ev.block_size)
        if len(keys) != len(block_hashes):  # token_ids and hashes disagree: key what both cover
            stats.orphaned += max(0, len(block_hashes) - len(keys))
            keys = keys[: len(block_hashes)]
        # The map needs no LRU refresh: entries leave it on BlockRemoved; the bound only
        # catches leaks from lost events, so oldest-inserted-first is good enough.
        hashes.update(zip(block_hashes, keys))
        tier = medium_tier(ev.medium)
        epoch = st.epoch
        fresh = tier | epoch << 3
        shared = {replica: fresh}
        blocks = self._blocks
        olds = list(map(blocks.pop, keys, repeat(None)))  # popped: reinsertion refreshes the LRU
        if olds.count(None) == len(olds):
            blocks.update(zip(keys, repeat(shared)))
        else:
            last_old: dict[str, int] | None = None
            last_new: dict[str, int] = shared
            for k, old in zip(keys, olds):
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
            v = None if old is None else old.get(replica)
            if v is None:  # the block key was evicted from the index: nothing left to clear
                del hashes[h]
                continue
            v &= keep
            if v & 7 == 0:
                del hashes[h]
            if old is not last_old:  # copy-on-write, once per distinct shared value
                last_old = old
                last_new = old.copy()  # type: ignore[union-attr]
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
        self._epochs.pop(replica, None)

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
            for r, w in zip(names, worst):
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
