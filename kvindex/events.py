"""vLLM KV-cache events: the msgpack payload of each ZMQ message, decoded and encoded.

The types mirror vLLM 0.33's ``vllm.distributed.kv_events`` field for field, and are
msgspec structs configured the way vLLM configures its own (tagged, ``omit_defaults``), so
``encode_batch`` reproduces vLLM's bytes exactly, including the map16 header msgspec writes
for a struct with 16 or more fields even when fewer keys are present.

``decode_batch`` is lenient where vLLM versions differ and strict where garbage would corrupt
the index: it accepts the 0.33 map form and the older array form (``["BlockStored", ...]``),
the batch envelope as an array (0.33) or as a map (builds whose ``EventBatch`` is not
``array_like``), int or raw-bytes block hashes, and unknown keys; an unknown event type is skipped and
counted; anything else raises ``EventDecodeError`` rather than crashing the subscriber.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"

#: A block hash as published: the digest's low 64 bits as an unsigned int (default) or the
#: raw digest bytes.
BlockHash: TypeAlias = int | bytes


class EventDecodeError(ValueError):
    """The payload is not a KV-event batch in any form we know."""


# --------------------------------------------------------------------------------------------
# vLLM 0.33 map form (the public types)
# --------------------------------------------------------------------------------------------


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged union; the tag is the ``"type"`` key, written first."""


class BlockStored(KVCacheEvent):
    """Consecutive full blocks became cached on a replica.

    ``token_ids`` holds all blocks' tokens concatenated; ``parent_block_hash`` is the hash of
    the block before the first one (None for a prompt's first block).
    """

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    #: Tokens after each block that its hash also covers, one list per block (vLLM 0.33's
    #: lookahead hashing for EAGLE-style speculative decoding); None when it is off.
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks were evicted from ``medium`` on a replica."""

    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The replica's whole prefix cache was reset."""


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: ``[ts, [events], data_parallel_rank]``."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# --------------------------------------------------------------------------------------------
# The older array form: each event ``["Type", field, field, ...]`` in field order
# --------------------------------------------------------------------------------------------


