"""End to end: the real openai SDK → the gateway (uvicorn on loopback) → simulated vLLM replicas.

Routing is checked through what the replicas themselves report (usage.cached_tokens) and
through the gateway's debug headers, which expose the *event-fed index* match (speculative
entries are not counted there), so a passing affinity test proves the KV-event path works.
"""

from __future__ import annotations

import collections
import json
import threading
import time

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import (
    MODEL,
    GatewayThread,
    fleet_config,
    get_metrics,
    metric_value,
    wait_for,
)

GROUP_PROMPTS = [f"System: you are assistant number {g}. " + " ".join(f"rule{g}-{i} applies to topic {g * 7 + i};" for i in range(60)) for g in range(6)]


@pytest.fixture(scope="module")
def fleet():
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, num_blocks=1024) for i in range(3)])
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def gw(fleet):
    with GatewayThread(fleet_config(fleet.handles, auth={"admin_key": "adm"})) as g:
        yield g


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30, **kw)


def test_completions_and_chat_stream_and_not(gw):
    c = client(gw)
    comp = c.completions.create(model=MODEL, prompt="Hello there, how are", max_tokens=8)
    assert comp.choices[0].text
    assert comp.usage.completion_tokens == 8

    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6)
    assert chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"

    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    stream = c.completions.create(model=MODEL, prompt="Count with me", max_tokens=4, stream=True)
    parts = [ch.choices[0].text for ch in stream if ch.choices]
    assert "".join(parts)


def test_request_id_kept_and_created(gw):
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    r2 = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r2.headers["x-request-id"].startswith("kvg-")


def _chat_raw(c: openai.OpenAI, system: str, question: str):
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], max_tokens=4
    )
    return raw.headers, raw.parse()


def test_prefix_affinity_via_kv_events_with_load_spread(gw):
    c = client(gw)
    first_replica: dict[int, str] = {}
    for g, system in enumerate(GROUP_PROMPTS):
        headers, _ = _chat_raw(c, system, "first question")
        first_replica[g] = headers["x-kvgate-replica"]
    # the replicas' KV events must reach the index: wait until a lookup sees every group
    for g, system in enumerate(GROUP_PROMPTS):

        def warm(g=g, system=system) -> bool:
            headers, _ = _chat_raw(c, system, f"probe {time.monotonic()}")
            return int(headers["x-kvgate-prefix-blocks"]) > 0

        wait_for(warm, timeout=10, message=f"group {g} blocks in the index")

    landed = collections.Counter()
    for rnd in range(3):
        for g, system in enumerate(GROUP_PROMPTS):
            headers, resp = _chat_raw(c, system, f"question {rnd}")
            assert headers["x-kvgate-replica"] == first_replica[g], f"group {g} moved"
            assert int(headers["x-kvgate-prefix-blocks"]) > 0
            assert resp.usage.prompt_tokens_details.cached_tokens > 0  # the replica really had it
            landed[headers["x-kvgate-replica"]] += 1
    # six groups over three replicas: affinity must not collapse onto one replica
    assert len(set(first_replica.values())) >= 2, first_replica
    text = get_metrics(gw.url)
    assert metric_value(text, "kvgate_prefix_hit_blocks_total") > 0
    assert metric_value(text, "kvgate_kv_events_applied_total") > 0


def test_models_health_ready_metrics(gw):
    models = client(gw).models.list()
    assert MODEL in [m.id for m in models.data]
    assert httpx.get(f"{gw.url}/health").status_code == 200
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 200 and len(ready.json()["healthy_replicas"]) == 3
    text = get_metrics(gw.url)
    for name in (
        "kvgate_requests_total",
        "kvgate_ttft_seconds_bucket",
        "kvgate_e2e_seconds_bucket",
        "kvgate_scheduler_seconds_bucket",
        "kvgate_replica_healthy",
    ):
        assert name in text, name


def test_embeddings_pass_through(gw):
    emb = client(gw).embeddings.create(model=MODEL, input="hello world")
    assert len(emb.data[0].embedding) > 0


def test_admin_state_requires_key(gw):
    assert httpx.get(f"{gw.url}/admin/state").status_code == 401
    r = httpx.get(f"{gw.url}/admin/state", headers={"Authorization": "Bearer adm"})
    assert r.status_code == 200
    assert {x["id"] for x in r.json()["replicas"]} == {"r0", "r1", "r2"}


# -- errors -----------------------------------------------------------------------------------------


