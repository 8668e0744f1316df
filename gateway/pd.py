"""Prefill→decode disaggregation: vLLM's NixlConnector protocol in pull mode, orchestrated.

Per request: if the best decode-capable replica already holds enough of the prompt that
fewer than ``pd.threshold`` tokens are uncached, one hop there is cheaper than moving KV; else
hop 1 sends the client's body to a prefill replica with ``kv_transfer_params.do_remote_decode``
(non-streaming, one output token), and hop 2 sends the original body plus the returned
``kv_transfer_params`` to a decode replica, which pulls the KV blocks over NIXL from the
prefill replica and streams the answer. Both hops share one X-Request-Id. The gateway never
touches the KV bytes or the NIXL side channel.

Failures never lose the request: a failing prefill replica is retried on the next one, then
(by default) the request is served in one hop on a decode replica; a decode replica that
cannot be reached is replaced by the next one (the prefill's blocks stay leased), and if the
decode side reports the transfer failed, the prefill is redone once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from starlette.responses import Response

from scorers.base import PHASE_DECODE, PHASE_PREFILL, ROLE_PREFILL, RequestContext

from .config import GatewayConfig
from .endpoints import Fleet
from .errors import GatewayError
from .forward import Forwarder
from .metrics import GatewayMetrics

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


class PrefillFailed(Exception):
    """No prefill replica produced a usable KV handle."""


class PDOrchestrator:
    def __init__(self, cfg: GatewayConfig, fleet: Fleet, forwarder: Forwarder, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.forwarder = forwarder
        self.metrics = metrics

    def applies(self, ctx: RequestContext) -> bool:
        """Two hops are possible: P/D on, and a healthy prefill-role replica serves the model."""
        if not self.cfg.pd.enabled or ctx.prompt_tokens == 0:
            return False
        return any(s.role == ROLE_PREFILL and s.healthy and s.serves(ctx.model, ctx.lora) for s in self.fleet.all())

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
    ) -> Response:
        decode_ranked = router.decide(ctx, PHASE_DECODE, profile)
        best = decode_ranked[0]
        if ctx.uncached_tokens(best.id) < self.cfg.pd.threshold:
            return await self._one_hop(ctx, decode_ranked, path, raw, headers, profile, stream, t_request, on_done, debug, "one_hop")

        try:
            kv_params, prefill_id, prefill_hit, t_prefill = await self._prefill(ctx, router, path, body, headers, profile)
        except PrefillFailed as exc:
            self.metrics.pd_fallbacks.labels("prefill_failed").inc()
            if self.cfg.pd.on_prefill_failure == "error":
                raise GatewayError(503, f"prefill failed: {exc}", "prefill_unavailable") from None
            log.warning("prefill failed for %s, serving in one hop: %s", ctx.request_id, exc)
            return await self._one_hop(ctx, decode_ranked, path, raw, headers, profile, stream, t_request, on_done, debug, "fallback_one_hop")
        except _ClientError as err:
            return err.response

        ctx.phase = PHASE_DECODE
        dbody = msgspec.json.encode(decode_body(body, kv_params))
        t_decode = time.perf_counter()
        resp, att = await self._send_decode(ctx, decode_ranked, path, dbody, headers, profile)
        if resp.status_code >= 500:
            # The decode side could not use the handle (lease gone, transfer failed): redo once.
            await resp.aclose()
            self.forwarder.end(ctx, att, profile, ok=False)
            self.metrics.pd_fallbacks.labels("decode_failed_redo_prefill").inc()
            kv_params, prefill_id, prefill_hit, t_prefill = await self._prefill(ctx, router, path, body, headers, profile)
            dbody = msgspec.json.encode(decode_body(body, kv_params))
            t_decode = time.perf_counter()
            resp, att = await self._send_decode(ctx, decode_ranked, path, dbody, headers, profile)
        decode_first = time.perf_counter() - t_decode
        self.metrics.pd_hop.labels("decode").observe(decode_first)
        ttft = time.perf_counter() - t_request
        if ttft > 0:
            self.metrics.pd_prefill_share.observe(min(1.0, t_prefill / ttft))
        self.metrics.pd_requests.labels("two_hop").inc()
        self.metrics.prompt_blocks.inc(len(ctx.block_keys))
        self.metrics.prefix_hit_blocks.inc(prefill_hit)
        extra = {"x-request-id": ctx.request_id}
        if debug:
            extra.update({"x-kvgate-replica": f"{prefill_id},{att.endpoint.id}", "x-kvgate-prefix-blocks": str(prefill_hit)})
        return await self.forwarder.relay(ctx, resp, att, profile, stream=stream, decision="two_hop", extra_headers=extra, on_done=on_done, t_request=t_request)

    async def _one_hop(self, ctx, ranked, path, raw, headers, profile, stream, t_request, on_done, debug, label) -> Response:
        resp, att = await self.forwarder.send(ctx, ranked, path, raw, headers, profile)
        hit = ctx.prefix.get(att.endpoint.id)
        hit_blocks = hit.blocks if hit else 0
        self.metrics.pd_requests.labels(label).inc()
        self.metrics.prompt_blocks.inc(len(ctx.block_keys))
        self.metrics.prefix_hit_blocks.inc(hit_blocks)
        extra = {"x-request-id": ctx.request_id}
        if debug:
            extra.update({"x-kvgate-replica": att.endpoint.id, "x-kvgate-prefix-blocks": str(hit_blocks)})
        decision = "prefix_hit" if hit_blocks else "cold"
        return await self.forwarder.relay(ctx, resp, att, profile, stream=stream, decision=decision, extra_headers=extra, on_done=on_done, t_request=t_request)

    async def _send_decode(self, ctx, ranked, path, dbody: bytes, headers, profile):
        # The decode replica pulls the prompt's KV instead of computing it: no prefill load.
        return await self.forwarder.send(ctx, ranked, path, dbody, headers, profile, prefill_tokens=0)

    async def _prefill(self, ctx: RequestContext, router, path: str, body: Mapping[str, Any], headers, profile: str) -> tuple[dict, str, int, float]:
        """Run hop 1 on the best prefill replica (retrying others); returns the KV handle."""
        try:
            ranked = router.decide(ctx, PHASE_PREFILL, profile)
        except GatewayError as exc:
            raise PrefillFailed(exc.message) from None
        ctx.phase = PHASE_PREFILL
        pbody = msgspec.json.encode(prefill_body(body))
        fwd = self.forwarder
        errors: list[str] = []
        for ep in ranked[: 1 + self.cfg.limits.max_retries]:
            t0 = time.perf_counter()
            att = fwd.begin(ctx, ep, profile)
            try:
                resp, content = await _send_one(fwd, ctx, ep, path, pbody, headers, self.cfg.pd.prefill_timeout_s, read=True)
            except _Unreachable as exc:
                fwd.end(ctx, att, profile, ok=False)
                self.fleet.record_failure(ep.id)
                errors.append(f"{ep.id}: {exc}")
                continue
            fwd.first_byte(att)
            elapsed = time.perf_counter() - t0
            self.metrics.pd_hop.labels("prefill").observe(elapsed)
            status = resp.status_code
            if 400 <= status < 500:
                fwd.end(ctx, att, profile, ok=True)
                # The client's request is at fault (too long, bad field): the answer is the same anywhere.
                raise _ClientError(Response(content, status_code=status, media_type="application/json", headers={"x-request-id": ctx.request_id}))
            kv = _kv_params(content) if status == 200 else None
            fwd.end(ctx, att, profile, ok=kv is not None)
            if kv is None:
                errors.append(f"{ep.id}: HTTP {status}" + ("" if status != 200 else " without kv_transfer_params"))
                continue
            self.fleet.record_success(ep.id)
            hit = ctx.prefix.get(ep.id)
            return kv, ep.id, hit.blocks if hit else 0, elapsed
        raise PrefillFailed("; ".join(errors) or "no prefill replica")


class _Unreachable(Exception):
    pass


class _ClientError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__("client error from prefill")
        self.response = response


async def _send_one(fwd: Forwarder, ctx: RequestContext, ep, path: str, body: bytes, headers, timeout_s: float, read: bool = False):
    """One attempt on one replica; connection-level failures become _Unreachable."""
    from .proxy import UpstreamBroken, UpstreamConnectError, UpstreamTimeout, forward_headers, open_upstream

    assert fwd.session is not None
    try:
        resp = await open_upstream(fwd.session, "POST", ep.url + path, content=body, headers=forward_headers(headers, ctx.request_id), first_byte_timeout_s=timeout_s)
    except UpstreamConnectError as exc:
        raise _Unreachable(str(exc)) from None
    except UpstreamTimeout:
        raise _Unreachable(f"timeout after {timeout_s:.0f}s") from None
    if not read:
        return resp, b""
    try:
        content = await resp.aread()
    except (UpstreamBroken, UpstreamTimeout) as exc:
        raise _Unreachable(f"broke while answering: {exc}") from None
    finally:
        await resp.aclose()
    return resp, content


def _kv_params(content: bytes) -> dict | None:
    try:
        data = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None
    kv = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return kv if isinstance(kv, dict) and kv else None