class _LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _LegacyBlockStored(_LegacyEvent, tag="BlockStored"):
    # 6 fields up to 0.11, 7 (lora_name) in 0.14, 9 (extra_keys, group_idx) in 0.20;
    # msgspec omits trailing defaults, so every length from 4 to 9 is valid
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _LegacyBlockRemoved(_LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class _LegacyAllBlocksCleared(_LegacyEvent, tag="AllBlocksCleared"):
    pass


_LegacyEventT: TypeAlias = _LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared


class _RawBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class _RawMapBatch(msgspec.Struct, gc=False):
    """The envelope as a map ``{"ts", "events", "data_parallel_rank"}``: some vLLM builds
    declare ``EventBatch`` without ``array_like`` and publish this form."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_KNOWN_TAGS = frozenset({"BlockStored", "BlockRemoved", "AllBlocksCleared"})


def _is_map(raw: msgspec.Raw | bytes) -> bool:
    view = memoryview(raw)
    return len(view) > 0 and (0x80 <= view[0] <= 0x8F or view[0] in (0xDE, 0xDF))


def _from_legacy(ev: _LegacyEventT) -> KVEvent:
    if isinstance(ev, _LegacyBlockStored):
        return BlockStored(
            block_hashes=ev.block_hashes,
            parent_block_hash=ev.parent_block_hash,
            token_ids=ev.token_ids,
            block_size=ev.block_size,
            lora_id=ev.lora_id,
            medium=ev.medium,
            lora_name=ev.lora_name,
            extra_keys=ev.extra_keys,
            group_idx=ev.group_idx,
        )
    if isinstance(ev, _LegacyBlockRemoved):
        return BlockRemoved(block_hashes=ev.block_hashes, medium=ev.medium, group_idx=ev.group_idx)
    return AllBlocksCleared()


#: The array form's BlockStored fields in order: 6 up to vLLM 0.10, 7 (``lora_name``) up to
#: 0.14, 9 (``extra_keys``, ``group_idx``) in 0.20. msgspec writes every field of an
#: ``array_like`` struct, defaults included, so a release's arrays always have its full length.
LEGACY_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name", "extra_keys", "group_idx")
_LEGACY_FORMS = (6, 7, 9)


def _to_legacy(ev: KVEvent, n: int) -> list[Any]:
    if isinstance(ev, BlockStored):
        return ["BlockStored", *(getattr(ev, f) for f in LEGACY_STORED_FIELDS[:n])]
    if isinstance(ev, BlockRemoved):
        return ["BlockRemoved", ev.block_hashes, ev.medium, *((ev.group_idx,) if n >= 9 else ())]
    return ["AllBlocksCleared"]


class _LegacyBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


# vLLM 0.27's map form: fewer declared fields than 0.33's, so msgspec sizes BlockStored's map
# header as a fixmap (12 fields + tag) where 0.33 writes a map16. Only for writing it.


class _Map27Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _Map27BlockStored(_Map27Event, tag="BlockStored"):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None


class _Map27BlockRemoved(_Map27Event, tag="BlockRemoved"):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class _Map27AllBlocksCleared(_Map27Event, tag="AllBlocksCleared"):
    pass


#: ``encode_batch``'s ``legacy`` value for vLLM 0.27's map form
MAP_FORM_0_27 = 12


def _to_map27(ev: KVEvent) -> _Map27Event:
    if isinstance(ev, BlockStored):
        return _Map27BlockStored(**{f: getattr(ev, f) for f in _Map27BlockStored.__struct_fields__})
    if isinstance(ev, BlockRemoved):
        return _Map27BlockRemoved(**{f: getattr(ev, f) for f in _Map27BlockRemoved.__struct_fields__})
    return _Map27AllBlocksCleared()


class EventDecoder:
    """Reusable decoder that also counts what it had to skip.

    ``unknown_events`` counts events of a type this version does not know (skipped, the rest
    of the batch is kept); a batch that is garbage as a whole raises ``EventDecodeError``, and
    so does one malformed event unless ``skip_bad`` is given, in which case it is skipped and
    counted in ``bad_events`` (the subscriber then distrusts the replica: the skipped event
    may have been a removal).
    """

    def __init__(self) -> None:
        self._batch = msgspec.msgpack.Decoder(_RawBatch)
        self._map_batch = msgspec.msgpack.Decoder(_RawMapBatch)
        self._event = msgspec.msgpack.Decoder(KVEvent)
        self._legacy = msgspec.msgpack.Decoder(_LegacyEventT)
        self._tag = msgspec.msgpack.Decoder(Any)
        self.unknown_events = 0
        self.bad_events = 0

    def decode(self, payload: bytes, *, skip_bad: bool = False) -> EventBatch:
        try:
            raw = (self._map_batch if _is_map(payload) else self._batch).decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise EventDecodeError(f"not a KV-event batch: {exc}") from None
        events: list[KVEvent] = []
        for item in raw.events:
            try:
                if _is_map(item):
                    events.append(self._event.decode(item))
                else:
                    events.append(_from_legacy(self._legacy.decode(item)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if self._has_unknown_tag(item):
                    self.unknown_events += 1
                    continue
                if skip_bad:
                    self.bad_events += 1
                    continue
                raise EventDecodeError(f"bad event in batch: {exc}") from None
        return EventBatch(ts=raw.ts, events=events, data_parallel_rank=raw.data_parallel_rank)

    def _has_unknown_tag(self, item: msgspec.Raw) -> bool:
        try:
            obj = self._tag.decode(item)
        except msgspec.DecodeError:
            return False
        tag = obj.get("type") if isinstance(obj, dict) else (obj[0] if isinstance(obj, list) and obj else None)
        return isinstance(tag, str) and tag not in _KNOWN_TAGS


_ENCODER = msgspec.msgpack.Encoder()


_DECODER = EventDecoder()


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one KV-event payload (0.33 map form or older array form)."""
    return _DECODER.decode(payload)


def encode_batch(batch: EventBatch, legacy: bool | int = False) -> bytes:
    """Encode ``batch`` as vLLM 0.33 would, or in the older array form with ``legacy``:
    ``True`` or 7 is the 0.14 form (7 BlockStored fields), 6 that of 0.10-0.11 (no
    ``lora_name``), 9 that of 0.20 (``extra_keys``, ``group_idx``; BlockRemoved gets
    ``group_idx`` too), ``MAP_FORM_0_27`` (12) the map form of 0.27 (no ``ownership``,
    ``session_id``, ``lookahead_token_ids``). Fields a form lacks are dropped, as that release
    would never have them."""
    if legacy is False:
        return _ENCODER.encode(batch)
    if legacy == MAP_FORM_0_27 and legacy is not True:
        return _ENCODER.encode(_LegacyBatch(ts=batch.ts, events=[_to_map27(e) for e in batch.events], data_parallel_rank=batch.data_parallel_rank))
    n = 7 if legacy is True else legacy
    if n not in _LEGACY_FORMS:
        raise ValueError(f"no vLLM release has a {n}-field BlockStored array")
    return _ENCODER.encode(_LegacyBatch(ts=batch.ts, events=[_to_legacy(e, n) for e in batch.events], data_parallel_rank=batch.data_parallel_rank))
