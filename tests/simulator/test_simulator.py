"""The simulator seen from outside, as a gateway sees a vLLM replica: OpenAI API, SSE, errors, metrics.

Wire shapes are checked against vLLM's serving code (completion/chat protocol + serving,
exception handlers, loggers.py). Events are in test_sim_events.py, P/D in test_sim_pd.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from kvindex.tokenize import load_tokenizer
from simulator.fleet import SimConfig, SimFleet
from simulator.metrics import TTFT_BUCKETS
from tests.helpers.sim import MODEL, metric, metrics, sdk, wait_for

LONG = "Shared context: " + " ".join(f"fact {i} is that item {i} costs {i * 3} coins;" for i in range(40))
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]


@pytest.fixture(scope="module")
def fleet():
    f = SimFleet(
        [
            SimConfig(model=MODEL, seed=7, time_scale=0.05),
            SimConfig(model=MODEL, seed=7, time_scale=0.05, num_blocks=24, hash_algo="sha256_cbor", hash_seed="42"),
            SimConfig(model=MODEL, seed=8, time_scale=0.05, lora_modules=["sql", "chat-tuned"]),
        ]
    )
    f.start()
    yield f
    f.stop()


def sse_events(resp: httpx.Response) -> list[str]:
    """The raw ``data:`` payloads of an SSE body, checking vLLM's framing on the way."""
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-80:]
    parts = body.split("\n\n")
    assert parts[-1] == ""
    out = []
    for p in parts[:-1]:
        assert p.startswith("data: ") and "\n" not in p, p
        out.append(p[len("data: ") :])
    assert out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out[:-1]


# -- OpenAI SDK ---------------------------------------------------------------------------------


def test_openai_sdk_sync_async_stream(fleet):
    h = fleet.handles[0]
    c = sdk(h.url)
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5 and r.usage.prompt_tokens_details.cached_tokens == 0
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    chunks = list(
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    comp_chunks = list(c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in comp_chunks) == r.choices[0].text
    assert comp_chunks[-1].choices[0].finish_reason == "length"

    async def go():
        ac = openai.AsyncOpenAI(base_url=f"{h.url}/v1", api_key="x", max_retries=0)
        try:
            rs = await asyncio.gather(*(ac.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=2) for i in range(5)))
            stream = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        finally:
            await ac.close()
        return rs, text

    rs, text = asyncio.run(go())
    assert all(x.choices[0].text and x.usage.completion_tokens == 2 for x in rs)
    assert text == chat.choices[0].message.content


# -- SSE and body shapes (vLLM's serving code) ----------------------------------------------------


def test_completion_stream_wire_format(fleet):
    h = fleet.handles[0]
    r = httpx.post(
        f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "wire format", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e) for e in sse_events(r)]
    tokens, usage = events[:-1], events[-1]
    assert len(tokens) == 4  # one chunk per token; the last token carries the finish reason
    for i, ch in enumerate(tokens):
        assert list(ch) == ["id", "object", "created", "model", "choices"]
        assert ch["object"] == "text_completion" and ch["id"].startswith("cmpl-") and ch["model"] == MODEL
        (choice,) = ch["choices"]
        assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"]
        assert choice["text"] and choice["finish_reason"] == ("length" if i == 3 else None)
    assert usage["choices"] == [] and list(usage) == ["id", "object", "created", "model", "choices", "usage"]
    assert list(usage["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"]
    assert usage["usage"]["completion_tokens"] == 4 and usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    # no stream_options: no usage chunk; stream_options {}: usage (vLLM's StreamOptions.include_usage defaults to True)
    plain = [
        json.loads(e)
        for e in sse_events(httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "wire format", "max_tokens": 2, "stream": True}))
    ]
    assert all(e["choices"] for e in plain) and "usage" not in plain[-1]
    empty = [
        json.loads(e)
        for e in sse_events(
            httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "wire format", "max_tokens": 2, "stream": True, "stream_options": {}})
        )
    ]
    assert empty[-1]["choices"] == [] and empty[-1]["usage"]["completion_tokens"] == 2
    # continuous usage stats: every chunk carries the running usage
    cont = [
        json.loads(e)
        for e in sse_events(
            httpx.post(
                f"{h.url}/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "wire format",
                    "max_tokens": 3,
                    "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                },
            )
        )
    ]
    assert [e["usage"]["completion_tokens"] for e in cont[:-1]] == [1, 2, 3]


