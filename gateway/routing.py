"""From an admitted request to a plan: which replicas, in which order, for one hop or two.

tokenize (as vLLM would) → kvgate block keys → index lookup → scheduler, all local on the hot
path. Every stage degrades instead of failing the request: no tokenizer ⇒ ask a replica's
/tokenize; that fails ⇒ route on load alone; the index (Redis) is slow or down ⇒
``index_ok=False`` and load decides.

The prefill→decode choice is a routing decision too, made here once: P/D applies when it is
on and a prefill-role replica serves the model; then if the best decode replica leaves fewer
than ``pd.threshold`` tokens uncached one hop there is cheaper than moving KV, else the plan
names the prefill replicas as well. ``gateway.hops`` carries the plan out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.responses import Response

from kvindex.hashing import block_keys
from kvindex.index import KVIndex, PrefixMatch
from kvindex.tokenize import CachingTokenizer, ChatTemplateError, load_tokenizer, remote_tokenize
from scorers.base import PHASE_ANY, PHASE_DECODE, PHASE_PREFILL, ROLE_PREFILL, EndpointState, RequestContext
from scorers.scheduler import Scheduler

from .config import GatewayConfig
from .errors import GatewayError, bad_request
from .fleet import Fleet
from .forward import RelayResponse
from .hops import Hops, Plan
from .metrics import GatewayMetrics
from .request import COMPLETIONS, EMBEDDINGS, ProxyRequest, Trace, req_log

log = logging.getLogger("kvgate.routing")

SESSION_HEADERS = ("x-session-id", "x-kvgate-session")


def _max_tokens(body: Mapping[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 16 if "messages" not in body else 256


def _session(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    for h in SESSION_HEADERS:
        if h in headers:
            return headers[h]
    user = body.get("user")
    return user if isinstance(user, str) else None


class Router:
    """Owns tokenizers, the index handle and the scheduler; turns a request into a plan."""

    def __init__(
        self, cfg: GatewayConfig, fleet: Fleet, index: KVIndex, scheduler: Scheduler, client: httpx.AsyncClient, metrics: GatewayMetrics, hops: Hops
    ) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.index = index
        self.scheduler = scheduler
        self.client = client
        self.metrics = metrics
        self.hops = hops
        self._tokenizers: dict[str, CachingTokenizer | None] = {}

    async def route(self, req: ProxyRequest) -> Response | RelayResponse:
        """Plan the request, then hand it to the hops that carry the plan out."""
        return await self.hops.serve(req, await self.plan(req))

    async def plan(self, req: ProxyRequest, *, pd: bool = True) -> Plan:
        """Context (tokens, block keys, index lookup), profile, and the ranked replicas.

        ``pd=False`` plans a single hop whatever the configuration (the ext-proc picker,
        which cannot make two upstream calls). Raises 503 when no replica can serve it.
        """
        if req.kind != EMBEDDINGS:
            req.ctx = await self.build_context(req)
        req.profile = self.scheduler.profile_for(req.headers)
        if req_log.isEnabledFor(logging.DEBUG):
            req.trace = Trace(req.request_id, req.kind, req.model, req.stream, req.profile, req.ctx.prompt_tokens)
        ctx = req.ctx
        if not (pd and self.pd_applies(ctx)):
            return Plan(self.decide(req, PHASE_ANY))
        ranked = self.decide(req, PHASE_DECODE)
        if ctx.uncached_tokens(ranked[0].id) < self.cfg.pd.threshold:
            return Plan(ranked, pd=True)
        try:
            return Plan(ranked, pd=True, prefill=self.decide(req, PHASE_PREFILL))
        except GatewayError as exc:  # no prefill replica: the hops fall back (or fail) as configured
            return Plan(ranked, pd=True, prefill=[], prefill_error=exc.message)

    def pd_applies(self, ctx: RequestContext) -> bool:
        """P/D is on and a prefill-role replica serves the model.

        Healthy or not: when every prefill replica is down the request still gets a two-hop
        plan with no prefill candidates, so ``pd.on_prefill_failure`` decides (one hop,
        counted as a fallback, or 503).
        """
        if not self.cfg.pd.enabled or ctx.prompt_tokens == 0:
            return False
        return any(s.role == ROLE_PREFILL and s.serves(ctx.model, ctx.lora) for s in self.fleet.all())

    # -- tokenization ----------------------------------------------------------------------------

    def tokenizer_for(self, base_model: str) -> CachingTokenizer | None:
        if base_model not in self._tokenizers:
            spec = self.cfg.model_config(base_model).tokenizer
            self._tokenizers[base_model] = CachingTokenizer(load_tokenizer(spec)) if spec else None
        return self._tokenizers[base_model]

    async def tokens_for(self, req: ProxyRequest) -> list[int] | None:
        body = req.body
        tok = self.tokenizer_for(req.ctx.model)
        if req.kind == COMPLETIONS:
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
            return await self._remote_tokens(req, prompt=prompt)
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
            req,
            messages=body["messages"],
            add_generation_prompt=kwargs["add_generation_prompt"],
            continue_final_message=kwargs["continue_final_message"],
            tools=body.get("tools"),
            chat_template_kwargs=extra if isinstance(extra, dict) else None,
        )

    async def _remote_tokens(self, req: ProxyRequest, **kw: Any) -> list[int] | None:
        """No local tokenizer: ask one healthy replica's /tokenize; None if that fails too."""
        base = req.ctx.model
        for state in self.fleet.all():
            if state.healthy and base in state.models:
                try:
                    return await remote_tokenize(self.client, state.url, req.model, api_key=self.fleet.api_key(state.id), **kw)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == 401:
                        self.fleet.auth_rejected_by(state.id, "POST /tokenize")
                    continue
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
        return None

    # -- context + decision ------------------------------------------------------------------------

    def block_size(self, base_model: str) -> int:
        return self.index.block_size(base_model) or self.cfg.model_config(base_model).block_size

    async def lookup(self, keys: list[int], base_model: str) -> tuple[dict[str, PrefixMatch], bool]:
        if not keys:
            return {}, True
        try:
            found = await asyncio.wait_for(self.index.lookup(keys, model=base_model), self.cfg.index.lookup_timeout_ms / 1000)
            return dict(found), True
        except Exception as exc:  # Redis down, timeout, script error: degrade to load-only routing
            self.metrics.index_errors.inc()
            log.debug("index lookup failed: %s", exc)
            return {}, False

    async def build_context(self, req: ProxyRequest) -> RequestContext:
        t0 = time.perf_counter()
        body = req.body
        base, lora = req.ctx.model, req.ctx.lora
        tokens = await self.tokens_for(req)
        bs = self.block_size(base)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        keys = block_keys(tokens, bs, model=base, lora=lora, salt=salt) if tokens else []
        t1 = time.perf_counter()
        prefix, index_ok = await self.lookup(keys, base)
        self.metrics.sched_tokenize.observe(t1 - t0)
        self.metrics.sched_index.observe(time.perf_counter() - t1)
        return RequestContext(
            request_id=req.request_id,
            model=base,
            lora=lora,
            prompt_tokens=len(tokens) if tokens else 0,
            max_tokens=_max_tokens(body),
            block_size=bs,
            block_keys=keys,
            prefix=prefix,
            session_id=_session(body, req.headers),
            phase=PHASE_ANY,
            headers=req.headers,
            index_ok=index_ok,
        )

    def decide(self, req: ProxyRequest, phase: str = PHASE_ANY) -> list[EndpointState]:
        """Ranked endpoints for one hop; raises 503 when nothing can serve it."""
        ctx = req.ctx
        ctx.phase = phase
        t0 = time.perf_counter()
        decision = self.scheduler.schedule(ctx, self.fleet.all(), req.profile)
        self.metrics.sched_schedule.observe(time.perf_counter() - t0)
        if req.trace is not None:
            req.trace.scores[phase] = {k: round(v, 4) for k, v in decision.scores.items()}
        if not decision.ranked:
            raise GatewayError(503, f"no healthy replica can serve model '{ctx.lora or ctx.model}' ({phase} phase)", "no_healthy_replica")
        return decision.ranked
