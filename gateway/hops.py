"""Carrying out a routing plan: one hop, or prefill→decode in two (vLLM's NixlConnector, pull mode).

One hop sends the client's body to the first replica of the plan that answers. Two hops: hop 1
sends the client's body to a prefill replica with ``kv_transfer_params.do_remote_decode``
(non-streaming, one output token), and hop 2 sends the original body plus the returned
``kv_transfer_params`` to a decode replica, which pulls the KV blocks over NIXL from the
prefill replica and streams the answer. Both hops share one X-Request-Id. The gateway never
touches the KV bytes or the NIXL side channel.

Failures never lose the request: a failing or slow prefill replica is retried on the next
one, then (by default) the request is served in one hop on a decode replica. A decode
replica that fails before its first byte is replaced by the next one; the KV handle is
reused only if the failed replica never received the request (connection refused) and the
prefill's lease has not run out — otherwise it may have pulled the blocks, which frees them
on the prefill side, so hop 1 is redone first. A decode replica answering 5xx (it could not
use the handle) counts as such a failure too.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.responses import Response

from scorers.base import PHASE_DECODE, PHASE_PREFILL, EndpointState

from .config import GatewayConfig
from .errors import GatewayError, normalize_error
from .forward import AttemptFailed, Forwarder, HopPolicy, RelayResponse, Upstream
from .metrics import GatewayMetrics
from .request import RESPONSES, UNROUTED, ProxyRequest
from .responses import ResponseAffinity, response_id, stream_response_id

log = logging.getLogger("kvgate.pd")

PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

#: a decode replica answering one of these could not serve the handle: try another one
DECODE_RETRY_STATUSES = frozenset({500, 502, 503, 504})


def prefill_body(body: Mapping[str, Any], kind: str = "") -> dict[str, Any]:
    """Hop 1's body: the client's, asking for one token and a KV handle back.

    A /v1/responses body (vLLM 0.33 passes its ``kv_transfer_params`` to the engine and returns
    the connector's in the response, as for chat) caps ``max_output_tokens`` instead, and asks
    the prefill replica not to store its one-token response (vLLM never evicts stored ones)."""
    out = copy.deepcopy(dict(body))
    out["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    out["stream"] = False
    if kind == RESPONSES:
        out["max_output_tokens"] = 1
        out["store"] = False
        out.pop("background", None)
        return out
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("stream_options", None)
    out.pop("min_tokens", None)
    return out


def decode_body(body: Mapping[str, Any], kv_transfer_params: Mapping[str, Any]) -> dict[str, Any]:
    """Hop 2's body: the client's own (streaming kept) plus the prefill's handle, verbatim."""
    out = dict(body)
    out["kv_transfer_params"] = kv_transfer_params
    return out


@dataclass(slots=True)
class Plan:
    """What routing decided: the replicas for the serving hop, best first, and for two hops
    the prefill replicas too (empty when none could be ranked: ``prefill_error`` says why)."""

    ranked: list[EndpointState]
    pd: bool = False  # P/D applied: the serving hop is a decode hop, even when it is the only one
    prefill: list[EndpointState] | None = None  # None: one hop
    prefill_error: str = ""


class PrefillFailed(Exception):
    """No prefill replica produced a usable KV handle."""

    def __init__(self, message: str, auth: GatewayError | None = None, rest: list[EndpointState] | None = None) -> None:
        super().__init__(message)
        self.auth = auth  # the 502 to give if every prefill replica refused the gateway's key
        self.rest = rest  # the decode candidates not tried yet (when hop 1 is redone mid-decode)


class PrefillRejected(Exception):
    """The prefill replica rejected the request itself (4xx): the same answer anywhere."""

    def __init__(self, response: Response) -> None:
        super().__init__("client error from prefill")
        self.response = response


@dataclass(slots=True)
class Handle:
    """Hop 1's result: the KV handle and where/when it was made."""

    kv: dict[str, Any]
    replica: str
    prefix_blocks: int
    elapsed_s: float
    done_at: float


@dataclass(slots=True)
class _Decode:
    """Hop 2's state across decode candidates: the handle in use and the last one made."""

    handle: Handle | None
    last: Handle
    started: float = field(default_factory=time.perf_counter)


def _kv_params(content: bytes) -> dict | None:
    try:
        data = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None
    kv = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return kv if isinstance(kv, dict) and kv else None


class Hops:
    """Serves a planned request: the one-hop path and both P/D hops, over one forwarder."""

    def __init__(self, cfg: GatewayConfig, forwarder: Forwarder, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.forwarder = forwarder
        self.metrics = metrics
        #: which replica stores which /v1/responses answer (for ``previous_response_id``)
        self.affinity = ResponseAffinity()
        self.prefill_hop = HopPolicy(
            "prefill replica", stream=False, first_byte_timeout_s=cfg.pd.prefill_timeout_s, retry_statuses=frozenset(), timeout_is_failure=True
        )
        self.decode_hop = HopPolicy("decode replica", first_byte_timeout_s=cfg.pd.decode_timeout_s, prefill_tokens=0, retry_statuses=DECODE_RETRY_STATUSES)

    async def serve(self, req: ProxyRequest, plan: Plan) -> Response | RelayResponse:
        if plan.prefill is None:
            return await self.one_hop(req, plan.ranked, pd=plan.pd)
        try:
            handle = await self.prefill(req, plan)
        except PrefillFailed as exc:
            return await self._prefill_fallback(req, plan.ranked, exc)
        except PrefillRejected as err:
            req.release()
            return err.response
        return await self.decode(req, plan, handle)

    # -- one hop ----------------------------------------------------------------------------------

    async def one_hop(self, req: ProxyRequest, ranked: list[EndpointState], *, pd: bool = False, fallback: bool = False) -> Response | RelayResponse:
        if pd:
            req.ctx.phase = PHASE_DECODE
        up = await self.forwarder.send(req, ranked)
        rid = up.att.endpoint.id
        if req.kind == RESPONSES:
            self._remember_response(req, up)
        if req.kind in UNROUTED:
            decision, blocks = req.kind, 0
        else:
            hit = req.ctx.prefix.get(rid)
            blocks = hit.blocks if hit else 0
            self.metrics.count_prefix(len(req.ctx.block_keys), blocks)
            self.metrics.pd_requests.labels("one_hop").inc()
            decision = "fallback" if fallback else ("prefix_hit" if blocks else "cold")
        if req.trace is not None:
            req.trace.replicas = [rid]
            req.trace.prefix_blocks = blocks
            if fallback:
                req.trace.path = "fallback_one_hop"
        if req.otel is not None:
            req.otel.set({"kvgate.replica": rid, "kvgate.prefix_blocks": blocks, "kvgate.pd.path": "fallback_one_hop" if fallback else "one_hop"})
        return self.forwarder.relay(req, up, decision=decision, extra_headers=self._headers(req, [rid], blocks))

    async def _prefill_fallback(self, req: ProxyRequest, ranked: list[EndpointState], exc: PrefillFailed) -> Response | RelayResponse:
        self.metrics.pd_fallbacks.labels("prefill_failed").inc()
        if self.cfg.pd.on_prefill_failure == "error":
            raise exc.auth or GatewayError(503, f"prefill failed: {exc}", "prefill_unavailable") from None
        log.warning("prefill failed for %s, serving in one hop: %s", req.request_id, exc)
        return await self.one_hop(req, ranked, pd=True, fallback=True)

    def _remember_response(self, req: ProxyRequest, up: Upstream) -> None:
        """Note which replica holds the response just produced, unless the client asked it not
        to be stored (the replica then keeps nothing to continue from)."""
        if up.status != 200 or req.body.get("store") is False:
            return
        rid = response_id(up.content) if up.content is not None else stream_response_id(up.first or b"")
        if rid is not None:
            self.affinity.remember(rid, up.att.endpoint.id)

    def _headers(self, req: ProxyRequest, replicas: list[str], prefix_blocks: int) -> dict[str, str]:
        out = {"x-request-id": req.request_id}
        if self.cfg.debug_headers:
            out.update({"x-kvgate-replica": ",".join(replicas), "x-kvgate-prefix-blocks": str(prefix_blocks)})
        return out

    # -- hop 1: prefill -----------------------------------------------------------------------------

    async def prefill(self, req: ProxyRequest, plan: Plan) -> Handle:
        """Hop 1 on the best prefill replica, retrying the next ones; returns the KV handle."""
        candidates = [e for e in plan.prefill or () if e.healthy]  # a redo skips replicas gone since
        if not candidates:
            raise PrefillFailed(plan.prefill_error or "no healthy prefill replica")
        req.ctx.phase = PHASE_PREFILL
        body = msgspec.json.encode(prefill_body(req.body, req.kind))
        handles: dict[int, dict[str, Any]] = {}

        def usable(up: Upstream) -> str | None:
            """None keeps the answer: a KV handle, or a 4xx (the client's fault, same anywhere)."""
            if 400 <= up.status < 500:
                return None
            kv = _kv_params(up.content or b"") if up.status == 200 else None
            if kv is None:
                return f"HTTP {up.status}" + ("" if up.status != 200 else " without kv_transfer_params")
            handles[id(up)] = kv
            return None

        def failed(ep: EndpointState, exc: AttemptFailed, timed_out: bool) -> None:
            if timed_out:  # a slow prefill replica is as good as down
                self.metrics.pd_fallbacks.labels("prefill_timeout").inc()

        try:
            up = await self.forwarder.send(req, candidates, self.prefill_hop, body=body, accept=usable, on_failure=failed)
        except GatewayError as exc:
            raise PrefillFailed(exc.message, exc if exc.code == "upstream_auth_failed" else None) from None
        elapsed = time.perf_counter() - up.att.started  # the successful attempt's whole hop
        self.metrics.pd_hop.labels("prefill").observe(elapsed)
        self.forwarder.end(req.ctx, up.att, req.profile, ok=True)  # hop 1 is over: the replica did its part
        if up.status >= 400:
            content = up.content or b""
            content = normalize_error(up.status, content) or content
            raise PrefillRejected(Response(content, status_code=up.status, media_type="application/json", headers={"x-request-id": req.request_id}))
        hit = req.ctx.prefix.get(up.att.endpoint.id)
        return Handle(handles[id(up)], up.att.endpoint.id, hit.blocks if hit else 0, elapsed, time.monotonic())

    # -- hop 2: decode ------------------------------------------------------------------------------

    async def decode(self, req: ProxyRequest, plan: Plan, handle: Handle) -> Response | RelayResponse:
        """Hop 2 on the ranked decode replicas in turn; hop 1 redone when the handle may be spent."""
        state = _Decode(handle, handle)
        ranked = plan.ranked

        async def body_for(ep: EndpointState) -> bytes:
            if state.handle is not None and time.monotonic() - state.handle.done_at > self.cfg.pd.lease_s:
                state.handle = None
            if state.handle is None:
                self.metrics.pd_fallbacks.labels("redo_prefill").inc()
                try:
                    state.handle = await self.prefill(req, plan)
                except PrefillFailed as exc:
                    exc.rest = ranked[ranked.index(ep) :]
                    raise
                state.last = state.handle
            req.ctx.phase = PHASE_DECODE
            state.started = time.perf_counter()
            return msgspec.json.encode(decode_body(req.body, state.handle.kv))

        def failed(ep: EndpointState, exc: AttemptFailed, timed_out: bool) -> None:
            self.metrics.pd_fallbacks.labels("decode_retry").inc()
            if exc.accepted:
                state.handle = None  # it may have pulled the blocks: the prefill's lease is spent

        try:
            up = await self.forwarder.send(req, ranked, self.decode_hop, body=body_for, on_failure=failed)
        except PrefillFailed as exc:
            return await self._prefill_fallback(req, exc.rest or ranked, exc)
        except PrefillRejected as err:
            req.release()
            return err.response
        if req.kind == RESPONSES:
            self._remember_response(req, up)
        last = state.last
        first_at = up.att.first_byte_at or time.perf_counter()
        self.metrics.pd_hop.labels("decode").observe(first_at - state.started)
        ttft = first_at - req.t0
        if ttft > 0:
            self.metrics.pd_prefill_share.observe(min(1.0, last.elapsed_s / ttft))
        self.metrics.pd_requests.labels("two_hop").inc()
        self.metrics.count_prefix(len(req.ctx.block_keys), last.prefix_blocks)
        did = up.att.endpoint.id
        if req.trace is not None:
            req.trace.replicas = [last.replica, did]
            req.trace.prefix_blocks = last.prefix_blocks
            req.trace.path = "two_hop"
        if req.otel is not None:
            req.otel.set({"kvgate.replica": f"{last.replica},{did}", "kvgate.prefix_blocks": last.prefix_blocks, "kvgate.pd.path": "two_hop"})
        return self.forwarder.relay(req, up, decision="two_hop", extra_headers=self._headers(req, [last.replica, did], last.prefix_blocks))
