"""How BlockStored events become index keys when vLLM hashed more than tokens, LoRA and salt.

Each case states vLLM's rule (vllm/v1/core/kv_cache_utils.py, 0.33) and checks both backends
answer as vLLM's cache would: lookahead block hashes (``lookahead_token_ids``), multimodal and
prompt-embedding extra keys (untagged in events), and the learned lookahead that requests must
be cut with. The release-by-release replay of vLLM's own events is in ``test_index.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kvindex.event_rules import RootCheck
from kvindex.events import BlockStored, EventBatch, decode_batch, encode_batch
from kvindex.hashing import block_keys, chain_keys, detailed_chain, event_hash, root_key, vllm_block_hashes
from kvindex.index import KVIndex, pack_geometry
from kvindex.memory_index import MemoryIndex
from kvindex.redis_index import RedisIndex

BS = 4
MODEL = "m"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def index(request: pytest.FixtureRequest) -> AsyncIterator[KVIndex]:
    idx: KVIndex = MemoryIndex() if request.param == "memory" else RedisIndex(request.getfixturevalue("redis_url"))
    yield idx
    await idx.close()


def stored(tokens: list[int], base: int, **kw: Any) -> BlockStored:
    n = len(tokens) // BS
    fields: dict[str, Any] = dict(
        block_hashes=[base + i for i in range(n)], parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=None, medium="GPU", lora_name=None
    )
    fields.update(kw)
    return BlockStored(**fields)


async def put(index: KVIndex, *events: BlockStored, replica: str = "r1") -> None:
    payload = encode_batch(EventBatch(ts=1.0, events=list(events)))
    stats = await index.apply(replica, decode_batch(payload), model=MODEL)
    assert stats.orphaned == 0


async def hits(index: KVIndex, keys: list[int], replica: str = "r1") -> int:
    got = await index.lookup(keys, model=MODEL)
    return got[replica].blocks if replica in got else 0


TOKENS = list(range(10, 22))  # three blocks


async def test_lookahead_blocks_match_only_with_the_same_next_tokens(index: KVIndex) -> None:
    """vLLM 0.33 (EAGLE, lookahead L): block i's hash covers the L tokens after it, and a block
    is hashed only once those tokens exist. Stored: blocks 0-1 of TOKENS, L = 1."""
    await put(index, stored(TOKENS[:8], 100, lookahead_token_ids=[[TOKENS[4]], [TOKENS[8]]]))
    assert index.lookahead(MODEL) == 1 and index.block_size(MODEL) == BS
    la = index.lookahead(MODEL)
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, lookahead=la)) == 2
    # the token after block 1 differs: vLLM's block-1 hash differs, one block is served
    other = TOKENS[:8] + [999] + TOKENS[9:]
    assert await hits(index, block_keys(other, BS, model=MODEL, lookahead=la)) == 1
    # exactly 8 tokens: block 1 has no lookahead token yet, vLLM hashes only block 0
    assert len(block_keys(TOKENS[:8], BS, model=MODEL, lookahead=la)) == 1
    assert await hits(index, block_keys(TOKENS[:8], BS, model=MODEL, lookahead=la)) == 1
    # a request cut without lookahead never matches lookahead-hashed blocks (a miss, not a wrong hit)
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL)) == 0


async def test_lookahead_chain_continues_across_events(index: KVIndex) -> None:
    await put(index, stored(TOKENS[:4], 100, lookahead_token_ids=[[TOKENS[4], TOKENS[5]]]))
    await put(index, stored(TOKENS[4:8], 101, parent_block_hash=100, lookahead_token_ids=[[TOKENS[8], TOKENS[9]]]))
    assert index.lookahead(MODEL) == 2
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, lookahead=2)) == 2


def test_detailed_chain_equals_chain_keys_without_extras() -> None:
    root = root_key(MODEL)
    assert detailed_chain(root, TOKENS, BS) == chain_keys(root, TOKENS, BS)
    assert detailed_chain(root, TOKENS, BS, 1) == chain_keys(root, TOKENS, BS, 1)
    assert detailed_chain(root, TOKENS, BS, [[14], [18]]) == chain_keys(root, TOKENS, BS, 1)[:2]
    assert detailed_chain(root, TOKENS + [2**32], BS) == chain_keys(root, TOKENS, BS)  # partial tail ignored
    assert detailed_chain(root, [2**32, *TOKENS[1:]], BS) == []  # a block that cannot be keyed stops the chain


async def test_multimodal_blocks_never_match_another_image(index: KVIndex) -> None:
    """vLLM 0.33 publishes ``(mm_identifier, offset)`` per block an image covers; the same
    placeholder tokens with image B hash differently, and so does every later block."""
    img_a = [None, [["img-A", 0]], None]
    await put(index, stored(TOKENS, 100, extra_keys=img_a))
    plain = block_keys(TOKENS, BS, model=MODEL)
    assert await hits(index, plain) == 1  # block 0 holds text only: served to anyone
    root = root_key(MODEL)
    same = detailed_chain(root, TOKENS, BS, 0, {1: [["img-A", 0]]})
    other = detailed_chain(root, TOKENS, BS, 0, {1: [["img-B", 0]]})
    assert await hits(index, same) == 3
    assert await hits(index, other) == 1


async def test_salt_lora_and_embeds_in_extra_keys(index: KVIndex) -> None:
    """Block 0's untagged extra keys: LoRA name, then mm pairs, then the salt, then prompt
    embedding digests. LoRA and salt go into our root; digests make the block opaque."""
    await put(index, stored(TOKENS, 100, lora_name="ad", lora_id=3, extra_keys=[["ad", "s1"], ["ad"], ["ad"]]))
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, lora="ad", salt="s1")) == 3
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, lora="ad")) == 0
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, salt="s1")) == 0
    await put(index, stored(TOKENS, 200, extra_keys=[["s2", b"\x01" * 32], None, None]), replica="r2")
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL, salt="s2"), "r2") == 0  # embeds: never a text prompt
    embeds = detailed_chain(root_key(MODEL, None, "s2"), TOKENS, BS, 0, {0: [b"\x01" * 32]})
    assert await hits(index, embeds, "r2") == 3


async def test_an_unknown_extra_key_is_never_taken_for_text(index: KVIndex) -> None:
    await put(index, stored(TOKENS, 100, extra_keys=[None, [{"type": "future", "v": 1}], None]))
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL)) == 1


def test_geometry_packs_block_size_and_lookahead() -> None:
    idx = MemoryIndex()
    idx._note_geometry(MODEL, pack_geometry(16, 2))
    assert (idx.block_size(MODEL), idx.lookahead(MODEL)) == (16, 2)
    idx._note_geometry(MODEL, 16)  # what older indexers wrote: a plain block size
    assert (idx.block_size(MODEL), idx.lookahead(MODEL)) == (16, 0)


@pytest.mark.redis
async def test_redis_shares_the_learned_lookahead(redis_url: str) -> None:
    writer, reader = RedisIndex(redis_url), RedisIndex(redis_url)
    try:
        await put(writer, stored(TOKENS[:8], 100, lookahead_token_ids=[[TOKENS[4]], [TOKENS[8]]]))
        assert reader.lookahead(MODEL) == 0
        assert await reader.ping()
        assert (reader.block_size(MODEL), reader.lookahead(MODEL)) == (BS, 1)
        assert await hits(reader, block_keys(TOKENS, BS, model=MODEL, lookahead=1)) == 2
    finally:
        await writer.close()
        await reader.close()


# -- vLLM <= 0.14: no extra keys in events; the configured hash tells salted from plain ------------


def legacy_stored(tokens: list[int], digests: list[bytes], *, as_int: bool = True, **kw: Any) -> BlockStored:
    """A prompt start as 0.10-0.14 publish it: no extra keys, hashes as ints (or raw digests)."""
    hashes: list[Any] = [event_hash(d) if as_int else d for d in digests]
    return BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=tokens, block_size=BS, lora_id=kw.get("lora_id"), medium="GPU", lora_name=kw.get("lora_name")
    )


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
async def test_a_salted_prompt_in_legacy_events_is_not_taken_for_a_plain_one(index: KVIndex, algo: str) -> None:
    seed = "1234"  # the replicas' PYTHONHASHSEED
    index.set_root_check(MODEL, RootCheck(algo, seed))
    plain = vllm_block_hashes(TOKENS, BS, algo, seed)
    salted = vllm_block_hashes(TOKENS, BS, algo, seed, [("tenant-a",), None, None])  # 0.10-0.14: the bare salt
    await put(index, legacy_stored(TOKENS, salted), replica="salted")
    await put(index, legacy_stored(TOKENS, plain, as_int=False), replica="plain")
    got = await index.lookup(block_keys(TOKENS, BS, model=MODEL), model=MODEL)
    assert {r: m.blocks for r, m in got.items()} == {"plain": 3}
    # a request with that salt computes block 0's engine hash as vLLM does, and reaches it
    check = index.root_check(MODEL)
    assert check.legacy_seen
    keys = check.request_keys(TOKENS, BS, model=MODEL, salt="tenant-a")
    got = await index.lookup(keys, model=MODEL)
    assert {r: m.blocks for r, m in got.items()} == {"salted": 3}
    got = await index.lookup(check.request_keys(TOKENS, BS, model=MODEL, salt="tenant-b"), model=MODEL)
    assert got == {}
    assert check.request_keys(TOKENS, BS, model=MODEL) == block_keys(TOKENS, BS, model=MODEL)


async def test_legacy_image_blocks_are_told_from_text_even_in_a_continuation(index: KVIndex) -> None:
    """An image at block 1 (0.14 hashes ``(mm_hash, offset)`` into it, publishes nothing of it):
    block 0 stays a text block, blocks 1-2 (and a continuation event after them) are opaque."""
    index.set_root_check(MODEL, RootCheck("sha256", "0"))
    image = vllm_block_hashes(TOKENS, BS, "sha256", "0", [None, ("img-A", 0), None])
    await put(index, legacy_stored(TOKENS[:8], image[:2]))
    cont = legacy_stored(TOKENS[8:], image[2:])
    cont.parent_block_hash = event_hash(image[1])
    await put(index, cont)
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL)) == 1
    text = vllm_block_hashes(TOKENS, BS, "sha256", "0")
    await put(index, legacy_stored(TOKENS[:8], text[:2]), replica="r2")
    cont = legacy_stored(TOKENS[8:], text[2:])
    cont.parent_block_hash = event_hash(text[1])
    await put(index, cont, replica="r2")
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL), "r2") == 3


async def test_legacy_lora_prompts_verify_with_the_id_or_the_name(index: KVIndex) -> None:
    index.set_root_check(MODEL, RootCheck("sha256", "0"))
    by_id = vllm_block_hashes(TOKENS, BS, "sha256", "0", [(7,), (7,), (7,)])  # 0.10/0.11 hash the int id
    by_name = vllm_block_hashes(TOKENS, BS, "sha256", "0", [("ad",), ("ad",), ("ad",)])  # 0.14 the name
    await put(index, legacy_stored(TOKENS, by_id, lora_id=7), replica="old")
    await put(index, legacy_stored(TOKENS, by_name, lora_id=7, lora_name="ad"), replica="new")
    got = await index.lookup(block_keys(TOKENS, BS, model=MODEL, lora="ad"), model=MODEL)
    assert {r: m.blocks for r, m in got.items()} == {"new": 3}  # an int id names no adapter a request can ask for


async def test_without_a_configured_hash_legacy_prompt_starts_count_as_plain(index: KVIndex) -> None:
    salted = vllm_block_hashes(TOKENS, BS, "sha256", "0", [("tenant-a",), None, None])
    await put(index, legacy_stored(TOKENS, salted))
    assert await hits(index, block_keys(TOKENS, BS, model=MODEL)) == 3  # documented: set prefix_hash_algo


def test_root_check_refuses_an_unknown_algorithm() -> None:
    with pytest.raises(ValueError):
        RootCheck("md5")
