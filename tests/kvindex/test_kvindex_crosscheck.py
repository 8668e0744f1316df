"""Independent cross-checks of kvindex against vLLM's own encoders, declared here from scratch.

* Events: msgspec Structs rebuilt from vLLM's own (the field order and schema that
  tests/kvindex/make_goldens.py records from each release's ``kv_events.py``: 0.33's map form,
  0.10 and 0.20's array forms) encode random batches; ``kvindex.events.encode_batch`` must produce the same bytes and ``decode_batch``
  must read them back (and read the legacy array form and a map-form envelope too).
* Hashes: vLLM's hash functions restated plainly (``pickle.dumps(obj, protocol=5)`` or
  ``cbor2.dumps(obj, canonical=True)``, then sha256 / xxh3_128) over random tokens, block
  sizes, seeds and extra keys must equal ``vllm_block_hashes``; ``block_keys`` must equal a
  plain-Python statement of DESIGN §3's chained xxh3_64.

tests/kvindex/test_events.py pins one hand-checked byte string and tests/kvindex/test_hashing.py hand-written
pickle/CBOR encoders; this file covers the random space around them.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from typing import Any, Union

import cbor2
import msgspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvindex.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    _Map27AllBlocksCleared,
    _Map27BlockRemoved,
    _Map27BlockStored,
    decode_batch,
    encode_batch,
)
from kvindex.hashing import (
    block_keys,
    event_hash,
    none_hash,
    root_key,
    vllm_block_hashes,
)
from tests.helpers.index import GOLDEN_VERSIONS, golden

# ------------------------------------------------------------------------------------------
# vLLM's event types, rebuilt from vLLM's own structs (recorded in the goldens)
# ------------------------------------------------------------------------------------------
#
# tests/kvindex/make_goldens.py loads each release's ``vllm/distributed/kv_events.py`` and records
# the field order and msgspec JSON schema of its EventBatch / BlockStored / BlockRemoved /
# AllBlocksCleared; the reference structs below are rebuilt from that record, never declared by
# hand (a hand-declared ``lookahead_token_ids: list[int]`` once hid 0.33's ``list[list[int]]``).


def _py_type(node: dict[str, Any]) -> Any:
    """The Python type a msgspec JSON-schema node came from (as msgspec encodes it)."""
    if "anyOf" in node:
        return Union[tuple(_py_type(n) for n in node["anyOf"])]  # noqa: UP007 - built at runtime
    kind = node.get("type")
    if kind == "integer":
        return int
    if kind == "number":
        return float
    if kind == "null":
        return None
    if kind == "string":
        return bytes if node.get("contentEncoding") == "base64" else str
    if kind == "array":
        return list[_py_type(node["items"])] if "items" in node else list[Any]
    return Any


def vllm_struct(version: str, name: str, *, base: type | None = None) -> type:
    """Release ``version``'s struct ``name`` as a msgspec struct of the same fields, types,
    defaults and configuration (tagged events; ``array_like`` where the release has it)."""
    doc = golden(version)
    rec = doc["schema"][name]
    body = rec["json_schema"]["$defs"][name]
    array_like = name == "EventBatch" or doc["event_form"] == "array"
    if body.get("type") == "array":  # array_like: positional items, ``minItems`` required
        items = body["prefixItems"]
        tagged = len(items) == len(rec["fields"]) + 1  # a tagged struct's first item is its tag
        props = dict(zip(rec["fields"], items[tagged:], strict=True))
        required = set(rec["fields"][: body.get("minItems", len(items)) - tagged])
    else:
        props, required = body["properties"], set(body.get("required", ()))
        array_like = False
    fields: list[Any] = [(f, _py_type(props[f])) if f in required else (f, _py_type(props[f]), None) for f in rec["fields"]]
    kw: dict[str, Any] = {"omit_defaults": True, "gc": False, "array_like": array_like}
    if name != "EventBatch":
        kw["tag"] = name
    return msgspec.defstruct(f"Ref{name}_{version.replace('.', '_')}", fields, **kw)


def _unordered(node: Any) -> Any:
    """A JSON-schema node with its ``anyOf`` alternatives in a canonical order."""
    if isinstance(node, dict):
        out = {k: _unordered(v) for k, v in node.items()}
        if "anyOf" in out:
            out["anyOf"] = sorted(out["anyOf"], key=repr)
        return out
    return [_unordered(v) for v in node] if isinstance(node, list) else node


MAP_VERSION = "0.33.0"
ARRAY_VERSIONS = [v for v in GOLDEN_VERSIONS if golden(v)["event_form"] == "array"]

RefBatch = vllm_struct(MAP_VERSION, "EventBatch")
RefStored = vllm_struct(MAP_VERSION, "BlockStored")
RefRemoved = vllm_struct(MAP_VERSION, "BlockRemoved")
RefCleared = vllm_struct(MAP_VERSION, "AllBlocksCleared")
RefLegacy = {v: {n: vllm_struct(v, n) for n in ("BlockStored", "BlockRemoved", "AllBlocksCleared")} for v in ARRAY_VERSIONS}


class RefMapBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """The envelope without ``array_like`` (some vLLM builds declare it so)."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


