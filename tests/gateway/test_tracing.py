"""OpenTelemetry tracing (``tracing:``, the ``otel`` extra) end to end.

A real OTLP collector runs in the test process (opentelemetry-proto's TraceService over gRPC on
127.0.0.1 port 0, or the OTLP/HTTP protobuf endpoint), the gateway exports to it, simulated
replicas answer behind recording proxies (so the ``traceparent`` each replica receives is seen),
and the requests come from the real openai SDK. Checked: one trace per request with its stage
spans in order and linked to the request's span, the hop span named as the replica's parent,
a client's trace continued, P/D hops, retries, the ext-proc decision and the sidecar's hops, and
with tracing off: nothing exported, no opentelemetry module imported on the request path.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from gateway import tracing as tracing_mod
from gateway.config import ConfigError, parse_config
from gateway.sidecar import PREFILL_HEADER, sidecar_config
from gateway.tracing import OTEL_MISSING, Tracing
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.envoy import ExtProcThread
from tests.helpers.extproc import Conversation, body_msg, headers_msg, prompt_bytes
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, recorded_gateway, wait_for
from tests.helpers.net import bound_socket

ROOT = Path(__file__).resolve().parents[2]
SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind
ERROR = 2  # OTLP Status.StatusCode
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


# -- an OTLP collector ------------------------------------------------------------------------------


def _value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    start: int
    end: int
    attrs: dict[str, Any]
    events: list[str]
    status: int
    message: str
    resource: dict[str, Any] = field(default_factory=dict)


class Collector:
    """What the gateway exports, received as an OTLP collector receives it: over gRPC
    (``TraceService/Export``) and over HTTP (``POST /v1/traces``, protobuf)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                outer.take(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.grpc = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    data = gzip.decompress(data)
                if self.path != "/v1/traces" or "protobuf" not in self.headers.get("content-type", ""):
                    self.send_response(404)
                    self.end_headers()
                    return
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(data)
                outer.take(req)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}/v1/traces"

    def take(self, request) -> None:
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent=s.parent_span_id.hex(),
                                kind=s.kind,
                                start=s.start_time_unix_nano,
                                end=s.end_time_unix_nano,
                                attrs={a.key: _value(a.value) for a in s.attributes},
                                events=[e.name for e in s.events],
                                status=s.status.code,
                                message=s.status.message,
                                resource=resource,
                            )
                        )

    def start(self) -> Collector:
        self.grpc.start()
        self.http_thread.start()
        return self

    def stop(self) -> None:
        self.grpc.stop(0)
        self.http.shutdown()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return sorted((s for s in self.spans if s.trace_id == trace_id), key=lambda s: s.start)

    def roots(self, request_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.kind == SERVER and s.attrs.get("kvgate.request_id") == request_id]


def collected(collector: Collector, tracing: Tracing, request_id: str, names: set[str]) -> tuple[Span, list[Span]]:
    """The request's root span and its trace, once the spans named have all arrived."""
    out: list = []

    def ready() -> bool:
        tracing.force_flush()
        roots = collector.roots(request_id)
        if len(roots) != 1:
            return False
        spans = collector.trace(roots[0].trace_id)
        if not names <= {s.name for s in spans}:
            return False
        out[:] = [roots[0], spans]
        return True

    wait_for(ready, timeout=15, message=f"spans {sorted(names)} of {request_id}")
    return out[0], out[1]


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def parse_traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, parent, flags = value.split("-")
    assert version == "00"
    return trace_id, parent, flags


def tracing_cfg(endpoint: str, protocol: str = "grpc", **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "otlp_endpoint": endpoint, "protocol": protocol, "service_name": "kvgate-test", **extra}


def client(url: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30, default_headers=headers or None)


def doc(tag: str) -> str:
    return f"Ledger {tag}: " + " ".join(f"entry {i} moves {i * 7} units from {tag} to the reserve;" for i in range(80))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector():
    c = Collector().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fleet():
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02) for i in range(2)])
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def traced(fleet, collector):
    """A traced gateway over the fleet, a recording proxy in front of each replica."""
    with recorded_gateway(fleet.handles, tracing=tracing_cfg(collector.grpc_endpoint)) as (g, proxies):
        yield g, proxies


@pytest.fixture(scope="module")
def pd_fleet():
    f = SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=0.02, num_blocks=1024) for i, r in enumerate(["prefill", "decode"])])
    f.start()
    yield f
    f.stop()