def test_chat_stream_wire_format(fleet):
    h = fleet.handles[0]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "wire"}], "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    events = [json.loads(e) for e in sse_events(httpx.post(f"{h.url}/v1/chat/completions", json=body))]
    first, tokens, usage = events[0], events[1:-1], events[-1]
    assert list(first) == ["id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    assert len(tokens) == 3
    for ch in tokens[:-1]:
        assert ch["choices"][0] == {
            "index": 0,
            "delta": {"content": ch["choices"][0]["delta"]["content"]},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
    last = tokens[-1]["choices"][0]
    assert (
        last["finish_reason"] == "length"
        and last["delta"]["content"]
        and list(last) == ["index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"]
    )
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3 and "prompt_tokens_details" in usage["usage"]


def test_non_stream_bodies_like_vllm(fleet):
    h = fleet.handles[0]
    comp = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "bodies", "max_tokens": 3}, headers={"X-Request-Id": "abc-123"})
    assert comp.headers["x-request-id"] == "abc-123"
    b = comp.json()
    assert b["id"] == "cmpl-abc-123" and b["object"] == "text_completion"
    assert list(b) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    ]
    assert list(b["choices"][0]) == [
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
        "weight_versions",  # vLLM 0.33: null unless return_weight_versions
    ]
    assert b["kv_transfer_params"] is None and b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + 3
    chat = httpx.post(
        f"{h.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "bodies"}], "max_tokens": 3, "request_id": "rid-9"}
    ).json()
    assert chat["id"] == "chatcmpl-rid-9" and chat["object"] == "chat.completion"
    msg = chat["choices"][0]["message"]
    assert msg["role"] == "assistant" and "tool_calls" not in msg and "reasoning" in msg  # vLLM drops an empty tool_calls
    assert list(chat)[:8] == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage"]


