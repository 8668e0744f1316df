"""Fuzzing the KV-event decoder and the index behind it: junk never escapes as anything but
``EventDecodeError``, and whatever decodes can be applied to both index backends' logic
without an exception other than the index's own.

Payloads: arbitrary bytes, arbitrary msgpack documents, and real batches (vLLM 0.33 map form
and the older array form) with fields replaced by arbitrary msgpack values. ``make test`` runs
a few hundred; ``KVGATE_FUZZ_EXAMPLES=20000`` runs longer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvindex.events import BlockRemoved, BlockStored, EventBatch, EventDecodeError, EventDecoder, encode_batch
from kvindex.memory_index import MemoryIndex

EXAMPLES = int(os.environ.get("KVGATE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=40)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=30)

GOOD = EventBatch(
    ts=1.0,
    events=[
        BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(32)), block_size=16, lora_id=None, medium="GPU", lora_name=None),
        BlockRemoved(block_hashes=[2], medium="GPU"),
    ],
    data_parallel_rank=0,
)


@st.composite
def mutated_batches(draw: Any) -> bytes:
    legacy = draw(st.booleans())
    doc = msgspec.msgpack.decode(encode_batch(GOOD, legacy=legacy))
    # replace a few leaves or containers anywhere in the document with arbitrary values
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path: list[Any] = []
        node: Any = doc
        while isinstance(node, (list, dict)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node)))))
            path.append(key)
            node = node[key]
        if not path:
            doc = draw(values)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = draw(values)
    return msgspec.msgpack.encode(doc)


payloads = st.binary(max_size=200) | values.map(msgspec.msgpack.encode) | mutated_batches()


@FUZZ
@given(payload=payloads)
def test_junk_is_an_event_decode_error_or_a_batch_the_index_takes(payload: bytes) -> None:
    decoder = EventDecoder()
    for skip_bad in (False, True):
        try:
            batch = decoder.decode(payload, skip_bad=skip_bad)
        except EventDecodeError:
            continue
        assert isinstance(batch, EventBatch)
        index = MemoryIndex(max_blocks=1000)
        asyncio.run(index.apply("r0", batch, model="m"))