@pytest.mark.parametrize("version", GOLDEN_VERSIONS)
def test_our_structs_declare_vllms_fields(version: str) -> None:
    """Every field a release's events declare exists in ours, in vLLM's order (the array form
    is positional); for the map form (0.33) with vLLM's JSON schema, except ``extra_keys``,
    deliberately wider (typed ``{"type": ...}`` entries of some builds must decode too)."""
    doc = golden(version)
    for name, ours_cls in (("BlockStored", BlockStored), ("BlockRemoved", BlockRemoved), ("AllBlocksCleared", AllBlocksCleared)):
        theirs = doc["schema"][name]["fields"]
        mine = [f.name for f in msgspec.structs.fields(ours_cls)]
        assert mine[: len(theirs)] == theirs, (version, name)
        if doc["event_form"] == "map":
            if version != GOLDEN_VERSIONS[-1]:  # an older map form: what we write for it (0.27)
                writer = {"BlockStored": _Map27BlockStored, "BlockRemoved": _Map27BlockRemoved, "AllBlocksCleared": _Map27AllBlocksCleared}[name]
                assert [f.name for f in msgspec.structs.fields(writer)] == theirs, (version, name)
                continue
            assert mine == theirs, name
            their_props = doc["schema"][name]["json_schema"]["$defs"][name]["properties"]
            my_props = msgspec.json.schema(ours_cls)["$defs"][name]["properties"]
            for f in theirs:
                if f != "extra_keys":
                    assert _unordered(my_props[f]) == _unordered(their_props[f]), (name, f)


STORED_OPTIONAL = (
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
)
REMOVED_OPTIONAL = ("group_idx", "locality", "ownership")

# ------------------------------------------------------------------------------------------
# random events
# ------------------------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
block_hash = st.one_of(u64, u64, st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
token = st.one_of(st.integers(0, 127), st.integers(0, 200_000), st.integers(0, 2**32 - 1))
small_text = st.text(max_size=12)
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
extra_entry = st.one_of(
    st.none(),
    st.lists(st.one_of(small_text, st.tuples(small_text, st.integers(0, 4096)).map(list), st.binary(max_size=8)), min_size=1, max_size=3),
)


@st.composite
def stored_fields(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 4))
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    f: dict[str, Any] = {
        "block_hashes": draw(st.lists(block_hash, min_size=n, max_size=n)),
        "parent_block_hash": draw(maybe(block_hash)),
        "token_ids": draw(st.lists(token, min_size=n * bs, max_size=n * bs)),
        "block_size": bs,
        "lora_id": draw(maybe(st.integers(0, 2**31))),
        "medium": draw(maybe(st.sampled_from(["GPU", "CPU", "STORAGE"]))),
        "lora_name": draw(maybe(small_text)),
    }
    optional = {
        "extra_keys": maybe(st.lists(extra_entry, min_size=n, max_size=n)),
        "group_idx": maybe(st.integers(0, 3)),
        "kv_cache_spec_kind": maybe(st.sampled_from(["full_attention", "sliding_window"])),
        "kv_cache_spec_sliding_window": maybe(st.integers(1, 8192)),
        "locality": maybe(st.sampled_from(["LOCAL", "REMOTE"])),
        "ownership": maybe(small_text),
        "session_id": maybe(small_text),
        "lookahead_token_ids": maybe(st.lists(st.lists(token, max_size=4), min_size=n, max_size=n)),
    }
    for name in STORED_OPTIONAL:
        f[name] = draw(optional[name])
    return f


