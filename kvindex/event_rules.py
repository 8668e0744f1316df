"""Rules both index backends follow, so that the memory and the Redis backend answer alike.

What lives here is what ``memory_index`` and ``redis_index`` share about index *entries*:

* which events count (``is_primary_group``: KV-cache group 0 only);
* how a BlockStored event becomes our chained keys (``stored_keys``, with ``event_salt`` and
  ``needs_known_first`` for a prompt's first block);
* how a walk reads an entry's tier bits (``BEST_TIER``, ``SLOWEST_TIER_NAME``);
* how a bounded insertion-ordered map sheds its oldest entries (``evict_oldest``).

It is a module of its own so that neither backend imports the other: both import this (and the
interface in ``kvindex.index``), and ``kvindex.backends.make_index`` imports both backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import xxhash

from .events import BlockStored
from .hashing import HASH_ALGOS, chain_keys, detailed_chain, event_hash, hash_block_tokens, root_key
from .index import TIER_NAMES

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
    """Whether an event belongs to KV-cache group 0 (or carries no group: vLLM before 0.20).

    Hybrid models (several KV-cache groups, e.g. full attention + sliding window) publish
    every group's stores and removals with the *same* block hashes, told apart only by
    ``group_idx``. Events of other groups are ignored rather than indexed apart: applied as
    group 0 they would add blocks group 0 never cached (a group-1-only prompt would match)
    and a sliding-window eviction would wipe blocks group 0 still serves. Group 0 is vLLM's
    first group, the full-attention one on the hybrids it ships; ordinary models have only it.

    What this leaves open: on a hybrid, vLLM serves a prefix only if the sliding-window group
    still holds the last window's blocks before the hit, so after such a group evicts them the
    index can predict a longer hit than vLLM gives (never a wrong replica's blocks, and never a
    hit group 0 does not hold). Indexing other groups apart and clipping matches by the window
    would close that; it is not done here.
    """
    return group_idx is None or group_idx == 0


def needs_known_first(ev: BlockStored) -> bool:
    """Whether a prompt-starting event lacks what its root key needs (no extra keys, so no
    cache salt): true of events from pools other than the GPU one, e.g. CPU offloading."""
    return ev.parent_block_hash is None and not ev.extra_keys and bool(ev.block_hashes)


@dataclass(frozen=True, slots=True)
class RootCheck:
    """How a model's replicas hash (``--prefix-caching-hash-algo`` and PYTHONHASHSEED), to tell a
    plain prompt from a salted or multimodal one when the events do not say.

    vLLM up to 0.14 publishes no extra keys: a prompt-starting BlockStored of a salted prompt
    (``cache_salt``) looks like an unsalted one with the same tokens, and keyed as such it would
    promise hits vLLM cannot give. Knowing the hash, block 0's digest can be recomputed for the
    plain prompt (with the event's LoRA, as that release hashes it: the int id up to 0.11, the
    name after) and compared with the published one; if they differ the prompt carried
    something else and its blocks get a root no request reaches.
    """

    algo: str
    seed: str | None = None

    def __post_init__(self) -> None:
        if self.algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algorithm {self.algo!r}; expected one of {', '.join(HASH_ALGOS)}")

    def is_plain(self, ev: BlockStored) -> bool:
        """Whether ``ev``'s first block hashes as a prompt with no salt and no multimodal input."""
        bs = ev.block_size
        if not ev.block_hashes or len(ev.token_ids) < bs:
            return True  # nothing to key
        lora: tuple[Any, ...] | None = None
        if ev.lora_name is not None:
            lora = (ev.lora_name,)
        elif ev.lora_id is not None:
            lora = (ev.lora_id,)
        digest = hash_block_tokens(self.algo, None, ev.token_ids[:bs], lora, self.seed)
        published = ev.block_hashes[0]
        return published == digest if isinstance(published, bytes) else published == event_hash(digest)


