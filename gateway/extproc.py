"""``kvgate extproc``: the same scheduler as an Envoy ``ext_proc`` endpoint picker (gRPC).

Envoy keeps the data path; we only choose the replica. Per HTTP request Envoy opens one
``Process`` stream and sends the request headers, then the body, then (if configured) the
response headers and body. Two request-body modes are supported:

* BUFFERED (plain Envoy, ``deploy/envoy/envoy.yaml``): the headers are answered with
  "continue" at once; the single body message is answered with the header mutation
  ``x-gateway-destination-endpoint: <host:port>`` (Envoy's ORIGINAL_DST cluster routes on it),
  ``clear_route_cache``, and the same value in dynamic metadata ``envoy.lb``.
* FULL_DUPLEX_STREAMED (Gateway API Inference Extension): body chunks arrive without waiting;
  we buffer them to end of stream (or to the request trailers), then send the headers response
  with the mutation (and ``content-length``), then stream the body back unchanged in chunks of
  at most 62 000 bytes, the last one with ``end_of_stream``. Response bodies in
  FULL_DUPLEX_STREAMED mode are echoed back chunk by chunk as they arrive.

The decision is the gateway's own: tokenize → block keys → index lookup → scheduler, with the
same fleet state (health, scraped load, in-flight counts) and the KV-event subscriber. The
Inference Extension's subset hint (metadata namespace ``envoy.lb.subset_hint``, key
``x-gateway-destination-endpoint-subset``, a list of host:port) restricts the candidates.
``fallbacks`` > 0 lists that many more endpoints after the primary, comma-separated, in both
the header and the metadata (the protocol requires the two to be equal; plain Envoy's
ORIGINAL_DST cluster only parses a single address, so the default is 0).

Upstream credentials: Envoy passes the client's own headers on, ``authorization`` included,
and the client's key is the gateway's, not a replica's. So every routing answer also rewrites
it: ``authorization: Bearer <replica key>`` when the picked replica has ``api_key`` /
``api_key_env`` configured, the header removed when it has none. Fallback endpoints are only
those with the same key as the primary (the data plane retries with the same headers).

Errors are immediate responses with an OpenAI-style JSON body: bad body 400, unknown model
404, no healthy replica (or none in the subset) 503, admission queue full 429; and a replica
answering 401 (it refused the key the picker set) becomes a 502 ``upstream_auth_failed`` at
the response headers, as in the HTTP gateway: the client's own key was fine.

Accounting: a request is counted in flight on its replica when we pick it; its prefill tokens
are released at the first byte of the response (first response body chunk if Envoy sends
bodies, else the response headers), and the request itself when the response ends
(``end_of_stream`` of the response, its trailers) or, at the latest, when Envoy closes the
stream (end of the HTTP exchange, client gone, upstream reset). A 5xx answer counts as a
failure for the scheduler. If the data plane reports that another endpoint served the request
(metadata ``envoy.lb`` / ``x-gateway-destination-endpoint-served``), the count moves there.

Prefill→decode: with prefill-role replicas configured, a request is planned as in the gateway
(same threshold; no prefill hop when the decode replica already holds the prefix) and a
two-hop one gets ``x-prefiller-host-port: <ip:port>`` of the prefill endpoint (llm-d's
header): the decode pod's sidecar (``kvgate sidecar``, or llm-d's) runs both hops. Every
other answer removes that header, so a client cannot choose a prefill endpoint. The server
also answers the standard gRPC health check (``grpc.health.v1.Health/Check``) for Envoy's
and Kubernetes' gRPC probes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from scorers.base import EndpointState

from .app import Gateway
from .config import GatewayConfig
from .errors import GatewayError, bad_request
from .fleet import DP_RANK_HEADER
from .forward import Attempt, AuthRejected, auth_error
from .request import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, ProxyRequest, request_id_from

if TYPE_CHECKING:
    from .tracing import RequestTracer

log = logging.getLogger("kvgate.extproc")

DEST_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
#: llm-d's header naming the prefill endpoint for the decode pod's sidecar (``gateway.sidecar``)
PREFILL_HEADER = "x-prefiller-host-port"
#: largest body chunk we stream back (Envoy recommends <= 64 KiB per message; GIE uses 62 000)
CHUNK_BYTES = 62_000
_KINDS = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT, "/v1/embeddings": EMBEDDINGS, "/v1/responses": RESPONSES}
_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED = _Mode.BUFFERED


def _port(url: str) -> int:
    u = urlparse(url)
    return u.port or (443 if u.scheme == "https" else 80)


class Addresses:
    """Replica URL → ``ip:port`` for the data plane.

    Envoy's ORIGINAL_DST cluster (and GIE's subset hints) speak IP addresses, while replica
    URLs in the config are often names (``http://vllm-0.vllm:8000``, ``http://sim-0:8001``).
    Names are resolved off the hot path's critical section: once, then again after ``ttl_s``.
    """

    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[str, float]] = {}
        self.by_addr: dict[str, str] = {}  # "ip:port" -> replica id, for served-endpoint reports

    async def of(self, ep: EndpointState) -> str:
        now = time.monotonic()
        hit = self._cache.get(ep.url)
        if hit is not None and hit[1] > now:
            return hit[0]
        u = urlparse(ep.url)
        host, port = u.hostname or "", _port(ep.url)
        try:
            ipaddress.ip_address(host)
            ip = host
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
                infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first, as Envoy would dial
                ip = str(infos[0][4][0])
            except (OSError, IndexError):
                if hit is not None:  # keep the last good answer through a DNS hiccup
                    return hit[0]
                raise GatewayError(503, f"cannot resolve replica {ep.id} ({host})", "no_healthy_replica") from None
        addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self._cache[ep.url] = (addr, now + self.ttl_s)
        self.by_addr[addr] = ep.id
        return addr


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
    """Per-HTTP-request state, alive for one ``Process`` stream."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    #: body modes from the first message's protocol_config (Envoy >= 1.33 sends it); without
    #: it we assume the plain-Envoy configuration (BUFFERED request, no response body)
    request_mode: int = BUFFERED
    response_mode: int = _Mode.NONE
    metadata: dict[str, dict] = field(default_factory=dict)
    routed: bool = False
    endpoints: list[str] = field(default_factory=list)
    attempt: Attempt | None = None
    prefill_attempt: Attempt | None = None  # P/D: the prefill endpoint the sidecar calls, counted until the first byte
    prefill: str | None = None  # its address, sent in x-prefiller-host-port
    req: ProxyRequest | None = None  # once the body is in: the request as the front door took it
    status: int = 0
    closed: bool = False  # an immediate response was sent: Envoy ignores anything further
    #: the picked replica's API key, set as the upstream authorization (None: header removed)
    upstream_key: str | None = field(default=None, repr=False)
    replica: str | None = None  # the picked replica's id
    otel: RequestTracer | None = None  # the decision's span (tracing on)
    #: traceparent naming that span, set on the request for the replica (tracing on)
    trace_headers: dict[str, str] | None = None


class ExtProcService(pb_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway, keep_decisions: int = 1000, fallbacks: int = 0) -> None:
        self.gw = gateway
        self.decisions: list[Decision] = []
        self.keep_decisions = keep_decisions
        self.fallbacks = fallbacks
        self.streams_open = 0
        self.addresses = Addresses()

    # -- the gRPC stream --------------------------------------------------------------------------

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProcessingResponse]:
        st = _Stream()
        self.streams_open += 1
        try:
            async for req in request_iterator:
                if req.HasField("protocol_config"):
                    st.request_mode = req.protocol_config.request_body_mode
                    st.response_mode = req.protocol_config.response_body_mode
                if req.HasField("metadata_context"):
                    for ns, value in req.metadata_context.filter_metadata.items():
                        st.metadata[ns] = _struct_dict(value)
                for resp in await self._handle(st, req):
                    yield resp
                if st.closed:
                    return
        finally:
            self.streams_open -= 1
            self._finish(st, ok=0 < st.status < 500 if st.status else True)

    async def _handle(self, st: _Stream, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        which = req.WhichOneof("request")
        if which == "request_headers":
            st.headers = {h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in req.request_headers.headers.headers}
            if req.request_headers.end_of_stream:
                if st.headers.get(":path", "").split("?")[0] in _KINDS:  # a generation call with no body
                    return [self._error(st, bad_request("request body is empty; expected JSON"))]
                return [await self._route_headers_only(st)]
            if st.request_mode == FULL_DUPLEX:
                return []  # answered once the body is complete
            if st.request_mode == _Mode.NONE:  # Envoy will not show us the body: route on load alone
                _warn_once("request_body_mode NONE: routing on load alone, without the prompt; send the body (BUFFERED)")
                return [await self._route_headers_only(st)]
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
        if which == "request_body":
            chunk = req.request_body
            if st.routed:  # a mode we cannot route in (STREAMED): pass the rest through
                return [pb.ProcessingResponse(request_body=pb.BodyResponse())]
            st.body += chunk.body
            if len(st.body) > self.gw.cfg.limits.max_body_bytes:
                return [self._error(st, GatewayError(413, f"request body larger than {self.gw.cfg.limits.max_body_bytes} bytes", "body_too_large"))]
            if st.request_mode == FULL_DUPLEX:
                return await self._route_full_duplex(st, trailers=False) if chunk.end_of_stream else []
            # BUFFERED / BUFFERED_PARTIAL send the body in one message, end_of_stream or not
            # (it is false when trailers follow); STREAMED cannot move the request any more.
            if st.request_mode == _Mode.STREAMED:
                _warn_once(
                    "request_body_mode STREAMED: the headers are gone before the body arrives, so the pick cannot apply; use BUFFERED or FULL_DUPLEX_STREAMED"
                )
            return await self._route_buffered(st)
        if which == "request_trailers":
            if st.request_mode == FULL_DUPLEX and not st.routed:
                return await self._route_full_duplex(st, trailers=True)
            return [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        if which == "response_headers":
            self._observe_served(st)
            for h in req.response_headers.headers.headers:
                if h.key == ":status":
                    value = h.raw_value.decode() if h.raw_value else h.value
                    st.status = int(value) if value.isdigit() else 0
            if st.status == 401 and st.replica is not None:
                return [self._auth_rejected(st)]
            if st.response_mode == _Mode.NONE or req.response_headers.end_of_stream:
                self._first_byte(st)
            if req.response_headers.end_of_stream:
                self._finish(st, ok=st.status < 500)
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if which == "response_body":
            chunk = req.response_body
            if chunk.body:
                self._first_byte(st)
            if chunk.end_of_stream:
                self._finish(st, ok=0 < st.status < 500 if st.status else True)
            if st.response_mode == FULL_DUPLEX:
                return [_streamed("response_body", chunk.body, chunk.end_of_stream)]
            return [pb.ProcessingResponse(response_body=pb.BodyResponse())]
        if which == "response_trailers":
            self._finish(st, ok=0 < st.status < 500 if st.status else True)
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []

    def _auth_rejected(self, st: _Stream) -> pb.ProcessingResponse:
        """The replica refused the key we set (or the lack of one): a 502 naming that, not its 401,
        which would tell the client its own key was wrong. The replica is not counted as failing."""
        rid = st.replica
        assert rid is not None
        self.gw.fleet.auth_rejected_by(rid, f"{st.headers.get(':method', 'POST')} {st.headers.get(':path', '')} via Envoy")
        err = auth_error([AuthRejected(rid)])
        assert err is not None
        return self._error(st, err)

    # -- accounting -------------------------------------------------------------------------------

    def _first_byte(self, st: _Stream) -> None:
        if st.attempt is not None:
            self.gw.forwarder.first_byte(st.attempt)
        self._end_prefill(st, ok=True)  # the decode pod answers only after hop 1 is done

    def _end_prefill(self, st: _Stream, ok: bool) -> None:
        if st.prefill_attempt is not None and st.req is not None:
            att, st.prefill_attempt = st.prefill_attempt, None
            self.gw.forwarder.end(st.req.ctx, att, st.req.profile, ok=ok)

    def _finish(self, st: _Stream, ok: bool) -> None:
        """Close the request's accounts once: in-flight counters, scheduler hooks, admission."""
        req = st.req
        if req is None:
            return
        self._end_prefill(st, ok=ok)
        if st.attempt is not None:
            att = st.attempt
            st.attempt = None
            self.gw.forwarder.end(req.ctx, att, req.profile, ok=ok)
            self.gw.metrics.requests.labels(req.ctx.lora or req.ctx.model, att.endpoint.id, "extproc", str(st.status) if st.status else "closed").inc()
        req.release()

    def _observe_served(self, st: _Stream) -> None:
        """The data plane says which endpoint served the request: move the count there."""
        served = st.metadata.get(LB_NAMESPACE, {}).get(SERVED_KEY)
        req = st.req
        if not isinstance(served, str) or st.attempt is None or req is None or not st.endpoints:
            return
        served = served.split(",")[0].strip()
        if served == st.endpoints[0]:
            return
        rid = self.addresses.by_addr.get(served)
        ep = self.gw.fleet.get(rid) if rid is not None else None
        if ep is None or ep.id == st.attempt.endpoint.id:
            return
        self.gw.forwarder.end(req.ctx, st.attempt, req.profile, ok=False)
        st.attempt = self.gw.forwarder.begin(req.ctx, ep, req.profile)
        st.replica = ep.id

    # -- decisions --------------------------------------------------------------------------------

    def _error(self, st: _Stream, exc: GatewayError) -> pb.ProcessingResponse:
        self.gw.metrics.errors.labels(exc.code).inc()
        st.closed = True
        return _immediate(exc)

    async def _route_headers_only(self, st: _Stream) -> pb.ProcessingResponse:
        """A request without a body (GET /v1/models, /health): the least-loaded healthy replica."""
        st.routed = True
        healthy = [s for s in self.gw.fleet.all() if s.healthy]
        try:
            subset = _subset_hint(st.metadata)
        except GatewayError as exc:
            return self._error(st, exc)
        try:
            ranked = await self._restrict(sorted(healthy, key=lambda s: s.inflight_requests), subset)
        except GatewayError as exc:
            return self._error(st, exc)
        st.endpoints, st.upstream_key = self._with_key(ranked)
        st.replica = ranked[0][0].id
        return _route_response("request_headers", st.endpoints, api_key=st.upstream_key, dp_rank=self.gw.fleet.dp_rank(st.replica))

    def _with_key(self, ranked: list[tuple[EndpointState, str]]) -> tuple[list[str], str | None]:
        """The primary and its fallbacks, kept to those the primary's upstream key fits."""
        fleet = self.gw.fleet
        key = fleet.api_key(ranked[0][0].id)
        return [addr for ep, addr in ranked if fleet.api_key(ep.id) == key][: 1 + self.fallbacks], key

    async def _restrict(self, ranked: list[EndpointState], subset: set[str] | None) -> list[tuple[EndpointState, str]]:
        """Ranked endpoints with their addresses, kept to the subset hint if there is one."""
        out = []
        for ep in ranked if subset is not None else ranked[: 1 + self.fallbacks]:
            try:
                addr = await self.addresses.of(ep)
            except GatewayError:
                continue
            if subset is None or addr in subset:
                out.append((ep, addr))
        if not out:
            if subset is not None:
                raise GatewayError(503, "no healthy replica in the subset hint", "no_healthy_replica")
            raise GatewayError(503, "no healthy replica (none resolves)", "no_healthy_replica")
        return out

    async def _decide(self, st: _Stream) -> GatewayError | None:
        raw = bytes(st.body)
        if self.gw.tracing is not None:
            st.otel = self.gw.tracing.pick(st.headers)
        try:
            st.endpoints, st.upstream_key, replica, blocks = await self._schedule(st, raw)
            st.replica = replica
        except GatewayError as exc:
            if st.otel is not None:
                st.otel.end(exc.status, exc.code)
            return exc
        except Exception:  # a bug must not turn into Envoy's bare 500: answer in OpenAI form
            log.exception("ext-proc scheduling failed")
            if st.otel is not None:
                st.otel.end(500, "internal_error")
            return GatewayError(500, "the endpoint picker failed to schedule this request", "internal_error")
        if st.otel is not None:
            st.otel.set({"kvgate.endpoint": st.endpoints[0], "kvgate.replica": replica, "kvgate.prefix_blocks": blocks, "kvgate.prefill_endpoint": st.prefill})
            st.otel.end()
            st.trace_headers = st.otel.carrier()
        st.routed = True
        self.decisions.append(Decision(st.headers.get("x-request-id", ""), st.endpoints[0], st.endpoints[1:], replica, blocks))
        del self.decisions[: -self.keep_decisions]
        return None

    async def _route_buffered(self, st: _Stream) -> list[pb.ProcessingResponse]:
        err = await self._decide(st)
        if err is not None:
            return [self._error(st, err)]
        return [
            _route_response(
                "request_body",
                st.endpoints,
                api_key=st.upstream_key,
                prefill=st.prefill,
                dp_rank=self.gw.fleet.dp_rank(st.replica),
                trace_headers=st.trace_headers,
            )
        ]

    async def _route_full_duplex(self, st: _Stream, trailers: bool) -> list[pb.ProcessingResponse]:
        err = await self._decide(st)
        if err is not None:
            return [self._error(st, err)]
        raw = bytes(st.body)
        out = [
            _route_response(
                "request_headers",
                st.endpoints,
                content_length=len(raw),
                api_key=st.upstream_key,
                prefill=st.prefill,
                dp_rank=self.gw.fleet.dp_rank(st.replica),
                trace_headers=st.trace_headers,
            )
        ]
        if raw or not trailers:
            out += [
                _streamed("request_body", raw[i : i + CHUNK_BYTES], not trailers and i + CHUNK_BYTES >= len(raw))
                for i in range(0, max(len(raw), 1), CHUNK_BYTES)
            ]
        if trailers:
            out.append(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
        return out

    async def _schedule(self, st: _Stream, raw: bytes) -> tuple[list[str], str | None, str, int]:
        """The gateway's own front door and routing, for one hop; the pick is counted in flight."""
        gw = self.gw
        path = st.headers.get(":path", "").split("?")[0]
        req = ProxyRequest(_KINDS.get(path, ""), path, request_id_from(st.headers), st.headers, raw=raw)
        req.otel = st.otel
        gw.front.authenticate(req)
        if not req.kind:
            raise GatewayError(404, f"no route {st.headers.get(':method', 'POST')} {path}", "not_found")
        gw.front.check(req)
        subset = _subset_hint(st.metadata)
        st.req = req
        await gw.front.admit(req)
        plan = await gw.router.plan(req)
        ranked = await self._restrict(plan.ranked, subset)
        chosen: EndpointState = ranked[0][0]
        hit = req.ctx.prefix.get(chosen.id)
        blocks = hit.blocks if hit else 0
        if plan.prefill:
            # two hops, run by the decode pod's sidecar: it calls this prefill endpoint first,
            # then its own vLLM, which pulls the KV instead of computing the prompt
            pre = plan.prefill[0]
            st.prefill = await self.addresses.of(pre)
            st.prefill_attempt = gw.forwarder.begin(req.ctx, pre, req.profile)
            st.attempt = gw.forwarder.begin(req.ctx, chosen, req.profile, prefill_tokens=0)
            pre_hit = req.ctx.prefix.get(pre.id)
            blocks = pre_hit.blocks if pre_hit else 0
            gw.metrics.pd_requests.labels("two_hop").inc()
        else:
            st.attempt = gw.forwarder.begin(req.ctx, chosen, req.profile)
            if plan.pd:
                gw.metrics.pd_requests.labels("one_hop").inc()
        gw.metrics.count_prefix(len(req.ctx.block_keys), blocks)
        endpoints, key = self._with_key(ranked)
        return endpoints, key, chosen.id, blocks


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _struct_dict(s: struct_pb2.Struct) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(s)


def _subset_hint(metadata: dict[str, dict]) -> set[str] | None:
    """GIE's subset hint; None when absent. Present but empty: no endpoint may be picked (503)."""
    ns = metadata.get(SUBSET_NAMESPACE)
    if not isinstance(ns, dict) or SUBSET_KEY not in ns:
        return None
    value = ns[SUBSET_KEY]
    items = value if isinstance(value, list) else str(value).split(",")
    subset = {str(x).strip() for x in items if str(x).strip()}
    if not subset:
        raise GatewayError(503, "the subset hint lists no endpoint", "no_healthy_replica")
    return subset


def _route_response(
    phase: str,
    endpoints: list[str],
    content_length: int | None = None,
    api_key: str | None = None,
    prefill: str | None = None,
    dp_rank: int | None = None,
    trace_headers: Mapping[str, str] | None = None,
) -> pb.ProcessingResponse:
    """The picked endpoint(s): same comma-separated value in the header and in ``envoy.lb``.

    Also the upstream ``authorization``: the replica's key, or none at all — the client's own
    bearer token (the gateway's key) must never reach a replica. And ``x-prefiller-host-port``
    for a two-hop request (the decode pod's sidecar reads it), removed otherwise so a client
    cannot pick a prefill endpoint itself. And vLLM's ``x-data-parallel-rank`` when the pick is
    one data-parallel rank of a server (removed otherwise: a client must not pick a rank). With
    tracing on, ``traceparent`` names the decision's span, so the replica's spans join its trace."""
    value = ",".join(endpoints)
    headers = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=DEST_HEADER, raw_value=value.encode()), append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        )
    ]
    if content_length:
        # FULL_DUPLEX_STREAMED makes Envoy drop content-length; we send the body back unchanged
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-length", raw_value=str(content_length).encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    remove: list[str] = []
    if prefill:
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=PREFILL_HEADER, raw_value=prefill.encode()), append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            )
        )
    else:
        remove.append(PREFILL_HEADER)
    if api_key:
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="authorization", raw_value=f"Bearer {api_key}".encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    else:
        remove.append("authorization")
    if dp_rank is not None:
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=DP_RANK_HEADER, raw_value=str(dp_rank).encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        )
    else:
        remove.append(DP_RANK_HEADER)
    for key, tv in (trace_headers or {}).items():
        headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, raw_value=tv.encode()), append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            )
        )
    common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=headers, remove_headers=remove), clear_route_cache=True)
    md = struct_pb2.Struct()
    md.update({LB_NAMESPACE: {DEST_HEADER: value}})
    if phase == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=md)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=md)


