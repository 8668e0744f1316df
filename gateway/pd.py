"""Prefill→decode disaggregation: vLLM's NixlConnector protocol in pull mode, orchestrated.

Per request: if the best decode-capable replica already holds enough of the prompt that
fewer than ``pd.threshold`` tokens are uncached, one hop there is cheaper than moving KV; else
hop 1 sends the client's body to a prefill replica with ``kv_transfer_params.do_remote_decode``
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response

from scorers.base import PHASE_DECODE, PHASE_PREFILL, ROLE_PREFILL, EndpointState, RequestContext

from .config import GatewayConfig
from .endpoints import Fleet
from .errors import GatewayError
from .forward import AttemptFailed, DisconnectWatch, Forwarder, Trace, Upstream, auth_error
from .metrics import GatewayMetrics
from .proxy import forward_headers

log = logging.getLogger("kvgate.pd")

PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """Hop 1's body: the client's, asking for one token and a KV handle back."""
    out = copy.deepcopy(dict(body))
    out["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    out["stream"] = False
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


#: a decode replica answering one of these could not serve the handle: try another one
DECODE_RETRY_STATUSES = frozenset({500, 502, 503, 504})


class PrefillFailed(Exception):
    """No prefill replica produced a usable KV handle."""

    def __init__(self, message: str, auth: GatewayError | None = None) -> None:
        super().__init__(message)
        self.auth = auth  # the 502 to give if every prefill replica refused the gateway's key


class _ClientError(Exception):
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


class PDOrchestrator:
    def __init__(self, cfg: GatewayConfig, fleet: Fleet, forwarder: Forwarder, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.forwarder = forwarder
        self.metrics = metrics

    def applies(self, ctx: RequestContext) -> bool:
        """The P/D decision applies: P/D on, and a prefill-role replica serves the model.

        Healthy or not: when every prefill replica is down, the request still goes through
        ``serve`` so ``pd.on_prefill_failure`` decides (one hop, counted as a fallback, or 503).
        """
        if not self.cfg.pd.enabled or ctx.prompt_tokens == 0:
            return False
        return any(s.role == ROLE_PREFILL and s.serves(ctx.model, ctx.lora) for s in self.fleet.all())

    async def serve(
        self,
        ctx: RequestContext,
        router,
        path: str,
        body: Mapping[str, Any],
        raw: bytes,
        headers: Mapping[str, str],
        profile: str,
        *,
        stream: bool,
        t_request: float,
        on_done: Callable[[], None],
        debug: bool,
        watch: DisconnectWatch | None,
        trace: Trace | None = None,
    ):
        decode_ranked = router.decide(ctx, PHASE_DECODE, profile, trace)
        best = decode_ranked[0]
        if ctx.uncached_tokens(best.id) < self.cfg.pd.threshold:
            return await self._one_hop(ctx, decode_ranked, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace)
        try:
            handle = await self._prefill(ctx, router, path, body, headers, profile, trace)
        except PrefillFailed as exc:
            return await self._prefill_fallback(ctx, decode_ranked, exc, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace)
        except _ClientError as err:
            on_done()
            return err.response
        return await self._decode(ctx, router, decode_ranked, handle, path, body, raw, headers, profile, stream, t_request, on_done, debug, watch, trace)

    async def _prefill_fallback(self, ctx, ranked, exc, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace):
        self.metrics.pd_fallbacks.labels("prefill_failed").inc()
        if self.cfg.pd.on_prefill_failure == "error":
            raise exc.auth or GatewayError(503, f"prefill failed: {exc}", "prefill_unavailable") from None
        log.warning("prefill failed for %s, serving in one hop: %s", ctx.request_id, exc)
        return await self._one_hop(ctx, ranked, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace, fallback=True)

    async def _one_hop(self, ctx, ranked, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace, fallback: bool = False):
        ctx.phase = PHASE_DECODE
        up = await self.forwarder.send(ctx, ranked, path, raw, headers, profile, stream=stream, trace=trace)
        rid = up.att.endpoint.id
        hit = ctx.prefix.get(rid)
        hit_blocks = hit.blocks if hit else 0
        self.metrics.pd_requests.labels("one_hop").inc()
        self.metrics.prompt_blocks.inc(len(ctx.block_keys))
        self.metrics.prefix_hit_blocks.inc(hit_blocks)
        extra = {"x-request-id": ctx.request_id}
        if debug:
            extra.update({"x-kvgate-replica": rid, "x-kvgate-prefix-blocks": str(hit_blocks)})
        if trace is not None:
            trace.replicas = [rid]
            trace.prefix_blocks = hit_blocks
            trace.path = "fallback_one_hop" if fallback else "one_hop"
        decision = "fallback" if fallback else ("prefix_hit" if hit_blocks else "cold")
        return self.forwarder.relay(ctx, up, profile, decision=decision, extra_headers=extra, on_done=on_done, t_request=t_request, watch=watch, trace=trace)

    async def _decode(self, ctx, router, ranked: list[EndpointState], handle: Handle | None, path, body, raw, headers, profile, stream, t_request, on_done, debug, watch, trace):
        """Hop 2 on the ranked decode replicas in turn; hop 1 redone when the handle may be spent."""
        fwd = self.forwarder
        fwd_headers = forward_headers(headers, ctx.request_id)
        timeout = self.cfg.pd.decode_timeout_s or self.cfg.limits.first_byte_timeout_s
        candidates = ranked[: 1 + self.cfg.limits.max_retries]
        errors: list[str] = []
        failures: list[AttemptFailed] = []
        last: Handle | None = handle
        up: Upstream | None = None
        for i, ep in enumerate(candidates):
            if handle is not None and time.monotonic() - handle.done_at > self.cfg.pd.lease_s:
                handle = None
            if handle is None:
                self.metrics.pd_fallbacks.labels("redo_prefill").inc()
                try:
                    handle = await self._prefill(ctx, router, path, body, headers, profile, trace)
                except PrefillFailed as exc:
                    return await self._prefill_fallback(ctx, candidates[i:], exc, path, raw, headers, profile, stream, t_request, on_done, debug, watch, trace)
                except _ClientError as err:
                    on_done()
                    return err.response
                last = handle
            ctx.phase = PHASE_DECODE
            dbody = msgspec.json.encode(decode_body(body, handle.kv))
            t_decode = time.perf_counter()
            try:
                # the decode replica pulls the prompt's KV instead of computing it: no prefill load
                up = await fwd.attempt(
                    ctx, ep, path, dbody, fwd_headers, profile, stream=stream, first_byte_timeout_s=timeout, prefill_tokens=0,
                    retry_statuses=DECODE_RETRY_STATUSES, can_retry=i + 1 < len(candidates),
                )
            except AttemptFailed as exc:
                errors.append(str(exc))
                failures.append(exc)
                self.metrics.retries.labels(ep.id).inc()
                self.metrics.pd_fallbacks.labels("decode_retry").inc()
                if trace is not None:
                    trace.retries += 1
                log.info("decode replica %s failed before the first byte of %s: %s", ep.id, ctx.request_id, exc)
                if exc.accepted:
                    handle = None  # it may have pulled the blocks: the prefill's lease is spent
                continue
            break
        if up is None:
            raise auth_error(failures) or GatewayError(503, "no decode replica could take the request: " + "; ".join(errors), "upstream_unavailable")
        assert last is not None
        decode_first = (up.att.first_byte_at or time.perf_counter()) - t_decode
        self.metrics.pd_hop.labels("decode").observe(decode_first)
        ttft = (up.att.first_byte_at or time.perf_counter()) - t_request
        if ttft > 0:
            self.metrics.pd_prefill_share.observe(min(1.0, last.elapsed_s / ttft))
        self.metrics.pd_requests.labels("two_hop").inc()
        self.metrics.prompt_blocks.inc(len(ctx.block_keys))
        self.metrics.prefix_hit_blocks.inc(last.prefix_blocks)
        did = up.att.endpoint.id
        extra = {"x-request-id": ctx.request_id}
        if debug:
            extra.update({"x-kvgate-replica": f"{last.replica},{did}", "x-kvgate-prefix-blocks": str(last.prefix_blocks)})
        if trace is not None:
            trace.replicas = [last.replica, did]
            trace.prefix_blocks = last.prefix_blocks
            trace.path = "two_hop"
        return fwd.relay(ctx, up, profile, decision="two_hop", extra_headers=extra, on_done=on_done, t_request=t_request, watch=watch, trace=trace)

    async def _prefill(self, ctx: RequestContext, router, path: str, body: Mapping[str, Any], headers, profile: str, trace: Trace | None) -> Handle:
        """Hop 1 on the best prefill replica, retrying the next ones; returns the KV handle."""
        try:
            ranked = router.decide(ctx, PHASE_PREFILL, profile, trace)
        except GatewayError as exc:
            raise PrefillFailed(exc.message) from None
        ctx.phase = PHASE_PREFILL
        pbody = msgspec.json.encode(prefill_body(body))
        fwd = self.forwarder
        fwd_headers = forward_headers(headers, ctx.request_id)
        errors: list[str] = []
        failures: list[AttemptFailed] = []
        for ep in ranked[: 1 + self.cfg.limits.max_retries]:
            t0 = time.perf_counter()
            try:
                up = await fwd.attempt(ctx, ep, path, pbody, fwd_headers, profile, stream=False, first_byte_timeout_s=self.cfg.pd.prefill_timeout_s, can_retry=False)
            except AttemptFailed as exc:
                errors.append(str(exc))
                failures.append(exc)
                self.metrics.retries.labels(ep.id).inc()
                continue
            except GatewayError as exc:  # timed out: a slow prefill replica is as good as down
                self.metrics.pd_fallbacks.labels("prefill_timeout").inc()
                errors.append(f"{ep.id}: {exc.message}")
                failures.append(AttemptFailed(ep.id, exc.message, accepted=True))
                continue
            elapsed = time.perf_counter() - t0
            self.metrics.pd_hop.labels("prefill").observe(elapsed)
            status = up.status
            if 400 <= status < 500:
                fwd.end(ctx, up.att, profile, ok=True)
                # the client's request is at fault (too long, bad field): the answer is the same anywhere
                raise _ClientError(Response(up.content, status_code=status, media_type="application/json", headers={"x-request-id": ctx.request_id}))
            kv = _kv_params(up.content or b"") if status == 200 else None
            fwd.end(ctx, up.att, profile, ok=kv is not None)
            if kv is None:
                errors.append(f"{ep.id}: HTTP {status}" + ("" if status != 200 else " without kv_transfer_params"))
                failures.append(AttemptFailed(ep.id, f"HTTP {status}", accepted=True))
                continue
            hit = ctx.prefix.get(ep.id)
            return Handle(kv, ep.id, hit.blocks if hit else 0, elapsed, time.monotonic())
        raise PrefillFailed("; ".join(errors) or "no prefill replica", auth_error(failures))


def _kv_params(content: bytes) -> dict | None:
    try:
        data = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None
    kv = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return kv if isinstance(kv, dict) and kv else None