def test_stop_strings_like_vllm(fleet):
    h = fleet.handles[0]
    base = {"model": MODEL, "prompt": "stop strings", "max_tokens": 30}
    full = httpx.post(f"{h.url}/v1/completions", json=base).json()["choices"][0]["text"]
    words = full.split()
    stop = " " + " ".join(words[3:5])  # spans two tokens
    r = httpx.post(f"{h.url}/v1/completions", json={**base, "stop": stop}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop and r["text"] == full[: full.index(stop)]
    # streaming holds back a possible stop-string prefix: the streamed text never contains it
    events = [json.loads(e) for e in sse_events(httpx.post(f"{h.url}/v1/completions", json={**base, "stop": [stop], "stream": True}))]
    assert "".join(e["choices"][0]["text"] for e in events) == r["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["stop_reason"] == stop
    # min_tokens defers stop strings
    late = httpx.post(f"{h.url}/v1/completions", json={**base, "stop": stop, "min_tokens": 30}).json()["choices"][0]
    assert late["finish_reason"] == "length" and late["text"] == full


# -- prompts and templates --------------------------------------------------------------------------


def test_token_id_and_list_prompts(fleet):
    h = fleet.handles[0]
    text = "token id prompts " + " ".join(f"t{i}" for i in range(30))
    ids = httpx.post(f"{h.url}/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
    a = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 4}).json()
    b = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 4}).json()
    c = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": [text], "max_tokens": 4}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == c["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] == len(ids)
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(ids) - 1) // 16 * 16  # the string's blocks are cached
    # several prompts in one request: one choice each, usage summed (vLLM batches them)
    many = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": ["first prompt", "second prompt here"], "max_tokens": 2}).json()
    assert [ch["index"] for ch in many["choices"]] == [0, 1]
    singles = [
        httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 2}).json() for p in ("first prompt", "second prompt here")
    ]
    assert [ch["text"] for ch in many["choices"]] == [s["choices"][0]["text"] for s in singles]
    assert many["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles) and many["usage"]["completion_tokens"] == 4
    ids_many = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": [ids[:5], ids[:7]], "max_tokens": 1, "stream": True}).text
    assert '"index":1' in ids_many and ids_many.endswith("data: [DONE]\n\n")


def test_chat_template_tokens(fleet):
    h = fleet.handles[0]
    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a prefix cache?"}]
    local = load_tokenizer("demo").encode_chat(msgs, add_generation_prompt=True)
    tok = httpx.post(f"{h.url}/tokenize", json={"model": MODEL, "messages": msgs}).json()
    assert tok["tokens"] == local and tok["count"] == len(local) and tok["max_model_len"] == 8192 and tok["token_strs"] is None
    usage = httpx.post(f"{h.url}/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == len(local)
    cont = httpx.post(
        f"{h.url}/tokenize",
        json={"model": MODEL, "messages": msgs + [{"role": "assistant", "content": "A cache"}], "add_generation_prompt": False, "continue_final_message": True},
    ).json()
    assert load_tokenizer("demo").decode(cont["tokens"], skip_special_tokens=False).endswith("A cache")
    strs = httpx.post(f"{h.url}/tokenize", json={"model": MODEL, "prompt": "hello world", "return_token_strs": True}).json()
    assert len(strs["token_strs"]) == strs["count"]
    detok = httpx.post(f"{h.url}/detokenize", json={"model": MODEL, "tokens": strs["tokens"]}).json()
    assert detok == {"prompt": "hello world"}


# -- cache, latency, determinism ------------------------------------------------------------------


def test_repeat_gets_cached_tokens_and_shorter_ttft(slow):
    h = slow  # real-time latency model: a cold 650-token prefill costs ~55 ms, a warm one ~1 ms
    c = sdk(h.url)
    prompt = LONG + " unique-ttft"
    hits0 = metric(h.url, "vllm:prefix_cache_hits_total")
    ttft_n0 = metric(h.url, "vllm:time_to_first_token_seconds_count")

    def ttft() -> tuple[float, int, int]:
        t0 = time.perf_counter()
        first = None
        usage = None
        for ch in c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, stream=True, stream_options={"include_usage": True}):
            if first is None and ch.choices and ch.choices[0].text:
                first = time.perf_counter() - t0
            if ch.usage:
                usage = ch.usage
        return first, usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

    cold, cached0, n = ttft()
    warm, cached1, _ = ttft()
    assert cached0 == 0 and cached1 == (n - 1) // 16 * 16 and cached1 > 0
    assert warm < cold - 0.02, (warm, cold)
    assert metric(h.url, "vllm:prefix_cache_hits_total") - hits0 == cached1
    assert metric(h.url, "vllm:time_to_first_token_seconds_count") - ttft_n0 == 2


def test_block_aligned_prompt_recomputes_its_last_block(fleet):
    """vLLM looks up at most prompt-1 tokens: a fully cached, block-aligned prompt reports one block less."""
    h = fleet.handles[0]
    ids = list(range(100, 164))  # exactly 4 blocks
    httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1}).raise_for_status()
    q0 = metric(h.url, "vllm:prefix_cache_queries_total")
    again = httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    assert metric(h.url, "vllm:prefix_cache_queries_total") - q0 == 64  # queries count the request's tokens


def test_deterministic_output_for_a_seed(fleet):
    a = sdk(fleet.handles[0].url).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    b = sdk(fleet.handles[1].url).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    c = sdk(fleet.handles[2].url).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    again = sdk(fleet.handles[0].url).completions.create(model=MODEL, prompt="Same prompt", max_tokens=6).choices[0].text
    assert a == b == again and a != c  # seed 7 twice, seed 8 differs


