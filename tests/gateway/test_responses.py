"""/v1/responses through the gateway, end to end: the real openai SDK (``client.responses``) →
the gateway (uvicorn on loopback) → simulated vLLM 0.33 replicas.

What is checked is what a client and the replicas see: the SDK parses every answer and event
into its own types; prefix routing shows in the replicas' own ``cached_tokens``; a follow-up
naming ``previous_response_id`` succeeds only on the replica that stored the first turn (any
other answers 404); a client that hangs up stops the replica's work. Also /tokenize and
/detokenize, which the gateway passes to a replica serving the body's model.
"""

from __future__ import annotations

import logging
import time
import uuid

import httpx
import openai
import pytest

from gateway.responses import ResponseAffinity
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, get_metrics, metric_value, recorded_gateway, replica_metric, wait_for

#: a long shared system prompt (many KV blocks), one per conversation group
INSTRUCTIONS = ["You are support agent {g}. " + " ".join(f"policy {g}-{i} says item {i} ships in {i % 7 + 1} days;" for i in range(50)) for g in range(3)]


@pytest.fixture(scope="module")
def fleet():
    # one seed everywhere: the same prompt gets the same words on any replica
    f = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.01, num_blocks=2048) for _ in range(3)])
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def gw(fleet):
    with GatewayThread(fleet_config(fleet.handles, auth={"admin_key": "adm"})) as g:
        yield g


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30)


def test_non_stream_and_stream_through_the_sdk(gw):
    c = client(gw)
    r = c.responses.create(model=MODEL, instructions="Answer briefly.", input="What is a prefix cache?", max_output_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # 12 tokens, no stop
    assert r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.output_tokens == 12 and r.usage.input_tokens > 0
    assert r.instructions == "Answer briefly."

    # a stop string ends it first: status completed, the stream's last event response.completed
    events = list(
        c.responses.create(
            model=MODEL, instructions="Answer briefly.", input="What is a prefix cache?", max_output_tokens=200, stream=True, extra_body={"stop": [" the"]}
        )
    )
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == final.output_text
    assert events[0].response.id == final.id


def test_input_items_tools_and_message_lists(gw):
    c = client(gw)
    tools = [{"type": "function", "name": "lookup", "description": "find an order", "parameters": {"type": "object", "properties": {}}}]
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Where is order 7?"}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "shipped"},
        {"role": "user", "content": "So?"},
    ]
    r = c.responses.create(model=MODEL, input=items, tools=tools, max_output_tokens=4)
    assert r.usage.output_tokens == 4 and r.tools[0].name == "lookup"


def _create_raw(c: openai.OpenAI, **kw):
    raw = c.responses.with_raw_response.create(model=MODEL, **kw)
    return raw.headers, raw.parse()


def test_prefix_routing_on_instructions_and_input(gw):
    c = client(gw)
    first: dict[int, str] = {}
    for g, instructions in enumerate(INSTRUCTIONS):
        headers, _ = _create_raw(c, instructions=instructions, input="first question", max_output_tokens=2)
        first[g] = headers["x-kvgate-replica"]
    for g, instructions in enumerate(INSTRUCTIONS):

        def warm(instructions=instructions) -> bool:
            headers, _ = _create_raw(c, instructions=instructions, input=f"probe {time.monotonic()}", max_output_tokens=1)
            return int(headers["x-kvgate-prefix-blocks"]) > 0

        wait_for(warm, timeout=10, message=f"group {g}'s blocks in the index")
    before = metric_value(get_metrics(gw.url), "kvgate_prefix_hit_blocks_total")
    for rnd in range(2):
        for g, instructions in enumerate(INSTRUCTIONS):
            # a list input renders to the same system prefix as a string one
            headers, r = _create_raw(c, instructions=instructions, input=[{"role": "user", "content": f"question {rnd}"}], max_output_tokens=2)
            assert headers["x-kvgate-replica"] == first[g], f"group {g} moved"
            assert int(headers["x-kvgate-prefix-blocks"]) > 0
            # the replica really had it: the prompt the gateway hashed is the one the replica built
            assert r.usage.input_tokens_details.cached_tokens >= 16 * int(headers["x-kvgate-prefix-blocks"]) - 16
    assert metric_value(get_metrics(gw.url), "kvgate_prefix_hit_blocks_total") > before
    state = httpx.get(f"{gw.url}/admin/state", headers={"authorization": "Bearer adm"}, timeout=5).json()
    assert state["index_blocks"] > 0


