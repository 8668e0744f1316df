"""Fuzzing the HTTP gateway: whatever a client sends, a 4xx with an OpenAI body, never a 5xx.

Bodies for every proxied endpoint are drawn by hypothesis: valid requests with fields replaced by
arbitrary JSON, whole arbitrary JSON documents, and arbitrary bytes. The property: the answer is
2xx, or a 4xx whose body is ``{"error": {"message", "type", "code"}}`` — never a 5xx, never a
hang, never a streamed error event for a request the client got wrong — and afterwards the
gateway still serves a normal request.

``make test`` runs a few hundred cases (a few seconds); ``KVGATE_FUZZ_EXAMPLES=20000`` runs
longer.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config

EXAMPLES = int(os.environ.get("KVGATE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], database=None)

ENDPOINTS = {
    "/v1/completions": {"model": MODEL, "prompt": "fuzz me", "max_tokens": 3},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "fuzz me"}], "max_tokens": 3},
    "/v1/embeddings": {"model": MODEL, "input": "fuzz me"},
}

#: the fields a request may carry, valid or not: each may get any JSON value
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "n",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "cache_salt",
    "user",
    "kv_transfer_params",
    "logprobs",
    "echo",
    "input",
    "request_id",
    "priority",
    "response_format",
]

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "x"]) | json_scalars},
        optional={
            "content": st.none()
            | st.text(max_size=60)
            | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])}, optional={"text": json_values}), max_size=3),
            "tool_calls": json_values,
            "name": json_values,
            "tool_call_id": json_values,
        },
    ),
    max_size=4,
)
prompts = st.text(max_size=200) | st.lists(st.integers(min_value=-5, max_value=2**40), max_size=20) | st.lists(st.text(max_size=20), max_size=3) | json_values


@st.composite
def mutated(draw: Any) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body: dict[str, Any] = dict(ENDPOINTS[path])
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if name == "messages":
            body[name] = draw(messages | json_values)
        elif name == "prompt":
            body[name] = draw(prompts)
        elif name in ("max_tokens", "max_completion_tokens"):
            body[name] = draw(st.integers(min_value=-3, max_value=64) | json_values)
        else:
            body[name] = draw(json_values)
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))), None)
    return path, msgspec.json.encode(body)


raw_bodies = st.tuples(
    st.sampled_from(sorted(ENDPOINTS)),
    st.binary(max_size=300) | json_values.map(msgspec.json.encode) | st.text(max_size=200).map(str.encode),
)


@pytest.fixture(scope="module")
def gw():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0, max_model_len=512) for i in range(2)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            with httpx.Client(base_url=g.url, timeout=30) as client:
                yield g, client
    finally:
        fleet.stop()


def check(client: httpx.Client, path: str, raw: bytes) -> None:
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, f"{r.status_code} for {path} {raw[:300]!r}: {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and isinstance(err["type"], str) and isinstance(err["code"], str), r.text
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert b'data: {"error"' not in r.content, r.content[-300:]


@FUZZ
@given(case=mutated())
def test_mutated_requests_never_get_a_5xx(gw, case):
    _, client = gw
    check(client, *case)


@FUZZ
@given(case=raw_bodies)
def test_arbitrary_bodies_never_get_a_5xx(gw, case):
    _, client = gw
    check(client, *case)


def test_still_serving_after_the_fuzz(gw):
    g, client = gw
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "still here", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert g.gateway.admission.inflight == 0
