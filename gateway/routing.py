"""From an OpenAI request body to a routing decision, all local on the hot path.

tokenize (as vLLM would) → kvgate block keys → index lookup → scheduler. Every stage degrades
instead of failing the request: no tokenizer ⇒ ask a replica's /tokenize; that fails ⇒ route
on load alone; the index (Redis) is slow or down ⇒ ``index_ok=False`` and load decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from kvindex.hashing import block_keys
from kvindex.index import KVIndex, PrefixMatch
from kvindex.tokenize import CachingTokenizer, ChatTemplateError, load_tokenizer, remote_tokenize
from scorers.base import PHASE_ANY, EndpointState, RequestContext
from scorers.scheduler import Scheduler

from .config import GatewayConfig
from .endpoints import Fleet, ModelInfo
from .errors import GatewayError, bad_request
from .metrics import GatewayMetrics

log = logging.getLogger("kvgate.routing")

SESSION_HEADERS = ("x-session-id", "x-kvgate-session")


@dataclass(slots=True)
class Prompt:
    """The tokens a replica will see for this request (or None when unknown)."""

    tokens: list[int] | None
    max_tokens: int


def _max_tokens(body: Mapping[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 16 if "messages" not in body else 256


def validate_body(kind: str, body: Any) -> None:
    """The checks an OpenAI server makes before doing any work (400 with the offending param)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    elif kind == "completions":
        p = body.get("prompt")
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, (str, int)) or isinstance(x, list) for x in p))
        if not ok:
            raise bad_request("'prompt' must be a string, a list of strings, or a list of token ids", "prompt")
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{key}' must be a positive integer", key)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean", "stream")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise bad_request("'n' must be a positive integer", "n")


class Router:
    """Owns tokenizers, the index handle and the scheduler; builds contexts and decisions."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, index: KVIndex | None, scheduler: Scheduler, client: httpx.AsyncClient, metrics: GatewayMetrics) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.index = index
        self.scheduler = scheduler
        self.client = client
        self.metrics = metrics
        self._tokenizers: dict[str, CachingTokenizer | None] = {}

    # -- tokenization ----------------------------------------------------------------------------

    def tokenizer_for(self, base_model: str) -> CachingTokenizer | None:
        if base_model not in self._tokenizers:
            spec = self.cfg.model_config(base_model).tokenizer
            self._tokenizers[base_model] = CachingTokenizer(load_tokenizer(spec)) if spec else None
        return self._tokenizers[base_model]

    async def tokens_for(self, kind: str, body: Mapping[str, Any], info: ModelInfo) -> list[int] | None:
        tok = self.tokenizer_for(info.base)
        if kind == "completions":
            prompt = body["prompt"]
            if isinstance(prompt, list):
                first = prompt[0]
                if isinstance(first, int):
                    return [int(x) for x in prompt]  # a token-id prompt passes through
                if isinstance(first, list):
                    return [int(x) for x in first]  # a batch: route by its first prompt
                prompt = first
            add_special = body.get("add_special_tokens", True)
            if tok is not None:
                return tok.encode(prompt, add_special_tokens=bool(add_special))
            return await self._remote_tokens(info, prompt=prompt)
        kwargs: dict[str, Any] = {
            "add_generation_prompt": bool(body.get("add_generation_prompt", True)),
            "continue_final_message": bool(body.get("continue_final_message", False)),
        }
        if body.get("tools") is not None:
            kwargs["tools"] = body["tools"]
        extra = body.get("chat_template_kwargs")
        if isinstance(extra, dict):
            kwargs.update(extra)
        if tok is not None:
            try:
                return tok.encode_chat(body["messages"], **kwargs)
            except ChatTemplateError as exc:
                raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None
        return await self._remote_tokens(
            info,
            messages=body["messages"],
            add_generation_prompt=kwargs["add_generation_prompt"],
            continue_final_message=kwargs["continue_final_message"],
            tools=body.get("tools"),
            chat_template_kwargs=extra if isinstance(extra, dict) else None,
        )

    async def _remote_tokens(self, info: ModelInfo, **kw: Any) -> list[int] | None:
        """No local tokenizer: ask one healthy replica's /tokenize; None if that fails too."""
        for state in self.fleet.all():
            if state.healthy and info.base in state.models:
                try:
                    return await remote_tokenize(self.client, state.url, info.id, api_key=self.fleet.api_key(state.id), **kw)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == 401:
                        self.fleet.auth_rejected_by(state.id, "POST /tokenize")
                    continue
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
        return None

    # -- context + decision ------------------------------------------------------------------------

    def block_size(self, base_model: str) -> int:
        seen = self.index.block_size(base_model) if self.index is not None else None
        return seen or self.cfg.model_config(base_model).block_size

    async def lookup(self, keys: list[int], base_model: str) -> tuple[dict[str, PrefixMatch], bool]:
        if self.index is None or not keys:
            return {}, self.index is not None
        try:
            found = await asyncio.wait_for(self.index.lookup(keys, model=base_model), self.cfg.index.lookup_timeout_ms / 1000)
            return dict(found), True
        except Exception as exc:  # Redis down, timeout, script error: degrade to load-only routing
            self.metrics.index_errors.inc()
            log.debug("index lookup failed: %s", exc)
            return {}, False

    async def build_context(self, request_id: str, kind: str, body: Mapping[str, Any], info: ModelInfo, headers: Mapping[str, str]) -> RequestContext:
        t0 = time.perf_counter()
        tokens = await self.tokens_for(kind, body, info)
        bs = self.block_size(info.base)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        keys = block_keys(tokens, bs, model=info.base, lora=info.lora, salt=salt) if tokens else []
        t1 = time.perf_counter()
        prefix, index_ok = await self.lookup(keys, info.base)
        self.metrics.sched_tokenize.observe(t1 - t0)
        self.metrics.sched_index.observe(time.perf_counter() - t1)
        session = None
        for h in SESSION_HEADERS:
            if h in headers:
                session = headers[h]
                break
        if session is None and isinstance(body.get("user"), str):
            session = body["user"]
        return RequestContext(
            request_id=request_id,
            model=info.base,
            lora=info.lora,
            prompt_tokens=len(tokens) if tokens else 0,
            max_tokens=_max_tokens(body),
            block_size=bs,
            block_keys=keys,
            prefix=prefix,
            session_id=session,
            phase=PHASE_ANY,
            headers=headers,
            index_ok=index_ok,
        )

    def decide(self, ctx: RequestContext, phase: str = PHASE_ANY, profile: str | None = None, trace=None) -> list[EndpointState]:
        """Ranked endpoints for one hop; raises 503 when nothing can serve it.

        ``trace`` (a ``forward.Trace``, only when debug logging is on) collects the scores
        for the request's one log line.
        """
        ctx.phase = phase
        t0 = time.perf_counter()
        decision = self.scheduler.schedule(ctx, self.fleet.all(), profile)
        self.metrics.sched_schedule.observe(time.perf_counter() - t0)
        if trace is not None:
            trace.scores[phase] = {k: round(v, 4) for k, v in decision.scores.items()}
        if not decision.ranked:
            raise GatewayError(503, f"no healthy replica can serve model '{ctx.lora or ctx.model}' ({phase} phase)", "no_healthy_replica")
        return decision.ranked
