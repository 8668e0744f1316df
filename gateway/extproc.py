"""``kvgate extproc``: the same scheduler as an Envoy ``ext_proc`` endpoint picker (gRPC).

Envoy keeps the data path; we only choose the replica. Per HTTP request Envoy opens a
``Process`` stream and sends the request headers, then the body:

* BUFFERED (plain Envoy): one body message; we answer the headers with "continue", then the
  body with a header mutation ``x-gateway-destination-endpoint: <host:port>`` (Envoy's
  ORIGINAL_DST cluster routes on it), ``clear_route_cache``, and the same value (with the
  fallbacks after it, comma-separated) in dynamic metadata ``envoy.lb``;
* FULL_DUPLEX_STREAMED (Gateway API Inference Extension): body chunks arrive without waiting;
  we buffer them to end of stream, then send the headers response with the mutation and
  stream the body back unchanged.

The decision is the gateway's own: tokenize → block keys → index lookup → scheduler, with the
same fleet state (health, scraped load, in-flight counts) and the KV-event subscriber. An
optional subset hint in metadata ``envoy.lb.subset_hint`` (endpoints as host:port, list or
comma-separated) restricts the candidates. Bad bodies get an immediate OpenAI-style error;
no healthy replica → 503; a full admission queue → 429. In-flight counts are released when
Envoy closes the stream (the end of the HTTP exchange).

Prefill→decode disaggregation is not offered through ext-proc: it needs two upstream calls,
which only our own HTTP gateway makes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from scorers.base import PHASE_ANY, EndpointState, RequestContext

from .app import Gateway
from .config import GatewayConfig
from .errors import GatewayError, bad_request
from .forward import Attempt
from .routing import validate_body

log = logging.getLogger("kvgate.extproc")

DEST_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_HINT_KEY = "subset_hint"
_KINDS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


def host_port(url: str) -> str:
    u = urlparse(url)
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"


@dataclass
class Decision:
    """What the picker decided for one stream (kept for tests and debugging)."""

    request_id: str
    endpoint: str
    fallbacks: list[str]
    replica: str
    prefix_blocks: int
    at: float = field(default_factory=time.time)


@dataclass
class _Stream:
    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    full_duplex: bool = False
    attempt: Attempt | None = None
    ctx: RequestContext | None = None
    profile: str = "default"
    admitted: bool = False


class ExtProcService(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway, keep_decisions: int = 1000) -> None:
        self.gw = gateway
        self.decisions: list[Decision] = []
        self.keep_decisions = keep_decisions

    # -- the gRPC stream --------------------------------------------------------------------------

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        st = _Stream()
        try:
            async for req in request_iterator:
                which = req.WhichOneof("request")
                if req.HasField("protocol_config"):
                    st.full_duplex = req.protocol_config.request_body_mode == _FULL_DUPLEX
                if which == "request_headers":
                    st.headers = {h.key.lower(): (h.raw_value.decode() if h.raw_value else h.value) for h in req.request_headers.headers.headers}
                    if req.request_headers.end_of_stream:
                        yield await self._decide_headers_only(st, req)
                    elif not st.full_duplex:
                        yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                elif which == "request_body":
                    st.body.append(req.request_body.body)
                    if req.request_body.end_of_stream:
                        async for resp in self._decide_with_body(st, req):
                            yield resp
                elif which == "response_headers":
                    if st.attempt is not None:
                        self.gw.forwarder.first_byte(st.attempt)
                    yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
                elif which == "response_body":
                    yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                elif which == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif which == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            self._finish(st)

    def _finish(self, st: _Stream) -> None:
        if st.attempt is not None and st.ctx is not None:
            self.gw.forwarder.end(st.ctx, st.attempt, st.profile, ok=True)
            st.attempt = None
        if st.admitted:
            self.gw.admission.release()
            st.admitted = False

    # -- decisions --------------------------------------------------------------------------------

    async def _decide_headers_only(self, st: _Stream, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """A request without a body (GET /v1/models, /health): any healthy replica will do."""
        healthy = [s for s in self.gw.fleet.all() if s.healthy]
        if not healthy:
            return _immediate(GatewayError(503, "no healthy replica", "no_healthy_replica"))
        ep = min(healthy, key=lambda s: s.inflight_requests)
        return _route_response("request_headers", [host_port(ep.url)], clear_route_cache=True)

    async def _decide_with_body(self, st: _Stream, req: pb.ProcessingRequest) -> AsyncIterator[pb.ProcessingResponse]:
        raw = b"".join(st.body)
        try:
            endpoints, ctx_replica, prefix_blocks = await self._schedule(st, raw, _subset_hint(req))
        except GatewayError as exc:
            self.gw.metrics.errors.labels(exc.code).inc()
            yield _immediate(exc)
            return
        self.decisions.append(Decision(st.headers.get("x-request-id", ""), endpoints[0], endpoints[1:], ctx_replica, prefix_blocks))
        del self.decisions[: -self.keep_decisions]
        if st.full_duplex:
            yield _route_response("request_headers", endpoints, clear_route_cache=True)
            yield pb.ProcessingResponse(
                request_body=pb.BodyResponse(
                    response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=raw, end_of_stream=True)))
                )
            )
        else:
            yield _route_response("request_body", endpoints, clear_route_cache=True)

    async def _schedule(self, st: _Stream, raw: bytes, subset: set[str] | None) -> tuple[list[str], str, int]:
        gw = self.gw
        path = st.headers.get(":path", "").split("?")[0]
        kind = _KINDS.get(path)
        if kind is None:
            raise GatewayError(404, f"no route {st.headers.get(':method', 'POST')} {path}", "not_found")
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}") from None
        if kind == "embeddings":
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise bad_request("'model' is required and must be a string", "model")
        else:
            validate_body(kind, body)
        info = gw.fleet.resolve_model(body["model"])
        if info is None:
            raise GatewayError(404, f"The model `{body['model']}` does not exist.", "model_not_found", "model")
        await gw.admission.acquire()
        st.admitted = True
        request_id = st.headers.get("x-request-id") or f"kvg-{uuid.uuid4().hex}"
        assert gw.router is not None
        if kind == "embeddings":
            ctx = RequestContext(request_id=request_id, model=info.base, lora=info.lora, headers=st.headers)
        else:
            ctx = await gw.router.build_context(request_id, kind, body, info, st.headers)
        st.profile = gw.scheduler.profile_for(st.headers)
        ranked = gw.router.decide(ctx, PHASE_ANY, st.profile)
        if subset is not None:
            ranked = [e for e in ranked if host_port(e.url) in subset]
            if not ranked:
                raise GatewayError(503, "no healthy replica in the subset hint", "no_healthy_replica")
        chosen: EndpointState = ranked[0]
        st.ctx = ctx
        st.attempt = gw.forwarder.begin(ctx, chosen, st.profile)
        hit = ctx.prefix.get(chosen.id)
        blocks = hit.blocks if hit else 0
        gw.metrics.prompt_blocks.inc(len(ctx.block_keys))
        gw.metrics.prefix_hit_blocks.inc(blocks)
        gw.metrics.requests.labels(ctx.lora or ctx.model, chosen.id, "extproc", "routed").inc()
        return [host_port(e.url) for e in ranked[: 1 + gw.cfg.limits.max_retries]], chosen.id, blocks


def _subset_hint(req: pb.ProcessingRequest) -> set[str] | None:
    md = req.metadata_context.filter_metadata
    if LB_NAMESPACE not in md:
        return None
    value = md[LB_NAMESPACE].fields.get(SUBSET_HINT_KEY)
    if value is None:
        return None
    if value.HasField("list_value"):
        return {v.string_value for v in value.list_value.values}
    return {x.strip() for x in value.string_value.split(",") if x.strip()}


def _route_response(phase: str, endpoints: list[str], clear_route_cache: bool) -> pb.ProcessingResponse:
    primary = endpoints[0]
    common = pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=DEST_HEADER, raw_value=primary.encode()), append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]
        ),
        clear_route_cache=clear_route_cache,
    )
    md = struct_pb2.Struct()
    md.update({LB_NAMESPACE: {DEST_HEADER: ",".join(endpoints)}})
    if phase == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=md)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=md)


def _immediate(exc: GatewayError) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=exc.status),
            headers=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))]),
            body=msgspec.json.encode(exc.body()),
            details=exc.code,
        )
    )


class ExtProcServer:
    """The gRPC server plus the gateway core it schedules with."""

    def __init__(self, cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 9002) -> None:
        self.cfg = cfg
        self.gateway = Gateway(cfg)
        self.service = ExtProcService(self.gateway)
        self.server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self.service, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host

    async def start(self) -> None:
        await self.gateway.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(grace=1)
        await self.gateway.stop()


async def serve_extproc(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 9002) -> ExtProcServer:
    srv = ExtProcServer(cfg, host, port)
    await srv.start()
    return srv


async def _run(cfg: GatewayConfig, host: str, port: int) -> int:
    from .server import shutdown_event

    srv = await serve_extproc(cfg, host, port)
    log.warning("ext_proc endpoint picker on %s:%d", host, srv.port)
    stop = shutdown_event()
    await stop.wait()
    await srv.stop()
    return 0


def main(argv: list[str]) -> int:
    from .server import load_for_command

    p = argparse.ArgumentParser(prog="kvgate extproc", description="Envoy ext_proc endpoint picker (gRPC) using kvgate's scheduler.")
    p.add_argument("--config", "-c", help="gateway YAML (replicas, models, index, scheduling)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    args = p.parse_args(argv)
    cfg = load_for_command(args.config)
    if cfg is None:
        return 2
    return asyncio.run(_run(cfg, args.host, args.port))

