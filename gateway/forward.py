"""One hop to a replica: dispatch with retries, then relay the answer chunk by chunk.

Bookkeeping happens here on every path, because routing quality depends on it: in-flight
counters move at dispatch, first byte and completion; failures feed the circuit breaker; the
scheduler's plugins hear about every dispatch (speculative prefix entries, session affinity).
A request that was admitted always gets exactly one answer: the replica's, a retry's, or an
OpenAI-style error — and a stream that breaks midway ends with an SSE error event.

"Before the first byte" means before the first byte of the *answer*: a streaming replica
sends its headers at once and its first chunk only after queueing and prefill, so a dispatch
only counts as done once that first chunk (or, not streaming, the whole body) is in hand.
Until then a failure is retried on the next replica and the client sees nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from scorers.base import EndpointState, RequestContext
from scorers.scheduler import Scheduler

from .config import GatewayConfig
from .connections import ChunkWriter
from .errors import GatewayError, normalize_error, sse_error_event
from .fleet import Fleet
from .metrics import GatewayMetrics
from .proxy import (
    FORWARDED_REQUEST_HEADERS,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    forward_headers,
    make_session,
    open_upstream,
    relay_headers,
)
from .request import RESPONSES, DisconnectWatch, ProxyRequest
from .responses import StreamEnd, past_preamble

if TYPE_CHECKING:
    from .tracing import HopSpan, RequestTracer

log = logging.getLogger("kvgate.forward")

#: upstream statuses worth another replica on a one-hop request (the replica, not the
#: request, is at fault); the P/D decode hop adds 500 (it could not use the KV handle)
RETRY_STATUSES = frozenset({502, 503, 504})
#: the event that ends an OpenAI-style (vLLM) completions or chat stream; a /v1/responses
#: stream ends with a named terminal event instead (``responses.StreamEnd``)
SSE_DONE = b"data: [DONE]\n\n"
#: most of a /v1/responses stream held before its first generated event (the created and
#: in-progress events echo the request's instructions and tools, so they may be large)
MAX_PREAMBLE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class HopPolicy:
    """How one kind of hop treats its replicas: what to call them, when to give up on one."""

    name: str = "replica"  # in logs and in the 503 when every candidate failed
    stream: bool | None = None  # None: as the client asked
    first_byte_timeout_s: float | None = None  # None: limits.first_byte_timeout_s
    prefill_tokens: int | None = None  # prefill work charged to the replica; None: its uncached tokens
    retry_statuses: frozenset[int] = RETRY_STATUSES  # answers that send the request to the next replica
    timeout_is_failure: bool = False  # a first-byte timeout moves on to the next replica (else 504)


ONE_HOP = HopPolicy()


@dataclass(slots=True)
class Attempt:
    """One dispatch of one request to one replica, with its accounting."""

    endpoint: EndpointState
    prefill_tokens: int
    decode_tokens: int
    started: float = field(default_factory=time.perf_counter)
    first_byte_at: float | None = None
    done: bool = False
    span: HopSpan | None = None  # the hop's trace span (tracing on), ended with the attempt


@dataclass(slots=True)
class Upstream:
    """A replica's answer, held at its first byte: the whole body, or a stream's first chunk."""

    resp: UpstreamResponse
    att: Attempt
    status: int
    content: bytes | None = None  # the full body (not streaming)
    first: bytes | None = None  # the first chunk of a stream still open

    @property
    def streaming(self) -> bool:
        return self.content is None


class AttemptFailed(Exception):
    """One replica failed before the first byte; the request may go to another one."""

    def __init__(self, replica: str, reason: str, *, accepted: bool) -> None:
        super().__init__(f"{replica}: {reason}")
        self.replica = replica
        self.accepted = accepted


class AuthRejected(AttemptFailed):
    """The replica answered 401: it refused the gateway's own key (the client's never goes
    upstream). The replica is up and did no work; another one may accept its key."""

    def __init__(self, replica: str) -> None:
        super().__init__(replica, "rejected the gateway's credentials (HTTP 401)", accepted=False)


def auth_error(failures: list[AttemptFailed]) -> GatewayError | None:
    """The 502 for a request that every tried replica refused on credentials, else None."""
    if not failures or not all(isinstance(f, AuthRejected) for f in failures):
        return None
    names = sorted({f.replica for f in failures})
    return GatewayError(
        502,
        f"{'replica' if len(names) == 1 else 'replicas'} {', '.join(names)} rejected the gateway's credentials (HTTP 401): the gateway's API key for it is "
        "missing or wrong (replicas[].api_key / api_key_env); the client's own key was accepted",
        "upstream_auth_failed",
    )


def _raw_headers(headers: Mapping[str, str], media_type: str | None = None) -> list[tuple[bytes, bytes]]:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if media_type and "content-type" not in headers:
        out.append((b"content-type", media_type.encode("latin-1")))
    return out


class RelayResponse:
    """A streamed answer relayed chunk by chunk (no re-framing, no buffering).

    A plain ASGI response rather than Starlette's StreamingResponse: the request's
    ``DisconnectWatch`` already notices a client that leaves (cancelling this task, which
    closes the upstream connection), so no per-response task group is needed. ``on_close``
    always runs, exactly once, whatever happens, told whether the answer was whole: a chat or
    completions stream is whole at its replica's EOF or once ``data: [DONE]`` was relayed; a
    responses stream (``end`` set) only once its terminal event was relayed in full.
    """

    def __init__(
        self,
        first: bytes | None,
        upstream: UpstreamResponse,
        *,
        status: int,
        headers: Mapping[str, str],
        watch: DisconnectWatch | None,
        on_broken: Callable[[Exception], bytes],
        on_close: Callable[[bool], None],
        end: StreamEnd | None = None,
        otel: RequestTracer | None = None,
    ) -> None:
        self.end = end
        self.otel = otel
        self.first = first
        self.upstream = upstream
        self.status_code = status
        self.headers = headers
        self.watch = watch
        self.on_broken = on_broken
        self.on_close = on_close
        self.started = False  # the response start was handed to the server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ok = False
        end = self.end
        last = self.first or b""  # the last chunk relayed
        direct: ChunkWriter | None = None
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": _raw_headers(self.headers)}
            self.started = True
            await send(start)
            # uvicorn's own cycle: the body goes straight to the client's transport, each chunk
            # from the upstream parser's callback (no task wake-up, no ASGI message per chunk)
            direct = ChunkWriter.for_send(send)
            if self.first:
                if end is not None:
                    end.feed(self.first)
                if direct is not None:
                    await direct.write(self.first)
                else:
                    await send({"type": "http.response.body", "body": self.first, "more_body": True})
                if self.otel is not None:
                    self.otel.client_first_byte()
            try:
                if direct is not None:
                    await self.upstream.relay(direct.sink(end.feed if end is not None else None), direct.drain)
                else:
                    async for chunk in self.upstream.aiter_raw():
                        if end is not None:
                            end.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        last = chunk
                ok = True if end is None else end.whole()
            except (UpstreamBroken, UpstreamTimeout) as exc:
                event = self.on_broken(exc)
                if direct is not None:
                    last, direct.last = direct.last, b""  # the error event is ours, not the replica's
                    await direct.write(event)
                    direct = None
                else:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            if self.watch is not None:
                self.watch.finishing = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # a client that closes as soon as it reads the final event (the SDK does) leaves
            # before the replica's EOF: the answer was whole all the same
            if direct is not None:
                last = direct.last
            ok = last.endswith(SSE_DONE) if end is None else end.whole()
            if self.watch is None or not self.watch.absorb():
                raise
        except OSError:  # the client's socket broke under us
            ok = False
        finally:
            if self.watch is not None:
                self.watch.stop()
            await self.upstream.aclose()
            self.on_close(ok)


class Forwarder:
    """Sends requests to replicas and relays responses; every hop of every path goes through it."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, scheduler: Scheduler, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.scheduler = scheduler
        self.metrics = metrics
        self.forwarded = FORWARDED_REQUEST_HEADERS | frozenset(cfg.forward_headers)
        self._session: UpstreamPool | None = None

    @property
    def session(self) -> UpstreamPool:
        """The keep-alive pool to the replicas, opened by ``start`` (it needs the running loop)."""
        if self._session is None:
            raise RuntimeError("the forwarder is not started")
        return self._session

    async def start(self) -> None:
        if self._session is None:
            self._session = make_session(self.cfg.limits)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- accounting ---------------------------------------------------------------------------

    def begin(self, ctx: RequestContext, ep: EndpointState, profile: str, *, prefill_tokens: int | None = None) -> Attempt:
        pre = ctx.uncached_tokens(ep.id) if prefill_tokens is None else prefill_tokens
        att = Attempt(ep, pre, ctx.prompt_tokens + ctx.max_tokens)
        self.fleet.dispatched(ep.id, att.prefill_tokens, att.decode_tokens)
        self.scheduler.on_dispatch(ctx, ep, profile)
        return att

    def first_byte(self, att: Attempt) -> None:
        # after end() the prefill tokens are already released: releasing them again would eat
        # into other requests' counts on that replica
        if att.first_byte_at is None and not att.done:
            att.first_byte_at = time.perf_counter()
            self.fleet.first_byte(att.endpoint.id, att.prefill_tokens)
            if att.span is not None:
                att.span.first_byte()

    def end(self, ctx: RequestContext, att: Attempt, profile: str, ok: bool) -> None:
        if att.done:
            return
        att.done = True
        left = 0 if att.first_byte_at is not None else att.prefill_tokens
        self.fleet.finished(att.endpoint.id, left, att.decode_tokens)
        self.scheduler.on_complete(ctx, att.endpoint, ok, profile)
        if att.span is not None:
            att.span.close(ok)

    # -- sending ------------------------------------------------------------------------------

    async def send(
        self,
        req: ProxyRequest,
        ranked: list[EndpointState],
        hop: HopPolicy = ONE_HOP,
        *,
        body: bytes | Callable[[EndpointState], Awaitable[bytes]] | None = None,
        accept: Callable[[Upstream], str | None] | None = None,
        on_failure: Callable[[EndpointState, AttemptFailed, bool], None] | None = None,
    ) -> Upstream:
        """Dispatch to the ranked replicas in turn until one produces its first byte.

        ``body`` is the client's own by default, or fixed bytes, or made per replica (a P/D
        decode hop builds it from the current KV handle). ``accept`` may turn an answer into a
        failure (returning why); ``on_failure(replica, failure, timed_out)`` hears each one.
        Raises GatewayError 503 when every candidate failed (502 when each refused the
        gateway's key), 504 on a first-byte timeout unless the hop moves on after one.
        """
        candidates = ranked[: 1 + self.cfg.limits.max_retries]
        errors: list[str] = []
        failures: list[AttemptFailed] = []
        for i, ep in enumerate(candidates):
            data = req.raw if body is None else body if isinstance(body, bytes) else await body(ep)
            timed_out = False
            try:
                up = await self.attempt(req, ep, data, hop, can_retry=i + 1 < len(candidates))
                reason = accept(up) if accept is not None else None
                if reason is None:
                    return up
                if up.att.span is not None:
                    up.att.span.fail(reason)
                self.end(req.ctx, up.att, req.profile, ok=False)
                await up.resp.aclose()
                failure = AttemptFailed(ep.id, reason, accepted=True)
            except AttemptFailed as exc:
                failure = exc
                self.metrics.retries.labels(ep.id).inc()
                if req.trace is not None:
                    req.trace.retries += 1
                log.info("%s %s failed before the first byte of %s: %s", hop.name, ep.id, req.request_id, exc)
            except GatewayError as exc:
                if not (hop.timeout_is_failure and exc.code == "upstream_timeout"):
                    raise
                failure, timed_out = AttemptFailed(ep.id, exc.message, accepted=True), True
            failures.append(failure)
            errors.append(str(failure))
            if on_failure is not None:
                on_failure(ep, failure, timed_out)
        raise auth_error(failures) or GatewayError(
            503, f"no {hop.name} could take the request: " + "; ".join(errors or ["no candidates"]), "upstream_unavailable"
        )

    async def attempt(self, req: ProxyRequest, ep: EndpointState, body: bytes, hop: HopPolicy = ONE_HOP, *, can_retry: bool = True) -> Upstream:
        """One dispatch to one replica, held until its first byte.

        Raises ``AttemptFailed`` when the replica failed before that (the attempt is closed
        and, for connection-level failures, counted against its circuit), ``GatewayError``
        504 on a first-byte timeout. The hop's ``retry_statuses`` turn an answer into a
        failure when ``can_retry`` (there is another replica to try).
        """
        req.check_client()
        timeout = hop.first_byte_timeout_s or self.cfg.limits.first_byte_timeout_s
        stream = req.stream if hop.stream is None else hop.stream
        if req.upstream_headers is None:
            req.upstream_headers = forward_headers(req.headers, req.request_id, self.forwarded)
        headers: Mapping[str, str] = req.upstream_headers
        auth = self.fleet.upstream_auth(ep.id)
        if auth:
            headers = {**headers, **auth}
        ctx = req.ctx
        att = self.begin(ctx, ep, req.profile, prefill_tokens=hop.prefill_tokens)
        if req.otel is not None:  # the replica's spans join the trace under this hop's span
            headers = {**headers, **req.otel.hop(att, ctx.phase)}
        resp: UpstreamResponse | None = None
        kept = False
        try:
            try:
                resp = await open_upstream(self.session, "POST", ep.url + req.path, content=body, headers=headers, first_byte_timeout_s=timeout)
            except UpstreamConnectError as exc:
                self.fleet.record_failure(ep.id)
                raise AttemptFailed(ep.id, str(exc), accepted=exc.accepted) from None
            except UpstreamTimeout:
                raise GatewayError(504, f"replica {ep.id} did not answer within {timeout:g}s", "upstream_timeout") from None
            status = resp.status_code
            if att.span is not None:
                att.span.status(status)
            if status == 401:  # not the client's fault, not an outage: never relayed, never a circuit failure
                self.fleet.auth_rejected_by(ep.id, f"POST {req.path}")
                raise AuthRejected(ep.id)
            if can_retry and status in hop.retry_statuses:
                raise AttemptFailed(ep.id, f"HTTP {status}", accepted=True)
            try:
                if stream and status == 200 and resp.is_sse:
                    first = await resp.first_chunk()
                    if req.kind == RESPONSES:
                        first = await self._past_preamble(resp, first)
                    up = Upstream(resp, att, status, first=first)
                    resp.set_read_timeout(self.cfg.limits.read_timeout_s)
                else:
                    up = Upstream(resp, att, status, content=await resp.aread())
                    await resp.aclose()  # read in full: the connection goes back to the pool
            except UpstreamBroken as exc:
                self.fleet.record_failure(ep.id)
                raise AttemptFailed(ep.id, f"broke before the first byte ({exc})", accepted=True) from None
            except UpstreamTimeout:
                raise GatewayError(504, f"replica {ep.id} sent no first byte within {timeout:g}s", "upstream_timeout") from None
            self.first_byte(att)
            if status < 500:
                self.fleet.record_success(ep.id)
                self.fleet.auth_accepted_by(ep.id)
            kept = True
            return up
        finally:
            if not kept:
                if resp is not None:
                    await resp.aclose()
                self.end(ctx, att, req.profile, ok=False)

    @staticmethod
    async def _past_preamble(resp: UpstreamResponse, first: bytes) -> bytes:
        """A responses stream read on until its first event after ``response.created`` and
        ``response.in_progress``, which vLLM sends before the engine starts: until then the
        replica has done nothing, so a failure is still retried elsewhere and the first byte
        (TTFT, prefill accounting) is the first generated event. Each read has the first-byte
        timeout."""
        buf = first
        while buf and len(buf) < MAX_PREAMBLE_BYTES and not past_preamble(buf):
            chunk = await resp.first_chunk()
            if not chunk:
                break
            buf += chunk
        return buf

    # -- relaying -----------------------------------------------------------------------------

    def relay(self, req: ProxyRequest, up: Upstream, *, decision: str, extra_headers: Mapping[str, str]) -> Response | RelayResponse:
        """Turn the replica's answer into the client's response, closing every account once."""
        headers = relay_headers(up.resp.headers)
        headers.update(extra_headers)
        att = up.att
        ep = att.endpoint
        status = up.status
        ctx = req.ctx
        ttft = (att.first_byte_at or time.perf_counter()) - req.t0
        metrics = self.metrics
        metrics.child(metrics.ttft, ep.id, decision).observe(ttft)
        if req.otel is not None:
            req.otel.relay(up.streaming, ttft)

        def finish(ok: bool) -> None:
            self.end(ctx, att, req.profile, ok)
            e2e = time.perf_counter() - req.t0
            metrics.child(metrics.requests, ctx.lora or ctx.model, ep.id, decision, str(status)).inc()
            metrics.child(metrics.e2e, ep.id, decision).observe(e2e)
            req.release()
            if req.trace is not None:
                req.trace.emit(status, ok, ttft, e2e)
            if req.otel is not None:
                req.otel.relayed(status, ok)

        if not up.streaming:
            finish(status < 500)
            content = up.content
            if status >= 400 and content:
                content = normalize_error(status, content) or content
            return Response(content, status_code=status, headers=headers)

        responses = req.kind == RESPONSES

        def broken(exc: Exception) -> bytes:
            self.metrics.midstream_failures.labels(ep.id).inc()
            self.fleet.record_failure(ep.id)
            log.warning("stream from %s broke for %s: %s", ep.id, req.request_id, exc)
            event = sse_error_event(
                f"the replica serving this request failed mid-stream ({type(exc).__name__}); the answer is incomplete", "upstream_stream_broken"
            )
            # a responses stream names its events: an ``error`` event (its data still carries
            # ``error``, which the SDK raises as APIError)
            return b"event: error\n" + event if responses else event

        end = StreamEnd() if responses else None
        return RelayResponse(up.first, up.resp, status=status, headers=headers, watch=req.watch, on_broken=broken, on_close=finish, end=end, otel=req.otel)
