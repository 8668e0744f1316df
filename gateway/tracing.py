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
no opentelemetry package until tracing is enabled, and ``ProxyRequest.otel`` stays None.

Cost when on, on the event loop: a few small records per request. The SDK's own span objects
cost ~60 µs each to start and end (sampler, context, attribute checks, processor) and its
protobuf encoding another ~50 µs per span — measured on the 2-core dev machine, that was ~0.3 ms
added to every request at concurrency 1. So a request writes plain records (ids, times, a dict
of attributes) and hands them over whole when it ends; a background thread turns them into the
SDK's ``ReadableSpan``s and gives them to the OTLP exporter in batches. Stage spans are written
after the fact from the ``perf_counter`` readings the stages already take for their metrics.
The W3C parts are small and done here: ``traceparent`` parsed and formatted (version 00), ids
random as the SDK's generator makes them, and the SDK's ``TraceIdRatioBased`` rule for
sampling (low 64 bits of the trace id under ratio × 2^64), parent-based: a client's sampled
flag decides for its request. A request left out gets no tracer at all (its client's
``traceparent``, if any, reaches the replica unchanged, flags included).

The gateway keeps an exporter of its own (no process-wide provider), so several gateways in
one process (tests) or an application embedding one keep their own exporters and resources.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TracingConfig

if TYPE_CHECKING:
    from kvindex.index import PrefixMatch
    from scorers.base import Decision, RequestContext

    from .forward import Attempt
    from .request import ProxyRequest

log = logging.getLogger("kvgate.tracing")

#: hop span names by the request's phase when it is sent
_HOP_NAMES = {"any": "hop", "prefill": "prefill hop", "decode": "decode hop"}
#: replicas listed on a schedule span (the ranking, best first)
MAX_RANKED = 8
#: finished traces waiting for the exporter; past this the oldest are dropped (a collector that
#: is down or slow must not grow the gateway's memory)
MAX_PENDING_TRACES = 4096
#: the exporter thread wakes this often, or sooner once this many traces wait
EXPORT_DELAY_S = 2.0
EXPORT_SOON = 256
#: spans per export call. Small: the exporter encodes a whole batch holding the GIL (~50 µs a
#: span), which the event loop then waits for; between batches and traces the thread yields
EXPORT_BATCH = 64

SERVER, CLIENT, INTERNAL = "server", "client", "internal"

OTEL_MISSING = "tracing.enabled needs the OpenTelemetry packages: pip install 'kvgate[otel]' (opentelemetry-sdk and an OTLP exporter)"

