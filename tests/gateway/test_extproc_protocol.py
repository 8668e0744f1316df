"""The ext_proc conversation driven over gRPC directly, message by message.

What Envoy does is covered by tests/gateway/test_extproc.py; here each protocol rule is pinned down
exactly: which message gets an answer when, chunking, trailers, the subset hint, fallbacks,
the served-endpoint report, response observation and the accounting it drives, health checks.
"""

from __future__ import annotations

import asyncio

import grpc
import msgspec
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from gateway.extproc import CHUNK_BYTES
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.envoy import ExtProcThread
from tests.helpers.extproc import (
    Conversation,
    M,
    body_msg,
    headers_msg,
    prompt_bytes,
    response_headers_msg,
    set_metadata,
)
from tests.helpers.gateway import MODEL, fleet_config, wait_for

DEST = "x-gateway-destination-endpoint"


@pytest.fixture(scope="module")
def picker():
    # a context that fits the ~210 kB prompt of the chunking test (the picker refuses longer ones early)
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, max_model_len=1_000_000) for i in range(3)])
    fleet.start()
    ep = ExtProcThread(fleet_config(fleet.handles)).start()
    wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
    yield fleet, ep
    ep.stop()
    fleet.stop()


def _addr(fleet, i: int) -> str:
    return f"127.0.0.1:{fleet.handles[i].config.port}"


def _mutation(resp: pb.ProcessingResponse) -> tuple[dict[str, str], str, bool]:
    """(headers set, envoy.lb value, clear_route_cache) of a routing answer."""
    common = getattr(resp, resp.WhichOneof("response")).response
    headers = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    lb = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value
    return headers, lb, common.clear_route_cache


def _state(ep):
    def read():
        gw = ep.server.gateway
        return {s.id: (s.inflight_requests, s.inflight_prefill_tokens) for s in gw.fleet.all()}, gw.admission.inflight

    return ep.call(read)


def _idle(ep) -> bool:
    per, admitted = _state(ep)
    return all(v == (0, 0) for v in per.values()) and admitted == 0 and ep.service.streams_open == 0


def test_buffered_headers_continue_then_body_routes_and_response_headers_mark_first_byte(picker):
    fleet, ep = picker

    async def run():
        async with Conversation(ep.port) as c:
            [h] = await c.send(headers_msg(), 1)
            assert h.WhichOneof("response") == "request_headers" and not h.request_headers.response.HasField("header_mutation")
            [b] = await c.send(body_msg(prompt_bytes("buffered " * 40), eos=True), 1)
            assert b.WhichOneof("response") == "request_body"
            headers, lb, clear = _mutation(b)
            assert clear and headers[DEST] == lb  # GIE: header and metadata never differ
            rid = ep.service.decisions[-1].replica
            assert lb == _addr(fleet, int(rid[1:]))
            per, admitted = _state(ep)
            assert per[rid][0] == 1 and per[rid][1] > 0 and admitted == 1
            [rh] = await c.send(response_headers_msg(200), 1)
            assert rh.WhichOneof("response") == "response_headers"
            assert _state(ep)[0][rid] == (1, 0)  # first byte: prefill released, request still running
            await c.close()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="released when Envoy closes the stream")


def test_full_duplex_buffers_chunks_then_headers_and_body_streamed_back(picker):
    fleet, ep = picker
    body = prompt_bytes("duplex " * 30_000)  # ~210 kB: more than three 62 000-byte answers
    cut = [0, 1000, 70_000, len(body)]

    async def run():
        async with Conversation(ep.port) as c:
            assert await c.send(headers_msg(request_mode=M.FULL_DUPLEX_STREAMED, response_mode=M.FULL_DUPLEX_STREAMED), 0) == []
            for a, b in zip(cut[:-2], cut[1:-1]):
                assert await c.send(body_msg(body[a:b], eos=False), 0) == []
            n = -(-len(body) // CHUNK_BYTES)
            out = await c.send(body_msg(body[cut[-2] :], eos=True), 1 + n)
            assert [r.WhichOneof("response") for r in out] == ["request_headers"] + ["request_body"] * n
            headers, lb, clear = _mutation(out[0])
            assert clear and headers[DEST] == lb and headers["content-length"] == str(len(body))
            parts = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
            assert all(len(p.body) <= CHUNK_BYTES for p in parts)
            assert [p.end_of_stream for p in parts] == [False] * (n - 1) + [True]
            assert b"".join(p.body for p in parts) == body
            rid = ep.service.decisions[-1].replica
            # the response: headers first (no first byte yet: bodies are observed), then chunks echoed
            [rh] = await c.send(response_headers_msg(200), 1)
            assert rh.WhichOneof("response") == "response_headers"
            assert _state(ep)[0][rid][0] == 1 and _state(ep)[0][rid][1] > 0
            [e1] = await c.send(body_msg(b"data: {}\n\n", eos=False, response=True), 1)
            assert e1.response_body.response.body_mutation.streamed_response.body == b"data: {}\n\n"
            assert not e1.response_body.response.body_mutation.streamed_response.end_of_stream
            assert _state(ep)[0][rid] == (1, 0)
            [e2] = await c.send(body_msg(b"data: [DONE]\n\n", eos=True, response=True), 1)
            s = e2.response_body.response.body_mutation.streamed_response
            assert s.body == b"data: [DONE]\n\n" and s.end_of_stream
            # released at the end of the response, before Envoy even closes the stream
            per, admitted = _state(ep)
            assert per[rid] == (0, 0) and admitted == 0
            await c.close()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="idle")