def _sent_to(proxies, request_id: str) -> list[dict]:
    """What the replicas received for one request (every hop, every attempt)."""
    return [e for p in proxies for e in p.posts("") if e["headers"].get("x-request-id") == request_id]


# -- one hop ----------------------------------------------------------------------------------------


def test_one_hop_request_is_one_trace_with_its_stages_in_order(traced, collector):
    g, proxies = traced
    raw = client(g.url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "You audit ledgers."}, {"role": "user", "content": doc("one")}], max_tokens=4
    )
    assert raw.parse().choices[0].message.content
    rid, replica = raw.headers["x-request-id"], raw.headers["x-kvgate-replica"]
    root, spans = collected(collector, g.gateway.tracing, rid, {"tokenize", "index", "schedule", "hop", "relay"})

    assert root.name == "POST /v1/chat/completions" and root.parent == ""  # no client trace: a new one
    assert root.resource["service.name"] == "kvgate-test"
    assert root.attrs["kvgate.component"] == "gateway"
    assert root.attrs["http.response.status_code"] == 200 and root.status != ERROR
    assert root.attrs["gen_ai.request.model"] == MODEL and root.attrs["kvgate.profile"] == "default"
    assert root.attrs["kvgate.replica"] == replica and root.attrs["kvgate.pd.path"] == "one_hop"
    # one span per stage, each a child of the request's span, in the order the stages ran
    assert [s.name for s in spans] == ["POST /v1/chat/completions", "tokenize", "index", "schedule", "hop", "relay"]
    stages = spans[1:]
    assert all(s.parent == root.span_id for s in stages)
    tok, idx, sched, hop, relay = stages
    for a, b in ((tok, idx), (idx, sched), (sched, hop)):
        assert a.end <= b.start + 1000, (a.name, b.name)  # one after the other (1 µs of rounding)
    # the hop spans the replica's whole answer, so relaying starts inside it; both end with the request
    assert hop.start <= relay.start <= hop.end <= relay.end <= root.end and root.start <= tok.start
    assert tok.attrs["kvgate.chat_template"] is True and tok.attrs["kvgate.tokenizer"] == "local"
    assert tok.attrs["kvgate.prompt_tokens"] == root.attrs["kvgate.prompt_tokens"] > 100
    assert tok.attrs["kvgate.blocks"] == tok.attrs["kvgate.prompt_tokens"] // tok.attrs["kvgate.block_size"]
    assert idx.attrs["kvgate.index.ok"] is True
    assert sched.attrs["kvgate.replica"] == replica and sched.attrs["kvgate.phase"] == "any"
    assert sched.attrs["kvgate.profile"] == "default" and sched.attrs["kvgate.prefix_blocks"] == 0
    assert sorted(sched.attrs["kvgate.ranked"]) == ["r0", "r1"] and sched.attrs["kvgate.ranked"][0] == replica
    assert hop.kind == CLIENT and hop.attrs["kvgate.replica"] == replica and hop.attrs["kvgate.attempt"] == 1
    assert hop.attrs["http.response.status_code"] == 200 and "first_byte" in hop.events and hop.status != ERROR
    assert relay.attrs["kvgate.streaming"] is False and relay.attrs["kvgate.complete"] is True

    # the same prompt again: the schedule span shows the prefix the chosen replica holds
    raw = client(g.url).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "You audit ledgers."}, {"role": "user", "content": doc("one")}], max_tokens=4
    )
    _, spans = collected(collector, g.gateway.tracing, raw.headers["x-request-id"], {"schedule", "relay"})
    [sched] = by_name(spans, "schedule")
    assert sched.attrs["kvgate.prefix_blocks"] == int(raw.headers["x-kvgate-prefix-blocks"]) > 0


def test_streamed_answer_relay_span_sees_the_first_byte_and_ends_with_the_stream(traced, collector):
    g, _ = traced
    with client(g.url).completions.with_streaming_response.create(model=MODEL, prompt="Count the ledger entries", max_tokens=12, stream=True) as r:
        rid = r.headers["x-request-id"]
        text = "".join(ch.choices[0].text for ch in r.parse() if ch.choices)
    assert text
    root, spans = collected(collector, g.gateway.tracing, rid, {"hop", "relay"})
    [hop], [relay] = by_name(spans, "hop"), by_name(spans, "relay")
    assert root.attrs["kvgate.stream"] is True
    assert relay.attrs["kvgate.streaming"] is True and relay.events == ["first_byte"] and relay.attrs["kvgate.complete"] is True
    assert by_name(spans, "tokenize")[0].attrs["kvgate.chat_template"] is False
    # the hop lasts as long as the replica's answer: it ends with the stream, before the request
    assert relay.start <= hop.end <= relay.end <= root.end