#: W3C trace context: version-traceid-parentid-flags, lower-case hex (later versions may append)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MASK64 = (1 << 64) - 1


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, else None (W3C: version
    ff and all-zero ids are invalid; version 00 has exactly four fields)."""
    if not value:
        return None
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, tid, pid, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(tid, 16), int(pid, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def _new_id(bits: int) -> int:
    while True:  # zero is the invalid id
        n = random.getrandbits(bits)
        if n:
            return n


class SpanRecord:
    """One span as the request path writes it: plain fields, no SDK object."""

    __slots__ = ("attrs", "end", "error", "events", "kind", "name", "parent_id", "span_id", "start")

    def __init__(self, name: str, span_id: int, parent_id: int, kind: str, start: int, attrs: dict[str, Any]) -> None:
        self.name = name
        self.span_id = span_id
        self.parent_id = parent_id
        self.kind = kind
        self.start = start
        self.end = 0
        self.attrs = attrs
        self.events: list[tuple[str, int]] | None = None
        self.error: str | None = None


def _attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}


class Tracing:
    """The gateway's tracer: sampling, W3C propagation, and the OTLP export thread."""

    def __init__(self, cfg: TracingConfig, component: str = "gateway") -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import Event, ReadableSpan
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
        except ImportError:
            raise ConfigError(OTEL_MISSING) from None
        self.cfg = cfg
        #: what the spans say produced them (gateway | extproc | sidecar): one service name, three roles
        self.component = component
        self._sdk = (ReadableSpan, Event, SpanContext, TraceFlags(TraceFlags.SAMPLED), TraceState, Status, StatusCode)
        self._kinds = {SERVER: SpanKind.SERVER, CLIENT: SpanKind.CLIENT, INTERNAL: SpanKind.INTERNAL}
        self._resource = Resource.create({"service.name": cfg.service_name})
        self._scope = InstrumentationScope("kvgate")
        self._exporter = _exporter(cfg)
        #: the SDK's TraceIdRatioBased bound: sampled when the trace id's low 64 bits are below it
        self._bound = round(cfg.sample_ratio * (1 << 64))
        self._pending: collections.deque[tuple[int, str | None, bool, list[SpanRecord]]] = collections.deque(maxlen=MAX_PENDING_TRACES)
        self.dropped = 0  # traces dropped because the exporter fell behind
        self._lock = threading.Lock()  # one export at a time (the thread, force_flush, shutdown)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvgate-otlp-export", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: TracingConfig, component: str = "gateway") -> Tracing | None:
        """The tracer, or None when tracing is off (nothing of OpenTelemetry imported then)."""
        return cls(cfg, component) if cfg.enabled else None

    # -- the request path -------------------------------------------------------------------------

    def begin(self, name: str, headers: Mapping[str, str], attrs: Mapping[str, Any], t0: float | None = None) -> RequestTracer | None:
        """The root span of one request, child of the client's ``traceparent`` if it sent a valid
        one; None when sampling leaves the request out."""
        parent = parse_traceparent(headers.get("traceparent"))
        if parent is not None:
            trace_id, parent_id, sampled = parent
            if not sampled:
                return None
            state = headers.get("tracestate") or None
        else:
            trace_id, parent_id, state = _new_id(128), 0, None
            if (trace_id & _MASK64) >= self._bound:
                return None
        now_ns, now = time.time_ns(), time.perf_counter()
        t0 = now if t0 is None else t0
        start_ns = now_ns - int((now - t0) * 1e9)
        root = SpanRecord(name, _new_id(64), parent_id, SERVER, start_ns, {"kvgate.component": self.component, **_attrs(attrs)})
        return RequestTracer(self, trace_id, state, root, t0)

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

    def submit(self, trace_id: int, state: str | None, remote_parent: bool, spans: list[SpanRecord]) -> None:
        """A finished request's spans, for the export thread (append is atomic: no lock)."""
        if len(self._pending) == MAX_PENDING_TRACES:
            self.dropped += 1
        self._pending.append((trace_id, state, remote_parent, spans))
        if len(self._pending) >= EXPORT_SOON:
            self._wake.set()

    # -- export (off the event loop) -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(EXPORT_DELAY_S)
            self._wake.clear()
            self._export()

    def _export(self) -> None:
        with self._lock:
            batch: list[Any] = []
            while self._pending:
                batch.extend(self._readable(*self._pending.popleft()))
                if len(batch) >= EXPORT_BATCH:
                    self._send(batch)
                    batch = []
                time.sleep(0)  # let the event loop in (the GIL would keep it waiting up to 5 ms)
            if batch:
                self._send(batch)

    def _send(self, batch: list[Any]) -> None:
        try:
            self._exporter.export(batch)
        except Exception:  # the exporter logs its own failures; anything else must not kill the thread
            log.exception("exporting %d spans failed", len(batch))

    def _readable(self, trace_id: int, state: str | None, remote_parent: bool, spans: list[SpanRecord]) -> list[Any]:
        readable_span, event, span_context, flags, trace_state, status, code = self._sdk
        ts = trace_state.from_header([state]) if state else None
        ok, end_default = status(code.UNSET), spans[0].end
        out = []
        for s in spans:
            ctx = span_context(trace_id, s.span_id, False, flags, ts)
            parent = span_context(trace_id, s.parent_id, remote_parent and s is spans[0], flags, ts) if s.parent_id else None
            out.append(
                readable_span(
                    s.name,
                    context=ctx,
                    parent=parent,
                    resource=self._resource,
                    attributes=s.attrs,
                    events=[event(n, timestamp=t) for n, t in s.events] if s.events else (),
                    kind=self._kinds[s.kind],
                    status=ok if s.error is None else status(code.ERROR, s.error),
                    start_time=s.start,
                    end_time=s.end or end_default,
                    instrumentation_scope=self._scope,
                )
            )
        return out

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export every finished trace now (blocking)."""
        self._export()
        return True

    def shutdown(self) -> None:
        """Export what is pending and stop (blocking: call it off the event loop)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(10)
        self._export()
        self._exporter.shutdown()


def _exporter(cfg: TracingConfig) -> Any:
    try:
        if cfg.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            endpoint = cfg.otlp_endpoint
            return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=cfg.otlp_endpoint)
    except ImportError as e:
        if "opentelemetry.proto" in str(e):
            # xds-protos (the envoy extra) ships its own, older copy of opentelemetry-proto's
            # modules; whichever wheel pip unpacks last wins, and the exporters need the new ones
            raise ConfigError(
                f"tracing: opentelemetry-proto's modules were overwritten by an older copy ({e}); "
                "xds-protos ships one: reinstall it last with "
                "pip install --force-reinstall --no-deps opentelemetry-proto"
            ) from None
        package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if cfg.protocol == "grpc" else "http")
        raise ConfigError(f"tracing.protocol {cfg.protocol} needs {package} (pip install 'kvgate[otel]')") from None