def test_overload_queues():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.5, max_num_seqs=2)])
    f.start()
    try:
        h = f.handles[0]

        async def go():
            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [
                    asyncio.create_task(client.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": f"q{i}", "max_tokens": 300})) for i in range(6)
                ]
                seen = []
                for _ in range(40):  # bounded poll while the batch is full
                    await asyncio.sleep(0.05)
                    text = (await client.get(f"{h.url}/metrics")).text
                    w = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_waiting{")]
                    r = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running{")]
                    seen.append((float(w[0].split()[-1]), float(r[0].split()[-1])))
                    if seen[-1] == (4.0, 2.0):
                        break
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return seen

        seen = asyncio.run(go())
        assert (4.0, 2.0) in seen, seen
        wait_for(lambda: metric(h.url, "vllm:num_requests_running") == 0 and metric(h.url, "vllm:num_requests_waiting") == 0, message="queue drained by aborts")
    finally:
        f.stop()


# -- robustness: disconnects -----------------------------------------------------------------------


@pytest.fixture
def slow():
    f = SimFleet([SimConfig(model=MODEL, time_scale=1.0, max_num_seqs=1)])
    f.start()
    yield f.handles[0]
    f.stop()


def test_client_disconnect_mid_stream_aborts(slow):
    url = slow.url
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": LONG, "max_tokens": 2000, "stream": True}) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: ")
            assert metric(url, "vllm:num_requests_running") == 1 and metric(url, "vllm:kv_cache_usage_perc") > 0
    wait_for(lambda: metric(url, "vllm:num_requests_running") == 0, message="running back to 0")
    assert metric(url, "vllm:kv_cache_usage_perc") == 0.0  # its blocks are free (cached ones stay reusable)
    assert metric(url, "vllm:request_success_total", finished_reason="abort") == 1
    # the engine is free again: a new request runs at once
    assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 2}, timeout=5).status_code == 200


