"""The simulator seen from outside, as a gateway sees a vLLM replica."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kvindex.events import BlockRemoved, BlockStored, decode_batch
from kvindex.hashing import event_hash, vllm_block_hashes
from simulator.fleet import SimConfig, SimFleet

MODEL = "kvgate/demo-8b"
LONG = "Shared context: " + " ".join(f"fact {i} is that item {i} costs {i * 3} coins;" for i in range(40))


@pytest.fixture(scope="module")
def fleet():
    f = SimFleet([SimConfig(model=MODEL, seed=7, time_scale=0.05), SimConfig(model=MODEL, seed=7, time_scale=0.05, num_blocks=24, hash_algo="sha256_cbor", hash_seed="42")])
    f.start()
    yield f
    f.stop()


def _sdk(h) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0, timeout=20)


class Subscriber:
    """An independent ZMQ SUB on a replica's event endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        time.sleep(0.2)  # slow joiner

    def drain(self, wait_s: float = 0.5) -> list[tuple[int, object]]:
        out = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                topic, seq, payload = self.sock.recv_multipart()
                out.append((int.from_bytes(seq, "big"), decode_batch(payload)))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_openai_sdk_sync_async_stream(fleet):
    h = fleet.handles[0]
    c = _sdk(h)
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content

    async def go():
        ac = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(*(ac.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=2) for i in range(5)))
        await ac.close()
        return rs

    assert all(x.choices[0].text for x in asyncio.run(go()))


def test_deterministic_output_for_a_seed(fleet):
    a = _sdk(fleet.handles[0]).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    b = _sdk(fleet.handles[1]).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    assert a == b


