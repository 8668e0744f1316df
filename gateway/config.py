"""The gateway's one configuration schema: YAML in, validated typed structs out.

Every knob has a default, unknown keys are rejected (a typo must not silently change
routing), and validation errors name the offending path, e.g.
``config error at $.replicas[1].role: Expected `'both' | 'prefill' | 'decode'`, got `'pre'```.
CLI flags override a few top-level values (see ``gateway.server``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from kvindex.event_rules import RootCheck
from kvindex.hashing import HASH_ALGOS


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ListenConfig(_Base):
    host: str = "127.0.0.1"
    port: int = 8000


class ReplicaConfig(_Base):
    """One vLLM replica (endpoint)."""

    id: str
    url: str
    role: Literal["both", "prefill", "decode"] = "both"
    #: base models served; empty = discover from the replica's /v1/models
    models: list[str] = []
    #: KV-event PUB endpoint, e.g. tcp://10.0.0.5:5557 (None: no events, approx-prefix only)
    kv_events: str | None = None
    #: KV-event replay ROUTER endpoint, e.g. tcp://10.0.0.5:5558
    replay: str | None = None
    #: topic filter for the SUB socket ("" = all)
    topic: str = ""
    #: prefill throughput estimate used by the estimated-TTFT scorer (tokens/s)
    prefill_tokens_per_s: float = 10_000.0
    labels: dict[str, str] = {}
    #: the replica's own key (vLLM --api-key / VLLM_API_KEY), sent as Authorization: Bearer on
    #: every call to it; the client's Authorization header never reaches a replica
    api_key: str | None = None
    #: name of an environment variable holding that key (keeps it out of the file)
    api_key_env: str | None = None
    #: vLLM's --data-parallel-size behind this one API server (internal load balancing): the
    #: replica is expanded into one routing target per rank, ``<id>-dp<rank>``, each with its own
    #: KV cache, indexed from that rank's events (vLLM offsets the event and replay ports by the
    #: rank) and addressed with vLLM's ``X-data-parallel-rank`` request header
    data_parallel_size: int = 1
    #: the rank this entry stands for (set by the expansion; or by hand for one rank only)
    data_parallel_rank: int | None = None

    def __repr__(self) -> str:  # the key must not end up in a log line or a traceback
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f != "api_key"}
        if self.api_key is not None:
            shown["api_key"] = "***"
        return "ReplicaConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def resolved_api_key(self) -> str | None:
        """The key to send (from ``api_key`` or the ``api_key_env`` variable), None for none."""
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env) or None
        return self.api_key or None


class ModelConfig(_Base):
    """Per-model settings: how to tokenize exactly as the replicas do."""

    #: directory with tokenizer.json (+ tokenizer_config.json) or "demo"; None = ask a
    #: replica's /tokenize (a remote call on the hot path)
    tokenizer: str | None = None
    #: KV block size used if no event has told us yet
    block_size: int = 16
    #: accept a chat template supplied by the request (body ``chat_template`` or
    #: ``chat_template_kwargs.chat_template``); false = vLLM's 400, as the replicas' own
    #: ``--trust-request-chat-template`` flag does. Set it like that flag.
    trust_request_chat_template: bool = False
    #: the replicas' ``--prefix-caching-hash-algo`` (sha256, sha256_cbor, xxhash, xxhash_cbor) and
    #: PYTHONHASHSEED: with them the index tells salted prompts from plain ones in events that
    #: carry no extra keys (vLLM <= 0.14), instead of trusting every prompt start as plain
    prefix_hash_algo: str | None = None
    prefix_hash_seed: str | None = None


class TokenizeConfig(_Base):
    """Tokenization off the event loop, its cache, and the caps on request-supplied templates."""

    #: threads tokenizing (HF tokenizers releases the GIL while encoding)
    workers: int = 2
    #: tokenization jobs queued or running; beyond it the gateway answers 429
    max_pending: int = 1024
    #: the request bodies of those jobs, summed; beyond it 429 (an idle pool takes any one job)
    max_pending_bytes: int = 32 * 1024 * 1024
    #: bodies up to this size are tokenized on the event loop, whatever the cache holds
    inline_max_bytes: int = 256
    #: larger bodies up to this size are rendered and looked up in the token cache on the event
    #: loop, and finished there when little is left to encode; beyond it (or 0) straight to the pool
    inline_try_max_bytes: int = 64 * 1024
    #: ... "little": at most this many characters not in the cache (~0.2 ms of encoding)
    inline_encode_max_chars: int = 1024
    #: token cache per model, in bytes (4 per token + ~300 per entry)
    cache_bytes: int = 64 * 1024 * 1024
    #: a request-supplied chat template's render: its process is killed after this
    template_timeout_s: float = 1.0
    #: ... its output is refused beyond this many characters
    template_max_chars: int = 1024 * 1024
    #: ... its process's address-space limit (RLIMIT_AS)
    template_memory_bytes: int = 1024 * 1024 * 1024


class IndexConfig(_Base):
    #: "memory" (embedded) or a redis:// URL shared by several gateway replicas
    backend: str = "memory"
    #: memory backend bound (distinct block keys; about 180 bytes each: 1M ≈ 180 MiB)
    max_blocks: int = 1_000_000
    #: Redis key TTL in seconds (bounds memory along with Redis maxmemory)
    ttl_s: int = 3600
    #: consume KV events in this process (false when a separate `kvgate indexer` feeds Redis)
    ingest: bool = True
    #: a lookup slower than this is abandoned and the request is routed on load alone
    lookup_timeout_ms: float = 50.0
    #: how often the event subscriber asks the index whether it lost its data (Redis restarted
    #: empty) and, if so, rebuilds it from the replicas' replay buffers
    loss_check_s: float = 1.0
    #: several gateways sharing a Redis index route like one (``gateway.shared_load``): each
    #: publishes its in-flight load per replica and its "just routed here" entries, and reads
    #: the others' in its lookup's round trip. Only with a Redis backend; off = each on its own
    share_load: bool = True
    #: a gateway's published load expires after this unless re-published (a crashed gateway's
    #: load stops counting); it is re-published every third of it, and at each change
    share_ttl_s: float = 3.0
    #: longest delay between a change of this gateway's in-flight load and its publication
    #: when no request's lookup carries it sooner
    share_flush_ms: float = 20.0
    #: how long a shared "just routed here" entry counts (between half this and this); 0 = not shared
    share_speculative_s: float = 2.0
    #: longest wait of a request whose new prompt part another request (at another gateway, or
    #: this one) is deciding, for that decision: then it is decided alone, and the part may
    #: end up on two replicas. Measured with two gateways, a burst of 12 new 2.4k-token
    #: documents on 2 shared cores: 20 ms left up to 7 of 12 split, 60 none in 3 runs
    share_wait_ms: float = 60.0


class HealthConfig(_Base):
    interval_s: float = 2.0
    timeout_s: float = 1.0
    #: consecutive failures (probes or proxied connection errors) that open the circuit
    failure_threshold: int = 3
    #: how long an open circuit stays open before a probe may close it
    cooldown_s: float = 5.0
    #: when every replica that could serve a request has its circuit open (probes timing out on a
    #: saturated fleet, say), try them anyway rather than answer 503 (Envoy's panic routing); a
    #: replica not ready (discovery) is never tried. The HTTP gateway only: ext-proc answers 503
    panic: bool = True


class ScrapeConfig(_Base):
    interval_s: float = 1.0
    timeout_s: float = 1.0


class LimitsConfig(_Base):
    #: requests proxied at once; beyond it requests wait in the admission queue
    max_inflight: int = 1024
    #: requests allowed to wait; beyond it the gateway answers 429
    max_queue: int = 2048
    #: longest a request may wait for admission before a 429
    queue_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    #: retries on another replica when the connection fails before the first byte
    max_retries: int = 2
    connect_timeout_s: float = 2.0
    #: time to the first byte of the answer: the first streamed chunk (covers queueing and
    #: prefill on the replica), or the whole body of a non-streaming answer
    first_byte_timeout_s: float = 300.0
    #: longest gap between two streamed chunks once the first one arrived
    read_timeout_s: float = 120.0
    #: idle upstream connections are closed after this; keep it below the replicas' own
    #: keep-alive timeout (uvicorn/vLLM: 5 s) so the gateway never reuses one being closed
    upstream_keepalive_s: float = 4.0
    #: a client connection must send its request headers within this (slowloris); 408 and closed
    header_timeout_s: float = 10.0
    #: and then its whole body within this; 408
    body_timeout_s: float = 30.0
    #: client connections open at once; a new one past this gets a 503 and is closed
    max_connections: int = 4096


class PDConfig(_Base):
    """Prefill→decode disaggregation (vLLM NixlConnector, pull mode)."""

    enabled: bool = True
    #: skip the prefill hop when the best decode replica leaves fewer uncached tokens than this
    threshold: int = 512
    #: when every prefill replica fails: "one_hop" (serve on a decode replica) or "error"
    on_prefill_failure: Literal["one_hop", "error"] = "one_hop"
    #: hop 1 (prefill, one output token) must complete within this
    prefill_timeout_s: float = 120.0
    #: hop 2: time to the decode replica's first byte (None: limits.first_byte_timeout_s);
    #: gaps between chunks afterwards use limits.read_timeout_s
    decode_timeout_s: float | None = None
    #: how long a prefill replica keeps the prompt's KV blocks for a decode replica to pull
    #: (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT, 480 s); a decode retry after that redoes hop 1
    lease_s: float = 480.0


class AuthConfig(_Base):
    #: bearer keys accepted from clients; empty = no client auth
    api_keys: list[str] = []
    #: bearer key for /admin/*; None = admin endpoints disabled
    admin_key: str | None = None

    def __repr__(self) -> str:  # keys must not end up in a log line or a traceback
        return f"AuthConfig(api_keys=[{len(self.api_keys)} keys], admin_key={'***' if self.admin_key else None})"


class DiscoveryConfig(_Base):
    """Replicas discovered in Kubernetes and kept up to date live (``gateway.discovery``):
    the pods matching a label selector, or the pods of a Gateway API Inference Extension
    ``InferencePool``. Each pod is one replica: id = pod name, address = pod IP, role from a
    label, ports from here or the pod's ``kvgate.io/*`` annotations (README: Discovery)."""

    #: "pods" (selected by ``label_selector``) or "inferencepool" (the pool's selector and port)
    kind: Literal["pods", "inferencepool"] = "pods"
    #: namespace watched; None = the gateway pod's own (its service account's), else "default"
    namespace: str | None = None
    #: Kubernetes label selector, evaluated by the API server. kind pods: None means
    #: ``llm-d.ai/inferenceServing=true`` (llm-d's serving pods); kind inferencepool: ANDed with
    #: the pool's selector (None: the pool's alone)
    label_selector: str | None = None
    #: kind inferencepool: the pool's name, and the API it is served under
    inference_pool: str | None = None
    inference_pool_api: Literal["inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2"] = "inference.networking.k8s.io/v1"
    #: label holding the P/D role (llm-d: prefill | decode | both)
    role_label: str = "llm-d.ai/role"
    #: role of a pod without that label
    default_role: Literal["both", "prefill", "decode"] = "both"
    #: a label whose value is the served model name (label values cannot hold "/", and llm-d's
    #: ``llm-d.ai/model`` names the release, not the model: off by default). Models come from
    #: the pod annotation ``kvgate.io/models``, else this label, else ``models``, else the
    #: pod's own /v1/models
    model_label: str | None = None
    models: list[str] = []
    #: vLLM's HTTP port (kind inferencepool: the pool's target port); annotation kvgate.io/port
    port: int = 8000
    #: vLLM --kv-events-config endpoint port (vLLM's default tcp://*:5557); None = no events.
    #: Annotation kvgate.io/kv-events-port ("none" turns them off for that pod)
    kv_events_port: int | None = 5557
    #: replay_endpoint port (vLLM has none unless replay_endpoint is set; 5558 by convention);
    #: None = no replay. Annotation kvgate.io/replay-port
    replay_port: int | None = 5558
    #: topic of the pods' KV events (vLLM --kv-events-config topic)
    topic: str = ""
    scheme: Literal["http", "https"] = "http"
    prefill_tokens_per_s: float = 10_000.0
    #: environment variable holding the pods' vLLM API key (the same for every pod)
    api_key_env: str | None = None
    #: kubeconfig file and context; None = in cluster (service account), else $KUBECONFIG or ~/.kube/config
    kubeconfig: str | None = None
    context: str | None = None
    #: each watch request asks the API server to end it after this long (then it is renewed)
    watch_timeout_s: float = 300.0
    #: a failed list or a dropped watch is retried after this, doubling up to backoff_max_s
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    #: start waits this long for the first list (then serves anyway and keeps trying)
    initial_sync_timeout_s: float = 10.0
    #: objects per list page (limit/continue)
    page_size: int = 500


