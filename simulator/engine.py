"""The simulated engine: continuous batching with a latency model where the physics shows.

Each scheduler step admits waiting requests (FIFO) while the running batch has room
(``max_num_seqs``), the step's token budget lasts (``max_num_batched_tokens``, chunked
prefill) and KV blocks can be allocated. The step then "runs" for

    prefill_tokens / prefill_rate            (compute-bound: only *uncached* tokens cost)
  + decode_step_ms + per-KV-token term       (memory-bound: grows with the batch's context)
  + a fixed overhead

times ``time_scale``, after which prefill progress and one new token per decoding request are
applied, newly full blocks are hashed and cached (BlockStored), and the step's KV events are
published as one batch — as vLLM's scheduler does once per step.

Outputs are deterministic: the tokens of a request depend only on the replica's seed and the
prompt, so tests can assert on text and two replicas with one seed answer alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvindex.tokenize import Tokenizer

from .config import SimConfig
from .prefix_cache import Allocation, NoSpace, PrefixCache

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


@dataclass
class Request:
    """One generation request inside the engine."""

    id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    lora: str | None = None
    salt: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    # P/D
    remote_decode: bool = False  # prefill role: keep blocks for a decode replica to pull
    remote_prefill: dict[str, Any] | None = None  # decode role: pull these blocks first
    # progress
    alloc: Allocation | None = None
    computed: int = 0  # prompt tokens whose KV exists
    cached_tokens: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token_text, finish_reason|None)
    aborted: bool = False

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Engine:
    """The scheduler loop, the prefix cache, and the request bookkeeping of one replica."""

    def __init__(self, cfg: SimConfig, tokenizer: Tokenizer, publish: Callable[[list], None] | None = None) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.cache = PrefixCache(cfg.num_blocks, cfg.block_size, cfg.hash_algo, cfg.hash_seed)
        self.publish = publish or (lambda events: None)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.word_ids = self._word_vocabulary()
        # hooks set by the P/D layer
        self.on_prefill_done: Callable[[Request], None] | None = None
        self.pull_remote: Callable[[Request], Any] | None = None
        # statistics for metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.ttfts: list[float] = []
        self.on_finished: list[Callable[[Request], None]] = []
        self.lora_running: dict[str, int] = {}

    def _word_vocabulary(self) -> list[int]:
        """Single-token words with a leading space: generated text reads like words."""
        words = "the model answers with a short and deterministic sentence about caches blocks tokens routing prefix replica fast".split()
        ids: list[int] = []
        for w in words:
            enc = self.tok.encode(" " + w, add_special_tokens=False)
            if len(enc) == 1:
                ids.append(enc[0])
        if not ids:
            ids = [i for i in range(min(200, self.tok.vocab_size)) if self.tok.id_to_token(i)]
        return ids

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- requests -------------------------------------------------------------------------------

    def extra_keys(self, req: Request, n_blocks: int) -> list[tuple | None]:
        """vLLM 0.33's tagged extra keys per block: LoRA on every block, cache salt on block 0."""
        out: list[tuple | None] = []
        for i in range(n_blocks):
            parts: list[tuple] = []
            if req.lora:
                parts.append(("lora", req.lora, f"/adapters/{req.lora}"))
            if i == 0 and req.salt:
                parts.append(("cache_salt", req.salt))
            out.append(tuple(parts) if parts else None)
        return out

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        """The client went away: free everything the request holds."""
        if req.finish_reason is not None:
            return
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
            self._finish(req, FINISH_ABORT)
        self._wake.set()

    def _next_token(self, req: Request) -> int:
        digest = hashlib.blake2b(repr((self.cfg.seed, req.prompt[-64:], len(req.prompt), len(req.output))).encode(), digest_size=8).digest()
        return self.word_ids[int.from_bytes(digest, "big") % len(self.word_ids)]

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            await self._step()

    def _admit(self, budget: int) -> None:
        cfg = self.cfg
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.remote_prefill is not None and req.alloc is None:
                if not self._start_remote(req):
                    break
                continue
            if req.alloc is None:
                n_full = len(req.prompt) // cfg.block_size
                digests = self.cache.prompt_digests(req.prompt, self.extra_keys(req, n_full))
                try:
                    req.alloc = self.cache.allocate_prompt(digests, len(req.prompt) + 1)
                except NoSpace:
                    break
                hit_tokens = req.alloc.cached_blocks * cfg.block_size
                req.computed = min(hit_tokens, len(req.prompt) - 1)  # always compute the last token
                req.cached_tokens = req.computed
            self.waiting.popleft()
            self.running.append(req)
            if req.lora:
                self.lora_running[req.lora] = self.lora_running.get(req.lora, 0) + 1
            budget -= min(budget, len(req.prompt) - req.computed)

    def _start_remote(self, req: Request) -> bool:
        """Decode role: allocate the prompt's blocks and pull the KV from the prefill replica."""
        cfg = self.cfg
        n_full = len(req.prompt) // cfg.block_size
        digests = self.cache.prompt_digests(req.prompt, self.extra_keys(req, n_full))
        try:
            req.alloc = self.cache.allocate_prompt(digests, len(req.prompt) + 1)
        except NoSpace:
            req.alloc = None
            return False
        self.waiting.popleft()
        asyncio.create_task(self._pull_then_run(req))
        return True

    async def _pull_then_run(self, req: Request) -> None:
        ok = False
        if self.pull_remote is not None:
            try:
                ok = bool(await self.pull_remote(req))
            except Exception:
                ok = False
        if req.aborted:
            self._finish(req, FINISH_ABORT)
            return
        if ok:
            req.computed = len(req.prompt)  # the prompt's KV arrived: nothing to recompute
            req.cached_tokens = len(req.prompt)
            assert req.alloc is not None
            self.cache.commit_full_blocks(req.alloc, req.prompt, self.extra_keys(req, len(req.prompt) // self.cfg.block_size), req.lora)
        else:
            # vLLM's recompute policy: a failed load is recomputed locally
            req.computed = req.alloc.cached_blocks * self.cfg.block_size if req.alloc else 0
            req.computed = min(req.computed, len(req.prompt) - 1)
            req.cached_tokens = req.computed
        req.remote_prefill = None
        self.running.append(req)
        self._wake.set()

    async def _step(self) -> None:
        cfg = self.cfg
        # decoding requests take one token each from the step's budget; prefill gets the rest
        decoding = [r for r in self.running if not r.prefilling]
        if self.waiting:
            self._admit(cfg.max_num_batched_tokens - len(decoding))
        prefill_plan: list[tuple[Request, int]] = []
        left = max(0, cfg.max_num_batched_tokens - len(decoding))
        for r in self.running:
            if r.prefilling and left > 0:
                chunk = min(left, len(r.prompt) - r.computed)
                prefill_plan.append((r, chunk))
                left -= chunk
        prefill_tokens = sum(c for _, c in prefill_plan)
        kv_tokens = sum(len(r.prompt) + len(r.output) for r in decoding)
        step_s = cfg.step_overhead_ms / 1000
        if prefill_tokens:
            step_s += prefill_tokens / cfg.prefill_tokens_per_s
        if decoding:
            step_s += (cfg.decode_step_ms + cfg.decode_ms_per_1k_kv_tokens * kv_tokens / 1000) / 1000
        if not prefill_plan and not decoding:
            # nothing runnable (e.g. waiting for blocks or remote KV): wait for a change
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
            self._flush_events()
            return
        if cfg.time_scale > 0:
            await asyncio.sleep(step_s * cfg.time_scale)
        else:
            await asyncio.sleep(0)
        now = time.monotonic()
        for r, chunk in prefill_plan:
            if r.aborted:
                continue
            r.computed += chunk
            assert r.alloc is not None
            self.cache.commit_full_blocks(r.alloc, r.prompt[: r.computed], self.extra_keys(r, r.computed // cfg.block_size), r.lora)
            if not r.prefilling:
                self.prompt_tokens_total += len(r.prompt)
                if r.remote_decode and self.on_prefill_done is not None:
                    self.on_prefill_done(r)  # KV ready for the decode replica, before the response goes out
                self._emit_token(r, now)
        for r in decoding:
            if r.aborted or r.finish_reason is not None:
                continue
            self._emit_token(r, now)
        for r in list(self.running):
            if r.aborted and r.finish_reason is None:
                self._finish(r, FINISH_ABORT)
        self._flush_events()

    def _emit_token(self, r: Request, now: float) -> None:
        if r.finish_reason is not None:
            return
        tid = self._next_token(r)
        r.output.append(tid)
        piece = self.tok.decode([tid])
        r.text += piece
        self.generation_tokens_total += 1
        if r.first_token_at is None:
            r.first_token_at = now
            self.ttfts.append(now - r.arrival)
        assert r.alloc is not None
        total = len(r.prompt) + len(r.output)
        try:
            self.cache.grow(r.alloc, total + 1)
        except NoSpace:
            pass  # a real engine would preempt; here the request simply stops caching decode blocks
        held = min(total, len(r.alloc.blocks) * self.cfg.block_size)
        self.cache.commit_full_blocks(r.alloc, (r.prompt + r.output)[:held], self.extra_keys(r, held // self.cfg.block_size), r.lora)
        finish = None
        stop_hit = next((s for s in r.stop if s and s in r.text), None) if len(r.output) >= r.min_tokens else None
        if stop_hit is not None:
            r.text = r.text[: r.text.index(stop_hit)]
            finish = FINISH_STOP
        elif len(r.output) >= r.max_tokens:
            finish = FINISH_LENGTH
        r.events.put_nowait((piece if finish != FINISH_STOP else "", None))
        if finish is not None:
            self._finish(r, finish)

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        r.finished_at = time.monotonic()
        if r in self.running:
            self.running.remove(r)
            if r.lora:
                self.lora_running[r.lora] = max(0, self.lora_running.get(r.lora, 1) - 1)
        if r.alloc is not None and not (r.remote_decode and reason != FINISH_ABORT):
            self.cache.release(r.alloc)
        r.events.put_nowait(("", reason))
        for cb in self.on_finished:
            cb(r)

    def release_remote(self, r: Request) -> None:
        """Prefill role: the decode replica has pulled (or the lease ran out): unpin the blocks."""
        if r.alloc is not None and r.alloc.blocks:
            self.cache.release(r.alloc)
        self._flush_events()

    def _flush_events(self) -> None:
        events = self.cache.take_events()
        if events:
            self.publish(events)

    def reset_prefix_cache(self) -> bool:
        ok = self.cache.reset()
        self._flush_events()
        return ok