def test_full_duplex_request_with_trailers_routes_at_the_trailers(picker):
    fleet, ep = picker
    body = prompt_bytes("trailers")

    async def run():
        async with Conversation(ep.port) as c:
            await c.send(headers_msg(request_mode=M.FULL_DUPLEX_STREAMED), 0)
            assert await c.send(body_msg(body, eos=False), 0) == []
            out = await c.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), 3)
            assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body", "request_trailers"]
            s = out[1].request_body.response.body_mutation.streamed_response
            assert s.body == body and not s.end_of_stream  # the trailers end the request, not the body
            await c.close()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="idle")


@pytest.mark.parametrize("mode", [M.BUFFERED, M.FULL_DUPLEX_STREAMED])
def test_bad_body_is_an_immediate_openai_error_and_counts_nothing(picker, mode):
    fleet, ep = picker

    async def run():
        async with Conversation(ep.port) as c:
            await c.send(headers_msg(request_mode=mode), 0 if mode == M.FULL_DUPLEX_STREAMED else 1)
            [r] = await c.send(body_msg(b'{"model": "' + MODEL.encode() + b'", "prompt": 5}', eos=True), 1, then_end=True)
            imm = r.immediate_response
            assert imm.status.code == 400
            assert {h.header.key: h.header.raw_value for h in imm.headers.set_headers}["content-type"] == b"application/json"
            err = msgspec.json.decode(imm.body)["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == "prompt"

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="idle")


def test_gie_subset_hint_restricts_the_pick(picker):
    fleet, ep = picker
    ns = "envoy.lb.subset_hint"
    key = "x-gateway-destination-endpoint-subset"

    async def pick(hint) -> pb.ProcessingResponse:
        async with Conversation(ep.port) as c:
            req = headers_msg()
            set_metadata(req, {ns: {key: hint}})
            await c.send(req, 1)
            await c.outbox.put(body_msg(prompt_bytes("subset " * 50), eos=True))
            r = await asyncio.wait_for(c.inbox.get(), 10)
            if r.WhichOneof("response") != "immediate_response":
                await c.close()
            return r

    for i in range(3):
        r = asyncio.run(pick([_addr(fleet, i)]))
        assert _mutation(r)[0][DEST] == _addr(fleet, i)
    r = asyncio.run(pick([_addr(fleet, 1), _addr(fleet, 2)]))
    assert _mutation(r)[0][DEST] in {_addr(fleet, 1), _addr(fleet, 2)}
    for hint in ([], ["10.9.9.9:8000"]):  # empty, or nothing we know: 503 as the protocol says
        r = asyncio.run(pick(hint))
        assert r.immediate_response.status.code == 503
        assert msgspec.json.decode(r.immediate_response.body)["error"]["code"] == "no_healthy_replica"
    wait_for(lambda: _idle(ep), message="idle")


def test_fallbacks_listed_in_header_and_metadata_alike(picker):
    fleet, _ = picker
    ep = ExtProcThread(fleet_config(fleet.handles), fallbacks=2).start()
    try:
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="healthy")

        async def run():
            async with Conversation(ep.port) as c:
                await c.send(headers_msg(), 1)
                [r] = await c.send(body_msg(prompt_bytes("fallbacks"), eos=True), 1)
                await c.close()
                return r

        headers, lb, _ = _mutation(asyncio.run(run()))
        listed = headers[DEST].split(",")
        assert headers[DEST] == lb and len(listed) == 3 and sorted(listed) == sorted(_addr(fleet, i) for i in range(3))
        wait_for(lambda: _idle(ep), message="idle")
    finally:
        ep.stop()


