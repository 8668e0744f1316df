"""The simulator's --api-key, checked against what vLLM's API-key middleware does.

vLLM (vllm/entrypoints/openai/api_server.py, later vllm/entrypoints/serve/middleware/
authenticate.py): with ``--api-key`` (one or several keys) or ``VLLM_API_KEY``, requests to
/v1/... need ``Authorization: Bearer <key>`` (scheme in any case, any configured key);
otherwise 401 with the JSON body ``{"error": "Unauthorized"}``. /health, /metrics, /version and
/tokenize stay open; OPTIONS (CORS preflight) is never checked; ``//v1/...`` is no way around it.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from simulator.cli import build_parser, configs_from_args
from simulator.fleet import SimConfig, SimFleet, cli_args
from tests.helpers.sim import MODEL

KEY = "sim-key-1"
OTHER = "sim-key-2"


@pytest.fixture(scope="module")
def fleet():
    f = SimFleet([SimConfig(model=MODEL, time_scale=0.0, api_key=[KEY, OTHER]), SimConfig(model=MODEL, time_scale=0.0)])
    f.start()
    yield f
    f.stop()


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_v1_routes_need_the_key_and_refuse_like_vllm(fleet):
    url = fleet.handles[0].url
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/embeddings", {"model": MODEL, "input": "hi"}),
        ("GET", "/v1/no-such-route", None),  # the prefix is guarded, routed or not
        ("GET", "//v1/models", None),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"X-Api-Key": KEY}):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.content == b'{"error":"Unauthorized"}' and r.headers["content-type"] == "application/json"
    for key in (KEY, OTHER):  # every configured key works, the scheme in any case
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"{scheme} {key}"}, timeout=10)
            assert r.status_code == 200, r.text
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL


def test_open_routes_stay_open(fleet):
    url = fleet.handles[0].url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]
    assert "vllm:num_requests_running" in httpx.get(f"{url}/metrics").text
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "hello"})
    assert r.status_code == 200 and r.json()["count"] > 0
    assert httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]}).status_code == 200
    # a CORS preflight is not authenticated (no route answers it: not a 401)
    assert httpx.options(f"{url}/v1/completions").status_code != 401


def test_openai_sdk_with_and_without_the_key(fleet):
    url = fleet.handles[0].url
    r = _client(url, KEY).completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert r.usage.completion_tokens == 3
    chunks = list(_client(url, OTHER).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError) as exc:
        _client(url, "nope").completions.create(model=MODEL, prompt="hello", max_tokens=3)
    assert exc.value.status_code == 401 and exc.value.response.json() == {"error": "Unauthorized"}


def test_a_replica_without_a_key_ignores_authorization(fleet):
    url = fleet.handles[1].url
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_cli_flag_env_default_and_process_mode(monkeypatch):
    args = build_parser().parse_args(["--api-key", "a", "b"])
    assert configs_from_args(args)[0].api_keys() == ["a", "b"]
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert configs_from_args(build_parser().parse_args([]))[0].api_keys() == ["from-env"]
    assert configs_from_args(build_parser().parse_args(["--api-key", "flag"]))[0].api_keys() == ["flag"]  # the flag wins, as in vLLM
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert configs_from_args(build_parser().parse_args([]))[0].api_keys() == []  # empty: no auth
    monkeypatch.delenv("VLLM_API_KEY")
    assert configs_from_args(build_parser().parse_args(["--replicas", "2", "--api-key", "k"]))[1].api_keys() == ["k"]
    assert cli_args(SimConfig(api_key="k"))[-2:] == ["--api-key", "k"]
    assert "--api-key" not in cli_args(SimConfig())
    # process mode: a real `python -m simulator.cli --api-key k` (and no VLLM_API_KEY leaking in)
    monkeypatch.setenv("VLLM_API_KEY", "leaked")
    f = SimFleet(
        [SimConfig(model=MODEL, time_scale=0.0, api_key="proc-key", kv_events=False), SimConfig(model=MODEL, time_scale=0.0, kv_events=False)], mode="process"
    )
    f.start()
    try:
        keyed, open_ = (h.url for h in f.handles)
        assert httpx.get(f"{keyed}/v1/models").status_code == 401
        assert httpx.get(f"{keyed}/v1/models", headers={"Authorization": "Bearer leaked"}).status_code == 401
        assert httpx.get(f"{keyed}/v1/models", headers={"Authorization": "Bearer proc-key"}).status_code == 200
        assert httpx.get(f"{open_}/v1/models").status_code == 200
    finally:
        f.stop()