def test_the_replica_gets_the_hop_span_as_its_parent(traced, collector):
    g, proxies = traced
    raw = client(g.url).completions.with_raw_response.create(model=MODEL, prompt="Which entry moved most?", max_tokens=3)
    rid = raw.headers["x-request-id"]
    root, spans = collected(collector, g.gateway.tracing, rid, {"hop"})
    [hop] = by_name(spans, "hop")
    [sent] = _sent_to(proxies, rid)
    trace_id, parent, flags = parse_traceparent(sent["headers"]["traceparent"])
    assert (trace_id, parent) == (root.trace_id, hop.span_id) and int(flags, 16) & 1  # sampled
    assert "tracestate" not in sent["headers"]  # nobody set one


def test_a_client_trace_is_continued(traced, collector):
    g, proxies = traced
    c = client(g.url, traceparent=traceparent(CLIENT_TRACE, CLIENT_SPAN), tracestate="vendor=abc,other=1")
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="Balance the reserve", max_tokens=3)
    rid = raw.headers["x-request-id"]
    root, spans = collected(collector, g.gateway.tracing, rid, {"hop", "relay"})
    assert root.trace_id == CLIENT_TRACE and root.parent == CLIENT_SPAN
    assert all(s.trace_id == CLIENT_TRACE for s in spans)
    [hop] = by_name(spans, "hop")
    [sent] = _sent_to(proxies, rid)
    assert parse_traceparent(sent["headers"]["traceparent"])[:2] == (CLIENT_TRACE, hop.span_id)
    assert sent["headers"]["tracestate"] == "vendor=abc,other=1"


