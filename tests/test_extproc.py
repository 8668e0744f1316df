"""The ext-proc endpoint picker behind a real Envoy, and its gRPC protocol driven directly."""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import httpx
import msgspec
import openai
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from simulator.fleet import SimConfig, SimFleet
from tests.envoy_harness import ExtProcThread, envoy_binary, extproc_envoy
from tests.gateway_harness import MODEL, fleet_config, wait_for

SYSTEMS = [f"System {g}: " + " ".join(f"policy {g}-{i} covers case {i * 11};" for i in range(50)) for g in range(4)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    envoy_binary()  # skip/fail early when Envoy is missing
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02) for i in range(3)])
    fleet.start()
    ep = ExtProcThread(fleet_config(fleet.handles)).start()
    envoy = extproc_envoy(tmp_path_factory.mktemp("envoy"), ep.port).start()
    yield fleet, ep, envoy
    envoy.stop()
    ep.stop()
    fleet.stop()


def _port_to_replica(fleet) -> dict[str, str]:
    return {f"127.0.0.1:{h.config.port}": f"r{i}" for i, h in enumerate(fleet.handles)}


def test_requests_through_envoy_reach_the_picked_replica_with_prefix_affinity(stack):
    fleet, ep, envoy = stack
    c = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="x", max_retries=0, timeout=30)
    by_port = _port_to_replica(fleet)
    homes = {}
    for g, system in enumerate(SYSTEMS):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "q0"}], max_tokens=3)
        assert r.choices[0].message.content
        homes[g] = ep.service.decisions[-1].endpoint
    # after the replicas' KV events land, the same prefixes go back where they are cached
    for g, system in enumerate(SYSTEMS):
        def warm(g=g, system=system) -> bool:
            c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"p{time.monotonic()}"}], max_tokens=2)
            return ep.service.decisions[-1].prefix_blocks > 0
        wait_for(warm, timeout=10, message="prefix blocks indexed")
    for g, system in enumerate(SYSTEMS):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "again"}], max_tokens=3)
        d = ep.service.decisions[-1]
        assert d.endpoint == homes[g] and d.prefix_blocks > 0
        assert r.usage.prompt_tokens_details.cached_tokens > 0  # the replica Envoy reached had it
        assert d.replica == by_port[d.endpoint]


def test_streaming_through_envoy_is_incremental(stack):
    fleet, ep, envoy = stack
    c = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="x", max_retries=0, timeout=30)
    arrivals = []
    t0 = time.perf_counter()
    for ch in c.completions.create(model=MODEL, prompt="stream through envoy", max_tokens=30, stream=True, stream_options={"include_usage": True}):
        arrivals.append(time.perf_counter() - t0)
        last = ch
    assert len(arrivals) >= 30
    assert last.usage.completion_tokens == 30
    assert arrivals[-1] - arrivals[0] > 0  # chunks were not delivered in one buffered block


def test_errors_through_envoy(stack):
    fleet, ep, envoy = stack
    r = httpx.post(f"{envoy.url}/v1/chat/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.post(f"{envoy.url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    models = httpx.get(f"{envoy.url}/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL


def test_no_healthy_replica_is_503(tmp_path):
    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.02)])
    fleet.start()
    cfg = fleet_config(fleet.handles)
    ep = ExtProcThread(cfg).start()
    envoy = extproc_envoy(tmp_path, ep.port).start()
    try:
        fleet.kill(0)
        wait_for(lambda: not ep.server.gateway.fleet.get("r0").healthy, message="circuit open")
        r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
    finally:
        envoy.stop()
        ep.stop()
        fleet.stop()


def _headers(path: str) -> pb.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key=":path", raw_value=path.encode()), base_pb2.HeaderValue(key=":method", raw_value=b"POST"), base_pb2.HeaderValue(key="x-request-id", raw_value=b"dup-1")]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs)), protocol_config=pb.ProtocolConfiguration(request_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED))


def test_full_duplex_streamed_gie_mode_over_grpc(stack):
    """GIE mode driven over gRPC directly: chunks buffered to end of stream, then headers + body back."""
    fleet, ep, envoy = stack
    body = msgspec.json.encode({"model": MODEL, "prompt": SYSTEMS[0] + " full duplex", "max_tokens": 2})
    chunks = [body[:40], body[40:100], body[100:]]

    async def run() -> list[pb.ProcessingResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)

            async def reqs():
                yield _headers("/v1/completions")
                for i, c in enumerate(chunks):
                    yield pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(chunks) - 1))

            return [r async for r in stub.Process(reqs())]

    out = asyncio.run(run())
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    mutation = out[0].request_headers.response.header_mutation.set_headers[0].header
    assert mutation.key == "x-gateway-destination-endpoint"
    assert mutation.raw_value.decode() in _port_to_replica(fleet)
    assert out[0].request_headers.response.clear_route_cache
    lb = out[0].dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value
    assert lb.split(",")[0] == mutation.raw_value.decode()
    streamed = out[1].request_body.response.body_mutation.streamed_response
    assert streamed.body == body and streamed.end_of_stream


def test_subset_hint_restricts_candidates(stack):
    fleet, ep, envoy = stack
    only = f"127.0.0.1:{fleet.handles[2].config.port}"
    body = msgspec.json.encode({"model": MODEL, "prompt": SYSTEMS[1], "max_tokens": 2})
    md = base_pb2.Metadata()
    md.filter_metadata["envoy.lb"].update({"subset_hint": only})

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ep.port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)

            async def reqs():
                hs = [base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")]
                yield pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs)))
                yield pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True), metadata_context=md)

            return [r async for r in stub.Process(reqs())]

    out = asyncio.run(run())
    assert out[-1].request_body.response.header_mutation.set_headers[0].header.raw_value.decode() == only