def test_previous_response_id_goes_to_the_replica_that_holds_it(gw):
    c = client(gw)
    headers, first = _create_raw(c, input=f"remember {uuid.uuid4().hex}", max_output_tokens=3)
    holder = headers["x-kvgate-replica"]
    prev = first
    for turn in range(5):  # each turn only works where the conversation is stored
        headers, nxt = _create_raw(c, input=f"and then {turn}?", previous_response_id=prev.id, max_output_tokens=3)
        assert headers["x-kvgate-replica"] == holder
        assert nxt.previous_response_id == prev.id
        assert nxt.usage.input_tokens > prev.usage.input_tokens  # the history was prepended
        prev = nxt
    # streamed too
    events = list(c.responses.create(model=MODEL, input="last one", previous_response_id=prev.id, max_output_tokens=3, stream=True))
    assert events[-1].response.previous_response_id == prev.id

    # a gateway that never saw the first turn (restarted, or another gateway replica) finds it
    gw.call(_forget(gw))
    headers, nxt = _create_raw(c, input="after a restart", previous_response_id=first.id, max_output_tokens=2)
    assert headers["x-kvgate-replica"] == holder

    # nobody holds it: vLLM's own 404
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.create(model=MODEL, input="x", previous_response_id="resp_does_not_exist", max_output_tokens=2)
    assert "resp_does_not_exist" in info.value.message

    # and it can be fetched by id through the gateway, from the replica that holds it
    got = c.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_nope")


async def _forget(gw):
    gw.gateway.hops.affinity = ResponseAffinity()


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 5}, "input"),
        ({"model": MODEL, "input": ["not an item"]}, "input[0]"),
        ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"model": MODEL, "input": [{"role": "user", "content": 3}]}, "input[0].content"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "max_output_tokens": "many"}, "max_output_tokens"),
        ({"model": MODEL, "input": "hi", "stream": "yes"}, "stream"),
        ({"model": MODEL, "input": "hi", "instructions": 7}, "instructions"),
        ({"model": MODEL, "input": "hi", "previous_response_id": 7}, "previous_response_id"),
        ({"model": MODEL, "input": "hi", "tools": {"type": "function"}}, "tools"),
        ({"model": MODEL, "input": "hi", "background": True, "store": False}, "background"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"model": MODEL, "input": [{"type": "reasoning", "encrypted_content": "x", "summary": []}]}, "input"),
        ({"input": "hi"}, "model"),
    ],
)
def test_bad_bodies_get_openai_style_400s(gw, payload, param):
    r = httpx.post(f"{gw.url}/v1/responses", json=payload, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and isinstance(err["message"], str)


def test_bad_body_through_the_sdk_and_unknown_model(gw):
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    assert info.value.param == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no/such-model", input="hi")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_relay_counts_a_completed_responses_stream_as_whole(gw):
    log = logging.getLogger("kvgate.request")
    handler = _Records()
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        c = client(gw)
        rid = f"whole-{uuid.uuid4().hex[:8]}"
        # the SDK closes the connection as soon as it has read the terminal event
        events = list(c.responses.create(model=MODEL, input="count me", max_output_tokens=6, stream=True, extra_headers={"X-Request-Id": rid}))
        assert events[-1].type == "response.incomplete"
        wait_for(lambda: any(getattr(r, "request_id", None) == rid for r in handler.records), timeout=5, message="the request's log line")
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    rec = next(r for r in handler.records if getattr(r, "request_id", None) == rid)
    assert rec.kind == "responses" and rec.stream is True and rec.status == 200
    assert rec.ok is True  # no [DONE] in a responses stream: its terminal event makes it whole
    assert rec.ttft_ms <= rec.e2e_ms


def test_client_disconnect_mid_stream_cancels_upstream():
    # 7 ms per token: 3000 tokens would take 21 s; the abort must show within a second or two
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=1.0)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            url = fleet.handles[0].url
            body = {"model": MODEL, "input": "go on and on", "max_output_tokens": 3000, "stream": True}
            with httpx.stream("POST", f"{g.url}/v1/responses", json=body, timeout=30) as r:
                seen = b""
                for chunk in r.iter_bytes():
                    seen += chunk
                    if seen.count(b"event: response.output_text.delta") >= 2:
                        break
            assert b"event: response.created" in seen
            wait_for(lambda: replica_metric(url, "vllm:num_requests_running") == 0, timeout=3, message="replica aborted the request")
            assert replica_metric(url, "vllm:generation_tokens_total") < 1000  # stopped early, did not run to 3000
            wait_for(
                lambda: g.gateway.admission.inflight == 0 and g.gateway.fleet.get("r0").inflight_requests == 0, timeout=3, message="gateway accounts closed"
            )
    finally:
        fleet.stop()


