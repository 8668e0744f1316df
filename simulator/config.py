"""Every knob of a simulated replica, with defaults that resemble an 8B model on one H100.

Latency defaults, and why:
* prefill ~ 12k tokens/s: an 8B dense model needs ~16 GFLOP per token; an H100 sustains
  roughly 200–400 TFLOP/s of useful bf16 work in prefill, i.e. 12–25k tokens/s. We take the
  low end because real batches are not perfectly packed.
* decode step ~ 7 ms + 0.02 ms per 1k tokens of KV in the batch: a step reads all weights
  (16 GB at ~3 TB/s ≈ 5–6 ms) plus every running sequence's KV (128 KiB per token for a
  Llama-3-8B-like GQA model: 1k tokens ≈ 128 MiB ≈ 0.04 ms), plus scheduling overhead.
``time_scale`` multiplies every simulated duration (0 = no sleeping at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvindex.events import MAP_FORM_0_27

from .vllm_versions import VllmProfile
from .vllm_versions import profile as vllm_profile


@dataclass
class SimConfig:
    model: str = "kvgate/demo-8b"
    host: str = "127.0.0.1"
    port: int = 0  # HTTP; 0: any free port, bound by whoever starts the replica (then set to the one it got)
    role: str = "both"  # both | prefill | decode (kv_both in vLLM terms: any replica can do either)
    block_size: int = 16
    num_blocks: int = 2048
    hash_algo: str = "sha256"
    hash_seed: str | None = None  # PYTHONHASHSEED of the replica (None: vLLM's fixed default seed)
    tokenizer: str = "demo"
    kv_events: bool = True
    kv_events_port: int = 0  # 0: any free port, bound by the replica itself (then set to the one it got)
    replay: bool = True  # serve the replay ROUTER (vLLM's replay_endpoint) next to the PUB socket
    replay_port: int = 0  # 0: any free port, as kv_events_port
    kv_events_topic: str = ""
    legacy_events: bool = False  # the 0.14 array form on the wire, whatever ``vllm_version`` says (older option)
    #: the vLLM release to behave like: event form, hash extra keys, replay frames, NONE_HASH
    #: seeding (simulator/vllm_versions.py says what differs); "0.10" ... "0.33"
    vllm_version: str = "0.33"
    #: vLLM 0.33's lookahead block hashes (EAGLE drafters): tokens after each block in its hash
    hash_lookahead_tokens: int = 0
    replay_buffer: int = 10_000
    time_scale: float = 1.0
    seed: int = 0
    max_model_len: int = 8192
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    prefill_tokens_per_s: float = 12_000.0
    decode_step_ms: float = 7.0
    decode_ms_per_1k_kv_tokens: float = 0.02
    step_overhead_ms: float = 0.3
    lora_modules: list[str] = field(default_factory=list)
    kv_block_bytes: int = 4096  # bytes of "KV" per block moved in P/D transfers
    lease_s: float = 30.0  # how long a prefill replica keeps blocks for a decode replica to pull (vLLM: VLLM_NIXL_ABORT_REQUEST_TIMEOUT, 480 s)
    side_channel_host: str = ""  # advertised as remote_host (vLLM: VLLM_NIXL_SIDE_CHANNEL_HOST); "" = host, or this machine's address when host is a wildcard
    side_channel_port: int = 0  # vLLM: VLLM_NIXL_SIDE_CHANNEL_PORT (5600); 0 = a free port
    engine_id: str = ""  # NIXL engine id; "" = derived from host/port
    #: auto: NIXL for prefill/decode replicas, the TCP side channel for role both (NIXL's
    #: start-up costs ~0.4 s a process, and a both replica rarely moves KV); nixl | tcp: forced
    kv_transfer: str = "auto"
    prefer_nixl: bool = True  # False forces tcp (kept for older callers)
    embedding_dim: int = 64
    #: vLLM's ``--api-key`` (one key or several, any of them accepted): ``/v1/*`` then needs
    #: ``Authorization: Bearer KEY`` and answers 401 ``{"error": "Unauthorized"}`` without it;
    #: /health, /metrics, /version, /tokenize, /detokenize stay open. None or empty: no auth
    api_key: str | list[str] | None = None

    def api_keys(self) -> list[str]:
        """The accepted keys, empty ones dropped (vLLM ignores an empty VLLM_API_KEY)."""
        keys = [self.api_key] if isinstance(self.api_key, str) else list(self.api_key or [])
        return [k for k in keys if k]

    def profile(self) -> VllmProfile:
        return vllm_profile(self.vllm_version)

    def event_form(self) -> bool | int:
        """How events go on the wire (``kvindex.events.encode_batch``'s ``legacy``): False for
        0.33's map form, the array length for 0.10-0.20, ``MAP_FORM_0_27`` for 0.27's map."""
        if self.legacy_events:
            return 7
        prof = self.profile()
        if prof.release == "0.27":
            return MAP_FORM_0_27
        return prof.array_fields or False

    def validate(self) -> None:
        prof = self.profile()  # raises for an unknown release
        if self.hash_lookahead_tokens < 0 or (self.hash_lookahead_tokens and not prof.lookahead):
            raise ValueError(f"hash_lookahead_tokens needs vLLM 0.33 or later and must be >= 0 (vllm_version {self.vllm_version})")
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError("block_size and num_blocks must be positive")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if self.kv_transfer not in ("auto", "nixl", "tcp"):
            raise ValueError(f"kv_transfer must be auto, nixl or tcp, got {self.kv_transfer!r}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be positive")