def _err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    "payload,param",
    [
        (b"{not json", None),
        (b"", None),
        (json.dumps({"model": MODEL}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(), "messages[0]"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), "stream"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
    ],
)
def test_400_bad_input(gw, payload, param):
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = _err(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_400_from_sdk_and_404_unknown_model(gw):
    c = client(gw)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=0)
    r = httpx.get(f"{gw.url}/v1/nothing-here")
    assert r.status_code == 404 and _err(r)["code"] == "not_found"


def test_replica_errors_pass_through(gw):
    # a prompt longer than the replica's max_model_len: vLLM's own 400, relayed untouched
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": [5] * 9000, "max_tokens": 4})
    assert r.status_code == 400
    assert "error" in r.json() or "message" in r.json()


def test_413_401_429_503(fleet):
    cfg = fleet_config(fleet.handles, limits={"max_body_bytes": 2000, "max_inflight": 1, "max_queue": 0}, auth={"api_keys": ["k1", "k2"]})
    with GatewayThread(cfg) as g:
        big = {"model": MODEL, "prompt": "x" * 5000}
        r = httpx.post(f"{g.url}/v1/completions", json=big, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 413 and _err(r)["code"] == "body_too_large"

        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{g.url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{g.url}/v1", api_key="k2", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="x", max_tokens=2).choices

        # hold the only admission slot with a long stream, then a second request is refused with 429
        started = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with httpx.stream(
                "POST",
                f"{g.url}/v1/completions",
                json={"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True},
                headers={"Authorization": "Bearer k1"},
                timeout=30,
            ) as resp:
                for _ in resp.iter_bytes():
                    started.set()
                    if done.is_set():
                        break

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(10)
        with pytest.raises(openai.RateLimitError):
            ok.completions.create(model=MODEL, prompt="x", max_tokens=2)
        done.set()
        t.join(10)
        # the slot comes back once the stream is gone
        wait_for(lambda: g.gateway.admission.inflight == 0, message="slot released")
        assert ok.completions.create(model=MODEL, prompt="x", max_tokens=2).choices

    dead = fleet_config(fleet.handles)
    for r in dead.replicas:
        r.url = f"http://127.0.0.1:{_closed_port()}"
    with GatewayThread(dead) as g:
        # models are configured, replicas unreachable: 503 with an OpenAI error, never a hang
        wait_for(lambda: not any(s.healthy for s in g.gateway.fleet.all()), message="circuits open")
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert r.status_code == 503
        assert _err(r)["type"] == "service_unavailable_error"
        assert httpx.get(f"{g.url}/ready").status_code == 503


def _closed_port() -> int:
    from tests.helpers.net import free_port

    return free_port()


def test_replica_killed_mid_run_is_routed_around():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02) for i in range(3)], mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            c = client(g)
            for i in range(6):
                assert c.completions.create(model=MODEL, prompt=f"warm {i}", max_tokens=2).choices
            fleet.kill(1)
            failures = 0
            served = collections.Counter()
            for i in range(30):
                try:
                    raw = c.completions.with_raw_response.create(model=MODEL, prompt=f"after kill {i}", max_tokens=2)
                    served[raw.headers["x-kvgate-replica"]] += 1
                except openai.APIError:
                    failures += 1
            assert failures == 0, "connection failures must be retried on another replica"
            assert served["r1"] == 0
            assert set(served) == {"r0", "r2"}
            wait_for(lambda: not g.gateway.fleet.get("r1").healthy, message="r1 circuit open")
            fleet.restart(1)
            wait_for(lambda: g.gateway.fleet.get("r1").healthy, timeout=15, message="r1 back")
    finally:
        fleet.stop()


def test_stream_broken_mid_way_ends_with_error_event():
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.5)], mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            c = client(g)
            stream = c.completions.create(model=MODEL, prompt="a long answer please", max_tokens=2000, stream=True)
            got = 0
            with pytest.raises(openai.APIError):
                for ch in stream:
                    got += 1
                    if got == 3:
                        fleet.kill(0)
            assert got >= 3
            text = get_metrics(g.url)
            assert metric_value(text, "kvgate_midstream_failures_total") >= 1
    finally:
        fleet.stop()


def test_redis_backend_routes_by_prefix(fleet, redis_url):
    cfg = fleet_config(fleet.handles, index={"backend": redis_url})
    with GatewayThread(cfg) as g:
        c = client(g)
        system = GROUP_PROMPTS[0] + " redis variant"
        headers, _ = _chat_raw(c, system, "q0")
        home = headers["x-kvgate-replica"]
        wait_for(lambda: int(_chat_raw(c, system, f"p {time.monotonic()}")[0]["x-kvgate-prefix-blocks"]) > 0, message="blocks in redis")
        for i in range(4):
            headers, resp = _chat_raw(c, system, f"q{i}")
            assert headers["x-kvgate-replica"] == home
            assert resp.usage.prompt_tokens_details.cached_tokens > 0


