"""vLLM's Prometheus metrics, same names, labels and buckets, one registry per simulated replica.

From vLLM's ``vllm/v1/metrics/loggers.py`` (PrometheusStatLogger): every series carries the
labels ``model_name`` and ``engine``; ``vllm:lora_requests_info`` exists only when LoRA is
enabled, with labels ``max_lora``, ``waiting_lora_adapters``, ``running_lora_adapters`` and the
current time as its value (``set_to_current_time``). The NixlConnector's transfer metrics
(``vllm:nixl_*``) are recorded on the decode side for NIXL transfers only.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# NIXL transfer histograms (vLLM's nixl stats; boundaries approximated: 1 ms..5 s, 2 KiB..16 GiB, 10..50k)
_NIXL_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_NIXL_BYTES_BUCKETS = tuple(float(2**k) for k in range(11, 35, 2))
_NIXL_DESC_BUCKETS = (10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 400.0, 1000.0, 2000.0, 4000.0, 10000.0, 20000.0, 50000.0)
FINISH_REASONS = ("stop", "length", "abort")


class SimMetrics:
    def __init__(self, model: str, engine: str = "0", lora_modules: list[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.lv = (model, engine)
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r)
        self.queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels, registry=r)
        self.hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.", [*labels, "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, buckets=TTFT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels, buckets=REQUEST_LATENCY_BUCKETS, registry=r
        )
        self.nixl_time = Histogram(
            "vllm:nixl_xfer_time_seconds", "Histogram of transfer duration for NIXL KV Cache transfers.", labels, buckets=_NIXL_TIME_BUCKETS, registry=r
        )
        self.nixl_post = Histogram(
            "vllm:nixl_post_time_seconds", "Histogram of transfer post time for NIXL KV Cache transfers.", labels, buckets=_NIXL_TIME_BUCKETS, registry=r
        )
        self.nixl_bytes = Histogram(
            "vllm:nixl_bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers.", labels, buckets=_NIXL_BYTES_BUCKETS, registry=r
        )
        self.nixl_desc = Histogram(
            "vllm:nixl_num_descriptors", "Histogram of number of descriptors per NIXL KV Cache transfers.", labels, buckets=_NIXL_DESC_BUCKETS, registry=r
        )
        self.nixl_failed = Counter("vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers.", labels, registry=r)
        self.nixl_failed_notifs = Counter("vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications.", labels, registry=r)
        self.nixl_expired = Counter("vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire.", labels, registry=r)
        # not a vLLM metric: pulled blocks whose bytes did not match their hash (then recomputed)
        self.kv_verify_failed = Counter("kvgate_sim:kv_verify_failures", "Pulled KV blocks that failed checksum verification.", labels, registry=r)
        for reason in FINISH_REASONS:
            self.success.labels(*self.lv, reason)
        for m in (
            self.running,
            self.waiting,
            self.kv_usage,
            self.queries,
            self.hits,
            self.preemptions,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.e2e,
            self.nixl_failed,
            self.nixl_failed_notifs,
            self.nixl_expired,
            self.kv_verify_failed,
        ):
            m.labels(*self.lv)
        self.max_lora = str(max(1, len(lora_modules))) if lora_modules else None
        self.lora_info = (
            Gauge("vllm:lora_requests_info", "Running stats on lora requests.", ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
            if lora_modules
            else None
        )
        self._last_queries = 0
        self._last_hits = 0
        self._last_prompt = 0
        self._last_gen = 0

    def sync(self, engine) -> bytes:
        """Copy the engine's state into the metrics and render the exposition text."""
        lv = self.lv
        self.running.labels(*lv).set(len(engine.running))
        self.waiting.labels(*lv).set(len(engine.waiting) + len(engine.pulling))
        self.kv_usage.labels(*lv).set(engine.cache.usage)
        c = engine.cache
        self.queries.labels(*lv).inc(c.queries - self._last_queries)
        self.hits.labels(*lv).inc(c.hits - self._last_hits)
        self.prompt_tokens.labels(*lv).inc(engine.prompt_tokens_total - self._last_prompt)
        self.generation_tokens.labels(*lv).inc(engine.generation_tokens_total - self._last_gen)
        self._last_queries, self._last_hits = c.queries, c.hits
        self._last_prompt, self._last_gen = engine.prompt_tokens_total, engine.generation_tokens_total
        if self.lora_info is not None:
            running = ",".join(k for k, v in engine.lora_running.items() if v)
            waiting = ",".join(dict.fromkeys(r.lora for r in engine.waiting if r.lora))
            self.lora_info.labels(self.max_lora, waiting, running).set(time.time())
        return generate_latest(self.registry)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(*self.lv).observe(seconds)

    def finished(self, req) -> None:
        self.success.labels(*self.lv, req.finish_reason if req.finish_reason in FINISH_REASONS else "abort").inc()
        if req.finished_at is not None and req.finish_reason != "abort":
            self.e2e.labels(*self.lv).observe(req.finished_at - req.arrival)

    def observe_nixl(self, seconds: float, nbytes: int, descriptors: int) -> None:
        self.nixl_time.labels(*self.lv).observe(seconds)
        self.nixl_post.labels(*self.lv).observe(min(seconds, 0.0005))
        self.nixl_bytes.labels(*self.lv).observe(nbytes)
        self.nixl_desc.labels(*self.lv).observe(descriptors)