@st.composite
def removed_fields(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "block_hashes": draw(st.lists(block_hash, max_size=4)),
        "medium": draw(maybe(st.sampled_from(["GPU", "CPU", "STORAGE"]))),
        "group_idx": draw(maybe(st.integers(0, 3))),
        "locality": draw(maybe(st.sampled_from(["LOCAL", "REMOTE"]))),
        "ownership": draw(maybe(small_text)),
    }


event_fields = st.one_of(
    st.tuples(st.just("stored"), stored_fields()),
    st.tuples(st.just("stored"), stored_fields()),
    st.tuples(st.just("removed"), removed_fields()),
    st.tuples(st.just("cleared"), st.just({})),
)
batch_fields = st.tuples(st.floats(allow_nan=False, allow_infinity=False), st.lists(event_fields, max_size=5), maybe(st.integers(0, 7)))


def ours(kind: str, f: dict[str, Any]) -> Any:
    return {"stored": BlockStored, "removed": BlockRemoved, "cleared": AllBlocksCleared}[kind](**f)


def reference(kind: str, f: dict[str, Any]) -> Any:
    return {"stored": RefStored, "removed": RefRemoved, "cleared": RefCleared}[kind](**f)


def legacy_reference(version: str, kind: str, f: dict[str, Any]) -> Any:
    ref = RefLegacy[version]
    if kind == "cleared":
        return ref["AllBlocksCleared"]()
    cls = ref["BlockStored" if kind == "stored" else "BlockRemoved"]
    return cls(**{k: f[k] for k in (fd.name for fd in msgspec.structs.fields(cls))})


ENC = msgspec.msgpack.Encoder()

# ------------------------------------------------------------------------------------------
# (a) events: byte-identical to vLLM-declared structs, both forms decoded
# ------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(batch_fields)
def test_encode_batch_is_byte_identical_to_vllm_structs(fields: tuple) -> None:
    ts, events, rank = fields
    mine = EventBatch(ts=ts, events=[ours(k, f) for k, f in events], data_parallel_rank=rank)
    theirs = ENC.encode(RefBatch(ts=ts, events=[reference(k, f) for k, f in events], data_parallel_rank=rank))
    assert encode_batch(mine) == theirs
    assert decode_batch(theirs) == mine
    # the map-form envelope carries the same events
    assert decode_batch(ENC.encode(RefMapBatch(ts=ts, events=[reference(k, f) for k, f in events], data_parallel_rank=rank))) == mine