def test_served_endpoint_report_moves_the_count(picker):
    fleet, ep = picker

    async def run():
        async with Conversation(ep.port) as c:
            await c.send(headers_msg(), 1)
            [r] = await c.send(body_msg(prompt_bytes("served elsewhere"), eos=True), 1)
            picked = ep.service.decisions[-1].replica
            other = next(f"r{i}" for i in range(3) if f"r{i}" != picked)
            served = _addr(fleet, int(other[1:]))
            await c.send(response_headers_msg(200, metadata={"envoy.lb": {"x-gateway-destination-endpoint-served": served}}), 1)
            per, _ = _state(ep)
            assert per[picked][0] == 0 and per[other][0] == 1
            await c.close()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="idle")


def test_5xx_answer_reported_as_failure_to_the_scheduler(picker):
    fleet, ep = picker
    seen = []
    sched = ep.server.gateway.scheduler
    original = sched.on_complete
    sched.on_complete = lambda ctx, endpoint, ok, profile=None: (seen.append(ok), original(ctx, endpoint, ok, profile))
    try:

        async def run(status):
            async with Conversation(ep.port) as c:
                await c.send(headers_msg(), 1)
                await c.send(body_msg(prompt_bytes(f"status {status}"), eos=True), 1)
                await c.send(response_headers_msg(status, eos=True), 1)  # a response without a body ends here
                assert not any(_state(ep)[0][r][0] for r in _state(ep)[0])
                await c.close()

        asyncio.run(run(200))
        asyncio.run(run(503))
        assert seen == [True, False]
    finally:
        sched.on_complete = original
    wait_for(lambda: _idle(ep), message="idle")


def test_abandoned_stream_releases_everything(picker):
    """Envoy resets the stream (client gone, upstream reset) after the pick: nothing leaks."""
    fleet, ep = picker

    async def run():
        c = Conversation(ep.port)
        await c.__aenter__()
        await c.send(headers_msg(), 1)
        await c.send(body_msg(prompt_bytes("abandoned"), eos=True), 1)
        assert sum(v[0] for v in _state(ep)[0].values()) == 1
        c.call.cancel()
        await c.__aexit__()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="released after the reset")


def test_grpc_health_check(picker):
    fleet, ep = picker

    async def check(service: str) -> bytes:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            call = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            return await call(b"\x0a" + bytes([len(service)]) + service.encode() if service else b"")

    assert asyncio.run(check("")) == b"\x08\x01"  # SERVING
    assert asyncio.run(check("envoy.service.ext_proc.v3.ExternalProcessor")) == b"\x08\x01"
    assert asyncio.run(check("readiness")) == b"\x08\x01"
    assert asyncio.run(check("something.else")) == b"\x08\x03"  # SERVICE_UNKNOWN


def test_struct_metadata_helpers_roundtrip():
    s = struct_pb2.Struct()
    s.update({"x-gateway-destination-endpoint-subset": ["1.2.3.4:80", "5.6.7.8:80"]})
    from gateway.extproc import SUBSET_KEY, SUBSET_NAMESPACE, _struct_dict, _subset_hint

    assert _subset_hint({SUBSET_NAMESPACE: _struct_dict(s)}) == {"1.2.3.4:80", "5.6.7.8:80"}
    assert _subset_hint({SUBSET_NAMESPACE: {SUBSET_KEY: "1.2.3.4:80, 5.6.7.8:80"}}) == {"1.2.3.4:80", "5.6.7.8:80"}
    assert _subset_hint({"envoy.lb": {"subset_hint": "1.2.3.4:80"}}) is None


def test_body_mode_none_routes_at_the_headers_on_load(picker):
    """A data plane that sends no body still gets an endpoint (no prompt: load only)."""
    fleet, ep = picker

    async def run():
        async with Conversation(ep.port) as c:
            [h] = await c.send(headers_msg(request_mode=M.NONE), 1)
            headers, lb, clear = _mutation(h)
            assert clear and headers[DEST] == lb and lb in {_addr(fleet, i) for i in range(3)}
            await c.close()

    asyncio.run(run())
    wait_for(lambda: _idle(ep), message="idle")
