"""vLLM-like prompts and event batches for the index tests (vLLM 0.33's wire form)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kvindex.events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    encode_batch,
)
from kvindex.hashing import block_keys, event_hash, vllm_block_hashes
from kvindex.index import ApplyStats, KVIndex, PrefixMatch

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


BS = 16


@dataclass
class Prompt:
    """A prompt as one replica sees it: tokens, vLLM's block hashes, and our keys."""

    tokens: list[int]
    block_size: int = BS
    lora: str | None = None
    salt: str | None = None
    raw_hashes: bool = False  # publish raw digest bytes instead of 64-bit ints
    seed: str | None = None
    hashes: list[Any] = field(init=False)
    keys: list[int] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.tokens) // self.block_size
        extra: list[tuple | None] = []
        for i in range(n):
            tagged: tuple = ()
            if self.lora:
                tagged += (("lora", self.lora, f"/adapters/{self.lora}"),)
            if self.salt and i == 0:
                tagged += (("cache_salt", self.salt),)
            extra.append(tagged or None)
        digests = vllm_block_hashes(self.tokens, self.block_size, "sha256", self.seed, extra)
        self.hashes = digests if self.raw_hashes else [event_hash(d) for d in digests]
        self.keys = block_keys(self.tokens, self.block_size, model=MODEL, lora=self.lora, salt=self.salt)

    def untagged_extra(self, i: int) -> list[Any] | None:
        """Block i's extra keys as 0.33 events carry them (untagged values)."""
        vals = ([self.lora] if self.lora else []) + ([self.salt] if self.salt and i == 0 else [])
        return vals or None

    def stored(self, a: int = 0, b: int | None = None, medium: str = "GPU", tagged: bool = False, extra: bool | None = None) -> BlockStored:
        """BlockStored for blocks [a, b) (parent = block a-1's hash), as the GPU or CPU pool
        sends it: only the GPU pool sets extra keys and group_idx (``extra`` overrides)."""
        b = len(self.hashes) if b is None else b
        bs = self.block_size
        gpu = medium == "GPU"
        with_extra = gpu if extra is None else extra
        extra_keys = None
        if with_extra:
            if tagged:
                extra_keys = [
                    ([["lora", self.lora, "p"]] if self.lora else []) + ([["cache_salt", self.salt]] if self.salt and i == 0 else []) or None
                    for i in range(a, b)
                ]
            else:
                extra_keys = [self.untagged_extra(i) for i in range(a, b)]
        return BlockStored(
            block_hashes=self.hashes[a:b],
            parent_block_hash=self.hashes[a - 1] if a > 0 else None,
            token_ids=self.tokens[a * bs : b * bs],
            block_size=bs,
            lora_id=1 if self.lora else None,
            medium=medium,
            lora_name=self.lora,
            extra_keys=extra_keys,
            group_idx=0 if gpu else None,
        )

    def removed(self, a: int = 0, b: int | None = None, medium: str = "GPU") -> BlockRemoved:
        b = len(self.hashes) if b is None else b
        return BlockRemoved(block_hashes=self.hashes[a:b], medium=medium, group_idx=0 if medium == "GPU" else None)


def make_tokens(n_blocks: int, seed: int, block_size: int = BS) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(150_000) for _ in range(n_blocks * block_size)]


def batch(*events: Any) -> EventBatch:
    """A batch after the wire: encoded as vLLM 0.33 would and decoded as the subscriber does."""
    return decode_batch(encode_batch(EventBatch(ts=1.0, events=list(events), data_parallel_rank=0)))


def match(blocks: int, tier: str = "GPU") -> PrefixMatch:
    return PrefixMatch(blocks, tier)


async def apply(idx: KVIndex, replica: str, *events: Any) -> ApplyStats:
    return await idx.apply(replica, batch(*events), model=MODEL)


# ------------------------------------------------------------------------------------------
# Goldens: payloads written by vLLM's own kv_events.py (tests/kvindex/make_goldens.py)
# ------------------------------------------------------------------------------------------

GOLDENS_DIR = Path(__file__).resolve().parent.parent / "kvindex" / "goldens"
GOLDEN_VERSIONS = sorted(p.stem.removeprefix("vllm-") for p in GOLDENS_DIR.glob("vllm-*.json"))


def golden(version: str) -> dict[str, Any]:
    """One release's golden file: ``schema``, ``batches`` (hex ``payload`` + vLLM's
    ``events`` field by field), ``lookups`` (expected matches after a batch)."""
    doc: dict[str, Any] = json.loads((GOLDENS_DIR / f"vllm-{version}.json").read_text())
    return doc


def event_fields(ev: Any, names: Sequence[str]) -> dict[str, Any]:
    """Our decoded event's ``names`` fields, normalised as the generator records vLLM's."""
    out: dict[str, Any] = {"type": type(ev).__name__}
    for name in names:
        value = getattr(ev, name, "<missing field>")
        if name == "block_hashes":
            value = [h.hex() if isinstance(h, bytes) else h for h in value]
        elif name == "parent_block_hash" and isinstance(value, bytes):
            value = value.hex()
        out[name] = msgspec.to_builtins(value)
    return out