@pytest.mark.parametrize("version", ARRAY_VERSIONS)
@settings(max_examples=150, deadline=None, derandomize=True)
@given(fields=batch_fields)
def test_legacy_array_form_is_byte_identical_and_decodes(version: str, fields: tuple) -> None:
    """Each array-form release (6 fields in 0.10, 9 in 0.20): our encoder writes its bytes and
    the decoder reads back every field it has (0.20's extra_keys and group_idx too)."""
    ts, events, rank = fields
    stored_names = golden(version)["schema"]["BlockStored"]["fields"]
    removed_names = golden(version)["schema"]["BlockRemoved"]["fields"]
    mine = EventBatch(ts=ts, events=[ours(k, f) for k, f in events], data_parallel_rank=rank)
    theirs = ENC.encode(RefBatch(ts=ts, events=[legacy_reference(version, k, f) for k, f in events], data_parallel_rank=rank))
    assert encode_batch(mine, legacy=len(stored_names)) == theirs
    back = decode_batch(theirs)
    assert (back.ts, back.data_parallel_rank, len(back.events)) == (ts, rank, len(events))
    for ev, (kind, f) in zip(back.events, events, strict=True):
        if kind == "stored":
            assert isinstance(ev, BlockStored)
            for k in msgspec.structs.fields(BlockStored):
                assert getattr(ev, k.name) == (f[k.name] if k.name in stored_names else None), k.name
        elif kind == "removed":
            assert isinstance(ev, BlockRemoved)
            for k in msgspec.structs.fields(BlockRemoved):
                assert getattr(ev, k.name) == (f[k.name] if k.name in removed_names else None), k.name
        else:
            assert isinstance(ev, AllBlocksCleared)


def _first_event_header(payload: bytes) -> int:
    """The byte after the envelope's array header, float64 ts and events array header."""
    assert payload[0] == 0x93 and payload[1] == 0xCB and 0x90 <= payload[10] <= 0x9F
    return payload[11]


def test_block_stored_map_header_is_always_map16() -> None:
    """DESIGN §3: msgspec sizes a struct's map header by its declared fields plus the tag, so
    BlockStored (15 fields + tag) is a map16 even with only the 8 required keys present, while
    BlockRemoved (5 + tag) and AllBlocksCleared are fixmaps."""
    minimal = {"block_hashes": [1], "parent_block_hash": None, "token_ids": [7], "block_size": 1, "lora_id": None, "medium": None, "lora_name": None}
    for payload in (
        ENC.encode(RefBatch(ts=0.0, events=[RefStored(**minimal)], data_parallel_rank=0)),
        encode_batch(EventBatch(ts=0.0, events=[BlockStored(**minimal)], data_parallel_rank=0)),
    ):
        i = 11
        assert payload[i : i + 3] == b"\xde\x00\x08"  # map16, 8 entries: type + 7 required fields
    assert _first_event_header(encode_batch(EventBatch(0.0, [BlockRemoved([1], "GPU")], 0))) == 0x83
    assert _first_event_header(encode_batch(EventBatch(0.0, [AllBlocksCleared()], 0))) == 0x81

    # the msgspec fact behind it, on structs unrelated to ours: 15 declared fields + tag -> map16,
    # 14 + tag -> fixmap, whatever is actually present
    def struct_with(n: int) -> type:
        return msgspec.defstruct(f"S{n}", [(f"f{i}", int | None, None) for i in range(n)], tag=True, omit_defaults=True)

    assert ENC.encode(struct_with(15)())[:3] == b"\xde\x00\x01"
    assert ENC.encode(struct_with(14)())[0] == 0x81


def test_vllm_typed_extra_keys_and_future_fields_decode() -> None:
    """A vLLM build publishing typed extra keys ({"type": "cache_salt", ...}) and an
    ``event_version`` field: unknown keys are ignored, the typed entries kept as maps."""
    ev = {
        "type": "BlockStored",
        "block_hashes": [5],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": "sql",
        "event_version": 1,
        "extra_keys": [[{"type": "lora", "name": "sql"}, {"type": "cache_salt", "salt": "t"}]],
        "group_idx": 0,
    }
    b = decode_batch(ENC.encode([1.0, [ev], 0]))
    assert b.events[0].extra_keys == [[{"type": "lora", "name": "sql"}, {"type": "cache_salt", "salt": "t"}]]
    assert b.events[0].lora_name == "sql" and b.events[0].group_idx == 0