def test_client_disconnect_non_stream_and_queued_abort(slow):
    url = slow.url

    async def go():
        async with httpx.AsyncClient() as client:
            running = asyncio.create_task(client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "long one", "max_tokens": 2000}, timeout=10))
            await asyncio.sleep(0.2)
            queued = asyncio.create_task(
                client.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 5, "stream": True},
                    timeout=10,
                )
            )
            for _ in range(100):  # bounded: until the second request is seen queued
                await asyncio.sleep(0.05)
                text = (await client.get(f"{url}/metrics")).text
                if 'vllm:num_requests_waiting{engine="0",model_name="kvgate/demo-8b"} 1.0' in text:
                    break
            assert 'vllm:num_requests_waiting{engine="0",model_name="kvgate/demo-8b"} 1.0' in text
            assert 'vllm:num_requests_running{engine="0",model_name="kvgate/demo-8b"} 1.0' in text
            for t in (running, queued):
                t.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)

    asyncio.run(go())
    wait_for(lambda: metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:num_requests_waiting") == 0, message="both aborted")
    assert metric(url, "vllm:kv_cache_usage_perc") == 0.0


def test_half_sent_body_and_garbage_do_not_hang(slow):
    url = slow.url
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":')
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.recv(100)  # answered (400) or closed; never hangs
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert metric(url, "vllm:num_requests_running") == 0


# -- errors ---------------------------------------------------------------------------------------


def _err(r: httpx.Response, status: int, type_: str, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"], body
    e = body["error"]
    assert e["code"] == status and e["type"] == type_ and e["param"] == param and contains in e["message"], e
    assert "Traceback" not in e["message"]
    return e


def test_errors_like_vllm(fleet):
    u = fleet.handles[0].url
    post = lambda path, **kw: httpx.post(f"{u}{path}", timeout=5, **kw)  # noqa: E731
    comp = lambda **b: post("/v1/completions", json={"model": MODEL, "prompt": "x", **b})  # noqa: E731
    _err(comp(model="nope"), 404, "NotFoundError", "model", "The model `nope` does not exist.")
    _err(post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "NotFoundError", "model")
    _err(comp(max_tokens=0), 400, "BadRequestError", "max_tokens", "max_tokens must be at least 1, got 0.")
    _err(comp(max_tokens=9000), 400, "BadRequestError", "max_tokens", "cannot be greater than max_model_len")
    e = _err(comp(prompt=[10] * 9000, max_tokens=1), 400, "BadRequestError", "input_tokens", "maximum context length is 8192 tokens")
    assert "9000 input tokens" in e["message"]
    _err(comp(prompt="word " * 100_000, max_tokens=1), 400, "BadRequestError", "input_text", "maximum context length")
    _err(comp(prompt=[5000]), 400, "BadRequestError", "prompt", "out of vocabulary")
    # request-validation errors (pydantic level): type "Bad Request"
    _err(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "Bad Request", "body.0", "validation error")
    _err(post("/v1/completions", content=b'{"model": "x"}', headers={"content-type": "text/plain"}), 400, "Bad Request", None, "Unsupported Media Type")
    _err(post("/v1/completions", json=[1, 2]), 400, "Bad Request", "body")
    _err(comp(max_tokens="ten"), 400, "Bad Request", "body.max_tokens", "valid integer")
    _err(comp(stream="yes"), 400, "Bad Request", "body.stream")
    _err(comp(prompt=[-1, 3]), 400, "Bad Request", "body.prompt")
    _err(comp(prompt=""), 400, "Bad Request", "prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
    _err(comp(stream_options={"include_usage": True}), 400, "Bad Request", "stream_options", "Stream options can only be defined when `stream=True`.")
    _err(comp(cache_salt=""), 400, "Bad Request", "cache_salt")
    _err(comp(stop=[1]), 400, "Bad Request", "body.stop")
    _err(post("/v1/chat/completions", json={"model": MODEL}), 400, "Bad Request", "body.messages", "Field required")
    _err(post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, "Bad Request", "body.messages")
    _err(post("/tokenize", json={"model": MODEL}), 400, "Bad Request", "body.prompt")
    _err(post("/detokenize", json={"model": MODEL, "tokens": ["a"]}), 400, "Bad Request", "body.tokens")
    _err(post("/detokenize", json={"model": "nope", "tokens": [1]}), 404, "NotFoundError", "model")
    # framework errors
    r = httpx.get(f"{u}/v1/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = httpx.get(f"{u}/v1/completions")
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
    # the SDK maps them to its exception types
    c = sdk(u)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    # and the replica is unharmed
    assert httpx.get(f"{u}/health").status_code == 200 and metric(u, "vllm:num_requests_running") == 0


# -- endpoints --------------------------------------------------------------------------------------


def test_models_version_health(fleet):
    h, lh = fleet.handles[0], fleet.handles[2]
    models = httpx.get(f"{h.url}/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert list(card) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
    assert card["id"] == MODEL and card["owned_by"] == "vllm" and card["parent"] is None and card["max_model_len"] == 8192
    assert card["permission"][0]["object"] == "model_permission"
    lora = httpx.get(f"{lh.url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"], m["max_model_len"]) for m in lora] == [(MODEL, None, 8192), ("sql", MODEL, None), ("chat-tuned", MODEL, None)]
    assert httpx.get(f"{h.url}/version").json() == {"version": "0.33.0"}
    r = httpx.get(f"{h.url}/health")
    assert r.status_code == 200 and r.content == b""
    # a LoRA adapter is served under its own name
    out = httpx.post(f"{lh.url}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 1}).json()
    assert out["model"] == "sql"


def test_metrics_parse_with_vllm_names_labels_buckets(fleet):
    h, lh = fleet.handles[0], fleet.handles[2]
    httpx.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": "metrics", "max_tokens": 2}).raise_for_status()
    m = metrics(h.url)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in m, name
        assert all(s.labels.get("model_name") == MODEL and s.labels.get("engine") == "0" for s in m[name]), name
    assert [s.labels["le"] for s in m["vllm:time_to_first_token_seconds_bucket"]] == [str(b) for b in VLLM_TTFT_BUCKETS] + ["+Inf"]
    assert list(TTFT_BUCKETS) == VLLM_TTFT_BUCKETS
    assert "vllm:lora_requests_info" not in m  # only with LoRA enabled, as in vLLM
    assert 0 <= metric(h.url, "vllm:kv_cache_usage_perc") <= 1
    # LoRA: info gauge with vLLM's labels, valued with the current time
    httpx.post(f"{lh.url}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 1}).raise_for_status()
    info = metrics(lh.url)["vllm:lora_requests_info"]
    assert set(info[0].labels) == {"max_lora", "waiting_lora_adapters", "running_lora_adapters"} and info[0].labels["max_lora"] == "2"
    assert abs(max(s.value for s in info) - time.time()) < 60