def test_tokenize_and_detokenize_pass_through(gw, fleet):
    direct = fleet.handles[0].url
    body = {"model": MODEL, "prompt": "Hello, routing world"}
    ours = httpx.post(f"{gw.url}/tokenize", json=body, timeout=10)
    assert ours.status_code == 200 and ours.json() == httpx.post(f"{direct}/tokenize", json=body, timeout=10).json()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}
    assert httpx.post(f"{gw.url}/tokenize", json=chat, timeout=10).json() == httpx.post(f"{direct}/tokenize", json=chat, timeout=10).json()
    tokens = ours.json()["tokens"]
    # no model: the gateway serves one, so that one (as vLLM answers for its only model)
    back = httpx.post(f"{gw.url}/detokenize", json={"tokens": tokens}, timeout=10)
    assert back.status_code == 200 and back.json() == httpx.post(f"{direct}/detokenize", json={"model": MODEL, "tokens": tokens}, timeout=10).json()
    assert httpx.post(f"{gw.url}/tokenize", json={"model": "no/such", "prompt": "x"}, timeout=10).status_code == 404
    bad = httpx.post(f"{gw.url}/detokenize", json={"model": MODEL, "tokens": "abc"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # the replica's own 400 (an id past the vocabulary), in the gateway's one error shape
    oov = httpx.post(f"{gw.url}/detokenize", json={"model": MODEL, "tokens": [10**9]}, timeout=10)
    assert oov.status_code == 400 and oov.json()["error"]["type"] == "invalid_request_error"


def test_two_hops_with_pd_and_the_follow_up_on_the_decode_replica():
    """P/D: hop 1 asks the prefill replica for one token and a KV handle (no stored response),
    hop 2 streams from a decode replica, which holds the response for the next turn."""
    roles = ["prefill", "decode", "decode"]
    fleet = SimFleet([SimConfig(model=MODEL, role=r, seed=0, time_scale=0.01, num_blocks=1024) for r in roles])
    fleet.start()
    try:
        with recorded_gateway(fleet.handles, pd={"threshold": 64}) as (g, proxies):
            c = client(g)
            instructions = INSTRUCTIONS[0]
            raw = c.responses.with_raw_response.create(model=MODEL, instructions=instructions, input="long one", max_output_tokens=5)
            hops = raw.headers["x-kvgate-replica"].split(",")
            assert hops[0] == "r0" and hops[1] in ("r1", "r2")
            first = raw.parse()
            # the decode replica did not recompute the prompt
            assert first.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16
            [pre] = [x for x in proxies[0].exchanges if x["path"] == "/v1/responses"]
            assert pre["body"]["max_output_tokens"] == 1 and pre["body"]["stream"] is False and pre["body"]["store"] is False
            assert pre["body"]["kv_transfer_params"]["do_remote_decode"] is True
            kv = pre["response"]["kv_transfer_params"]
            assert kv["do_remote_prefill"] is True and kv["remote_engine_id"]
            decoder = proxies[int(hops[1][1:])]
            [dec] = [x for x in decoder.exchanges if x["path"] == "/v1/responses"]
            assert dec["body"]["kv_transfer_params"] == kv and dec["body"]["max_output_tokens"] == 5
            # streamed two hops
            events = list(c.responses.create(model=MODEL, instructions=instructions, input="stream it", max_output_tokens=4, stream=True))
            assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 4
            # the next turn: one hop, to the decode replica that stored the first one
            nxt = c.responses.with_raw_response.create(model=MODEL, input="and then?", previous_response_id=first.id, max_output_tokens=2)
            assert nxt.headers["x-kvgate-replica"] == hops[1]
    finally:
        fleet.stop()


def test_stream_end_sees_a_terminal_event_split_anywhere():
    """The relay's completion rule on the bytes alone: whole only once the terminal event's
    line and the end of its data have both passed, however the chunks fall."""
    from gateway.responses import StreamEnd, past_preamble, stream_response_id

    stream = (
        b'event: response.created\ndata: {"response":{"id":"resp_1","status":"in_progress"},"sequence_number":0,"type":"response.created"}\n\n'
        b'event: response.in_progress\ndata: {"response":{"id":"resp_1"},"sequence_number":1,"type":"response.in_progress"}\n\n'
        b'event: response.output_text.delta\ndata: {"delta":"event: response.completed\\n","sequence_number":2}\n\n'
        b'event: response.completed\ndata: {"response":{"id":"resp_1","status":"completed"},"sequence_number":3,"type":"response.completed"}\n\n'
    )
    terminal_at = stream.index(b"\nevent: response.completed") + 1
    for size in (1, 2, 5, 17, 64, len(stream)):
        end = StreamEnd()
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        for i, chunk in enumerate(chunks):
            end.feed(chunk)
            relayed = sum(len(c) for c in chunks[: i + 1])
            # a text delta that merely says "event: response.completed" does not count
            assert end.whole() == (relayed == len(stream)), (size, i)
            assert end.seen == (relayed >= terminal_at + len(b"event: response.completed\n"))
    preamble = stream[: stream.index(b"event: response.output_text.delta")]
    assert not past_preamble(preamble) and past_preamble(preamble + b"event: response.output_text.delta\n")
    assert stream_response_id(preamble) == "resp_1"


def test_the_chat_vllm_builds_from_a_responses_body():
    from gateway.responses import chat_body

    body = {
        "model": MODEL,
        "instructions": "sys",
        "input": [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "namespace": "ns"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "r1"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "partial"}], "status": "incomplete"},
        ],
        "reasoning": {"effort": "low"},
        "chat_template_kwargs": {"x": 1},
        "tools": [{"type": "function", "name": "g", "parameters": {}}, {"type": "web_search"}],
    }
    chat = chat_body(body)
    assert chat["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "reasoning": "think",
            "tool_calls": [
                {"id": "c1", "function": {"name": "ns__f", "arguments": "{}"}, "type": "function"},
                {"id": "c2", "function": {"name": "g", "arguments": "{}"}, "type": "function"},
            ],
        },
        {"role": "tool", "content": "r1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "partial"},
    ]
    # the last assistant message is still in progress: continued, no generation prompt
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    assert chat["chat_template_kwargs"] == {"x": 1, "reasoning_effort": "low", "enable_thinking": True}
    assert chat["tools"] == [{"type": "function", "function": {"name": "g", "description": None, "parameters": {}, "strict": None}}]


def test_background_response_fetched_and_cancelled_through_the_gateway(gw):
    c = client(gw)
    queued = c.responses.create(model=MODEL, input=f"in the background {uuid.uuid4().hex}", background=True, max_output_tokens=5)
    assert queued.status == "queued" and queued.background is True

    def done() -> bool:
        return c.responses.retrieve(queued.id).status == "incomplete"  # 5 tokens, no stop

    wait_for(done, timeout=10, message="the background response finished")
    final = c.responses.retrieve(queued.id)
    assert final.output_text and final.usage.output_tokens == 5
    with pytest.raises(openai.BadRequestError) as info:  # vLLM: only a queued or running one can be cancelled
        c.responses.cancel(queued.id)
    assert "Cannot cancel" in info.value.message
