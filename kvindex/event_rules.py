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
from itertools import islice
from typing import Any

import xxhash

from .events import BlockStored
from .hashing import HASH_ALGOS, block_keys, chain_keys, detailed_chain, event_hash, hash_block_tokens, root_key
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


class RootCheck:
    """How a model's replicas hash (``--prefix-caching-hash-algo`` and PYTHONHASHSEED), to tell
    plain text blocks from salted, multimodal or prompt-embedding ones when events do not say.

    vLLM up to 0.14 publishes no extra keys: a BlockStored of a salted prompt, or of an image's
    placeholder tokens, looks like a text prompt with the same tokens, and keyed as such it
    would promise hits vLLM cannot give. Knowing the hash, each block's digest can be
    recomputed as a text block (with the event's LoRA, as that release hashes it: the int id up
    to 0.11, the name after) and compared with the published one; from the first block that
    differs, the event's blocks get keys no request reaches (``plain_blocks``).

    A continuation event (with a parent) is checked only when the parent's digest is still
    remembered (``memory`` digests of checked blocks, oldest dropped first); otherwise its
    blocks are trusted, as they chain from a key that was checked when it was stored.
    """

    __slots__ = ("_digests", "algo", "legacy_seen", "memory", "seed")

    def __init__(self, algo: str, seed: str | None = None, memory: int = 65_536) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algorithm {algo!r}; expected one of {', '.join(HASH_ALGOS)}")
        self.algo = algo
        self.seed = seed
        self.memory = memory
        self._digests: dict[int | bytes, bytes] = {}
        #: whether events without extra keys (vLLM <= 0.14) were checked: then a salted
        #: request is keyed from its block 0's engine hash (``request_keys``)
        self.legacy_seen = False

    def request_keys(
        self, token_ids: Sequence[int], block_size: int, *, model: str, lora: str | None = None, salt: str | None = None, lookahead: int = 0
    ) -> list[int]:
        """A request's block keys as the index holds them for this model's replicas.

        Plain requests: ``block_keys``. A salted one, once vLLM <= 0.14 events were seen:
        those releases hash the salt (after the LoRA name) into block 0 and publish nothing of
        it, so the index keys such a prompt from its block 0's engine hash (``engine_root``);
        the request's engine hash is computed here the same way.
        """
        if salt is None or not self.legacy_seen or len(token_ids) < block_size:
            return block_keys(token_ids, block_size, model=model, lora=lora, salt=salt, lookahead=lookahead)
        extra = (*((lora,) if lora else ()), salt)
        digest = hash_block_tokens(self.algo, None, token_ids[:block_size], extra, self.seed)
        first = engine_root(event_hash(digest))
        return [first, *chain_keys(first, token_ids[block_size:], block_size)]

    def plain_blocks(self, ev: BlockStored) -> int:
        """How many leading blocks of ``ev`` hash as text blocks (all of them: ``len(block_hashes)``)."""
        self.legacy_seen = True
        bs = ev.block_size
        n = min(len(ev.block_hashes), len(ev.token_ids) // bs)
        parent: bytes | None = None
        if ev.parent_block_hash is not None:
            parent = self._digests.get(ev.parent_block_hash)
            if parent is None:
                return len(ev.block_hashes)  # not checkable: trusted (see the class docstring)
        lora: tuple[Any, ...] | None = None
        if ev.lora_name is not None:
            lora = (ev.lora_name,)
        elif ev.lora_id is not None:
            lora = (ev.lora_id,)
        digests = self._digests
        for i in range(n):
            digest = hash_block_tokens(self.algo, parent, ev.token_ids[i * bs : (i + 1) * bs], lora, self.seed)
            published = ev.block_hashes[i]
            if published != (digest if isinstance(published, bytes) else event_hash(digest)):
                return i
            digests[published] = digest
            parent = digest
        if len(digests) > self.memory:
            evict_oldest(digests, self.memory)
        return len(ev.block_hashes)


def engine_root(engine_hash: int) -> int:
    """The key of a legacy prompt's block 0 that hashed with more than its tokens and LoRA (a
    cache salt, most likely): derived from vLLM's own hash of it, so a request carrying the
    same salt reaches it (``RootCheck.request_keys``) and no other does."""
    return xxhash.xxh3_64_intdigest(b"kvgate/engine-root\x00" + engine_hash.to_bytes(8, "big"))


def _engine_tag(engine_hash: int | bytes) -> bytes:
    """An opaque extra key standing for a block vLLM hashed with something we cannot see."""
    raw = engine_hash if isinstance(engine_hash, bytes) else engine_hash.to_bytes(16, "big", signed=engine_hash < 0)
    return b"kvgate/engine-hash\x00" + raw


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
        parent_key = root_key(model, lora, event_salt(ev))
    if parent_key is None:
        return None
    lookahead = ev.lookahead_token_ids
    opaque = _opaque_blocks(ev)
    if check is not None and not ev.extra_keys and ev.group_idx is None:  # vLLM <= 0.14 (0.20+ sets group_idx)
        plain = check.plain_blocks(ev)
        first = ev.block_hashes[0] if ev.block_hashes else None
        if plain == 0 and ev.parent_block_hash is None and isinstance(first, int) and len(ev.token_ids) >= bs:
            # block 0 hashed with more than text: a salt (a request with it computes this key)
            # or an image at the very start (the gateway never keys a request past an image)
            root = engine_root(first)
            return [root, *chain_keys(root, ev.token_ids[bs:], bs)]
        if plain < len(ev.block_hashes):  # from there on, blocks vLLM hashed with more than text
            opaque = {i: [_engine_tag(ev.block_hashes[i])] for i in range(plain, len(ev.block_hashes))}
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
    """``opaque_extras`` of an event's blocks."""
    if not ev.extra_keys:
        return {}
    return opaque_extras(ev.extra_keys, ev.lora_name, event_salt(ev))


def opaque_extras(extra_keys: Sequence[Any], lora_name: str | None, salt: str | None) -> dict[int, list[Any]]:
    """Per block index, the extra keys other than the LoRA name and block 0's cache salt.

    vLLM's untagged event form lists, per block: the LoRA name, ``(mm_identifier, offset)``
    pairs, block 0's cache salt, then prompt-embedding digests. LoRA and salt are in our root
    key already; whatever else a block carries makes vLLM's hash differ from a text prompt's
    with the same tokens, so it must make ours differ too. Unknown entries count as opaque: a
    missed hit is acceptable, a predicted hit vLLM cannot give is not. A request whose extra
    keys are known in this form (the multimodal identifiers vLLM would compute) gets the same
    blocks from this function, hence the same keys through ``hashing.detailed_chain``.
    """
    out: dict[int, list[Any]] = {}
    for i, entry in enumerate(extra_keys):
        if entry is None:
            continue
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        rest: list[Any] = []
        salt_seen = False
        for item in items:
            if isinstance(item, str):
                if item == lora_name:
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
