"""vLLM's Prometheus metrics, same names and labels, one registry per simulated replica."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class SimMetrics:
    def __init__(self, model: str, engine: str = "0") -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.lv = (model, engine)
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=r)
        self.queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels, registry=r)
        self.hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels, buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", labels, buckets=_E2E_BUCKETS, registry=r)
        self.lora_info = Gauge(
            "vllm:lora_requests_info", "Running stats on lora requests.", ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r
        )
        self._last_queries = 0
        self._last_hits = 0
        self._last_prompt = 0
        self._last_gen = 0

    def sync(self, engine) -> bytes:
        """Copy the engine's state into the metrics and render the exposition text."""
        lv = self.lv
        self.running.labels(*lv).set(len(engine.running))
        self.waiting.labels(*lv).set(len(engine.waiting))
        self.kv_usage.labels(*lv).set(engine.cache.usage)
        c = engine.cache
        self.queries.labels(*lv).inc(c.queries - self._last_queries)
        self.hits.labels(*lv).inc(c.hits - self._last_hits)
        self.prompt_tokens.labels(*lv).inc(engine.prompt_tokens_total - self._last_prompt)
        self.generation_tokens.labels(*lv).inc(engine.generation_tokens_total - self._last_gen)
        self._last_queries, self._last_hits = c.queries, c.hits
        self._last_prompt, self._last_gen = engine.prompt_tokens_total, engine.generation_tokens_total
        for t in engine.ttfts:
            self.ttft.labels(*lv).observe(t)
        engine.ttfts.clear()
        running = ",".join(sorted(k for k, v in engine.lora_running.items() if v))
        self.lora_info.clear()
        self.lora_info.labels(str(len(engine.cfg.lora_modules)), "", running).set(0)
        return generate_latest(self.registry)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.labels(*self.lv).observe(seconds)
