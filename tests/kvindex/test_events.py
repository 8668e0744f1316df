"""The KV-event codec: vLLM 0.33 bytes exactly, older forms accepted, garbage rejected cleanly."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.events import (
    MAP_FORM_0_27,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    EventDecoder,
    decode_batch,
    encode_batch,
)
from tests.helpers.index import GOLDEN_VERSIONS, event_fields, golden


def _s(text: str) -> bytes:
    """msgpack fixstr."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def test_one_block_stored_batch_is_byte_exact():
    batch = EventBatch(
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[5],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[None],
                group_idx=0,
            )
        ],
        data_parallel_rank=0,
    )
    expected = b"".join(
        [
            b"\x93",  # the batch: array of 3 [ts, events, data_parallel_rank]
            b"\xcb" + struct.pack(">d", 1.5),  # ts as float64
            b"\x91",  # one event
            b"\xde\x00\x0a",  # map16 with 10 entries (msgspec sizes the header for 16 fields + tag)
            _s("type") + _s("BlockStored"),  # the tag comes first
            _s("block_hashes") + b"\x91\x05",
            _s("parent_block_hash") + b"\xc0",
            _s("token_ids") + b"\x94\x01\x02\x03\x04",
            _s("block_size") + b"\x04",
            _s("lora_id") + b"\xc0",  # required fields are written even when null
            _s("medium") + _s("GPU"),
            _s("lora_name") + b"\xc0",
            _s("extra_keys") + b"\x91\xc0",  # set fields only from here on
            _s("group_idx") + b"\x00",
            b"\x00",  # data_parallel_rank 0
        ]
    )
    assert encode_batch(batch) == expected
    assert decode_batch(expected) == batch


def test_round_trips_all_fields_and_forms():
    full = BlockStored(
        block_hashes=[2**64 - 1, 7],
        parent_block_hash=3,
        token_ids=list(range(32)),
        block_size=16,
        lora_id=2,
        medium="CPU",
        lora_name="sql",
        extra_keys=[["lora", "sql"], None],
        group_idx=0,
        kv_cache_spec_kind="full_attention",
        kv_cache_spec_sliding_window=None,
        locality="LOCAL",
        ownership="own",
        session_id="s",
        lookahead_token_ids=[[1, 2], [3, 4]],  # one list per block (vLLM 0.33)
    )
    raw_hashes = BlockStored(
        block_hashes=[b"\x01" * 32], parent_block_hash=b"\x02" * 32, token_ids=[1] * 16, block_size=16, lora_id=None, medium=None, lora_name=None
    )
    batch = EventBatch(ts=2.0, events=[full, raw_hashes, BlockRemoved(block_hashes=[7], medium="CPU", group_idx=0), AllBlocksCleared()])
    assert decode_batch(encode_batch(batch)) == batch
    legacy = decode_batch(encode_batch(batch, legacy=True))
    assert [type(e) for e in legacy.events] == [BlockStored, BlockStored, BlockRemoved, AllBlocksCleared]
    assert legacy.events[0].block_hashes == full.block_hashes and legacy.events[0].lora_name == "sql"
    assert legacy.events[1].block_hashes == [b"\x01" * 32]
    # 0.20's 9-field arrays carry extra_keys and group_idx (on removals too)
    v020 = decode_batch(encode_batch(batch, legacy=9))
    assert (v020.events[0].extra_keys, v020.events[0].group_idx, v020.events[2].group_idx) == (full.extra_keys, 0, 0)
    assert v020.events[0].lookahead_token_ids is None  # no such field before the map form


