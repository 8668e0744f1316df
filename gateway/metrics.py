"""The gateway's own Prometheus metrics, in a registry per app (several apps may share a process).

Names are prefixed ``kvgate_``. Event-ingestion and index figures are read at scrape time
from the live objects (a custom collector), so the hot path only touches a few counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_SCHED_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3)


class _LiveCollector(Collector):
    """Reads gauges/counters from callbacks at scrape time."""

    def __init__(self, read: Callable[[], Iterable]) -> None:
        self._read = read

    def collect(self) -> Iterable:
        yield from self._read()


class GatewayMetrics:
    """All gateway metrics; ``render()`` gives the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter("kvgate_requests", "Requests answered, by replica and status", ["model", "replica", "route", "status"], registry=r)
        self.errors = Counter("kvgate_errors", "Requests answered with a gateway-generated error", ["code"], registry=r)
        self.ttft = Histogram(
            "kvgate_ttft_seconds", "Time to first byte of the response body seen by the gateway", ["replica", "decision"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram("kvgate_e2e_seconds", "Request latency through the gateway", ["replica", "decision"], buckets=_LATENCY_BUCKETS, registry=r)
        self.sched = Histogram(
            "kvgate_scheduler_seconds",
            "Routing time per stage: tokenize (tokens + block keys), index (lookup), schedule (filters + scorers + picker, per hop)",
            ["stage"],
            buckets=_SCHED_BUCKETS,
            registry=r,
        )
        self.prompt_blocks = Counter("kvgate_prompt_blocks", "Full prompt blocks of routed requests", registry=r)
        self.prefix_hit_blocks = Counter("kvgate_prefix_hit_blocks", "Prompt blocks the chosen replica held according to the index", registry=r)
        self.retries = Counter("kvgate_retries", "Attempts moved to another replica after a connection failure", ["replica"], registry=r)
        self.midstream_failures = Counter("kvgate_midstream_failures", "Streams that broke after the first byte", ["replica"], registry=r)
        self.index_errors = Counter("kvgate_index_errors", "Index lookups that failed or timed out (routing fell back to load)", registry=r)
        self.rejected = Counter("kvgate_admission_rejected", "Requests refused because the admission queue was full", registry=r)
        self.queue_wait = Histogram("kvgate_admission_wait_seconds", "Time spent waiting for admission", buckets=_LATENCY_BUCKETS, registry=r)
        self.pd_requests = Counter("kvgate_pd_requests", "Requests by serving path", ["path"], registry=r)
        self.pd_fallbacks = Counter("kvgate_pd_fallbacks", "Two-hop requests that fell back", ["reason"], registry=r)
        self.pd_hop = Histogram(
            "kvgate_pd_hop_seconds", "Latency of each P/D hop (prefill: full hop; decode: to first byte)", ["hop"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.pd_prefill_share = Histogram(
            "kvgate_pd_prefill_ttft_share", "Share of the client's TTFT spent in the prefill hop", buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0), registry=r
        )
        self.panic_routes = Counter(
            "kvgate_panic_routes",
            "Requests routed to replicas whose circuit was open, because no replica that could serve them was healthy (health.panic)",
            registry=r,
        )
        self.tokenize_jobs = Counter(
            "kvgate_tokenize_jobs",
            "Prompts tokenized by the gateway, by where: inline (event loop), inline_then_pool (too much left uncached), pool",
            ["where"],
            registry=r,
        )
        # label children resolved once: .labels() costs a lock and a dict lookup per call
        self.tokenize_inline = self.tokenize_jobs.labels("inline")
        self.tokenize_inline_then_pool = self.tokenize_jobs.labels("inline_then_pool")
        self.tokenize_pool = self.tokenize_jobs.labels("pool")
        self.sched_tokenize = self.sched.labels("tokenize")
        self.sched_index = self.sched.labels("index")
        self.sched_schedule = self.sched.labels("schedule")
        self.index_blocks = Gauge("kvgate_index_blocks", "Block keys held by the index (-1: the index did not answer)", registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, resolved once per label set: prometheus_client's
        ``labels()`` validates and locks on every call, and the relay calls it per request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count_prefix(self, prompt_blocks: int, hit_blocks: int) -> None:
        """A routed request's prompt blocks and how many of them its replica held (the hit ratio)."""
        self.prompt_blocks.inc(prompt_blocks)
        self.prefix_hit_blocks.inc(hit_blocks)

    def add_live(self, read: Callable[[], Iterable]) -> None:
        """Register a callback yielding metric families at scrape time."""
        self.registry.register(_LiveCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        g.add_metric(values, v)
    return g


def counter(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=labels)
    for values, v in rows:
        c.add_metric(values, v)
    return c
