"""A tool-calling conversation as the openai SDK sends it back (the assistant's tool-call turn
with ``content: None``) goes through the gateway: routed, not refused, and prefix-routed with
a prediction the replica confirms (the gateway's tokens are the replica's)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from kvindex.tokenize import CachingTokenizer, ChatOptions, load_tokenizer
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, wait_for

BLOCK = 16  # the simulator's and gateway's default block size

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time"}},  # no description: vLLM renders it as null
]
SYSTEM = "You are the travel desk assistant. Answer with the facts from the tools only, in one sentence, and cite the tool you used. " * 4


def _history(client: openai.OpenAI) -> list:
    """The first turns, the assistant's tool call taken from a real answer's shape: the SDK's
    message object dumped back, content None included."""
    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assistant = openai.types.chat.ChatCompletionMessage(role="assistant", content=None, tool_calls=[call]).model_dump(exclude_unset=False)
    assert assistant["content"] is None
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]},
        assistant,
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 21, "sky": "clear"}'},
    ]


@pytest.fixture(scope="module")
def gw():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0) for i in range(2)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            yield g, fleet
    finally:
        fleet.stop()


def test_tool_call_turn_with_null_content_is_routed_and_prefix_matched(gw):
    g, fleet = gw
    client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
    history = _history(client)

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4)
    assert raw.status_code == 200 and raw.headers["x-kvgate-replica"]
    home = raw.headers["x-kvgate-replica"]

    # the same conversation one turn on: the gateway must find the cached history on the replica
    # that served it, and never claim more than the replica then reads from its cache
    def follow_up() -> tuple[Any, Any]:
        turn = [*history, {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": f"And tomorrow? {time.monotonic()}"}]
        r = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=4)
        return r.headers, r.parse()

    seen: dict[str, Any] = {}

    def hit() -> bool:
        headers, resp = follow_up()
        seen.update(headers=headers, resp=resp)
        return int(headers["x-kvgate-prefix-blocks"]) > 0

    wait_for(hit, timeout=10, message="the tool-call history's blocks in the index")
    headers, resp = seen["headers"], seen["resp"]
    predicted = int(headers["x-kvgate-prefix-blocks"]) * BLOCK
    assert headers["x-kvgate-replica"] == home
    cached = resp.usage.prompt_tokens_details.cached_tokens
    assert predicted >= 4 * BLOCK  # the system prompt, tools and the tool-call turn, not just a block
    assert predicted <= cached, (predicted, cached)  # never a hit the replica does not have

    # the gateway's tokens for the request (its request-time path) are the replica's own
    body = {"model": MODEL, "messages": history, "tools": TOOLS}
    ours = CachingTokenizer(load_tokenizer("demo")).chat_tokens(history, ChatOptions.for_request(body))
    theirs = httpx.post(f"{fleet.handles[0].url}/tokenize", json=body, timeout=5).json()["tokens"]
    assert ours == theirs
