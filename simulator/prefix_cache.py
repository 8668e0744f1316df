"""A paged KV cache with vLLM's prefix caching, and the events vLLM would publish for it.

Semantics follow vLLM's block pool: fixed-size blocks, a block becomes cacheable only when
full, it is identified by vLLM's chained block hash (same algorithm, seed and extra keys, so
the published hashes are the ones a real replica would publish), reuse is a walk over the
request's block hashes that stops at the first miss, blocks are pinned (ref-counted) while a
request uses them, and unreferenced blocks form an LRU free queue: taking a free block that
still holds a cached hash evicts it (BlockRemoved).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvindex.hashing import event_hash, hash_function, none_hash


@dataclass(slots=True)
class Block:
    id: int
    ref: int = 0
    digest: bytes | None = None  # vLLM block hash once full and cached


@dataclass(slots=True)
class Allocation:
    """Blocks a request holds: the cached prefix it reused plus the blocks it computes."""

    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)  # digests of the full blocks hashed so far
    cached_blocks: int = 0


class NoSpace(Exception):
    """Not enough free blocks right now: the request must wait."""


class PrefixCache:
    def __init__(self, num_blocks: int, block_size: int, algo: str = "sha256", seed: str | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.algo = algo
        self.seed = seed
        self._hash = hash_function(algo)
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

    def prompt_digests(self, tokens: Sequence[int], extra_keys: list[tuple | None]) -> list[bytes]:
        bs = self.block_size
        out: list[bytes] = []
        parent = None
        for i in range(len(tokens) // bs):
            parent = self.block_digest(parent, tokens[i * bs : (i + 1) * bs], extra_keys[i] if i < len(extra_keys) else None)
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
                self.pending.append(BlockRemoved(block_hashes=[event_hash(blk.digest)], medium="GPU"))
            blk.digest = None
        return bid

    def allocate_prompt(self, digests: Sequence[bytes], total_tokens: int, count_query: bool = True) -> Allocation:
        """Reuse the cached prefix of ``digests`` and reserve blocks for the rest of ``total_tokens``.

        Raises NoSpace (changing nothing) when the free queue cannot cover the new blocks.
        """
        hit = self.match_prefix(digests)
        # never reuse the *whole* prompt: vLLM recomputes at least the last token
        full_prompt_blocks = len(digests)
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
            self.queries += total_tokens if total_tokens < full_prompt_blocks * self.block_size else full_prompt_blocks * self.block_size
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

    def commit_full_blocks(self, alloc: Allocation, tokens: Sequence[int], extra_keys: list[tuple | None], lora_name: str | None = None) -> list[int]:
        """Hash and cache every block of ``alloc`` that ``tokens`` now fills; queue BlockStored.

        Returns the ids of newly cached blocks (for P/D, whose KV bytes get written).
        """
        bs = self.block_size
        full = len(tokens) // bs
        start = len(alloc.digests)
        if full <= start:
            return []
        new_ids: list[int] = []
        run: list[int] = []  # block indexes of the current run of newly cached blocks
        parent = alloc.digests[-1] if alloc.digests else None
        for i in range(start, full):
            block_tokens = tokens[i * bs : (i + 1) * bs]
            extra = extra_keys[i] if i < len(extra_keys) else None
            digest = self.block_digest(parent, block_tokens, extra)
            alloc.digests.append(digest)
            parent = digest
            bid = alloc.blocks[i]
            if digest in self.cached:  # an identical block is cached already (computed twice at once)
                self._emit_stored(alloc, run, tokens, extra_keys, lora_name)
                run = []
                continue
            self.blocks[bid].digest = digest
            self.cached[digest] = bid
            run.append(i)
            new_ids.append(bid)
        self._emit_stored(alloc, run, tokens, extra_keys, lora_name)
        return new_ids

    def _emit_stored(self, alloc: Allocation, run: list[int], tokens: Sequence[int], extra_keys: list[tuple | None], lora_name: str | None) -> None:
        """One BlockStored for a run of consecutive blocks, chained to the block before it."""
        if not run:
            return
        bs = self.block_size
        first = run[0]
        self.pending.append(
            BlockStored(
                block_hashes=[event_hash(alloc.digests[i]) for i in run],
                parent_block_hash=event_hash(alloc.digests[first - 1]) if first > 0 else None,
                token_ids=list(tokens[first * bs : (run[-1] + 1) * bs]),
                block_size=bs,
                lora_id=None,
                medium="GPU",
                lora_name=lora_name,
                extra_keys=[extra_keys[i] if i < len(extra_keys) else None for i in run],
                group_idx=0,
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

    def reset(self) -> bool:
        """Drop every cached block (vLLM refuses while blocks are in use)."""
        if any(b.ref for b in self.blocks):
            return False
        for b in self.blocks:
            b.digest = None
        self.cached.clear()
        self.free = OrderedDict((i, None) for i in range(self.num_blocks))
        self.pending.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        out, self.pending = self.pending, []
        return out
