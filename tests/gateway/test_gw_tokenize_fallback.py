"""A gateway with no local tokenizer asks a replica's /tokenize, and still routes by prefix.

The tokens must be the ones the replica will compute: for a chat that means the template's
inputs (tools, template kwargs, continue_final_message) travel with the /tokenize call. A tools
block rendered at the top of the prompt makes a missing ``tools`` visible: the gateway's block
keys would then never match the blocks the replica reported.
"""

from __future__ import annotations

import time

import openai

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"lookup_{i}",
            "description": "look a word up in the glossary of the release notes and answer with its meaning " * 2,
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        },
    }
    for i in range(3)
]


def test_chat_with_tools_routes_by_prefix_through_the_tokenize_fallback():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.01) for i in range(2)])
    fleet.start()
    try:
        cfg = fleet_config(fleet.handles, models={MODEL: {"tokenizer": None}})
        with GatewayThread(cfg) as g:
            client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
            messages = [{"role": "user", "content": "what does the word cadence mean in these notes?"}]

            def ask():
                r = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=2)
                return r.headers["x-kvgate-replica"], int(r.headers["x-kvgate-prefix-blocks"]), r.parse().usage.prompt_tokens

            home, blocks, prompt_tokens = ask()
            assert blocks == 0 and prompt_tokens > 3 * 16  # the tools block spans several KV blocks
            deadline = time.monotonic() + 10
            while blocks == 0 and time.monotonic() < deadline:  # until the replica's KV events reached the index
                time.sleep(0.1)
                replica, blocks, _ = ask()
            assert blocks >= (prompt_tokens - 1) // 16, "the gateway's tokens match the replica's, tools included"
            assert replica == home
    finally:
        fleet.stop()