def opaque_root(engine_hash: int | bytes) -> int:
    """A root for a prompt the index cannot key as text: unique to its engine hash, so its own
    later events still chain, and no request's key can equal it."""
    raw = engine_hash if isinstance(engine_hash, bytes) else engine_hash.to_bytes(16, "big", signed=engine_hash < 0)
    return xxhash.xxh3_64_intdigest(b"kvgate/opaque-root\x00" + raw)


def stored_keys(ev: BlockStored, parent_key: int | None, model: str, known_first: int | None = None, check: RootCheck | None = None) -> list[int] | None:
    """Our chained keys for a BlockStored event, or None if it cannot be keyed.

    ``parent_key`` is the resolved key of ``ev.parent_block_hash`` (ignored when the event
    starts a prompt). ``known_first`` is the key the replica's map already holds for the
    event's first engine hash, if any: for a prompt-starting event without extra keys (a
    CPU-offload copy of a salted prompt says nothing of the salt) it is the better source,
    since the engine hash already covers the salt. None is returned for an unknown parent
    or a malformed block size. ``check``, when the model's hash is known, verifies a prompt
    start that carries no extra keys (``RootCheck``).

    Blocks whose vLLM hash covers more than tokens, LoRA and salt (multimodal items, prompt
    embeddings: ``opaque_extras``) get keys no text prompt can produce, and so does every block
    chained after them, as in vLLM. Lookahead tokens (``lookahead_token_ids``) are hashed with
    their block, as ``chain_keys(..., lookahead=L)`` does for a request.
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
        if check is not None and not ev.extra_keys and not check.is_plain(ev):
            parent_key = opaque_root(ev.block_hashes[0])
        else:
            parent_key = root_key(model, lora, event_salt(ev))
    if parent_key is None:
        return None
    lookahead = ev.lookahead_token_ids
    opaque = _opaque_blocks(ev)
    if not lookahead and not opaque:
        return chain_keys(parent_key, ev.token_ids, bs)
    return _detailed_keys(ev, parent_key, bs, opaque)


def lookahead_of(ev: BlockStored) -> int:
    """How many tokens past each block vLLM hashed with it (0: lookahead hashes are off)."""
    la = ev.lookahead_token_ids
    return len(la[0]) if la and isinstance(la[0], list) else 0


def _detailed_keys(ev: BlockStored, parent: int, bs: int, opaque: dict[int, list[Any]]) -> list[int]:
    """``stored_keys`` block by block, for events carrying lookahead tokens or opaque extras;
    keyed up to a malformed block (the rest is counted as orphaned by the caller)."""
    lookahead: Sequence[Sequence[int]] | int = ev.lookahead_token_ids or 0
    return detailed_chain(parent, ev.token_ids, bs, lookahead, opaque)


def _opaque_blocks(ev: BlockStored) -> dict[int, list[Any]]:
    """Per block index, the extra keys other than the LoRA name and block 0's cache salt.

    vLLM's untagged event form lists, per block: the LoRA name, ``(mm_identifier, offset)``
    pairs, block 0's cache salt, then prompt-embedding digests. LoRA and salt are in our root
    key already; whatever else a block carries makes vLLM's hash differ from a text prompt's
    with the same tokens, so it must make ours differ too. Unknown entries count as opaque: a
    missed hit is acceptable, a predicted hit vLLM cannot give is not.
    """
    extra = ev.extra_keys
    if not extra:
        return {}
    salt = event_salt(ev)
    out: dict[int, list[Any]] = {}
    for i, entry in enumerate(extra):
        if entry is None:
            continue
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        rest: list[Any] = []
        salt_seen = False
        for item in items:
            if isinstance(item, str):
                if item == ev.lora_name:
                    continue
                if i == 0 and item == salt and not salt_seen:
                    salt_seen = True
                    continue
            elif isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in ("lora", "cache_salt"):
                continue  # tagged form of the two we already keyed
            elif isinstance(item, dict) and item.get("type") in ("lora", "cache_salt"):
                continue
            rest.append(item)
        if rest:
            out[i] = rest
    return out


def evict_oldest(d: dict[Any, Any], bound: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict down to ``bound - bound // 32``."""
    target = bound - bound // 32
    for k in list(islice(d, len(d) - target)):
        del d[k]
