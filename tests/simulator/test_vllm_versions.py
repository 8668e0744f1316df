"""``--vllm-version``: the simulator publishes and hashes as each vLLM release does.

What each release does is restated in ``simulator/vllm_versions.py`` (read in that release's
code); here the simulator's wire output is held to it: the BlockStored array length or map
form, extra keys in events, LoRA and salt in the hash (checked by recomputing the block hash
with the release's extra keys), ``group_idx`` on removals, the replay frames and end marker.
The golden files written by vLLM's own classes (tests/kvindex/goldens) fix the field order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from kvindex.events import decode_batch
from kvindex.hashing import event_hash, vllm_block_hashes
from simulator.fleet import SimConfig, SimFleet
from simulator.vllm_versions import RELEASES, profile
from tests.helpers.index import golden
from tests.helpers.sim import Subscriber, replay

MODEL = "kvgate/demo-8b"
BS = 4
TOKENS = list(range(1000, 1013))  # three full blocks and one token more
GOLDEN = {"0.10": "0.10.2", "0.11": "0.11.0", "0.14": "0.14.0", "0.20": "0.20.0", "0.27": "0.27.0", "0.33": "0.33.0"}


@pytest.fixture(scope="module", params=RELEASES)
def sim(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    cfg = SimConfig(model=MODEL, block_size=BS, time_scale=0.0, hash_seed="7", vllm_version=request.param, lora_modules=["ad"], kv_events_topic="kv")
    fleet = SimFleet([cfg])
    fleet.start()
    try:
        yield request.param, fleet.handles[0]
    finally:
        fleet.stop()


def _complete(h: Any, **extra: Any) -> None:
    r = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": TOKENS, "max_tokens": 1, **extra}, timeout=10)
    assert r.status_code == 200, r.text


def test_events_and_hashes_are_the_releases(sim: tuple[str, Any]) -> None:
    release, h = sim
    prof = profile(release)
    sub = Subscriber(h.events_endpoint)
    try:
        _complete(h, model="ad", cache_salt="tenant")
        frames = sub.raw(1.0)
    finally:
        sub.close()
    assert frames, "no events"
    topic, _, payload = frames[0]
    assert topic == b"kv"
    raw = msgspec.msgpack.decode(payload)
    stored = next(e for e in raw[1] if (e[0] if isinstance(e, list) else e.get("type")) == "BlockStored")
    schema = golden(GOLDEN[release])["schema"]["BlockStored"]["fields"]
    if prof.array_fields:
        assert isinstance(stored, list) and len(stored) == 1 + prof.array_fields == 1 + len(schema)
    else:
        assert isinstance(stored, dict) and set(stored) - {"type"} <= set(schema)
        # msgspec sizes the map header by the declared fields: fixmap for 0.27's 12, map16 for 0.33's 15
        at = payload.index(b"\xa4type\xabBlockStored")
        if len(schema) > 14:
            assert payload[at - 3 : at - 1] == b"\xde\x00", release
        else:
            assert payload[at - 1] & 0xF0 == 0x80, release
    ev = next(e for e in decode_batch(payload).events if type(e).__name__ == "BlockStored")
    lora_id = ev.lora_id
    assert lora_id is not None
    # the block hashes are the release's: LoRA (int id up to 0.11, name after, tagged in 0.33)
    # on every block, the salt on block 0 (tagged in 0.33)
    lora_key: Any = {"id": lora_id, "name": "ad", "tagged": ("lora", "ad", "/adapters/ad")}[prof.lora_hash]
    salt_key: Any = ("cache_salt", "tenant") if prof.salt_tagged else "tenant"
    extra = [(lora_key, salt_key), (lora_key,), (lora_key,)]
    want = [event_hash(d) for d in vllm_block_hashes(TOKENS, BS, "sha256", "7", extra)]
    assert ev.block_hashes == want
    assert (ev.extra_keys is not None) == prof.extra_keys_in_events
    if prof.extra_keys_in_events:
        assert ev.extra_keys == [["ad", "tenant"], ["ad"], ["ad"]]
    assert ev.lora_name == (None if prof.lora_hash == "id" else "ad")
    assert (ev.group_idx == 0) == (prof.array_fields in (0, 9))


def test_replay_frames_are_the_releases(sim: tuple[str, Any]) -> None:
    release, h = sim
    _complete(h)
    got = replay(h.replay_endpoint, 0)
    *batches, end = got
    assert batches
    if profile(release).replay_topic:  # 0.27+: [b"", topic, seq, payload], end [b"", b"", END, b""]
        assert all(len(f) == 4 and f[1] == b"kv" for f in batches)
        assert end == [b"", b"", b"\xff" * 8, b""]
    else:  # up to 0.20: [b"", seq, payload], end [b"", END, b""]
        assert all(len(f) == 3 for f in batches)
        assert end == [b"", b"\xff" * 8, b""]


def test_unseeded_none_hash_is_random_before_0_33() -> None:
    fleet = SimFleet([SimConfig(model=MODEL, block_size=BS, time_scale=0.0, vllm_version=v) for v in ("0.27", "0.27", "0.33", "0.33")])
    fleet.start()
    try:
        hashes = []
        for h in fleet.handles:
            sub = Subscriber(h.events_endpoint)
            try:
                _complete(h)
                ev = decode_batch(sub.raw(1.0)[0][2]).events[0]
                hashes.append(ev.block_hashes[0])
            finally:
                sub.close()
    finally:
        fleet.stop()
    assert hashes[0] != hashes[1]  # 0.27: os.urandom per process (here per replica)
    assert hashes[2] == hashes[3] == event_hash(vllm_block_hashes(TOKENS, BS, "sha256", None)[0])  # 0.33: "vllm-none-hash"


def test_lookahead_hashes_cover_the_next_tokens() -> None:
    fleet = SimFleet([SimConfig(model=MODEL, block_size=BS, time_scale=0.0, hash_seed="7", hash_lookahead_tokens=1)])
    fleet.start()
    try:
        h = fleet.handles[0]
        sub = Subscriber(h.events_endpoint)
        try:
            _complete(h)
            evs = [e for _, b in sub.drain(1.0) for e in b.events if type(e).__name__ == "BlockStored"]
        finally:
            sub.close()
    finally:
        fleet.stop()
    ev = evs[0]
    assert ev.lookahead_token_ids == [[TOKENS[4]], [TOKENS[8]], [TOKENS[12]]]
    want = [event_hash(d) for d in vllm_block_hashes(TOKENS[:12], BS, "sha256", "7", [(None, TOKENS[4]), (None, TOKENS[8]), (None, TOKENS[12])])]
    assert ev.block_hashes == want


def test_unknown_release_and_lookahead_before_0_33_are_refused() -> None:
    with pytest.raises(ValueError):
        SimConfig(vllm_version="0.9").validate()
    with pytest.raises(ValueError):
        SimConfig(vllm_version="0.27", hash_lookahead_tokens=1).validate()
    assert profile("0.20.0") == profile("0.20")