# ------------------------------------------------------------------------------------------
# (b) vLLM block hashes, restated with pickle / canonical cbor2 and hashlib / xxhash
# ------------------------------------------------------------------------------------------


def vllm_hash_fn(algo: str):
    serialize = {
        "sha256": lambda o: pickle.dumps(o, protocol=5),
        "xxhash": lambda o: pickle.dumps(o, protocol=5),
        "sha256_cbor": lambda o: cbor2.dumps(o, canonical=True),
        "xxhash_cbor": lambda o: cbor2.dumps(o, canonical=True),
    }[algo]
    digest = (lambda b: hashlib.sha256(b).digest()) if algo.startswith("sha256") else xxhash.xxh3_128_digest
    return lambda o: digest(serialize(o))


tagged_extra = st.one_of(
    st.tuples(st.just("cache_salt"), small_text),
    st.tuples(st.just("lora"), small_text, small_text),
    st.tuples(st.just("mm"), st.text(alphabet="0123456789abcdef", min_size=1, max_size=16), st.integers(0, 4096)),
    small_text,  # untagged values (older vLLM) hash as they are
    st.tuples(small_text, st.integers(0, 4096)),
    st.binary(max_size=32),
)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    algo=st.sampled_from(["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]),
    tokens=st.lists(token, max_size=80),
    bs=st.integers(1, 17),
    seed=st.one_of(st.none(), st.just("0"), st.text(max_size=10)),
    extra=st.lists(st.one_of(st.none(), st.lists(tagged_extra, min_size=1, max_size=3).map(tuple)), max_size=8),
)
def test_vllm_block_hashes_equal_restated_vllm(algo: str, tokens: list[int], bs: int, seed: str | None, extra: list) -> None:
    h = vllm_hash_fn(algo)
    parent = h("vllm-none-hash" if seed is None else seed)
    assert none_hash(algo, seed) == parent
    want = []
    for i in range(len(tokens) // bs):  # full blocks only
        parent = h((parent, tuple(tokens[i * bs : (i + 1) * bs]), extra[i] if i < len(extra) else None))
        want.append(parent)
    got = vllm_block_hashes(tokens, bs, algo, seed, extra)
    assert got == want
    assert all(len(d) == (32 if algo.startswith("sha256") else 16) for d in got)
    assert [event_hash(d) for d in got] == [int.from_bytes(d, "big") & (2**64 - 1) for d in got]


@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    tokens=st.lists(token, max_size=200),
    bs=st.integers(1, 33),
    model=st.text(max_size=20),
    lora=maybe(st.text(min_size=1, max_size=10)),
    salt=maybe(st.text(min_size=1, max_size=10)),
)
def test_block_keys_equal_plain_statement(tokens: list[int], bs: int, model: str, lora: str | None, salt: str | None) -> None:
    """DESIGN §3: key_i = xxh3_64(block i's tokens as uint32 little-endian, seed=key_{i-1}),
    key_{-1} = xxh3_64 of the model / LoRA / salt material."""
    key = xxhash.xxh3_64_intdigest("\x00".join(("kvgate/v1", model, lora or "", salt or "")).encode())
    assert root_key(model, lora, salt) == key
    want = []
    for i in range(len(tokens) // bs):
        key = xxhash.xxh3_64_intdigest(struct.pack(f"<{bs}I", *tokens[i * bs : (i + 1) * bs]), seed=key)
        want.append(key)
    assert block_keys(tokens, bs, model=model, lora=lora, salt=salt) == want


def test_block_keys_reject_what_vllm_never_sends() -> None:
    with pytest.raises(ValueError):
        block_keys([1, 2], 0, model="m")
    with pytest.raises((OverflowError, ValueError)):
        block_keys([-1] * 16, 16, model="m")


def test_block_keys_ignore_the_partial_tail_whatever_it_holds() -> None:
    full = list(range(32))
    assert block_keys(full + [2**40], 16, model="m") == block_keys(full, 16, model="m") == block_keys(full + [5, 6], 16, model="m")