def _streamed(phase: str, body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    resp = pb.BodyResponse(
        response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)))
    )
    return pb.ProcessingResponse(**{phase: resp})


def _immediate(exc: GatewayError) -> pb.ProcessingResponse:
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))]
    headers += [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode())) for k, v in exc.headers.items()]
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=exc.status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=msgspec.json.encode(exc.body()),
            details=exc.code,
        )
    )


# -- gRPC health checking (grpc.health.v1), hand-encoded: two one-field messages -----------------

_SERVING, _SERVICE_UNKNOWN = 1, 3
_HEALTHY_SERVICES = {"", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"}


def _decode_health_request(data: bytes) -> str:
    """HealthCheckRequest {string service = 1}: tag 0x0a, varint length, utf-8."""
    if not data or data[0] != 0x0A:
        return ""
    n, shift, i = 0, 0, 1
    while i < len(data):
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    return data[i : i + n].decode("utf-8", "replace")


def _health_handler() -> grpc.GenericRpcHandler:
    async def check(service: str, context: grpc.aio.ServicerContext) -> int:
        return _SERVING if service in _HEALTHY_SERVICES else _SERVICE_UNKNOWN

    method = grpc.unary_unary_rpc_method_handler(check, request_deserializer=_decode_health_request, response_serializer=lambda status: bytes([0x08, status]))
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": method})


class ExtProcServer:
    """The gRPC server plus the gateway core it schedules with."""

    def __init__(self, cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 9002, fallbacks: int = 0) -> None:
        self.cfg = cfg
        self.gateway = Gateway(cfg)
        # no panic routing here: with nothing healthy the protocol's answer is a 503 (Envoy
        # cannot move a request the picker sent to a dead endpoint on to another)
        self.gateway.router.panic = False
        if self.gateway.tracing is not None:
            self.gateway.tracing.component = "extproc"
        self.service = ExtProcService(self.gateway, fallbacks=fallbacks)
        self.server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self.service, self.server)
        self.server.add_generic_rpc_handlers((_health_handler(),))
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host

    async def start(self) -> None:
        await self.gateway.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(grace=1)
        await self.gateway.stop()


async def serve_extproc(cfg: GatewayConfig, host: str = "127.0.0.1", port: int = 9002, fallbacks: int = 0) -> ExtProcServer:
    srv = ExtProcServer(cfg, host, port, fallbacks)
    await srv.start()
    return srv


async def _run(cfg: GatewayConfig, host: str, port: int, fallbacks: int) -> int:
    from .server import shutdown_event

    srv = await serve_extproc(cfg, host, port, fallbacks)
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
    p.add_argument(
        "--fallbacks",
        type=int,
        default=0,
        help="endpoints listed after the primary in x-gateway-destination-endpoint (for GIE data planes that retry down the list; plain Envoy's ORIGINAL_DST needs 0)",
    )
    args = p.parse_args(argv)
    if args.fallbacks < 0:
        p.error("--fallbacks must be >= 0")
    cfg = load_for_command(args.config)
    if cfg is None:
        return 2
    return asyncio.run(_run(cfg, args.host, args.port, args.fallbacks))
