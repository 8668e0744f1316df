"""The gateway in front of replicas started with vLLM's --api-key.

Real simulated replicas enforce the key as vLLM does (401 ``{"error": "Unauthorized"}`` on
/v1/*); the gateway authenticates itself with each replica's own key (``replicas[].api_key`` or
``api_key_env``) on every upstream call, never forwards the client's key, and turns a replica's
401 into an OpenAI-style 502 (the client's key was fine) without marking the replica down.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import msgspec
import openai
import pytest

from gateway.config import ConfigError, parse_config
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import (
    MODEL,
    GatewayThread,
    RecordingProxy,
    fleet_config,
    get_metrics,
    metric_value,
    wait_for,
)

KEY_A = "replica-key-a"
KEY_B = "replica-key-b"
CLIENT_KEY = "client-key-for-the-gateway"


def doc(tag: str) -> str:
    """A long prompt (two hops when P/D applies) whose first block is unique to ``tag``."""
    return f"Document {tag}: " + " ".join(f"clause {i} says the tenant {tag} shall keep item {i * 3} in good order;" for i in range(80))


def keyed_config(urls_roles_keys: list[tuple[str, str, dict[str, Any]]], *, discover: bool = False, **overrides: Any):
    """A gateway config over replicas given as (url, role, auth fields); models discovered or listed."""
    replicas = []
    for i, (url, role, auth) in enumerate(urls_roles_keys):
        r: dict[str, Any] = {"id": f"r{i}", "url": url, "role": role, **auth}
        if not discover:
            r["models"] = [MODEL]
        replicas.append(r)
    base = msgspec.to_builtins(fleet_config([], **overrides))
    base["replicas"] = replicas
    return parse_config(base)


def _client(g, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=30)


def _state(g) -> dict:
    return httpx.get(f"{g.url}/admin/state", headers={"Authorization": "Bearer admin"}, timeout=5).json()


@pytest.fixture(scope="module")
def fleet():
    """Two replicas with different keys, one P/D pair with keys, one replica without a key."""
    f = SimFleet(
        [
            SimConfig(model=MODEL, seed=0, time_scale=0.02, api_key=KEY_A),
            SimConfig(model=MODEL, seed=1, time_scale=0.02, api_key=KEY_B),
            SimConfig(model=MODEL, seed=2, time_scale=0.02, role="prefill", api_key=KEY_A, num_blocks=1024),
            SimConfig(model=MODEL, seed=3, time_scale=0.02, role="decode", api_key=KEY_B, num_blocks=1024),
            SimConfig(model=MODEL, seed=4, time_scale=0.02),
        ]
    )
    f.start()
    yield f
    f.stop()


# -- configuration ------------------------------------------------------------------------------


def test_config_api_key_and_api_key_env(monkeypatch):
    base = {"id": "r0", "url": "http://127.0.0.1:1"}
    assert parse_config({"replicas": [{**base, "api_key": "k"}]}).replicas[0].resolved_api_key() == "k"
    monkeypatch.setenv("KVGATE_TEST_REPLICA_KEY", "from-env")
    cfg = parse_config({"replicas": [{**base, "api_key_env": "KVGATE_TEST_REPLICA_KEY"}]})
    assert cfg.replicas[0].resolved_api_key() == "from-env"
    assert parse_config({"replicas": [base]}).replicas[0].resolved_api_key() is None
    with pytest.raises(ConfigError, match=r"\$\.replicas\[0\]: set api_key or api_key_env, not both"):
        parse_config({"replicas": [{**base, "api_key": "k", "api_key_env": "KVGATE_TEST_REPLICA_KEY"}]})
    monkeypatch.delenv("KVGATE_TEST_REPLICA_KEY")
    with pytest.raises(ConfigError, match=r"\$\.replicas\[0\]\.api_key_env: environment variable 'KVGATE_TEST_REPLICA_KEY' is not set"):
        parse_config({"replicas": [{**base, "api_key_env": "KVGATE_TEST_REPLICA_KEY"}]})
    monkeypatch.setenv("KVGATE_TEST_REPLICA_KEY", "")
    with pytest.raises(ConfigError, match="is empty"):
        parse_config({"replicas": [{**base, "api_key_env": "KVGATE_TEST_REPLICA_KEY"}]})
    with pytest.raises(ConfigError, match=r"\$\.replicas\[0\]\.api_key: empty"):
        parse_config({"replicas": [{**base, "api_key": ""}]})
    # the key is not in the config's repr (a traceback or a debug print of the config)
    shown = repr(parse_config({"replicas": [{**base, "api_key": "s3cret-value"}], "auth": {"api_keys": ["client-s3cret"], "admin_key": "admin-s3cret"}}))
    assert "s3cret-value" not in shown and "api_key='***'" in shown
    assert "client-s3cret" not in shown and "admin-s3cret" not in shown and "1 keys" in shown


# -- the happy path ------------------------------------------------------------------------------


def test_openai_sdk_through_replicas_with_keys(fleet, monkeypatch):
    """Completions and chat, streamed and not, on two replicas with different keys; models discovered."""
    monkeypatch.setenv("KVGATE_TEST_KEY_B", KEY_B)
    h = fleet.handles
    cfg = keyed_config(
        [(h[0].url, "both", {"api_key": KEY_A}), (h[1].url, "both", {"api_key_env": "KVGATE_TEST_KEY_B"})], discover=True, auth={"admin_key": "admin"}
    )
    with GatewayThread(cfg) as g:
        wait_for(lambda: all(s.healthy and MODEL in s.models for s in g.gateway.fleet.all()), message="models discovered through /v1/models")
        models = _client(g).models.list()
        assert [m.id for m in models.data] == [MODEL]
        c = _client(g)
        served = set()
        for i in range(6):
            raw = c.completions.with_raw_response.create(model=MODEL, prompt=f"keyed {i} " * (i + 1), max_tokens=3)
            assert raw.parse().usage.completion_tokens == 3
            served.add(raw.headers["x-kvgate-replica"])
            chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2)
            assert chat.choices[0].message.content
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=4, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[-1].usage.completion_tokens == 4
        chunks = list(c.completions.create(model=MODEL, prompt="stream me", max_tokens=4, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks)
        emb = c.embeddings.create(model=MODEL, input="embed me")
        assert len(emb.data[0].embedding) > 0
        assert served == {"r0", "r1"}, served  # both keys used, not just one
        state = _state(g)
        assert [(r["api_key"], r["auth_rejected"]) for r in state["replicas"]] == [(True, False), (True, False)]
        text = msgspec.json.encode(state).decode()
        assert KEY_A not in text and KEY_B not in text


def test_pd_two_hops_with_keys(fleet):
    """Hop 1 to a prefill replica (key A), hop 2 to a decode replica (key B)."""
    h = fleet.handles
    cfg = keyed_config([(h[2].url, "prefill", {"api_key": KEY_A}), (h[3].url, "decode", {"api_key": KEY_B})], pd={"threshold": 128})
    with GatewayThread(cfg) as g:
        c = _client(g)
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": doc("pd-auth")}], max_tokens=5)
        assert raw.headers["x-kvgate-replica"] == "r0,r1"
        resp = raw.parse()
        assert resp.usage.completion_tokens == 5
        assert resp.usage.prompt_tokens_details.cached_tokens >= resp.usage.prompt_tokens - 16  # decode pulled the KV
        with c.completions.with_streaming_response.create(
            model=MODEL, prompt=doc("pd-auth-stream"), max_tokens=6, stream=True, stream_options={"include_usage": True}
        ) as r:
            assert r.headers["x-kvgate-replica"] == "r0,r1"
            chunks = list(r.parse())
        assert chunks[-1].usage.completion_tokens == 6
        m = get_metrics(g.url)
        assert metric_value(m, "kvgate_pd_requests_total", {"path": "two_hop"}) == 2
        assert metric_value(m, "kvgate_pd_fallbacks_total") == 0


# -- the client's key stays with the gateway ------------------------------------------------------


def test_client_key_never_reaches_a_replica(fleet):
    """auth.api_keys for clients + replica keys: each replica sees its own key, or no header at all."""
    h = fleet.handles
    keyed, open_ = RecordingProxy(h[0].url).start(), RecordingProxy(h[4].url).start()
    try:
        cfg = keyed_config(
            [(keyed.url, "both", {"api_key": KEY_A}), (open_.url, "both", {})],
            auth={"api_keys": [CLIENT_KEY], "admin_key": "admin"},
            scheduling={"default_profile": "round-robin"},
        )
        with GatewayThread(cfg) as g:
            c = _client(g, CLIENT_KEY)
            for i in range(4):  # three calls a round over two replicas (round-robin): each sees each kind
                c.completions.create(model=MODEL, prompt=f"who sees my key {i}", max_tokens=2)
                list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"s{i}"}], max_tokens=2, stream=True))
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=2)
            c.embeddings.create(model=MODEL, input="e")
            with pytest.raises(openai.AuthenticationError):
                _client(g, KEY_A).completions.create(model=MODEL, prompt="x", max_tokens=1)  # a replica's key is no client key
            wait_for(lambda: any(e["path"] == "/metrics" for e in keyed.exchanges), message="a scrape through the proxy")
        for proxy, expected in ((keyed, f"Bearer {KEY_A}"), (open_, None)):
            posts = proxy.posts("completions") + proxy.posts("embeddings")
            assert len(posts) >= 4
            for e in proxy.exchanges:
                assert CLIENT_KEY not in msgspec.json.encode(e["headers"]).decode()
                assert e["headers"].get("authorization") == expected, (e["path"], e["headers"].get("authorization"))
            assert {"/v1/models", "/metrics", "/v1/completions", "/v1/chat/completions"} <= {e["path"] for e in proxy.exchanges}
    finally:
        keyed.stop()
        open_.stop()


def test_tokenize_fallback_carries_the_key(fleet):
    """No local tokenizer: the gateway asks the replica's /tokenize with the replica's key."""
    proxy = RecordingProxy(fleet.handles[0].url).start()
    try:
        cfg = keyed_config([(proxy.url, "both", {"api_key": KEY_A})], models={MODEL: {"tokenizer": None}})
        with GatewayThread(cfg) as g:
            c = _client(g)
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tokenize me remotely"}], max_tokens=2)
            c.completions.create(model=MODEL, prompt="tokenize me too", max_tokens=2)
        calls = [e for e in proxy.exchanges if e["path"] == "/tokenize"]
        assert len(calls) == 2 and all(e["status"] == 200 for e in calls)
        assert all(e["headers"].get("authorization") == f"Bearer {KEY_A}" for e in calls)
    finally:
        proxy.stop()


# -- a key the replica refuses ------------------------------------------------------------------


def test_wrong_key_is_a_502_and_the_replica_stays_healthy(fleet, caplog):
    h = fleet.handles
    cfg = keyed_config([(h[0].url, "both", {"api_key": "not-the-key"})], auth={"admin_key": "admin"}, health={"failure_threshold": 1}, log_level="debug")
    caplog.set_level(logging.DEBUG)
    with GatewayThread(cfg) as g:
        c = _client(g)
        for _ in range(3):  # more than the failure threshold
            with pytest.raises(openai.APIStatusError) as exc:
                c.completions.create(model=MODEL, prompt="refused", max_tokens=2)
            assert exc.value.status_code == 502
            err = exc.value.body
            assert err["code"] == "upstream_auth_failed" and err["type"] == "upstream_error"
            assert "replica r0 rejected the gateway's credentials" in err["message"] and "client's own key was accepted" in err["message"]
        with pytest.raises(openai.APIStatusError) as exc:
            list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "s"}], max_tokens=2, stream=True))
        assert exc.value.status_code == 502
        r = httpx.post(f"{g.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
        # probes (401 on /v1/models) and passive failures did not open the circuit
        assert g.gateway.fleet.get("r0").healthy
        assert httpx.get(f"{g.url}/ready").status_code == 200
        state = _state(g)["replicas"][0]
        assert state["healthy"] and state["auth_rejected"] and state["api_key"]
        assert metric_value(get_metrics(g.url), "kvgate_errors_total", {"code": "upstream_auth_failed"}) == 5
        assert metric_value(get_metrics(g.url), "kvgate_replica_healthy", {"replica": "r0"}) == 1
    logged = caplog.text
    assert "rejected the gateway's credentials" in logged
    assert "not-the-key" not in logged and KEY_A not in logged


def test_no_key_configured_for_a_keyed_replica(fleet):
    """The gateway sends no key: models cannot be discovered (the 404 says why), listed ones get the 502."""
    h = fleet.handles
    with GatewayThread(keyed_config([(h[1].url, "both", {})], discover=True)) as g:
        assert _client(g).models.list().data == []
        with pytest.raises(openai.NotFoundError, match="rejected the gateway's credentials on /v1/models"):
            _client(g).completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert g.gateway.fleet.get("r0").healthy
    with GatewayThread(keyed_config([(h[1].url, "both", {})])) as g:
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"


def test_a_refusing_replica_is_retried_on_one_that_accepts(fleet):
    h = fleet.handles
    cfg = keyed_config(
        [(h[0].url, "both", {"api_key": "wrong"}), (h[1].url, "both", {"api_key": KEY_B})],
        auth={"admin_key": "admin"},
        scheduling={"default_profile": "round-robin"},
    )
    with GatewayThread(cfg) as g:
        c = _client(g)
        for i in range(4):
            raw = c.completions.with_raw_response.create(model=MODEL, prompt=f"retry {i}", max_tokens=2)
            assert raw.headers["x-kvgate-replica"] == "r1"
        assert metric_value(get_metrics(g.url), "kvgate_retries_total", {"replica": "r0"}) >= 2
        assert [(r["id"], r["healthy"], r["auth_rejected"]) for r in _state(g)["replicas"]] == [("r0", True, True), ("r1", True, False)]


def test_pd_prefill_refusing_the_key_falls_back_to_one_hop(fleet):
    h = fleet.handles
    cfg = keyed_config([(h[2].url, "prefill", {"api_key": "wrong"}), (h[3].url, "decode", {"api_key": KEY_B})], pd={"threshold": 128})
    with GatewayThread(cfg) as g:
        raw = _client(g).chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": doc("pd-refused")}], max_tokens=3)
        assert raw.headers["x-kvgate-replica"] == "r1" and raw.parse().usage.completion_tokens == 3
        assert metric_value(get_metrics(g.url), "kvgate_pd_fallbacks_total", {"reason": "prefill_failed"}) == 1
    cfg = keyed_config(
        [(h[2].url, "prefill", {"api_key": "wrong"}), (h[3].url, "decode", {"api_key": KEY_B})], pd={"threshold": 128, "on_prefill_failure": "error"}
    )
    with GatewayThread(cfg) as g:
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": doc("pd-refused-2"), "max_tokens": 2})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    cfg = keyed_config([(h[2].url, "prefill", {"api_key": KEY_A}), (h[3].url, "decode", {"api_key": "wrong"})], pd={"threshold": 128})
    with GatewayThread(cfg) as g:
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": doc("pd-refused-3"), "max_tokens": 2})
        assert r.status_code == 502 and "replica r1 rejected" in r.json()["error"]["message"]
