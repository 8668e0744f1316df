"""The simulator's answers to the parts of vLLM 0.33's API beyond plain generation, parsed with
the openai SDK's own types: /v1/responses (stored for ``previous_response_id``, streamed with
vLLM's event sequence), the render endpoints a cache-aware router calls, ``n > 1``, logprobs
and ``weight_versions``."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.responses import Response

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.sim import MODEL, sdk


@pytest.fixture(scope="module")
def url():
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.0)])
    fleet.start()
    yield fleet.handles[0].url
    fleet.stop()


def test_responses_non_stream_is_an_sdk_response_and_is_stored(url):
    c = sdk(url)
    r = c.responses.create(model=MODEL, instructions="Be brief.", input="Hello there", max_output_tokens=6)
    raw = httpx.get(f"{url}/v1/responses/{r.id}", timeout=5).json()
    Response.model_validate(raw)  # every field the SDK requires, with its types
    assert raw["object"] == "response" and raw["status"] == "incomplete" and raw["incomplete_details"] == {"reason": "max_output_tokens"}
    assert raw["usage"]["output_tokens"] == 6 and raw["max_output_tokens"] == 6 and raw["tool_choice"] == "none"
    assert r.output_text == raw["output"][0]["content"][0]["text"]
    # the conversation continues on this replica: the history is prepended to the prompt
    r2 = c.responses.create(model=MODEL, input="more please", previous_response_id=r.id, max_output_tokens=3)
    assert r2.previous_response_id == r.id and r2.usage.input_tokens > r.usage.input_tokens
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    assert info.value.body["message"] == "Response with id 'resp_unknown' not found." and info.value.body["param"] == "response_id"
    # store=False keeps nothing
    r3 = c.responses.create(model=MODEL, input="forget me", store=False, max_output_tokens=2)
    assert httpx.get(f"{url}/v1/responses/{r3.id}", timeout=5).status_code == 404


def test_responses_stream_has_vllms_event_sequence_and_no_done(url):
    with httpx.stream("POST", f"{url}/v1/responses", json={"model": MODEL, "input": "stream it", "max_output_tokens": 4, "stream": True}, timeout=10) as r:
        raw = b"".join(r.iter_bytes())
    assert b"[DONE]" not in raw and raw.endswith(b"\n\n")
    names = [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    events = list(sdk(url).responses.create(model=MODEL, input="stream it", max_output_tokens=4, stream=True, extra_body={"stop": [" "]}))
    # a stop string: completed; the SDK parsed every event into its own types
    assert events[-1].type == "response.completed" and events[-1].response.status == "completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_logprobs_and_bad_bodies(url):
    c = sdk(url)
    r = c.responses.create(model=MODEL, input="x", include=["message.output_text.logprobs"], top_logprobs=3, max_output_tokens=4)
    lps = r.output[0].content[0].logprobs
    assert len(lps) == 4 and all(len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token for lp in lps)
    assert r.top_logprobs == 3
    events = list(c.responses.create(model=MODEL, input="x", include=["message.output_text.logprobs"], top_logprobs=1, max_output_tokens=4, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in lps]
    for body, param in [
        ({"model": MODEL}, "body.input"),
        ({"model": MODEL, "input": "x", "background": True, "store": False}, "background"),
        ({"model": MODEL, "input": "x", "prompt": {"id": "p"}}, "prompt"),
    ]:
        resp = httpx.post(f"{url}/v1/responses", json=body, timeout=5)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_render_endpoints_return_vllms_generate_requests(url):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5, "stop": ["xy"]}
    rendered = httpx.post(f"{url}/v1/chat/completions/render", json=chat, headers={"X-Request-Id": "abc"}, timeout=5).json()
    tokens = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": chat["messages"]}, timeout=5).json()["tokens"]
    assert rendered["request_id"] == "chatcmpl-abc" and rendered["token_ids"] == tokens
    sp = rendered["sampling_params"]
    assert sp["max_tokens"] == 5 and sp["stop"] == ["xy"] and sp["output_kind"] == 2 and sp["output_text_buffer_length"] == 1
    assert rendered["parse_context"]["tool_choice"] == "none" and rendered["output_mode"] == "tokens"
    comp = httpx.post(f"{url}/v1/completions/render", json={"model": MODEL, "prompt": ["one", "two"], "stream": True}, timeout=5).json()
    assert isinstance(comp, list) and len(comp) == 2 and comp[1]["request_id"].endswith("-1")
    assert comp[0]["token_ids"] == httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "one"}, timeout=5).json()["tokens"]
    assert comp[0]["sampling_params"]["output_kind"] == 1 and "max_tokens" not in comp[0]["sampling_params"]  # 16: the default, omitted
    resp = httpx.post(f"{url}/v1/responses/render", json={"model": MODEL, "input": "hi", "previous_response_id": "resp_x"}, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "previous_response_id"
    bad = httpx.post(f"{url}/v1/chat/completions/render", json={"model": "nope", "messages": chat["messages"]}, timeout=5)
    assert bad.status_code == 404


def test_n_choices_logprobs_and_weight_versions(url):
    c = sdk(url)
    chat = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        logprobs=True,
        top_logprobs=2,
        max_tokens=5,
        extra_body={"return_weight_versions": True},
    )
    ChatCompletion.model_validate(chat.model_dump())
    assert [ch.index for ch in chat.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in chat.choices}) > 1  # samples differ
    assert (
        chat.usage.completion_tokens == 15
        and chat.usage.prompt_tokens == c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1).usage.prompt_tokens
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert chat.choices[0].model_extra["weight_versions"] == [{"version": "default", "start": 0, "end": 5}]

    comp = c.completions.create(model=MODEL, prompt=["a b", "c d"], n=2, logprobs=2, max_tokens=4)
    Completion.model_validate(comp.model_dump())
    assert [ch.index for ch in comp.choices] == [0, 1, 2, 3]
    lp = comp.choices[1].logprobs
    assert "".join(lp.tokens) == comp.choices[1].text and lp.text_offset[0] == 0 and len(lp.top_logprobs[0]) == 2
    assert comp.choices[0].model_extra["weight_versions"] is None  # not asked for

    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, logprobs=True, max_tokens=4, stream=True))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
            if choice.logprobs is not None:
                assert all(t.top_logprobs == [] for t in choice.logprobs.content)
    assert set(by_index) == {0, 1}
    stream_lps = list(c.completions.create(model=MODEL, prompt="a b", logprobs=1, max_tokens=4, stream=True))
    tokens = [t for ch in stream_lps for t in ch.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(ch.choices[0].text for ch in stream_lps)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_logprobs=2, max_tokens=2)