class HopSpan:
    """One dispatch to one replica (a CLIENT span), from the request sent to the end of the
    replica's answer: its first byte is an event, the status its HTTP status; a failure before
    the first byte ends it in error with the reason (the exception that ended it, or the one
    ``fail`` names)."""

    __slots__ = ("_tracer", "reason", "span")

    def __init__(self, tracer: RequestTracer, span: SpanRecord) -> None:
        self._tracer = tracer
        self.span = span
        self.reason: str | None = None

    def status(self, code: int) -> None:
        self.span.attrs["http.response.status_code"] = code

    def first_byte(self) -> None:
        self._tracer.event(self.span, "first_byte")

    def fail(self, reason: str) -> None:
        self.reason = reason

    def close(self, ok: bool) -> None:
        span = self.span
        if not ok:
            reason = self.reason
            if reason is None:  # ended while an exception unwinds (AttemptFailed, a 504, a cancellation)
                exc = sys.exc_info()[1]
                reason = f"{type(exc).__name__}: {exc}" if exc is not None else "failed"
            span.error = reason
        span.end = self._tracer.ns(time.perf_counter())


class RequestTracer:
    """The spans of one request, hung off ``ProxyRequest.otel`` (None when tracing is off)."""

    __slots__ = ("_attempts", "_done", "_relay", "_remote", "_state", "_t0", "_tracing", "root", "spans", "trace_id")

    def __init__(self, tracing: Tracing, trace_id: int, state: str | None, root: SpanRecord, t0: float) -> None:
        self._tracing = tracing
        self.trace_id = trace_id
        self._state = state
        self._remote = root.parent_id != 0  # the parent is the client's span
        self.root = root
        self.spans = [root]
        self._t0 = t0
        self._attempts: dict[str, int] = {}
        self._relay: SpanRecord | None = None
        self._done = False

    def ns(self, t: float) -> int:
        """A ``time.perf_counter()`` reading as the epoch nanoseconds spans carry."""
        return self.root.start + int((t - self._t0) * 1e9)

    def _child(self, name: str, kind: str, start: int, attrs: dict[str, Any]) -> SpanRecord:
        span = SpanRecord(name, _new_id(64), self.root.span_id, kind, start, attrs)
        self.spans.append(span)
        return span

    def event(self, span: SpanRecord, name: str) -> None:
        if span.events is None:
            span.events = []
        span.events.append((name, self.ns(time.perf_counter())))

    def carrier(self, span: SpanRecord | None = None) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming ``span`` (default: the request's own) as parent."""
        out = {"traceparent": format_traceparent(self.trace_id, (span or self.root).span_id)}
        if self._state:
            out["tracestate"] = self._state
        return out

    def set(self, attrs: Mapping[str, Any]) -> None:
        """Attributes of the request as a whole (model, profile, the replicas that served it)."""
        if not self._done:  # once handed to the exporter thread, the records are its own
            self.root.attrs.update(_attrs(attrs))

    def stage(self, name: str, start: float, end: float, attrs: Mapping[str, Any], error: str | None = None) -> None:
        """A finished stage, written from its ``perf_counter`` timestamps."""
        span = self._child(name, INTERNAL, self.ns(start), _attrs(attrs))
        span.end = self.ns(end)
        span.error = error

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
        attrs = {
            "kvgate.replica": ep.id,
            "kvgate.phase": phase,
            "kvgate.attempt": n,
            "kvgate.prefill_tokens": att.prefill_tokens,
            "server.address": ep.url,
            "http.request.method": "POST",
        }
        span = self._child(name, CLIENT, self.ns(time.perf_counter()), attrs)
        att.span = HopSpan(self, span)
        return self.carrier(span)

    # -- the answer -------------------------------------------------------------------------------

    def relay(self, streaming: bool, ttft_s: float) -> None:
        """The answer is in hand (a stream's first chunk, or the whole body): relaying starts."""
        attrs = {"kvgate.streaming": streaming, "kvgate.ttft_ms": round(ttft_s * 1000, 3)}
        self._relay = self._child("relay", INTERNAL, self.ns(time.perf_counter()), attrs)

    def client_first_byte(self) -> None:
        """The first body chunk was handed to the client's connection."""
        if self._relay is not None:
            self.event(self._relay, "first_byte")

    def relayed(self, status: int, ok: bool) -> None:
        """The answer is over (whole or not): the relay and the request end."""
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.attrs["kvgate.complete"] = ok
            relay.error = None if ok else "answer incomplete"
            relay.end = self.ns(time.perf_counter())
        self.end(status, None if ok else "answer incomplete")

    def end(self, status: int | None = None, error: str | None = None) -> None:
        """End the request's span (once; later calls do nothing) and hand the trace to the exporter."""
        if self._done:
            return
        self._done = True
        root = self.root
        root.end = self.ns(time.perf_counter())
        relay, self._relay = self._relay, None
        if relay is not None:  # the request ended before its answer was relayed to the end
            relay.end = root.end
        if status is not None:
            root.attrs["http.response.status_code"] = status
        if error is not None:
            root.attrs["error.type"] = error
        # as OTel's HTTP server conventions: a 4xx is the client's doing, not the gateway's error
        if (status is not None and status >= 500) or (error is not None and (status is None or status < 400)):
            root.error = error or f"HTTP {status}"
        self._tracing.submit(self.trace_id, self._state, self._remote, self.spans)