class TracingConfig(_Base):
    """OpenTelemetry traces (``gateway.tracing``; needs the ``otel`` extra): one trace per request,
    a span per stage and per hop, and W3C ``traceparent`` sent to each replica with the hop's span
    as parent, so vLLM's own spans (``--otlp-traces-endpoint``) join the gateway's trace."""

    enabled: bool = False
    #: OTLP collector: grpc ``http://host:4317`` (``https://`` for TLS); http/protobuf the full
    #: traces URL, ``http://host:4318/v1/traces``
    otlp_endpoint: str = "http://localhost:4317"
    #: as vLLM's OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    #: the resource's service.name
    service_name: str = "kvgate"
    #: share of the traces the gateway starts that are recorded; a client's own traceparent
    #: decides for its requests (parent-based sampling)
    sample_ratio: float = 1.0


class GatewayConfig(_Base):
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    replicas: list[ReplicaConfig] = []
    #: replicas discovered in Kubernetes, besides ``replicas`` (None: the static list only)
    discovery: DiscoveryConfig | None = None
    models: dict[str, ModelConfig] = {}
    index: IndexConfig = msgspec.field(default_factory=IndexConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    scrape: ScrapeConfig = msgspec.field(default_factory=ScrapeConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    pd: PDConfig = msgspec.field(default_factory=PDConfig)
    tokenize: TokenizeConfig = msgspec.field(default_factory=TokenizeConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    #: the `scheduling:` section, validated by scorers.scheduler.Scheduler.from_config
    scheduling: dict[str, Any] = {}
    #: client request headers passed to replicas besides content-type, accept, traceparent and
    #: tracestate (names, case-insensitive); everything else stays at the gateway
    forward_headers: list[str] = []
    #: add x-kvgate-replica / x-kvgate-prefix-blocks to responses
    debug_headers: bool = False
    log_level: str = "warning"
    #: JSON log lines (one per request at debug)
    log_json: bool = True
    #: OpenTelemetry tracing (off by default)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)

    def model_config(self, model: str) -> ModelConfig:
        return self.models.get(model) or ModelConfig()

    def root_checks(self) -> dict[str, RootCheck]:
        """Per base model whose hash is configured, the index's check of plain prompt starts."""
        return {name: RootCheck(m.prefix_hash_algo, m.prefix_hash_seed) for name, m in self.models.items() if m.prefix_hash_algo}


def parse_config(data: Any) -> GatewayConfig:
    """Validate a decoded YAML document into a GatewayConfig."""
    if data is None:
        data = {}
    try:
        cfg = msgspec.convert(data, GatewayConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config error: {exc}") from None
    _check(cfg)
    return cfg


#: headers the gateway owns or that are per hop: never forwarded from a client
_NOT_FORWARDABLE = frozenset(
    {
        "authorization",
        "x-request-id",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "cookie",
    }
)


def offset_endpoint(endpoint: str | None, rank: int) -> str | None:
    """vLLM's event endpoint for data-parallel ``rank``: the TCP port plus the rank (an ipc://
    or inproc:// path gets ``_dp<rank>``); unchanged for rank 0, as vLLM leaves it."""
    if not endpoint or rank == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        head, sep, port = endpoint.rpartition(":")
        if sep and port.isdigit():
            return f"{head}:{int(port) + rank}"
        raise ConfigError(f"config error: KV-event endpoint {endpoint!r} has no port to offset for data-parallel rank {rank}")
    return f"{endpoint}_dp{rank}"


def expand_data_parallel(r: ReplicaConfig) -> list[ReplicaConfig]:
    """One replica entry per data-parallel rank (the entry itself when it has one rank)."""
    if r.data_parallel_size <= 1:
        return [r]
    return [
        msgspec.structs.replace(
            r,
            id=f"{r.id}-dp{rank}",
            kv_events=offset_endpoint(r.kv_events, rank),
            replay=offset_endpoint(r.replay, rank),
            data_parallel_size=1,
            data_parallel_rank=rank,
        )
        for rank in range(r.data_parallel_size)
    ]


def _check(cfg: GatewayConfig) -> None:
    cfg.forward_headers = [h.strip().lower() for h in cfg.forward_headers]
    owned = sorted(set(cfg.forward_headers) & _NOT_FORWARDABLE)
    if owned:
        raise ConfigError(f"config error at $.forward_headers: {owned} cannot be forwarded from clients (the gateway owns them, or they are per hop)")
    for name in ("header_timeout_s", "body_timeout_s", "max_connections"):
        if getattr(cfg.limits, name) <= 0:
            raise ConfigError(f"config error at $.limits.{name}: must be > 0")
    for i, r in enumerate(cfg.replicas):
        if r.data_parallel_size < 1 or (r.data_parallel_rank is not None and r.data_parallel_rank < 0):
            raise ConfigError(f"config error at $.replicas[{i}]: data_parallel_size must be >= 1 and data_parallel_rank >= 0")
        if r.data_parallel_size > 1 and r.data_parallel_rank is not None:
            raise ConfigError(f"config error at $.replicas[{i}]: set data_parallel_size (all ranks) or data_parallel_rank (one), not both")
    cfg.replicas = [rank for r in cfg.replicas for rank in expand_data_parallel(r)]
    ids = [r.id for r in cfg.replicas]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"config error at $.replicas: duplicate replica ids {dupes}")
    for i, r in enumerate(cfg.replicas):
        if not r.url.startswith(("http://", "https://")):
            raise ConfigError(f"config error at $.replicas[{i}].url: must start with http:// or https://, got {r.url!r}")
        if r.api_key is not None and r.api_key_env is not None:
            raise ConfigError(f"config error at $.replicas[{i}]: set api_key or api_key_env, not both")
        if r.api_key is not None and not r.api_key.strip():
            raise ConfigError(f"config error at $.replicas[{i}].api_key: empty (remove it for a replica without a key)")
        if r.api_key_env is not None and not os.environ.get(r.api_key_env):
            raise ConfigError(
                f"config error at $.replicas[{i}].api_key_env: environment variable {r.api_key_env!r} is "
                + ("empty" if r.api_key_env in os.environ else "not set")
                + f" (replica {r.id}'s API key)"
            )
    for name, m in cfg.models.items():
        if m.block_size <= 0:
            raise ConfigError(f"config error at $.models.{name}.block_size: must be positive")
        if m.prefix_hash_algo is not None and m.prefix_hash_algo not in HASH_ALGOS:
            raise ConfigError(f"config error at $.models.{name}.prefix_hash_algo: one of {', '.join(HASH_ALGOS)}, got {m.prefix_hash_algo!r}")
    if cfg.limits.max_inflight <= 0 or cfg.limits.max_queue < 0:
        raise ConfigError("config error at $.limits: max_inflight must be > 0 and max_queue >= 0")
    if cfg.pd.threshold < 0:
        raise ConfigError("config error at $.pd.threshold: must be >= 0")
    for path, value in (
        ("limits.connect_timeout_s", cfg.limits.connect_timeout_s),
        ("limits.first_byte_timeout_s", cfg.limits.first_byte_timeout_s),
        ("limits.read_timeout_s", cfg.limits.read_timeout_s),
        ("limits.upstream_keepalive_s", cfg.limits.upstream_keepalive_s),
        ("limits.queue_timeout_s", cfg.limits.queue_timeout_s),
        ("pd.prefill_timeout_s", cfg.pd.prefill_timeout_s),
        ("pd.decode_timeout_s", cfg.pd.decode_timeout_s if cfg.pd.decode_timeout_s is not None else 1.0),
        ("pd.lease_s", cfg.pd.lease_s),
        ("index.loss_check_s", cfg.index.loss_check_s),
        ("index.share_ttl_s", cfg.index.share_ttl_s),
        ("index.share_flush_ms", cfg.index.share_flush_ms),
    ):
        if value <= 0:
            raise ConfigError(f"config error at $.{path}: must be > 0, got {value}")
    if cfg.limits.max_retries < 0 or cfg.limits.max_body_bytes <= 0:
        raise ConfigError("config error at $.limits: max_retries must be >= 0 and max_body_bytes > 0")
    if cfg.discovery is not None:
        _check_discovery(cfg.discovery)
    _check_tracing(cfg.tracing)
    if cfg.index.share_wait_ms < 0:
        raise ConfigError(f"config error at $.index.share_wait_ms: must be >= 0, got {cfg.index.share_wait_ms}")
    if cfg.index.share_speculative_s < 0:
        raise ConfigError(f"config error at $.index.share_speculative_s: must be >= 0, got {cfg.index.share_speculative_s}")
    backend = cfg.index.backend
    if backend != "memory" and not backend.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"config error at $.index.backend: 'memory' or a redis:// URL, got {backend!r}")


def _check_discovery(d: DiscoveryConfig) -> None:
    if (d.kind == "inferencepool") != bool(d.inference_pool):
        raise ConfigError(
            "config error at $.discovery.inference_pool: "
            + ("required with kind inferencepool" if d.kind == "inferencepool" else "only with kind inferencepool")
        )
    for name in ("port", "kv_events_port", "replay_port"):
        value = getattr(d, name)
        if value is not None and not 0 < value < 65536:
            raise ConfigError(f"config error at $.discovery.{name}: a port (1..65535), got {value}")
    for name in ("watch_timeout_s", "backoff_s", "backoff_max_s", "initial_sync_timeout_s", "prefill_tokens_per_s", "page_size"):
        if getattr(d, name) <= 0:
            raise ConfigError(f"config error at $.discovery.{name}: must be > 0")
    if d.api_key_env is not None and not os.environ.get(d.api_key_env):
        raise ConfigError(f"config error at $.discovery.api_key_env: environment variable {d.api_key_env!r} is not set (the pods' API key)")


def _check_tracing(t: TracingConfig) -> None:
    if not 0.0 <= t.sample_ratio <= 1.0:
        raise ConfigError(f"config error at $.tracing.sample_ratio: a fraction in [0, 1], got {t.sample_ratio}")
    if not t.otlp_endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"config error at $.tracing.otlp_endpoint: must start with http:// or https://, got {t.otlp_endpoint!r}")
    if not t.service_name.strip():
        raise ConfigError("config error at $.tracing.service_name: empty")


def load_config(path: str | Path | None) -> GatewayConfig:
    """Read and validate a YAML file (None → all defaults)."""
    if path is None:
        return parse_config({})
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return parse_config(data)
