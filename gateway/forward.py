"""One hop to a replica: dispatch with retries, then relay the answer chunk by chunk.

Bookkeeping happens here on every path, because routing quality depends on it: in-flight
counters move at dispatch, first byte and completion; failures feed the circuit breaker; the
scheduler's plugins hear about every dispatch (speculative prefix entries, session affinity).
A request that was admitted always gets exactly one answer: the replica's, a retry's, or an
OpenAI-style error — and a stream that breaks midway ends with an SSE error event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from scorers.base import EndpointState, RequestContext
from scorers.scheduler import Scheduler

from .config import GatewayConfig
from .endpoints import Fleet
from .errors import GatewayError, sse_error_event
from .metrics import GatewayMetrics
from .proxy import UpstreamBroken, UpstreamConnectError, UpstreamResponse, UpstreamTimeout, forward_headers, iter_body, open_upstream, relay_headers

log = logging.getLogger("kvgate.forward")


class RelayResponse(StreamingResponse):
    """A streaming response that always runs its cleanup, even if never iterated."""

    def __init__(self, *args, on_close: Callable[[], Awaitable[None]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


@dataclass(slots=True)
class Attempt:
    """One dispatch of one request to one replica, with its accounting."""

    endpoint: EndpointState
    prefill_tokens: int
    decode_tokens: int
    started: float = field(default_factory=time.perf_counter)
    first_byte_at: float | None = None
    done: bool = False


class Forwarder:
    """Sends requests to replicas and relays responses; shared by one-hop and P/D paths."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, scheduler: Scheduler, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.scheduler = scheduler
        self.session: aiohttp.ClientSession | None = None  # set on start (needs the running loop)
        self.metrics = metrics

    # -- accounting ---------------------------------------------------------------------------

    def begin(self, ctx: RequestContext, ep: EndpointState, profile: str, *, prefill_tokens: int | None = None) -> Attempt:
        pre = ctx.uncached_tokens(ep.id) if prefill_tokens is None else prefill_tokens
        att = Attempt(ep, pre, ctx.prompt_tokens + ctx.max_tokens)
        self.fleet.dispatched(ep.id, att.prefill_tokens, att.decode_tokens)
        self.scheduler.on_dispatch(ctx, ep, profile)
        return att

    def first_byte(self, att: Attempt) -> None:
        if att.first_byte_at is None:
            att.first_byte_at = time.perf_counter()
            self.fleet.first_byte(att.endpoint.id, att.prefill_tokens)

    def end(self, ctx: RequestContext, att: Attempt, profile: str, ok: bool) -> None:
        if att.done:
            return
        att.done = True
        left = 0 if att.first_byte_at is not None else att.prefill_tokens
        self.fleet.finished(att.endpoint.id, left, att.decode_tokens)
        self.scheduler.on_complete(ctx, att.endpoint, ok, profile)

    # -- sending ------------------------------------------------------------------------------

    async def send(
        self,
        ctx: RequestContext,
        ranked: list[EndpointState],
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        profile: str,
        *,
        first_byte_timeout_s: float | None = None,
        prefill_tokens: int | None = None,
    ) -> tuple[UpstreamResponse, Attempt]:
        """Dispatch to the first replica that accepts the connection (retrying the next ones).

        Returns the upstream response with its headers read and its body still streaming.
        ``prefill_tokens`` overrides the prefill work charged to the replica (0 for a decode
        hop that pulls the prompt's KV instead of computing it).
        Raises GatewayError 503 when every candidate failed to connect, 504 on a timeout.
        """
        fb_timeout = first_byte_timeout_s or self.cfg.limits.first_byte_timeout_s
        fwd = forward_headers(headers, ctx.request_id)
        errors: list[str] = []
        for i, ep in enumerate(ranked[: 1 + self.cfg.limits.max_retries]):
            att = self.begin(ctx, ep, profile, prefill_tokens=prefill_tokens)
            try:
                assert self.session is not None
                resp = await open_upstream(self.session, "POST", ep.url + path, content=body, headers=fwd, first_byte_timeout_s=fb_timeout)
            except UpstreamConnectError as exc:
                self.end(ctx, att, profile, ok=False)
                self.fleet.record_failure(ep.id)
                self.metrics.retries.labels(ep.id).inc()
                errors.append(f"{ep.id}: {exc}")
                log.info("replica %s unreachable for %s: %s", ep.id, ctx.request_id, exc)
                continue
            except UpstreamTimeout:
                self.end(ctx, att, profile, ok=False)
                raise GatewayError(504, f"replica {ep.id} did not answer within {fb_timeout:.0f}s", "upstream_timeout") from None
            if resp.status_code in (502, 503) and i + 1 < len(ranked[: 1 + self.cfg.limits.max_retries]):
                await resp.aclose()
                self.end(ctx, att, profile, ok=False)
                errors.append(f"{ep.id}: HTTP {resp.status_code}")
                continue
            self.fleet.record_success(ep.id)
            return resp, att
        raise GatewayError(503, "no replica could take the request: " + "; ".join(errors or ["no candidates"]), "upstream_unavailable")

    # -- relaying -----------------------------------------------------------------------------

    async def relay(
        self,
        ctx: RequestContext,
        resp: UpstreamResponse,
        att: Attempt,
        profile: str,
        *,
        stream: bool,
        decision: str,
        extra_headers: Mapping[str, str],
        on_done: Callable[[], None],
        t_request: float,
    ) -> Response:
        """Turn the upstream response into the client's response, closing every account once."""
        headers = relay_headers(resp.headers)
        headers.update(extra_headers)
        ep = att.endpoint
        status = resp.status_code

        def finish(ok: bool) -> None:
            self.end(ctx, att, profile, ok)
            self.metrics.requests.labels(ctx.lora or ctx.model, ep.id, decision, str(status)).inc()
            self.metrics.e2e.labels(ep.id, decision).observe(time.perf_counter() - t_request)
            on_done()

        is_sse = "text/event-stream" in resp.headers.get("content-type", "")
        if not (stream and is_sse):
            try:
                content = await resp.aread()
            except (UpstreamBroken, UpstreamTimeout) as exc:
                await resp.aclose()
                finish(False)
                self.fleet.record_failure(ep.id)
                raise GatewayError(502, f"replica {ep.id} failed while answering: {type(exc).__name__}", "upstream_error") from None
            finally:
                await resp.aclose()
            self.first_byte(att)
            self.metrics.ttft.labels(ep.id, decision).observe(time.perf_counter() - t_request)
            finish(status < 500)
            return Response(content, status_code=status, headers=headers)

        state = {"ok": True}

        async def body():
            try:
                async for chunk in iter_body(resp):
                    if att.first_byte_at is None:
                        self.first_byte(att)
                        self.metrics.ttft.labels(ep.id, decision).observe(time.perf_counter() - t_request)
                    yield chunk
            except (UpstreamBroken, UpstreamTimeout) as exc:
                state["ok"] = False
                self.metrics.midstream_failures.labels(ep.id).inc()
                self.fleet.record_failure(ep.id)
                log.warning("stream from %s broke for %s: %s", ep.id, ctx.request_id, exc)
                yield sse_error_event(f"the replica serving this request failed mid-stream ({type(exc).__name__}); the answer is incomplete", "upstream_stream_broken")

        async def close() -> None:
            await resp.aclose()
            finish(state["ok"] and status < 500)

        return RelayResponse(body(), status_code=status, headers=headers, on_close=close)