def test_other_vllm_versions_decode():
    enc = msgspec.msgpack.encode
    # older array form with the oldest field set (no medium, no lora_name), no dp rank
    old = enc([1.0, [["BlockStored", [1, 2], None, list(range(32)), 16, None], ["BlockRemoved", [1]], ["AllBlocksCleared"]]])
    b = decode_batch(old)
    assert b.events[0].block_hashes == [1, 2] and b.events[0].medium is None
    assert isinstance(b.events[1], BlockRemoved) and b.data_parallel_rank is None
    # map form with a key this version does not know, and an unknown event type
    newer = enc(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [9],
                    "parent_block_hash": None,
                    "token_ids": [1] * 16,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "future_field": {"x": 1},
                },
                {"type": "BlockTransferred", "block_hashes": [9]},
            ],
            3,
        ]
    )
    dec = EventDecoder()
    b = dec.decode(newer)
    assert len(b.events) == 1 and b.events[0].block_hashes == [9] and b.data_parallel_rank == 3
    assert dec.unknown_events == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x93\xcb\x3f",  # truncated
        msgspec.msgpack.encode({"ts": 1}),
        msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}]]),  # required fields missing
        msgspec.msgpack.encode([1.0, [["BlockStored", "not a list", None, [], 16]]]),
        msgspec.msgpack.encode([1.0, "events"]),
        msgspec.msgpack.encode(["ts", []]),
    ],
)
def test_garbage_raises_event_decode_error(payload):
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        decode_batch(data)
    except EventDecodeError:
        pass


def test_decoder_can_skip_malformed_events():
    enc = msgspec.msgpack.encode
    good = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}
    payload = enc([1.0, [good, {"type": "BlockRemoved", "block_hashes": "x", "medium": None}, ["BlockStored", 1], good], 0])
    with pytest.raises(EventDecodeError):
        decode_batch(payload)
    dec = EventDecoder()
    b = dec.decode(payload, skip_bad=True)
    assert b.events == [BlockRemoved([1], "GPU"), BlockRemoved([1], "GPU")] and dec.bad_events == 2
    with pytest.raises(EventDecodeError):  # a broken envelope is never partly decoded
        dec.decode(b"\x93\xcb\x00", skip_bad=True)


# ------------------------------------------------------------------------------------------
# Goldens written by vLLM's own kv_events.py (tests/kvindex/make_goldens.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_golden_payloads_decode_every_event_and_field(version: str) -> None:
    """Every event vLLM wrote decodes (nothing dropped, nothing skipped) and every field vLLM
    declares lands with vLLM's value: extra_keys, group_idx, lookahead_token_ids (a list
    per block in 0.33), the spec kind, session ids."""
    doc = golden(version)
    decoder = EventDecoder()
    for b in doc["batches"]:
        got = decoder.decode(bytes.fromhex(b["payload"]))
        assert len(got.events) == len(b["events"]), (version, b["seq"])
        for ours, theirs in zip(got.events, b["events"], strict=True):
            names = [k for k in theirs if k != "type"]
            assert event_fields(ours, names) == theirs, (version, b["seq"])
    assert decoder.unknown_events == 0 and decoder.bad_events == 0


def test_goldens_cover_the_release_forms() -> None:
    """The three wire generations are each pinned: 6-field array (0.10), 9-field array with
    extra_keys and group_idx (0.20), map form with list-per-block lookahead ids (0.33)."""
    assert {"0.10.2", "0.20.0", "0.33.0"} <= set(GOLDEN_VERSIONS)
    assert golden("0.10.2")["event_form"] == "array"
    assert golden("0.20.0")["schema"]["BlockStored"]["fields"][-2:] == ["extra_keys", "group_idx"]
    assert golden("0.33.0")["event_form"] == "map"


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_golden_payloads_reencode_byte_identically(version: str) -> None:
    """``encode_batch`` writes the bytes vLLM wrote: the map form for 0.33, the array form
    of the release's length (``legacy``: 6 fields in 0.10, 9 in 0.20) for the older ones, and
    0.27's narrower map (whose BlockStored header is a fixmap, 0.33's a map16)."""
    doc = golden(version)
    n_fields = len(doc["schema"]["BlockStored"]["fields"])
    legacy = n_fields if doc["event_form"] == "array" else (MAP_FORM_0_27 if n_fields == MAP_FORM_0_27 else False)
    for b in doc["batches"]:
        payload = bytes.fromhex(b["payload"])
        assert encode_batch(decode_batch(payload), legacy=legacy) == payload, (version, b["seq"])