def test_repeat_gets_cached_tokens_and_shorter_ttft(fleet):
    c = _sdk(fleet.handles[0])
    prompt = LONG + " unique-ttft"

    def ttft() -> tuple[float, int]:
        t0 = time.perf_counter()
        first = None
        usage = None
        for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, stream=True, stream_options={"include_usage": True}):
            if first is None and ch.choices and ch.choices[0].text:
                first = time.perf_counter() - t0
            if ch.usage:
                usage = ch.usage
        return first, usage.prompt_tokens_details.cached_tokens

    cold, cached0 = ttft()
    warm, cached1 = ttft()
    assert cached0 == 0 and cached1 >= 16 * (len(LONG) // 200)
    assert warm < cold


def test_events_match_vllm_hashes(fleet):
    h = fleet.handles[1]  # sha256_cbor with seed "42"
    sub = Subscriber(h.events_endpoint)
    try:
        prompt = "Events check: " + " ".join(f"w{i}" for i in range(60))
        _sdk(h).completions.create(model=MODEL, prompt=prompt, max_tokens=1)
        tokens = httpx.post(f"{h.url}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]
        expected = [event_hash(d) for d in vllm_block_hashes(tokens, 16, "sha256_cbor", "42")]
        stored = [hh for _, b in sub.drain() for e in b.events if isinstance(e, BlockStored) for hh in e.block_hashes]
        assert stored[: len(expected)] == expected
    finally:
        sub.close()


def test_eviction_emits_block_removed_and_replay(fleet):
    h = fleet.handles[1]  # 24 blocks only
    sub = Subscriber(h.events_endpoint)
    try:
        c = _sdk(h)
        for i in range(6):
            c.completions.create(model=MODEL, prompt=f"evict {i} " + " ".join(f"x{i}y{j}" for j in range(60)), max_tokens=1)
        batches = sub.drain()
        assert any(isinstance(e, BlockRemoved) for _, b in batches for e in b.events)
        seqs = [s for s, _ in batches]
        # replay from the first seq we saw returns the same batches
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(h.replay_endpoint)
        dealer.send_multipart([b"", seqs[0].to_bytes(8, "big")])
        replayed = []
        while dealer.poll(2000):
            frames = dealer.recv_multipart()
            assert frames[0] == b""
            if frames[-2] == b"\xff" * 8:
                break
            replayed.append(int.from_bytes(frames[-2], "big"))
        dealer.close(0)
        ctx.term()
        assert set(seqs) <= set(replayed)
    finally:
        sub.close()


def test_metrics_names_and_labels(fleet):
    h = fleet.handles[0]
    text = httpx.get(f"{h.url}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds", "vllm:lora_requests_info"):
        assert name in fams, name
    s = fams["vllm:num_requests_running"].samples[0]
    assert s.labels == {"model_name": MODEL, "engine": "0"}


def test_errors_like_vllm(fleet):
    h = fleet.handles[0]
    r = httpx.post(f"{h.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400
    r = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": [10] * 9000, "max_tokens": 1})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert httpx.get(f"{h.url}/health").status_code == 200
    assert httpx.get(f"{h.url}/version").json()["version"]
    models = httpx.get(f"{h.url}/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 8192


def test_overload_queues():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.5, max_num_seqs=2)])
    f.start()
    try:
        h = f.handles[0]

        async def go():
            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [asyncio.create_task(client.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": f"q{i}", "max_tokens": 300})) for i in range(6)]
                best = ""
                for _ in range(40):  # bounded poll while the batch is full
                    await asyncio.sleep(0.05)
                    text = (await client.get(f"{h.url}/metrics")).text
                    if 'vllm:num_requests_waiting{engine="0",model_name="kvgate/demo-8b"} 4.0' in text:
                        best = text
                        break
                    best = best or text
                await asyncio.gather(*tasks)
                return best

        text = asyncio.run(go())
        waiting = [s.value for fam in text_string_to_metric_families(text) if fam.name == "vllm:num_requests_waiting" for s in fam.samples]
        assert waiting and waiting[0] > 0
    finally:
        f.stop()


@pytest.mark.parametrize("prefer_nixl", [True, False])
def test_two_hop_pd_moves_kv(prefer_nixl):
    f = SimFleet([SimConfig(model=MODEL, role="prefill", time_scale=0.02, prefer_nixl=prefer_nixl), SimConfig(model=MODEL, role="decode", time_scale=0.02, prefer_nixl=prefer_nixl)])
    f.start()
    try:
        pre, dec = f.handles
        body = {"model": MODEL, "prompt": LONG, "max_tokens": 1, "stream": False}
        r = httpx.post(f"{pre.url}/v1/completions", json={**body, "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None, "remote_host": None, "remote_port": None}})
        assert r.status_code == 200
        kv = r.json()["kv_transfer_params"]
        assert kv["do_remote_prefill"] is True and kv["remote_engine_id"] == pre.engine_id and isinstance(kv["remote_block_ids"][0], list)
        r2 = httpx.post(f"{dec.url}/v1/completions", json={**body, "max_tokens": 5, "kv_transfer_params": kv})
        usage = r2.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
        assert r2.json()["choices"][0]["text"]
    finally:
        f.stop()


def test_process_mode_kill_and_restart():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.02)], mode="process")
    f.start()
    try:
        h = f.handles[0]
        assert httpx.get(f"{h.url}/health").status_code == 200
        f.kill(0)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{h.url}/health", timeout=1)
        f.restart(0)
        assert httpx.get(f"{h.url}/health").status_code == 200
    finally:
        f.stop()


def test_lora_salt_and_legacy_events_match_vllm():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.02, lora_modules=["sql"], legacy_events=True)])
    f.start()
    try:
        h = f.handles[0]
        models = httpx.get(f"{h.url}/v1/models").json()["data"]
        assert {(m["id"], m["parent"]) for m in models} == {(MODEL, None), ("sql", MODEL)}
        sub = Subscriber(h.events_endpoint)
        raw_sub = sub.sock
        try:
            prompt = "LoRA and salt: " + " ".join(f"v{i}" for i in range(40))
            httpx.post(f"{h.url}/v1/completions", json={"model": "sql", "prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"}).raise_for_status()
            tokens = httpx.post(f"{h.url}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]
            n = len(tokens) // 16
            lora = ("lora", "sql", "/adapters/sql")
            extra = [(lora, ("cache_salt", "tenant-a"))] + [(lora,)] * (n - 1)
            expected = [event_hash(d) for d in vllm_block_hashes(tokens, 16, "sha256", None, extra)]
            frames = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not frames:
                if raw_sub.poll(100):
                    frames.append(raw_sub.recv_multipart())
            payload = frames[0][2]
            import msgspec

            assert isinstance(msgspec.msgpack.decode(payload)[1][0], list)  # the older array form
            ev = decode_batch(payload).events[0]
            assert isinstance(ev, BlockStored) and ev.lora_name == "sql"
            assert ev.block_hashes == expected
        finally:
            sub.close()
    finally:
        f.stop()
