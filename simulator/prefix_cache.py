"""A paged KV cache with vLLM's prefix caching, and the events vLLM would publish for it.

Semantics follow vLLM's block pool: fixed-size blocks, a block becomes cacheable only when
full, it is identified by vLLM's chained block hash (same algorithm, seed and extra keys, so
the published hashes are the ones a real replica would publish), reuse is a walk over the
request's block hashes that stops at the first miss, blocks are pinned (ref-counted) while a
request uses them, and unreferenced blocks form an LRU free queue: taking a free block that
still holds a cached hash evicts it (BlockRemoved).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvindex.hashing import event_hash, hash_function, none_hash

from .vllm_versions import VllmProfile
from .vllm_versions import profile as vllm_profile


@dataclass(slots=True)
class Block:
    id: int
    ref: int = 0
    digest: bytes | None = None  # vLLM block hash once full and cached


class BlockKeys:
    """A request's per-block extra keys, for the hash and for the events.

    vLLM 0.33 hashes tagged entries — ``("lora", name, path)`` on every block and
    ``("cache_salt", salt)`` on block 0 — while its BlockStored events carry the same keys
    untagged (``[name, salt]`` on block 0, ``[name]`` after). ``lora_name``/``lora_id`` go
    into the events as vLLM sets them.
    """

    __slots__ = ("_e", "_e0", "_h", "_h0", "lora_id", "lora_name", "lora_path", "salt")

    def __init__(self, lora: str | None = None, lora_path: str | None = None, salt: str | None = None, lora_id: int | None = None) -> None:
        self.lora_name = lora
        self.lora_id = lora_id if lora else None
        self.lora_path = lora_path
        self.salt = salt
        lora_t = (("lora", lora, lora_path or f"/adapters/{lora}"),) if lora else ()
        salt_t = (("cache_salt", salt),) if salt else ()
        self._h0 = (lora_t + salt_t) or None
        self._h = lora_t or None
        self._e0 = ([lora] if lora else []) + ([salt] if salt else []) or None
        self._e = [lora] if lora else None

    def hash_key(self, i: int) -> tuple | None:
        return self._h0 if i == 0 else self._h

    def event_key(self, i: int) -> list | None:
        e = self._e0 if i == 0 else self._e
        return list(e) if e is not None else None


NO_KEYS = BlockKeys()


@dataclass(slots=True)
class Allocation:
    """Blocks a request holds: the cached prefix it reused plus the blocks it computes."""

    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # digests of the full blocks hashed so far
    cached_blocks: int = 0


class NoSpace(Exception):
    """Not enough free blocks right now: the request must wait."""


class PrefixCache:
    """vLLM's prefix cache for one replica, as a given release (``profile``) hashes and reports
    it. ``lookahead`` L > 0 is vLLM 0.33's lookahead block hashing (EAGLE drafters): a block's
    hash also covers the L tokens after it, so a block is hashed once those exist."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        algo: str = "sha256",
        seed: str | None = None,
        profile: VllmProfile | None = None,
        lookahead: int = 0,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.algo = algo
        self.seed = seed
        self.profile = profile or vllm_profile("0.33")
        if lookahead and not self.profile.lookahead:
            raise ValueError(f"vLLM {self.profile.release} has no lookahead block hashes")
        self.lookahead = lookahead
        self._hash = hash_function(algo)
        if seed is None and not self.profile.seeded_none_hash:
            self._none = os.urandom(32)  # as that release does without PYTHONHASHSEED: per process
        else:
            self._none = none_hash(algo, seed)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.pending: list[KVEvent] = []
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found cached

    # -- hashing --------------------------------------------------------------------------------

    def block_digest(self, parent: bytes | None, tokens: Sequence[int], extra: tuple | None) -> bytes:
        return self._hash((parent or self._none, tuple(tokens), extra))

    def hash_key(self, keys: BlockKeys, i: int) -> tuple | None:
        """Block ``i``'s extra keys in the hash, as this release forms them (without lookahead)."""
        if self.profile.salt_tagged:  # 0.33: precomputed on the keys
            return keys.hash_key(i)
        return self.profile.hash_extra(keys.lora_name, keys.lora_id, keys.lora_path, keys.salt, i)

    def hashable_blocks(self, n_tokens: int) -> int:
        """Full blocks of ``n_tokens`` that can be hashed (with lookahead, the L tokens after a
        block must exist too)."""
        return max(0, n_tokens - self.lookahead) // self.block_size

    def _digest(self, parent: bytes | None, tokens: Sequence[int], keys: BlockKeys, i: int) -> bytes:
        bs = self.block_size
        extra = self.hash_key(keys, i)
        L = self.lookahead
        if L:  # vLLM 0.33: the extra keys become (E, *next L tokens)
            end = (i + 1) * bs
            extra = (extra, tokens[end]) if L == 1 else (extra, *tokens[end : end + L])
        return self.block_digest(parent, tokens[i * bs : (i + 1) * bs], extra)

    def prompt_digests(self, tokens: Sequence[int], keys: BlockKeys = NO_KEYS, n_full: int | None = None) -> list[bytes]:
        """vLLM's chained digests of the first ``n_full`` (default: all) hashable blocks of ``tokens``."""
        out: list[bytes] = []
        parent = None
        n = self.hashable_blocks(len(tokens))
        if n_full is not None:
            n = min(n, n_full)
        for i in range(n):
            parent = self._digest(parent, tokens, keys, i)
            out.append(parent)
        return out

    # -- allocation -----------------------------------------------------------------------------

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def match_prefix(self, digests: Sequence[bytes]) -> int:
        n = 0
        for d in digests:
            if d not in self.cached:
                break
            n += 1
        return n

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.digest is not None:
            if self.cached.get(blk.digest) == bid:
                del self.cached[blk.digest]
                group = 0 if self.profile.extra_keys_in_events else None  # group_idx exists from 0.20 on
                self.pending.append(BlockRemoved(block_hashes=[event_hash(blk.digest)], medium="GPU", group_idx=group))
            blk.digest = None
        return bid

    def allocate_prompt(
        self, digests: Sequence[bytes], total_tokens: int, *, max_hit_blocks: int | None = None, prompt_tokens: int | None = None, count_query: bool = True
    ) -> Allocation:
        """Reuse the cached prefix of ``digests`` and reserve blocks for the rest of ``total_tokens``.

        ``max_hit_blocks`` caps the reuse (vLLM looks up at most ``prompt - 1`` tokens, so the
        last prompt token is always computed); ``prompt_tokens`` is what the query counters
        count (vLLM: the request's tokens). Raises NoSpace (changing nothing) when the free
        queue cannot cover the new blocks.
        """
        hit = self.match_prefix(digests)
        if max_hit_blocks is not None:
            hit = min(hit, max(0, max_hit_blocks))
        needed_blocks = -(-total_tokens // self.block_size)
        reused_ids = [self.cached[d] for d in digests[:hit]]
        reusable_free = sum(1 for b in reused_ids if self.blocks[b].ref == 0)
        new_blocks = needed_blocks - hit
        if new_blocks > len(self.free) - reusable_free:
            raise NoSpace
        alloc = Allocation(cached_blocks=hit)
        for bid in reused_ids:
            blk = self.blocks[bid]
            if blk.ref == 0:
                self.free.pop(bid, None)
            blk.ref += 1
            alloc.blocks.append(bid)
        alloc.digests = list(digests[:hit])
        for _ in range(new_blocks):
            bid = self._take_free()
            self.blocks[bid].ref = 1
            alloc.blocks.append(bid)
        if count_query:
            self.queries += total_tokens if prompt_tokens is None else prompt_tokens
            self.hits += hit * self.block_size
        return alloc

    def grow(self, alloc: Allocation, total_tokens: int) -> None:
        """Make sure ``alloc`` has blocks for ``total_tokens`` (decode spilling into a new block)."""
        while len(alloc.blocks) * self.block_size < total_tokens:
            if not self.free:
                raise NoSpace
            bid = self._take_free()
            self.blocks[bid].ref = 1
            alloc.blocks.append(bid)

    def commit_full_blocks(self, alloc: Allocation, tokens: Sequence[int], keys: BlockKeys = NO_KEYS) -> list[int]:
        """Hash and cache every block of ``alloc`` that ``tokens`` now fills; queue BlockStored.

        Returns the ids of newly cached blocks (for P/D, whose KV bytes get written).
        """
        full = self.hashable_blocks(len(tokens))
        start = len(alloc.digests)
        if full <= start:
            return []
        new_ids: list[int] = []
        run: list[int] = []  # block indexes of the current run of newly cached blocks
        parent = alloc.digests[-1] if alloc.digests else None
        for i in range(start, full):
            digest = self._digest(parent, tokens, keys, i)
            alloc.digests.append(digest)
            parent = digest
            bid = alloc.blocks[i]
            if digest in self.cached:  # an identical block is cached already (computed twice at once)
                self._emit_stored(alloc, run, tokens, keys)
                run = []
                continue
            self.blocks[bid].digest = digest
            self.cached[digest] = bid
            run.append(i)
            new_ids.append(bid)
        self._emit_stored(alloc, run, tokens, keys)
        return new_ids

    def _emit_stored(self, alloc: Allocation, run: list[int], tokens: Sequence[int], keys: BlockKeys) -> None:
        """One BlockStored for a run of consecutive blocks, chained to the block before it."""
        if not run:
            return
        bs = self.block_size
        first = run[0]
        L = self.lookahead
        if self.profile.salt_tagged:
            extra: list | None = [keys.event_key(i) for i in run]
        elif self.profile.extra_keys_in_events:
            extra = [self.profile.event_extra(keys.lora_name, keys.salt, i) for i in run]
        else:
            extra = None
        self.pending.append(
            BlockStored(
                block_hashes=[event_hash(alloc.digests[i]) for i in run],
                parent_block_hash=event_hash(alloc.digests[first - 1]) if first > 0 else None,
                token_ids=list(tokens[first * bs : (run[-1] + 1) * bs]),
                block_size=bs,
                lora_id=keys.lora_id,
                medium="GPU",
                lora_name=keys.lora_name if self.profile.lora_hash != "id" else None,
                extra_keys=extra,
                group_idx=0,
                lookahead_token_ids=[list(tokens[(i + 1) * bs : (i + 1) * bs + L]) for i in run] if L else None,
            )
        )

    def release(self, alloc: Allocation) -> None:
        """Unpin a request's blocks; cached ones go to the LRU tail, the tail block first."""
        for bid in reversed(alloc.blocks):
            blk = self.blocks[bid]
            blk.ref -= 1
            if blk.ref == 0:
                if blk.digest is None:
                    self.free[bid] = None
                    self.free.move_to_end(bid, last=False)  # holds nothing reusable: evict first
                else:
                    self.free[bid] = None
        alloc.blocks = []

    def reset(self, force: bool = False) -> bool:
        """Drop every cached block. vLLM refuses while blocks are in use, unless ``force``
        (``reset_running_requests``): then blocks in use stay allocated but stop being cached."""
        if not force and any(b.ref for b in self.blocks):
            return False
        for b in self.blocks:
            b.digest = None
        self.cached.clear()
        self.free = OrderedDict((b.id, None) for b in self.blocks if b.ref == 0)
        self.pending.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        out, self.pending = self.pending, []
        return out
