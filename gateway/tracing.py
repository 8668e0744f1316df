"""OpenTelemetry traces of the request path (the ``otel`` extra; ``tracing:`` in the config).

One trace per request: a root span for the request as the gateway serves it (continuing the
client's W3C ``traceparent``/``tracestate`` when it sent them), a child span per stage —
``tokenize`` (chat template render, encode and block keys), ``index`` (the prefix lookup),
``schedule`` (one per phase, with the chosen replica, its prefix blocks and the profile),
each ``hop`` (``prefill hop`` / ``decode hop`` for P/D; every retry is a new hop span with its
attempt number) and the ``relay`` to the client (first byte sent, end). Each hop sends the
replica a ``traceparent`` naming the hop span as parent, so vLLM's own ``llm_request`` span
(vLLM reads the header when started with ``--otlp-traces-endpoint``) lands under it.

Cost when off: nothing but ``req.otel is not None`` checks at the hooks — this module imports
no opentelemetry package until tracing is enabled, and ``ProxyRequest.otel`` stays None. When on,
stage spans are written after the fact from the timestamps the stages already take for their
metrics (``time.perf_counter``), so no stage runs inside a context manager; hop and relay spans
live while their exchange does. A request the sampler leaves out gets no tracer either (its
client's ``traceparent``, if any, reaches the replica unchanged, flags included).

The gateway keeps a provider of its own (not the process-wide one), so several gateways in one
process (tests) or an application embedding one keep their own exporters and resources.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TracingConfig

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from kvindex.index import PrefixMatch
    from scorers.base import Decision, RequestContext

    from .forward import Attempt
    from .request import ProxyRequest

#: hop span names by the request's phase when it is sent
_HOP_NAMES = {"any": "hop", "prefill": "prefill hop", "decode": "decode hop"}
#: replicas listed on a schedule span (the ranking, best first)
MAX_RANKED = 8

OTEL_MISSING = "tracing.enabled needs the OpenTelemetry packages: pip install 'kvgate[otel]' (opentelemetry-sdk and an OTLP exporter)"


class Tracing:
    """The gateway's tracer: provider, OTLP exporter, sampler and W3C propagator."""

    def __init__(self, cfg: TracingConfig, component: str = "gateway") -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise ConfigError(OTEL_MISSING) from None
        self.cfg = cfg
        #: what the spans say produced them (gateway | extproc | sidecar): one service name, three roles
        self.component = component
        self._trace = trace
        self._kinds = trace.SpanKind
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()
        resource = Resource.create({"service.name": cfg.service_name})
        self.provider: TracerProvider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(cfg)))
        self.tracer: Tracer = self.provider.get_tracer("kvgate")

    @classmethod
    def from_config(cls, cfg: TracingConfig, component: str = "gateway") -> Tracing | None:
        """The tracer, or None when tracing is off (nothing of OpenTelemetry imported then)."""
        return cls(cfg, component) if cfg.enabled else None

    def begin(self, name: str, headers: Mapping[str, str], attrs: Mapping[str, Any], t0: float | None = None) -> RequestTracer | None:
        """The root span of one request, child of the client's ``traceparent`` if it sent one;
        None when the sampler leaves the request out."""
        parent = self.propagator.extract(headers) if "traceparent" in headers else None
        now_ns, now = time.time_ns(), time.perf_counter()
        t0 = now if t0 is None else t0
        start_ns = now_ns - int((now - t0) * 1e9)
        root = self.tracer.start_span(
            name,
            context=parent,
            kind=self._kinds.SERVER,
            attributes={"kvgate.component": self.component, **{k: v for k, v in attrs.items() if v is not None}},
            start_time=start_ns,
        )
        if not root.is_recording():
            return None
        return RequestTracer(self, root, start_ns, t0)

    def request(self, req: ProxyRequest) -> RequestTracer | None:
        """The root span of a proxied HTTP request (``POST /v1/...``)."""
        attrs = {"http.request.method": "POST", "url.path": req.path, "kvgate.request_id": req.request_id, "kvgate.kind": req.kind}
        return self.begin(f"POST {req.path}", req.headers, attrs, req.t0)

    def pick(self, headers: Mapping[str, str]) -> RequestTracer | None:
        """The span of one ext-proc scheduling decision (its stages are children, as a
        request's are); its context is what the picker sends on as ``traceparent``."""
        path = headers.get(":path", "").split("?")[0]
        attrs = {"url.path": path, "kvgate.request_id": headers.get("x-request-id")}
        return self.begin(f"pick {path}", headers, attrs)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Export what is pending and stop (blocking: call it off the event loop)."""
        self.provider.shutdown()


def _exporter(cfg: TracingConfig) -> Any:
    try:
        if cfg.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            endpoint = cfg.otlp_endpoint
            return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=cfg.otlp_endpoint)
    except ImportError:
        package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if cfg.protocol == "grpc" else "http")
        raise ConfigError(f"tracing.protocol {cfg.protocol} needs {package} (pip install 'kvgate[otel]')") from None


class HopSpan:
    """One dispatch to one replica (a CLIENT span), from the request sent to the end of the
    replica's answer: its first byte is an event, the status its HTTP status; a failure before
    the first byte ends it in error with the reason (the exception that ended it, or the one
    ``fail`` names)."""

    __slots__ = ("_tracing", "reason", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self.reason: str | None = None

    def status(self, code: int) -> None:
        self.span.set_attribute("http.response.status_code", code)

    def first_byte(self) -> None:
        self.span.add_event("first_byte")

    def fail(self, reason: str) -> None:
        self.reason = reason

    def close(self, ok: bool) -> None:
        if not ok:
            reason = self.reason
            if reason is None:  # ended while an exception unwinds (AttemptFailed, a 504, a cancellation)
                exc = sys.exc_info()[1]
                reason = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
            self.span.set_status(self._tracing._status(self._tracing._error, reason))
        self.span.end()


class RequestTracer:
    """The spans of one request, hung off ``ProxyRequest.otel`` (None when tracing is off)."""

    __slots__ = ("_attempts", "_ctx", "_done", "_relay", "_t0", "_t0_ns", "_tracing", "root")

    def __init__(self, tracing: Tracing, root: Span, t0_ns: int, t0: float) -> None:
        self._tracing = tracing
        self.root = root
        self._ctx: Context = tracing._trace.set_span_in_context(root)
        self._t0_ns = t0_ns
        self._t0 = t0
        self._attempts: dict[str, int] = {}
        self._relay: Span | None = None
        self._done = False

    def ns(self, t: float) -> int:
        """A ``time.perf_counter()`` reading as the epoch nanoseconds spans carry."""
        return self._t0_ns + int((t - self._t0) * 1e9)

    @property
    def trace_id(self) -> int:
        return int(self.root.get_span_context().trace_id)

    def carrier(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming the request's own span as parent."""
        out: dict[str, str] = {}
        self._tracing.propagator.inject(out, context=self._ctx)
        return out

    def set(self, attrs: Mapping[str, Any]) -> None:
        """Attributes of the request as a whole (model, profile, the replicas that served it)."""
        if not self._done:
            self.root.set_attributes({k: v for k, v in attrs.items() if v is not None})

    def stage(self, name: str, start: float, end: float, attrs: Mapping[str, Any], error: str | None = None) -> None:
        """A finished stage, written from its ``perf_counter`` timestamps."""
        span = self._tracing.tracer.start_span(name, context=self._ctx, start_time=self.ns(start), attributes={k: v for k, v in attrs.items() if v is not None})
        if error is not None:
            span.set_status(self._tracing._status(self._tracing._error, error))
        span.end(end_time=self.ns(end))

    # -- the routing stages (attributes built here, so each hook is one line) ---------------------

    def tokenized(self, start: float, end: float, kind: str, ctx: RequestContext, remote: bool) -> None:
        self.stage(
            "tokenize",
            start,
            end,
            {
                "kvgate.kind": kind,
                "kvgate.chat_template": kind != "completions",
                "kvgate.tokenizer": "remote" if remote else "local",
                "kvgate.prompt_tokens": ctx.prompt_tokens,
                "kvgate.block_size": ctx.block_size,
                "kvgate.blocks": len(ctx.block_keys),
            },
        )

    def looked_up(self, start: float, end: float, prefix: Mapping[str, PrefixMatch], ok: bool, blocks: int) -> None:
        best = max(prefix.items(), key=lambda kv: kv[1].blocks, default=None)
        self.stage(
            "index",
            start,
            end,
            {
                "kvgate.index.ok": ok,
                "kvgate.index.replicas": len(prefix),
                "kvgate.index.best_replica": best[0] if best else None,
                "kvgate.index.best_blocks": best[1].blocks if best else 0,
                "kvgate.blocks": blocks,
            },
            None if ok else "index unavailable: routed on load",
        )

    def scheduled(self, start: float, end: float, phase: str, decision: Decision, ctx: RequestContext) -> None:
        chosen = decision.ranked[0] if decision.ranked else None
        hit = ctx.prefix.get(chosen.id) if chosen is not None else None
        self.stage(
            "schedule",
            start,
            end,
            {
                "kvgate.phase": phase,
                "kvgate.profile": decision.profile,
                "kvgate.replica": chosen.id if chosen is not None else None,
                "kvgate.prefix_blocks": hit.blocks if hit else 0,
                "kvgate.prefix_tier": hit.tier if hit else None,
                "kvgate.score": decision.scores.get(chosen.id) if chosen is not None else None,
                "kvgate.ranked": [e.id for e in decision.ranked[:MAX_RANKED]],
            },
            None if chosen is not None else "no replica can serve the request",
        )

    # -- hops -------------------------------------------------------------------------------------

    def hop(self, att: Attempt, phase: str) -> dict[str, str]:
        """Start the hop span of one attempt (kept on ``att.span``, ended with the attempt) and
        return the ``traceparent``/``tracestate`` the replica gets: this span as its parent."""
        name = _HOP_NAMES.get(phase, "hop")
        n = self._attempts[name] = self._attempts.get(name, 0) + 1
        ep = att.endpoint
        span = self._tracing.tracer.start_span(
            name,
            context=self._ctx,
            kind=self._tracing._kinds.CLIENT,
            attributes={
                "kvgate.replica": ep.id,
                "kvgate.phase": phase,
                "kvgate.attempt": n,
                "kvgate.prefill_tokens": att.prefill_tokens,
                "server.address": ep.url,
                "http.request.method": "POST",
            },
        )
        att.span = HopSpan(self._tracing, span)
        carrier: dict[str, str] = {}
        self._tracing.propagator.inject(carrier, context=self._tracing._trace.set_span_in_context(span))
        return carrier

    # -- the answer -------------------------------------------------------------------------------

    def relay(self, streaming: bool, ttft_s: float) -> None:
        """The answer is in hand (a stream's first chunk, or the whole body): relaying starts."""
        self._relay = self._tracing.tracer.start_span(
            "relay", context=self._ctx, attributes={"kvgate.streaming": streaming, "kvgate.ttft_ms": round(ttft_s * 1000, 3)}
        )

    def client_first_byte(self) -> None:
        """The first body chunk was handed to the client's connection."""
        if self._relay is not None:
            self._relay.add_event("first_byte")

    def relayed(self, status: int, ok: bool) -> None:
        """The answer is over (whole or not): the relay and the request end."""
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.set_attribute("kvgate.complete", ok)
            if not ok:
                relay.set_status(self._tracing._status(self._tracing._error, "answer incomplete"))
            relay.end()
        self.end(status, None if ok else "answer incomplete")

    def end(self, status: int | None = None, error: str | None = None) -> None:
        """End the request's span (once; later calls do nothing)."""
        if self._done:
            return
        self._done = True
        relay, self._relay = self._relay, None
        if relay is not None:  # the request ended before its answer was relayed to the end
            relay.end()
        root = self.root
        if status is not None:
            root.set_attribute("http.response.status_code", status)
        if error is not None:
            root.set_attribute("error.type", error)
        # as OTel's HTTP server conventions: a 4xx is the client's doing, not the gateway's error
        if (status is not None and status >= 500) or (error is not None and (status is None or status < 400)):
            root.set_status(self._tracing._status(self._tracing._error, error or f"HTTP {status}"))
        root.end()