def test_an_invalid_client_traceparent_starts_a_new_trace(traced, collector):
    g, proxies = traced
    bad = traceparent("0" * 32, CLIENT_SPAN)  # an all-zero trace id is invalid (W3C)
    raw = client(g.url, traceparent=bad).completions.with_raw_response.create(model=MODEL, prompt="Bad parent", max_tokens=2)
    rid = raw.headers["x-request-id"]
    root, spans = collected(collector, g.gateway.tracing, rid, {"hop"})
    assert root.parent == "" and root.trace_id != "0" * 32
    [sent] = _sent_to(proxies, rid)
    assert parse_traceparent(sent["headers"]["traceparent"])[:2] == (root.trace_id, by_name(spans, "hop")[0].span_id)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (traceparent(CLIENT_TRACE, CLIENT_SPAN), (int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), True)),
        (traceparent(CLIENT_TRACE, CLIENT_SPAN, "00"), (int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), False)),
        (traceparent(CLIENT_TRACE, CLIENT_SPAN, "03"), (int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), True)),  # level 2's random flag
        (f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-later", (int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), True)),  # a later version may append
        (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-more", None),
        (f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", None),
        (traceparent(CLIENT_TRACE.upper(), CLIENT_SPAN), None),
        (traceparent(CLIENT_TRACE, "0" * 16), None),
        (traceparent(CLIENT_TRACE[:-1], CLIENT_SPAN), None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_parsing_follows_w3c(value, parsed):
    assert tracing_mod.parse_traceparent(value) == parsed
    if parsed is not None:
        assert tracing_mod.format_traceparent(parsed[0], parsed[1]) == traceparent(CLIENT_TRACE, CLIENT_SPAN)


def test_a_client_trace_sampled_out_records_nothing_and_passes_unchanged(traced, collector):
    g, proxies = traced
    tid = "0af7651916cd43dd8448eb211c80319c"
    header = traceparent(tid, "b7ad6b7169203331", "00")
    raw = client(g.url, traceparent=header).completions.with_raw_response.create(model=MODEL, prompt="Not traced", max_tokens=3)
    [sent] = _sent_to(proxies, raw.headers["x-request-id"])
    assert sent["headers"]["traceparent"] == header  # the client's decision reaches the replica
    g.gateway.tracing.force_flush()
    assert collector.trace(tid) == [] and collector.roots(raw.headers["x-request-id"]) == []


def test_an_error_answer_is_an_error_span(traced, collector):
    g, _ = traced
    with pytest.raises(openai.BadRequestError) as err:
        client(g.url).completions.create(model=MODEL, prompt=[-1, 2], max_tokens=3)
    rid = err.value.response.headers["x-request-id"]
    root, _ = collected(collector, g.gateway.tracing, rid, set())
    # a 4xx is the client's doing: the status code and error type are said, the span is no error
    assert root.attrs["http.response.status_code"] == 400 and root.attrs["error.type"] == "invalid_request" and root.status != ERROR


def test_otlp_over_http_protobuf(fleet, collector):
    with GatewayThread(fleet_config(fleet.handles, tracing=tracing_cfg(collector.http_endpoint, "http/protobuf"))) as g:
        raw = client(g.url).completions.with_raw_response.create(model=MODEL, prompt="Over HTTP", max_tokens=2)
        root, spans = collected(collector, g.gateway.tracing, raw.headers["x-request-id"], {"tokenize", "index", "schedule", "hop", "relay"})
    assert root.name == "POST /v1/completions" and len(spans) == 6


# -- retries ----------------------------------------------------------------------------------------


class FailingReplica:
    """A replica that lists the model and is healthy, but answers every POST with vLLM's 503."""

    def __init__(self, models_from: str) -> None:
        async def models(request: Request) -> Response:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{models_from}/v1/models")
            return Response(r.content, media_type="application/json")

        async def overloaded(request: Request) -> Response:
            self.posts.append({k.lower(): v for k, v in request.headers.items()})
            return JSONResponse({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}}, status_code=503)

        async def empty(request: Request) -> Response:
            return Response("")

        self.posts: list[dict[str, str]] = []
        app = Starlette(
            routes=[Route("/v1/models", models), Route("/metrics", empty), Route("/v1/{rest:path}", overloaded, methods=["POST"])],
        )
        self.sock = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="none"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> FailingReplica:
        self.thread.start()
        wait_for(lambda: self.server.started, message="failing replica up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_a_retry_is_a_new_hop_span_with_its_attempt_number(fleet, collector):
    good = fleet.handles[0]
    with FailingReplica(good.url) as bad:
        cfg = parse_config(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                # round-robin in id order: of two requests in a row, one goes to r0 (failing) first
                "replicas": [{"id": "r0", "url": bad.url, "models": [MODEL]}, {"id": "r1", "url": good.url, "models": [MODEL]}],
                "models": {MODEL: {"tokenizer": "demo"}},
                "scheduling": {"default_profile": "round-robin"},
                "debug_headers": True,
                "tracing": tracing_cfg(collector.grpc_endpoint),
            }
        )
        with GatewayThread(cfg) as g:
            rids = [
                client(g.url).completions.with_raw_response.create(model=MODEL, prompt=f"retry {i}", max_tokens=2).headers["x-request-id"] for i in range(2)
            ]
            traces = [collected(collector, g.gateway.tracing, rid, {"hop", "relay"}) for rid in rids]
    [(root, spans)] = [t for t in traces if len(by_name(t[1], "hop")) == 2]
    first, second = by_name(spans, "hop")
    assert (first.attrs["kvgate.replica"], first.attrs["kvgate.attempt"]) == ("r0", 1)
    assert first.status == ERROR and "HTTP 503" in first.message and first.attrs["http.response.status_code"] == 503
    assert (second.attrs["kvgate.replica"], second.attrs["kvgate.attempt"]) == ("r1", 2)
    assert second.status != ERROR and first.end <= second.start
    assert root.attrs["kvgate.replica"] == "r1" and root.status != ERROR
    # the failed attempt's replica was told its own hop span as parent, not the retry's
    [seen] = [h for h in bad.posts if h["x-request-id"] == root.attrs["kvgate.request_id"]]
    assert parse_traceparent(seen["traceparent"])[:2] == (root.trace_id, first.span_id)


# -- prefill → decode -------------------------------------------------------------------------------


def test_pd_request_has_a_prefill_hop_and_a_decode_hop(pd_fleet, collector):
    with recorded_gateway(pd_fleet.handles, roles=["prefill", "decode"], pd={"threshold": 64}, tracing=tracing_cfg(collector.grpc_endpoint)) as (g, proxies):
        with client(g.url).chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": doc("pd")}], max_tokens=5, stream=True
        ) as r:
            rid = r.headers["x-request-id"]
            assert r.headers["x-kvgate-replica"] == "r0,r1"
            assert "".join(ch.choices[0].delta.content or "" for ch in r.parse() if ch.choices)
        root, spans = collected(collector, g.gateway.tracing, rid, {"prefill hop", "decode hop", "relay"})
    assert root.attrs["kvgate.pd.path"] == "two_hop" and root.attrs["kvgate.replica"] == "r0,r1"
    names = [s.name for s in spans]
    assert names == ["POST /v1/chat/completions", "tokenize", "index", "schedule", "schedule", "prefill hop", "decode hop", "relay"]
    decode_sched, prefill_sched = by_name(spans, "schedule")
    assert (decode_sched.attrs["kvgate.phase"], decode_sched.attrs["kvgate.replica"]) == ("decode", "r1")
    assert (prefill_sched.attrs["kvgate.phase"], prefill_sched.attrs["kvgate.replica"]) == ("prefill", "r0")
    [pre], [dec] = by_name(spans, "prefill hop"), by_name(spans, "decode hop")
    assert pre.attrs["kvgate.replica"] == "r0" and dec.attrs["kvgate.replica"] == "r1"
    assert pre.parent == dec.parent == root.span_id and pre.end <= dec.start
    # each replica's spans go under its own hop
    [to_prefill] = _sent_to(proxies[:1], rid)
    [to_decode] = _sent_to(proxies[1:], rid)
    assert parse_traceparent(to_prefill["headers"]["traceparent"])[:2] == (root.trace_id, pre.span_id)
    assert parse_traceparent(to_decode["headers"]["traceparent"])[:2] == (root.trace_id, dec.span_id)


def test_the_sidecar_traces_its_hops_under_the_callers_span(pd_fleet, collector):
    from tests.gateway.test_sidecar_pd import SidecarThread

    prefill, decode = pd_fleet.handles
    addr = f"127.0.0.1:{prefill.config.port}"
    cfg = sidecar_config(decode.url, [addr], parse_config({"tracing": tracing_cfg(collector.grpc_endpoint)}))
    with SidecarThread(cfg) as s:
        caller = "1234567890abcdef"
        c = client(s.url, **{PREFILL_HEADER: addr, "traceparent": traceparent(CLIENT_TRACE, caller)})
        raw = c.completions.with_raw_response.create(model=MODEL, prompt=doc("sidecar"), max_tokens=3)
        root, spans = collected(collector, s.sidecar.gw.tracing, raw.headers["x-request-id"], {"prefill hop", "decode hop", "relay"})
    assert root.trace_id == CLIENT_TRACE and root.parent == caller and root.attrs["kvgate.component"] == "sidecar"
    assert [x.name for x in spans if x.parent == root.span_id] == ["prefill hop", "decode hop", "relay"]
    assert by_name(spans, "prefill hop")[0].attrs["kvgate.replica"] == "prefill-0"
    assert by_name(spans, "decode hop")[0].attrs["kvgate.replica"] == "local"


# -- ext-proc ---------------------------------------------------------------------------------------


def test_the_picker_traces_each_decision_and_hands_its_span_on(fleet, collector):
    ep = ExtProcThread(fleet_config(fleet.handles, tracing=tracing_cfg(collector.grpc_endpoint))).start()
    try:
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")

        async def run():
            async with Conversation(ep.port) as c:
                await c.send(headers_msg(request_id="pick-1", extra=[("traceparent", traceparent(CLIENT_TRACE, CLIENT_SPAN))]), 1)
                [b] = await c.send(body_msg(prompt_bytes("picked " * 30), eos=True), 1)
                await c.close()
                return b

        b = asyncio.run(run())
        mutation = {h.header.key: h.header.raw_value.decode() for h in b.request_body.response.header_mutation.set_headers}
        root, spans = collected(collector, ep.server.gateway.tracing, "pick-1", {"tokenize", "index", "schedule"})
    finally:
        ep.stop()
    assert root.name == "pick /v1/completions" and root.attrs["kvgate.component"] == "extproc"
    assert root.trace_id == CLIENT_TRACE and root.parent == CLIENT_SPAN
    assert root.attrs["kvgate.endpoint"] == mutation["x-gateway-destination-endpoint"]
    assert [s.name for s in spans if s.parent == root.span_id] == ["tokenize", "index", "schedule"]
    # Envoy sends the request on with the decision's span as the parent of the replica's spans
    assert parse_traceparent(mutation["traceparent"])[:2] == (CLIENT_TRACE, root.span_id)


# -- off: nothing exported, nothing imported ------------------------------------------------------

OFF_SCRIPT = """
import json, sys
if "{mode}" == "absent":  # as without the otel extra: any import of it fails
    sys.modules["opentelemetry"] = None
import redis  # redis-py imports opentelemetry's metrics SDK itself when it is installed: not ours
before = {{m for m in sys.modules if m.split(".")[0] == "opentelemetry"}}
import httpx
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, recorded_gateway

fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.0)])
fleet.start()
tp = "00-{tid}-{sid}-01"
try:
    with recorded_gateway(fleet.handles, tracing={{"enabled": False, "otlp_endpoint": "{endpoint}"}}) as (g, proxies):
        assert g.gateway.tracing is None
        for path, body in (
            ("/v1/completions", {{"model": MODEL, "prompt": "off", "max_tokens": 2}}),
            ("/v1/chat/completions", {{"model": MODEL, "messages": [{{"role": "user", "content": "off"}}], "max_tokens": 2, "stream": True}}),
        ):
            r = httpx.post(g.url + path, json=body, headers={{"traceparent": tp}}, timeout=30)
            assert r.status_code == 200, r.text
        sent = [e["headers"].get("traceparent") for e in proxies[0].posts("")]
finally:
    fleet.stop()
after = {{m for m in sys.modules if m.split(".")[0] == "opentelemetry" and sys.modules[m] is not None}}
print(json.dumps({{"new": sorted(after - before), "sent": sent}}))
"""


@pytest.mark.parametrize("mode", ["off", "absent"])
def test_tracing_off_exports_nothing_and_imports_no_opentelemetry(collector, mode):
    """Tracing off (the default) with the extra installed, and the extra absent: requests are
    served, no opentelemetry module is imported by the gateway (redis-py's own import of the
    metrics SDK, when installed, happens before and is left out), nothing reaches the collector."""
    before = len(collector.spans)
    script = OFF_SCRIPT.format(mode=mode, tid=CLIENT_TRACE, sid=CLIENT_SPAN, endpoint=collector.grpc_endpoint)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True, timeout=90, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["new"] == []
    # the client's traceparent reaches the replica unchanged, as before tracing existed
    assert out["sent"] == [traceparent(CLIENT_TRACE, CLIENT_SPAN)] * 2
    time.sleep(0.2)
    assert len(collector.spans) == before


def test_no_gateway_module_imports_opentelemetry_at_import_time():
    """Only inside functions (run when tracing is on) or for the type checker."""
    import ast

    for path in sorted((ROOT / "gateway").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
                names = [a.name for a in sub.names] if isinstance(sub, ast.Import) else [sub.module or ""] if isinstance(sub, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "opentelemetry" for n in names), f"{path.name}:{sub.lineno} imports opentelemetry at import time"


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
        ({"sample_ratio": -0.1}, "tracing.sample_ratio"),
        ({"otlp_endpoint": "collector:4317"}, "tracing.otlp_endpoint"),
        ({"protocol": "http/json"}, "tracing.protocol"),
        ({"service_name": " "}, "tracing.service_name"),
        ({"endpoint": "http://x:4317"}, "tracing"),
    ],
)
def test_bad_tracing_config_is_refused_with_its_place(section, where):
    with pytest.raises(ConfigError) as err:
        parse_config({"tracing": section})
    assert where in str(err.value)


def test_tracing_on_without_the_otel_packages_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"kvgate\[otel\]") as err:
        Tracing.from_config(parse_config({"tracing": {"enabled": True}}).tracing)
    assert str(err.value) == OTEL_MISSING
    assert Tracing.from_config(parse_config({}).tracing) is None  # off: nothing needed


def test_sampling_ratio_zero_traces_nothing_of_its_own(fleet, collector):
    with GatewayThread(fleet_config(fleet.handles, tracing=tracing_cfg(collector.grpc_endpoint, sample_ratio=0.0))) as g:
        raw = client(g.url).completions.with_raw_response.create(model=MODEL, prompt="unsampled", max_tokens=2)
        sampled = client(g.url, traceparent=traceparent(CLIENT_TRACE[::-1], CLIENT_SPAN)).completions.with_raw_response.create(
            model=MODEL, prompt="the client samples", max_tokens=2
        )
        collected(collector, g.gateway.tracing, sampled.headers["x-request-id"], {"hop"})  # a sampled parent decides
        assert collector.roots(raw.headers["x-request-id"]) == []
