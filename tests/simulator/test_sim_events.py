"""The simulator's KV events seen by an independent ZMQ subscriber, checked against vLLM's hashes.

Frames, seq, map-form payloads (array form with --legacy-events), one batch per step, replay,
BlockStored/BlockRemoved/AllBlocksCleared, and block hashes equal to
``kvindex.hashing.vllm_block_hashes`` for every algorithm, seed, cache salt and LoRA.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import msgspec
import pytest

from kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from kvindex.hashing import event_hash, vllm_block_hashes
from simulator.cli import build_parser, configs_from_args
from simulator.fleet import SimConfig, SimFleet, cli_args
from tests.helpers.sim import MODEL, Subscriber, replay, sdk, wait_for

ALGOS = [("sha256", None), ("sha256_cbor", "42"), ("xxhash", "7"), ("xxhash_cbor", None)]


@pytest.fixture(scope="module")
def fleet():
    cfgs = [SimConfig(model=MODEL, time_scale=0.0, hash_algo=a, hash_seed=s, kv_events_topic="kv@sim") for a, s in ALGOS]
    cfgs.append(SimConfig(model=MODEL, time_scale=0.0, num_blocks=24))  # small: evicts
    cfgs.append(SimConfig(model=MODEL, time_scale=0.0, lora_modules=["sql"]))
    f = SimFleet(cfgs)
    f.start()
    yield f
    f.stop()


def _tokens(url: str, prompt: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]


@pytest.mark.parametrize("i", range(len(ALGOS)), ids=[a for a, _ in ALGOS])
def test_events_decode_and_match_vllm_hashes(fleet, i):
    h = fleet.handles[i]
    algo, seed = ALGOS[i]
    sub = Subscriber(h.events_endpoint)
    try:
        prompt = f"Events check {algo}: " + " ".join(f"w{j}" for j in range(60))
        sdk(h.url).completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        raw = sub.raw()
    finally:
        sub.close()
    tokens = _tokens(h.url, prompt)
    expected = [event_hash(d) for d in vllm_block_hashes(tokens, 16, algo, seed)]
    assert raw and all(topic == b"kv@sim" for topic, _, _ in raw)
    seqs = [s for _, s, _ in raw]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # +1 per batch
    stored = []
    for _, _, payload in raw:
        top = msgspec.msgpack.decode(payload)
        assert isinstance(top, list) and len(top) == 3 and isinstance(top[0], float) and top[2] == 0  # [ts, events, dp_rank]
        assert all(isinstance(ev, dict) and next(iter(ev)) == "type" for ev in top[1])  # 0.33 map form, "type" first
        stored += [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
    hashes = [hh for e in stored for hh in e.block_hashes]
    assert hashes[: len(expected)] == expected
    first = stored[0]
    assert first.parent_block_hash is None and first.block_size == 16 and first.medium == "GPU" and first.group_idx == 0
    assert first.token_ids == tokens[: 16 * len(first.block_hashes)] and first.extra_keys == [None] * len(first.block_hashes)
    for a, b in zip(stored, stored[1:]):
        assert b.parent_block_hash == a.block_hashes[-1]


def test_seq_starts_at_zero_and_one_batch_per_step():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.0)])
    f.start()
    try:
        h = f.handles[0]
        sub = Subscriber(h.events_endpoint)
        try:
            prompt = "seq check " + " ".join(f"s{j}" for j in range(70))
            httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 20}).raise_for_status()
            got = sub.raw()
        finally:
            sub.close()
        assert [s for _, s, _ in got] == list(range(len(got))) and got[0][1] == 0
        # prefill stores the prompt's blocks in one batch; decode fills one more block 16 tokens later
        n_prompt_blocks = len(_tokens(h.url, prompt)) // 16
        batches = [decode_batch(p).events for _, _, p in got]
        assert len(batches[0]) == 1 and len(batches[0][0].block_hashes) == n_prompt_blocks
        assert all(len(b) == 1 and isinstance(b[0], BlockStored) for b in batches)
    finally:
        f.stop()


def test_lora_and_cache_salt_match_vllm(fleet):
    h = fleet.handles[5]
    sub = Subscriber(h.events_endpoint)
    try:
        prompt = "LoRA and salt: " + " ".join(f"v{j}" for j in range(40))
        httpx.post(f"{h.url}/v1/completions", json={"model": "sql", "prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"}).raise_for_status()
        events = [e for _, b in sub.drain() for e in b.events]
    finally:
        sub.close()
    tokens = _tokens(h.url, prompt)
    n = len(tokens) // 16
    lora = ("lora", "sql", "/adapters/sql")
    tagged = [(lora, ("cache_salt", "tenant-a"))] + [(lora,)] * (n - 1)
    expected = [event_hash(d) for d in vllm_block_hashes(tokens, 16, "sha256", None, tagged)]
    ev = events[0]
    assert isinstance(ev, BlockStored) and ev.block_hashes == expected
    assert ev.lora_name == "sql" and ev.lora_id == 1
    assert [list(k) for k in ev.extra_keys] == [["sql", "tenant-a"]] + [["sql"]] * (n - 1)  # untagged in events
    # salt and LoRA separate caches: the same prompt on the base model or unsalted gets no hit
    for body in ({"model": MODEL}, {"model": "sql"}, {"model": "sql", "cache_salt": "tenant-b"}):
        r = httpx.post(f"{h.url}/v1/completions", json={**body, "prompt": prompt, "max_tokens": 1}).json()
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, body
    r = httpx.post(f"{h.url}/v1/completions", json={"model": "sql", "cache_salt": "tenant-a", "prompt": prompt, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(tokens) - 1) // 16 * 16


def test_eviction_emits_block_removed_and_replay_returns_missed_batches(fleet):
    h = fleet.handles[4]  # 24 blocks only
    c = sdk(h.url)
    # batches published before anyone subscribes: a late subscriber must get them from replay
    for i in range(2):
        c.completions.create(model=MODEL, prompt=f"early {i} " + " ".join(f"e{i}y{j}" for j in range(40)), max_tokens=1)
    sub = Subscriber(h.events_endpoint)
    try:
        for i in range(6):
            c.completions.create(model=MODEL, prompt=f"evict {i} " + " ".join(f"x{i}y{j}" for j in range(60)), max_tokens=1)
        live = sub.raw()
    finally:
        sub.close()
    events = [e for _, _, p in live for e in decode_batch(p).events]
    stored = {hh for e in events if isinstance(e, BlockStored) for hh in e.block_hashes}
    removed = [hh for e in events if isinstance(e, BlockRemoved) for hh in e.block_hashes]
    assert removed and all(e.medium == "GPU" for e in events if isinstance(e, BlockRemoved))
    assert set(removed) - stored, "evicted blocks include ones stored before we subscribed"
    first_live = live[0][1]
    assert first_live > 0
    got = replay(h.replay_endpoint, 0)
    assert got[-1] == [b"", b"", b"\xff" * 8, b""]  # [empty, topic, ff*8, empty payload]
    frames = got[:-1]
    assert all(len(fr) == 4 and fr[0] == b"" for fr in frames)
    by_seq = {int.from_bytes(fr[2], "big"): fr[3] for fr in frames}
    assert sorted(by_seq) == list(range(len(by_seq)))  # everything from seq 0
    assert all(by_seq[s] == p for _, s, p in live)  # the very bytes published live
    missed = [decode_batch(by_seq[s]) for s in range(first_live)]
    assert any(isinstance(e, BlockStored) for b in missed for e in b.events)
    # a replay from the middle returns only the tail
    tail = replay(h.replay_endpoint, first_live)
    assert [int.from_bytes(fr[2], "big") for fr in tail[:-1]] == sorted(s for s in by_seq if s >= first_live)


def test_reset_prefix_cache_emits_all_blocks_cleared(fleet):
    h = fleet.handles[0]
    prompt = "reset me " + " ".join(f"r{j}" for j in range(40))
    httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).raise_for_status()
    sub = Subscriber(h.events_endpoint)
    try:
        assert httpx.post(f"{h.url}/reset_prefix_cache").status_code == 200
        events = [e for _, b in sub.drain() for e in b.events]
    finally:
        sub.close()
    assert any(isinstance(e, AllBlocksCleared) for e in events)
    r = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_legacy_events_from_the_cli():
    """``kvgate sim --legacy-events`` (a real process): array-form events, topic-less replay."""
    args = build_parser().parse_args(["--port", "0", "--legacy-events", "--kv-events-endpoint", "tcp://127.0.0.1:1", "--replay-endpoint", "tcp://127.0.0.1:2"])
    (cfg,) = configs_from_args(args)
    assert cfg.legacy_events and "--legacy-events" in cli_args(cfg)
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.0, legacy_events=True)], mode="process")
    f.start()
    try:
        h = f.handles[0]
        sub = Subscriber(h.events_endpoint)
        try:
            prompt = "legacy " + " ".join(f"l{j}" for j in range(40))
            httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).raise_for_status()
            raw = sub.raw()
        finally:
            sub.close()
        top = msgspec.msgpack.decode(raw[0][2])
        assert isinstance(top[1][0], list) and top[1][0][0] == "BlockStored"  # ["BlockStored", field, ...]
        ev = decode_batch(raw[0][2]).events[0]
        assert ev.block_hashes == [event_hash(d) for d in vllm_block_hashes(_tokens(h.url, prompt), 16)]
        got = replay(h.replay_endpoint, 0)
        assert got[-1] == [b"", b"\xff" * 8, b""] and all(len(fr) == 3 for fr in got)  # older form: no topic
    finally:
        f.stop()


def _free_run(n: int) -> int:
    """The first of ``n`` consecutive loopback ports that are all free right now."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_cli_runs_several_replicas_with_their_own_ports():
    """``python -m simulator.cli --replicas 2``: consecutive HTTP ports, event ports two apart."""
    port = _free_run(6)
    ev = port + 2  # events ev, ev+2; replay ev+1, ev+3
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "--port",
            str(port),
            "--replicas",
            "2",
            "--time-scale",
            "0",
            "--kv-events-endpoint",
            f"tcp://*:{ev}",
            "--replay-endpoint",
            f"tcp://*:{ev + 1}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for p in (port, port + 1):
            wait_for(lambda p=p: proc.poll() is not None or _healthy(p), timeout=20, message=f"replica on {p}")
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        sub = Subscriber(f"tcp://127.0.0.1:{ev + 2}")
        try:
            httpx.post(f"http://127.0.0.1:{port + 1}/v1/completions", json={"model": MODEL, "prompt": "x " * 40, "max_tokens": 1}).raise_for_status()
            assert sub.drain(), "second replica publishes on its own port"
        finally:
            sub.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.05)
        return False
