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

Diagnosis: with ``KVGATE_SIM_STEP_TRACE=<dir>`` in its environment each engine appends one line
per step to ``<dir>/<role>-<pid>.steps`` (monotonic step start, sleep start, wake-up, end, the
planned sleep, decoding requests, prefill tokens), which separates a late wake-up (a starved or
blocked event loop) from work done inside the step.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvindex.tokenize import Tokenizer

from .config import SimConfig
from .prefix_cache import Allocation, BlockKeys, NoSpace, PrefixCache

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


class _Seq:
    """prompt + output as one read-only sequence, without copying either (for block slicing)."""

    __slots__ = ("a", "b")

    def __init__(self, a: list[int], b: list[int]) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, s: slice) -> list[int]:
        start, stop, _ = s.indices(len(self))
        n = len(self.a)
        if stop <= n:
            return self.a[start:stop]
        if start >= n:
            return self.b[start - n : stop - n]
        return self.a[start:] + self.b[: stop - n]


@dataclass(eq=False)
class Request:
    """One generation request inside the engine.

    ``id`` is the id the client sees (``cmpl-…``); ``engine_id`` is the engine-internal id,
    the client's id plus a random suffix as vLLM makes it, so two requests sharing an
    ``X-Request-Id`` never collide (P/D leases are keyed by it).
    """

    id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    lora: str | None = None
    lora_id: int | None = None
    lora_path: str | None = None
    salt: str | None = None
    sample: int = 0  # which of the request's ``n`` samples (0 for n=1): samples differ, prompts do not
    stream: bool = False  # per-token deltas wanted (``events`` queue)
    arrival: float = field(default_factory=time.monotonic)
    engine_id: str = ""
    # P/D
    remote_decode: bool = False  # prefill role: keep blocks for a decode replica to pull
    remote_prefill: dict[str, Any] | None = None  # decode role: pull these blocks first
    # progress
    alloc: Allocation | None = None
    computed: int = 0  # prompt tokens whose KV exists
    cached_tokens: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already released to the client
    finish_reason: str | None = None
    stop_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    events: asyncio.Queue | None = None  # streaming: (delta_text, finish_reason | None) per token
    done: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False
    keys: BlockKeys | None = None
    _gen_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.engine_id:
            self.engine_id = f"{self.id}-{uuid.uuid4().hex[:8]}"
        if self.stream and self.events is None:
            self.events = asyncio.Queue()
        self.keys = BlockKeys(self.lora, self.lora_path, self.salt, self.lora_id)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Engine:
    """The scheduler loop, the prefix cache, and the request bookkeeping of one replica."""

    #: steps that start within this long of the previous step's deadline run back to back
    CATCH_UP_S = 0.002

    def __init__(self, cfg: SimConfig, tokenizer: Tokenizer, publish: Callable[[list], None] | None = None) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.cache = PrefixCache(cfg.num_blocks, cfg.block_size, cfg.hash_algo, cfg.hash_seed, cfg.profile(), cfg.hash_lookahead_tokens)
        self.publish = publish or (lambda events: None)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pulling: set[Request] = set()  # decode role: waiting for remote KV (vLLM counts them as waiting)
        self._wake = asyncio.Event()
        self._step_end: float | None = None  # when the last step was due to end (monotonic)
        self._task: asyncio.Task | None = None
        self._pulls: set[asyncio.Task[None]] = set()  # running _pull_then_run tasks (the loop keeps only weak references)
        self.word_ids = self._word_vocabulary()
        self._piece = {i: self.tok.decode([i]) for i in self.word_ids}
        # hooks set by the P/D layer
        self.on_prefill_done: Callable[[Request], None] | None = None
        self.pull_remote: Callable[[Request], Any] | None = None
        self.on_remote_abort: Callable[[Request], None] | None = None
        # statistics for metrics
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.on_first_token: list[Callable[[Request, float], None]] = []
        self.on_finished: list[Callable[[Request], None]] = []
        self.lora_running: dict[str, int] = {}
        # KVGATE_SIM_STEP_TRACE=<dir>: one line per step (planned vs actual wall time), for diagnosis
        self._trace = None
        trace_dir = os.environ.get("KVGATE_SIM_STEP_TRACE")
        if trace_dir:
            self._trace = open(os.path.join(trace_dir, f"{cfg.role}-{os.getpid()}.steps"), "a", buffering=1 << 16)  # open for the engine's lifetime
            self._trace.write("t_begin t_sleep t_wake t_end planned_s decoding prefill_tokens\n")
            self._trace_n = 0

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
        if self._trace is not None:
            self._trace.flush()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- requests -------------------------------------------------------------------------------

    def extra_keys(self, req: Request, n_blocks: int) -> list[tuple | None]:
        """The extra keys per block as the simulated release hashes them (0.33: tagged LoRA on
        every block, cache salt on block 0)."""
        assert req.keys is not None
        return [self.cache.hash_key(req.keys, i) for i in range(n_blocks)]

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        """The client went away: free everything the request holds, stop counting it."""
        if req.finish_reason is not None:
            return
        req.aborted = True
        if req in self.waiting:
            self.waiting.remove(req)
            self._finish(req, FINISH_ABORT)
        elif req in self.running:
            self._finish(req, FINISH_ABORT)
        # a request still pulling its KV finishes when the pull returns
        self._flush_events()
        self._wake.set()

    def _next_token(self, req: Request) -> int:
        if not req._gen_prefix:
            # the repr of (seed, prompt tail, prompt length, n) without the closing part, computed once
            seed: Any = self.cfg.seed if req.sample == 0 else (self.cfg.seed, req.sample)
            req._gen_prefix = repr((seed, req.prompt[-64:], len(req.prompt), 0))[:-2]
        digest = hashlib.blake2b((req._gen_prefix + repr(len(req.output)) + ")").encode(), digest_size=8).digest()
        return self.word_ids[int.from_bytes(digest, "big") % len(self.word_ids)]

    def logprobs(self, req: Request, start: int, end: int, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Deterministic log probabilities of output tokens ``start:end``: each token's own (the
        highest: the simulated sampler is greedy-like) and ``top`` most likely tokens, itself
        first then other words of the vocabulary, each less likely than the one before."""
        out = []
        words = self.word_ids
        for pos in range(start, min(end, len(req.output))):
            tid = req.output[pos]
            digest = hashlib.blake2b(f"{req._gen_prefix}{pos}|lp".encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "big")
            own = -round((h % 997) / 997 * 0.6, 6)
            alts = [tid]
            k = h % len(words)
            while len(alts) < min(top, len(words)):
                w = words[k % len(words)]
                if w not in alts:
                    alts.append(w)
                k += 1
            out.append((tid, own, [(a, round(own - 0.9 * j, 6)) for j, a in enumerate(alts[:top])]))
        return out

    def piece(self, tid: int) -> str:
        """One token's text (as vLLM's logprobs show it)."""
        p = self._piece.get(tid)
        if p is None:
            p = self._piece[tid] = self.tok.decode([tid])
        return p

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            await self._step()

    def _allocate(self, req: Request) -> None:
        """Reuse the cached prefix (never the whole prompt: the last token is always computed)."""
        cfg = self.cfg
        assert req.keys is not None
        n_full = len(req.prompt) // cfg.block_size
        digests = self.cache.prompt_digests(req.prompt, req.keys, n_full)
        req.alloc = self.cache.allocate_prompt(
            digests, len(req.prompt) + 1, max_hit_blocks=(len(req.prompt) - 1) // cfg.block_size, prompt_tokens=len(req.prompt)
        )
        req.computed = req.alloc.cached_blocks * cfg.block_size
        req.cached_tokens = req.computed

    def _admit(self, budget: int) -> None:
        cfg = self.cfg
        while self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.remote_prefill is not None and req.alloc is None:
                if not self._start_remote(req):
                    break
                continue
            if req.alloc is None:
                try:
                    self._allocate(req)
                except NoSpace:
                    break
            self.waiting.popleft()
            self.running.append(req)
            if req.lora:
                self.lora_running[req.lora] = self.lora_running.get(req.lora, 0) + 1
            budget -= min(budget, len(req.prompt) - req.computed)

    def _start_remote(self, req: Request) -> bool:
        """Decode role: allocate the prompt's blocks and pull the uncached ones from the prefill replica."""
        try:
            self._allocate(req)
        except NoSpace:
            req.alloc = None
            return False
        self.waiting.popleft()
        self.pulling.add(req)
        task = asyncio.create_task(self._pull_then_run(req))
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)
        return True

    async def _pull_then_run(self, req: Request) -> None:
        ok = False
        if self.pull_remote is not None:
            try:
                ok = bool(await self.pull_remote(req))
            except Exception:
                ok = False
        self.pulling.discard(req)
        if req.aborted:
            self._finish(req, FINISH_ABORT)
            self._flush_events()
            return
        assert req.alloc is not None and req.keys is not None
        if ok:
            req.computed = len(req.prompt)  # the prompt's KV arrived: nothing to recompute
            req.cached_tokens = len(req.prompt)
            self.cache.commit_full_blocks(req.alloc, req.prompt, req.keys)
        # else: vLLM's recompute policy, a failed load is recomputed locally from the local hit
        req.remote_prefill = None
        self.running.append(req)
        if req.lora:
            self.lora_running[req.lora] = self.lora_running.get(req.lora, 0) + 1
        self._flush_events()
        self._wake.set()

    async def _step(self) -> None:
        cfg = self.cfg
        t_begin = time.monotonic()
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
            except TimeoutError:
                pass
            self._flush_events()
            return
        t_sleep = time.monotonic()
        if cfg.time_scale > 0:
            # Back-to-back steps are timed from the previous step's deadline, not from when the
            # loop woke up: asyncio rounds its epoll waits up to whole milliseconds, and ~0.8 ms
            # of overshoot per step (plus this step's bookkeeping) would otherwise pile up into a
            # decode step 10% slower than the model. After an idle or starved gap of more than
            # CATCH_UP_S, timing starts afresh instead of catching up.
            prev = self._step_end
            base = prev if prev is not None and 0.0 <= t_sleep - prev < self.CATCH_UP_S else t_sleep
            self._step_end = base + step_s * cfg.time_scale
            await asyncio.sleep(max(0.0, self._step_end - t_sleep))
        else:
            await asyncio.sleep(0)
        now = time.monotonic()
        for r, chunk in prefill_plan:
            if r.finish_reason is not None:
                continue
            r.computed += chunk
            assert r.alloc is not None and r.keys is not None
            self.cache.commit_full_blocks(r.alloc, r.prompt[: r.computed], r.keys)
            if not r.prefilling:
                self._emit_token(r, now)
        for r in decoding:
            if r.finish_reason is None:
                self._emit_token(r, now)
        self._flush_events()
        if self._trace is not None:
            self._trace.write(f"{t_begin:.6f} {t_sleep:.6f} {now:.6f} {time.monotonic():.6f} {step_s * cfg.time_scale:.6f} {len(decoding)} {prefill_tokens}\n")
            self._trace_n += 1
            if self._trace_n % 200 == 0:
                self._trace.flush()

    def _emit_token(self, r: Request, now: float) -> None:
        tid = self._next_token(r)
        r.output.append(tid)
        piece = self._piece.get(tid)
        if piece is None:
            piece = self._piece[tid] = self.tok.decode([tid])
        r.text += piece
        self.generation_tokens_total += 1
        if r.first_token_at is None:
            r.first_token_at = now
            self.prompt_tokens_total += len(r.prompt)  # vLLM counts a request's prompt at its first token
            for cb in self.on_first_token:
                cb(r, now - r.arrival)
        assert r.alloc is not None and r.keys is not None
        bs = self.cfg.block_size
        total = len(r.prompt) + len(r.output)
        try:
            self.cache.grow(r.alloc, total + 1)
        except NoSpace:
            pass  # a real engine would preempt; here the request simply stops caching decode blocks
        held = min(total, len(r.alloc.blocks) * bs)
        if held // bs > len(r.alloc.digests):
            self.cache.commit_full_blocks(r.alloc, _Seq(r.prompt, r.output)[:held], r.keys)
        finish = None
        if r.stop and len(r.output) >= r.min_tokens:
            scan_from = max(0, len(r.text) - len(piece) - r._holdback)
            for s in r.stop:
                idx = r.text.find(s, scan_from) if s else -1
                if idx >= 0:
                    r.text = r.text[:idx]
                    r.stop_reason = s
                    finish = FINISH_STOP
                    break
        if finish is None and len(r.output) >= r.max_tokens:
            finish = FINISH_LENGTH
        if finish is not None:
            delta = r.text[r.sent :]
            r.sent = len(r.text)
        else:
            # hold back what could still turn out to be the start of a stop string, as vLLM does
            safe = len(r.text) - r._holdback
            delta = r.text[r.sent : safe] if safe > r.sent else ""
            r.sent = max(r.sent, safe)
        if r.events is not None:
            r.events.put_nowait((delta, finish, len(r.output)))  # the count as of this token
        if finish is not None:
            self._finish(r, finish, notify=False)

    def _finish(self, r: Request, reason: str, notify: bool = True) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        r.finished_at = time.monotonic()
        if r in self.running:
            self.running.remove(r)
            if r.lora:
                self.lora_running[r.lora] = max(0, self.lora_running.get(r.lora, 1) - 1)
        if r.alloc is not None:
            if r.remote_decode and reason == FINISH_LENGTH and self.on_prefill_done is not None:
                # NixlConnector: a length-capped prefill keeps its blocks for the decode replica
                self.on_prefill_done(r)
            else:
                self.cache.release(r.alloc)
        if reason == FINISH_ABORT and r.remote_prefill is not None and self.on_remote_abort is not None:
            # aborted before its KV was pulled: tell the prefill replica to free the blocks
            self.on_remote_abort(r)
        if notify and r.events is not None:
            r.events.put_nowait(("", reason, len(r.output)))
        r.done.set()
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

    def reset_prefix_cache(self, force: bool = False) -> bool:
        ok = self.cache.reset(force)
        self._flush_events()
        return ok