def test_redis_down_degrades_to_load_routing(fleet, redis_server, redis_url):
    cfg = fleet_config(fleet.handles, index={"backend": redis_url, "lookup_timeout_ms": 200})
    with GatewayThread(cfg) as g:
        c = client(g)

        def prefix_blocks(system: str, q: str) -> int:
            return int(_chat_raw(c, system, q)[0]["x-kvgate-prefix-blocks"])

        before = "Redis outage, before: " + GROUP_PROMPTS[2]
        prefix_blocks(before, "q0")
        wait_for(lambda: prefix_blocks(before, f"p {time.monotonic()}") > 0, message="prefix routing via redis")
        home_before = _chat_raw(c, before, "home")[0]["x-kvgate-replica"]
        redis_server.stop()
        try:
            from concurrent.futures import ThreadPoolExecutor

            def during(i: int):
                # full blocks, so the index is asked (and fails): load decides, every request succeeds
                raw = c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "system", "content": f"outage {i}: " + GROUP_PROMPTS[1]}, {"role": "user", "content": "q"}], max_tokens=200
                )
                return raw.headers, raw.parse()

            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(during, range(6)))
            served = collections.Counter()
            for headers, resp in results:
                assert resp.choices[0].message.content
                assert headers["x-kvgate-prefix-blocks"] == "0"
                served[headers["x-kvgate-replica"]] += 1
            assert len(served) >= 2, served  # six at once: load-only routing spreads them
            text = get_metrics(g.url)
            assert metric_value(text, "kvgate_index_errors_total") >= 6
            assert metric_value(text, "kvgate_index_blocks") == -1
        finally:
            redis_server.start()
        # the new Redis is empty: the gateway notices and rebuilds the index from the replicas'
        # replay buffers, so the prefix cached before the outage is found again at its first ask
        wait_for(lambda: metric_value(get_metrics(g.url), "kvgate_index_rebuilds_total") >= 1, timeout=15, interval=0.2, message="index rebuilt")
        assert metric_value(get_metrics(g.url), "kvgate_index_losses_total") >= 1
        headers, _ = _chat_raw(c, before, "after the rebuild")
        assert int(headers["x-kvgate-prefix-blocks"]) > 0 and headers["x-kvgate-replica"] == home_before
        # recovery is automatic: lookups answer again and new KV events land in the fresh Redis
        errors_then = metric_value(get_metrics(g.url), "kvgate_index_errors_total")
        after = "Redis outage, after: " + GROUP_PROMPTS[3]
        wait_for(lambda: prefix_blocks(after, f"p {time.monotonic()}") > 0, timeout=15, interval=0.2, message="prefix routing back after the restart")
        home = _chat_raw(c, after, "again")[0]["x-kvgate-replica"]
        for i in range(3):
            headers, resp = _chat_raw(c, after, f"again {i}")
            assert headers["x-kvgate-replica"] == home and resp.usage.prompt_tokens_details.cached_tokens > 0
        text = get_metrics(g.url)
        assert metric_value(text, "kvgate_index_errors_total") - errors_then <= 2  # the first lookups may race the reconnect
        # the gauge is a SCAN cached for count_cache_s: a scrape during the rebuild may still hold 0
        wait_for(lambda: metric_value(get_metrics(g.url), "kvgate_index_blocks") > 0, timeout=15, interval=0.5, message="blocks counted in the new Redis")


def test_lora_and_cache_salt_route_by_their_own_prefix():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, lora_modules=["sql"]) for i in range(2)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            assert "sql" in [m.id for m in client(g).models.list().data]  # discovered from /v1/models
            prompt = "LoRA routing: " + " ".join(f"t{i}" for i in range(80))

            def send(model: str, salt: str | None):
                body = {"model": model, "prompt": prompt, "max_tokens": 2}
                if salt:
                    body["cache_salt"] = salt
                r = httpx.post(f"{g.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r

            first = send("sql", "tenant-a")
            home = first.headers["x-kvgate-replica"]
            wait_for(lambda: int(send("sql", "tenant-a").headers["x-kvgate-prefix-blocks"]) > 0, message="lora+salt blocks indexed")
            again = send("sql", "tenant-a")
            assert again.headers["x-kvgate-replica"] == home
            assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            # another tenant's salt, or the base model, share nothing with it
            assert send("sql", "tenant-b").headers["x-kvgate-prefix-blocks"] == "0"
            assert send(MODEL, None).headers["x-kvgate-prefix-blocks"] == "0"
    finally:
        fleet.stop()
