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
import functools
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import httpx
from starlette.responses import Response

from kvindex.hashing import block_keys
from kvindex.index import IndexUnavailableError, KVIndex, PrefixMatch
from kvindex.outage import RateLimited
from kvindex.tokenize import (
    CachingTokenizer,
    ChatOptions,
    ChatTemplateError,
    OverBudget,
    PoolBusy,
    PromptTooLong,
    TemplateLimitError,
    TemplateSandbox,
    TextTooLong,
    TokenizePool,
    load_tokenizer,
    remote_tokenize,
)
from scorers.base import PHASE_ANY, PHASE_DECODE, PHASE_PREFILL, ROLE_PREFILL, Decision, EndpointState, RequestContext
from scorers.scheduler import Scheduler

from . import responses
from .config import GatewayConfig
from .errors import GatewayError, bad_request
from .fleet import Fleet
from .forward import RelayResponse
from .hops import Hops, Plan
from .metrics import GatewayMetrics
from .request import COMPLETIONS, RESPONSES, UNROUTED, ProxyRequest, Trace, req_log
from .shared_load import SharedLoad
from .worker_share import WorkerShare

log = logging.getLogger("kvgate.routing")

SESSION_HEADERS = ("x-session-id", "x-kvgate-session")

T = TypeVar("T")

#: token ids travel as uint32 everywhere (vLLM, the KV events, our block keys); no vocabulary is larger
UINT32 = 1 << 32

#: vLLM 0.33's refusal of a request-supplied template without --trust-request-chat-template
#: how long the replicas get to say whether they hold a response id the gateway does not know
RESPONSE_PROBE_TIMEOUT_S = 1.0

UNTRUSTED_TEMPLATE = "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template."


# -- vLLM's 400s, word for word (vLLM 0.33: renderers/params.py, sampling_params.py, renderers/base.py) --


def vllm_error(message: str, parameter: str, value: Any) -> GatewayError:
    """A VLLMValidationError with a parameter, as vLLM renders it: ``str(exc)`` appends both."""
    return bad_request(f"{message} (parameter={parameter}, value={value})", parameter)


def too_many_tokens(max_len: int, count: int) -> GatewayError:
    # vLLM tokenizes text with truncation at max_len + 1, hence "at least" for that count
    qualifier = "at least " if count == max_len + 1 else ""
    return vllm_error(
        f"This model's maximum context length is {max_len} tokens. However, your prompt contains {qualifier}{count} input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt.",
        "input_tokens",
        count,
    )


def too_many_chars(max_len: int, chars: int, bound: int) -> GatewayError:
    return vllm_error(
        f"This model's maximum context length is {max_len} tokens. However, your prompt contains {chars} characters "
        f"(more than {bound} characters, which is the upper bound for {max_len} input tokens). Please reduce the length of the input prompt.",
        "input_text",
        chars,
    )


def too_many_output_tokens(name: str, out: int, max_len: int) -> GatewayError:
    return vllm_error(f"{name}={out} cannot be greater than max_model_len={max_len}. Please request fewer output tokens.", name, out)


def no_room_for_output() -> GatewayError:
    """The prompt fills the whole context: vLLM's get_max_tokens gives 0, SamplingParams refuses it."""
    return vllm_error("max_tokens must be at least 1, got 0.", "max_tokens", 0)


def _summarize(value: Any) -> Any:
    """vLLM's bounded echo of a rejected value in a validation error."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "...[truncated]"
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


def validation_error(loc: str, kind: str, msg: str, value: Any, ctx: dict | None = None) -> GatewayError:
    """vLLM's RequestValidationError 400 (pydantic's error, ``loc`` cleaned to a dotted path).

    One error is reported: pydantic lists one per member of the ``prompt`` union that failed."""
    err: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _summarize(value)}
    if ctx:
        err["ctx"] = ctx
    return bad_request(f"1 validation error:\n  {err}", loc)


def _check_ids(ids: list, loc: str) -> list[int]:
    """A token-id prompt as pydantic's ``list[Annotated[int, Field(ge=0)]]`` takes it (lax mode:
    ``true`` is 1, ``2.0`` is 2)."""
    floats = False
    for i, t in enumerate(ids):
        if isinstance(t, int | float) and t < 0:
            raise validation_error(f"{loc}.{i}", "greater_than_equal", "Input should be greater than or equal to 0", t, {"ge": 0})
        if isinstance(t, int):
            continue
        if isinstance(t, float) and t.is_integer():
            floats = True
        elif isinstance(t, float):
            raise validation_error(f"{loc}.{i}", "int_from_float", "Input should be a valid integer, got a number with a fractional part", t)
        elif isinstance(t, str):
            raise validation_error(f"{loc}.{i}", "int_parsing", "Input should be a valid integer, unable to parse string as an integer", t)
        else:
            raise validation_error(f"{loc}.{i}", "int_type", "Input should be a valid integer", t)
    return [int(t) for t in ids] if floats else ids


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompt(s) of a completion request — a string, a list of strings, a list of token ids
    or a list of token-id lists — each checked as vLLM's request model checks it (400, never a
    500 further on)."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise validation_error("body.prompt", "list_type", "Input should be a valid list", prompt)
    first = prompt[0]
    if isinstance(first, str):
        for i, p in enumerate(prompt):
            if not isinstance(p, str):
                raise validation_error(f"body.prompt.{i}", "string_type", "Input should be a valid string", p)
        return list(prompt)
    if isinstance(first, list):
        out: list[str | list[int]] = []
        for i, p in enumerate(prompt):
            if not isinstance(p, list):
                raise validation_error(f"body.prompt.{i}", "list_type", "Input should be a valid list", p)
            out.append(_check_ids(p, f"body.prompt.{i}"))
        return out
    return [_check_ids(prompt, "body.prompt")]


def _max_tokens(body: Mapping[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return 16 if body.get("prompt") is not None else 256


def _session(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    for h in SESSION_HEADERS:
        if h in headers:
            return headers[h]
    user = body.get("user")
    return user if isinstance(user, str) else None


#: a chat with more messages than this is never tried on the event loop: its render alone costs
#: ~7 µs per message (demo template; a 64 KB body of 1,800 one-word messages rendered for 13 ms
#: before its encode was found too large for the loop), so the try is bounded to ~1 ms
INLINE_TRY_MAX_MESSAGES = 128


def _inline_chat(opts: ChatOptions, messages: Any) -> bool:
    """May this chat be tokenized on the event loop: not a request's own template (rendered in
    the sandbox process), not more than ``INLINE_TRY_MAX_MESSAGES`` messages."""
    return opts.chat_template is None and (not isinstance(messages, list) or len(messages) <= INLINE_TRY_MAX_MESSAGES)


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
        #: several gateways on one Redis index: their load and claims (set by the Gateway)
        self.shared: SharedLoad | WorkerShare | None = None
        self._tokenizers: dict[str, CachingTokenizer | None] = {}
        #: health.panic (the ext-proc picker turns it off: its protocol answers 503)
        self.panic = cfg.health.panic
        self._say = RateLimited(log, every_s=10.0)
        tc = cfg.tokenize
        self.pool = TokenizePool(tc.workers, tc.max_pending, tc.max_pending_bytes)
        # request-supplied chat templates (models with trust_request_chat_template); a process is
        # spawned at the first such render only
        self.sandbox = TemplateSandbox(tc.template_timeout_s, tc.template_max_chars, tc.template_memory_bytes)

    async def route(self, req: ProxyRequest) -> Response | RelayResponse:
        """Plan the request, then hand it to the hops that carry the plan out."""
        return await self.hops.serve(req, await self.plan(req))

    async def plan(self, req: ProxyRequest, *, pd: bool = True) -> Plan:
        """Context (tokens, block keys, index lookup), profile, and the ranked replicas.

        ``pd=False`` plans a single hop whatever the configuration (the ext-proc picker,
        which cannot make two upstream calls). Raises 503 when no replica can serve it.
        """
        if req.kind not in UNROUTED:
            req.ctx = await self.build_context(req)
        req.profile = self.scheduler.profile_for(req.headers)
        if req_log.isEnabledFor(logging.DEBUG):
            req.trace = Trace(req.request_id, req.kind, req.model, req.stream, req.profile, req.ctx.prompt_tokens)
        if req.otel is not None:
            req.otel.set(
                {"gen_ai.request.model": req.model, "kvgate.stream": req.stream, "kvgate.profile": req.profile, "kvgate.prompt_tokens": req.ctx.prompt_tokens}
            )
        ctx = req.ctx
        if req.kind == RESPONSES and req.body.get("previous_response_id"):
            holder = await self.response_holder(req)
            if holder is not None:  # the conversation's state lives there and nowhere else
                return Plan([holder])
            pd = False  # nobody holds it: the one replica routed to answers vLLM's 404
        if req.kind == RESPONSES and req.body.get("background"):
            pd = False  # generated after the answer, fetched later from the replica that ran it
        if not (pd and self.pd_applies(ctx)):
            return Plan(self.decide_and_claim(req, PHASE_ANY))
        ranked = self.decide(req, PHASE_DECODE)
        if ctx.uncached_tokens(ranked[0].id) < self.cfg.pd.threshold:
            return Plan(ranked, pd=True)
        try:
            return Plan(ranked, pd=True, prefill=self.decide_and_claim(req, PHASE_PREFILL))
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

    # -- responses state ---------------------------------------------------------------------------

    async def response_holder(self, req: ProxyRequest) -> EndpointState | None:
        """The healthy replica serving the model that holds ``previous_response_id``: remembered
        from its answer, else found by asking the replicas (``GET /v1/responses/{id}``)."""
        rid = req.body["previous_response_id"]
        affinity = self.hops.affinity
        name = affinity.holder(rid)
        if name is None:
            name = await self.find_response(rid, [s for s in self.fleet.all() if s.healthy and s.serves(req.ctx.model, req.ctx.lora)])
        state = self.fleet.get(name) if name is not None else None
        if state is None or not state.healthy or not state.serves(req.ctx.model, req.ctx.lora):
            return None
        return state

    async def find_response(self, rid: str, states: list[EndpointState]) -> str | None:
        """Which of ``states`` stores response ``rid`` (asked in parallel; remembered when found):
        for ids the gateway has not seen answered (it restarted, or another gateway replica
        routed the first turn). None if none does."""
        path = "/v1/responses/" + urllib.parse.quote(rid, safe="")

        async def has(state: EndpointState) -> bool:
            try:
                r = await self.client.get(state.url + path, headers=dict(self.fleet.upstream_auth(state.id)), timeout=RESPONSE_PROBE_TIMEOUT_S)
            except httpx.HTTPError:
                return False
            return r.status_code == 200

        if not states:
            return None
        found = await asyncio.gather(*(has(s) for s in states))
        name = next((s.id for s, ok in zip(states, found, strict=True) if ok), None)
        if name is not None:
            self.hops.affinity.remember(rid, name)
        return name

    # -- tokenization ----------------------------------------------------------------------------

    def tokenizer_for(self, base_model: str) -> CachingTokenizer | None:
        if base_model not in self._tokenizers:
            spec = self.cfg.model_config(base_model).tokenizer
            self._tokenizers[base_model] = CachingTokenizer(load_tokenizer(spec), self.cfg.tokenize.cache_bytes, self.sandbox) if spec else None
        return self._tokenizers[base_model]

    def max_model_len(self, model: str) -> int | None:
        """The context length the replicas reported for ``model`` (/v1/models), if any."""
        info = self.fleet.resolve_model(model)
        n = info.max_model_len if info is not None else None
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    async def _tokenize(self, req: ProxyRequest, fn: Callable[..., T], *args: Any, inline: bool = True) -> T:
        """``fn(*args)`` on the event loop when it is cheap, else in the tokenize pool.

        The hop to a pool thread and back is not cheap: ~50 µs of wall time for a trivial job
        (demo BPE tokenizer, 2 shared cores, a throwaway timing script) but 0.3-0.35 ms of CPU
        per request under load (``bench_cpu``'s short chats: futex wake-ups and GIL hand-overs
        on both threads), where the encode itself was ~0.04 ms. Encoding costs ~0.2 ms per 1,000
        uncached characters; a chat's render ~17 µs for 10 KB, and its pieces seen before (system
        prompt, documents, earlier turns: ``CachingTokenizer``) cost a lookup each. So: bodies
        up to ``tokenize.inline_max_bytes`` are done inline; larger ones up to
        ``inline_try_max_bytes`` are tried inline with at most ``inline_encode_max_chars``
        characters left to encode (``fn`` takes ``budget=``), else run again in the pool
        (the render done twice then: ~1-3% of such a job); a long new prompt never holds
        the loop. A request's own chat template (``inline=False``) always goes to the pool."""
        weight = len(req.raw)
        cfg = self.cfg.tokenize
        if inline and weight <= cfg.inline_max_bytes:
            self.metrics.tokenize_inline.inc()
            return fn(*args)
        if inline and weight <= cfg.inline_try_max_bytes:
            try:
                tokens = fn(*args, budget=cfg.inline_encode_max_chars)
            except OverBudget:
                self.metrics.tokenize_inline_then_pool.inc()
            else:
                self.metrics.tokenize_inline.inc()
                return tokens
        else:
            self.metrics.tokenize_pool.inc()
        try:
            return await self.pool.run(fn, *args, weight=weight)
        except PoolBusy:
            # shed like the admission queue does (429 + Retry-After: the client should come back);
            # 503 here means "no replica can serve it", which is not the case
            raise GatewayError(
                429,
                f"the gateway's tokenizer is saturated ({self.pool.pending} requests being tokenized); retry shortly",
                "tokenizer_busy",
                headers={"retry-after": "1"},
            ) from None

    async def tokens_for(self, req: ProxyRequest) -> list[int] | None:
        """The request's prompt tokens as vLLM computes them (a batch: its first prompt), after
        vLLM's own request checks that can be made here: prompt shape, token ids, lengths
        against the model's ``max_model_len``, chat template trust and errors (each vLLM's 400)."""
        if req.kind == COMPLETIONS:
            return await self._completion_tokens(req)
        if req.kind == RESPONSES:
            return await self._responses_tokens(req)
        return await self._chat_tokens(req)

    async def _completion_tokens(self, req: ProxyRequest) -> list[int] | None:
        body = req.body
        if body.get("prompt_embeds"):
            # vLLM hashes each block's embeddings into its key: nothing the gateway can predict
            return None
        tok = self.tokenizer_for(req.ctx.model)
        prompts = completion_prompts(body["prompt"])
        max_len = self.max_model_len(req.model)
        # truncate_prompt_tokens set: vLLM truncates rather than refuses, so does not refuse here
        limit = max_len if body.get("truncate_prompt_tokens") is None else None
        if max_len is not None:
            out = body.get("max_tokens")
            out = 16 if out is None else out  # vLLM's CompletionRequest default
            if out > max_len:
                raise too_many_output_tokens("max_tokens", out, max_len)
        if limit is not None:  # before any tokenization: a length no tokenization can fit
            bound = limit * tok.max_chars_per_token if tok is not None else None
            for p in prompts:
                if isinstance(p, str) and bound is not None and len(p) > bound:
                    raise too_many_chars(limit, len(p), bound)
                if isinstance(p, list) and len(p) > limit:
                    raise too_many_tokens(limit, len(p))
        first = prompts[0]
        tokens: list[int] | None
        if isinstance(first, list):
            tokens = first  # a token-id prompt passes through (a batch: route by its first prompt)
        elif tok is not None:
            try:
                tokens = await self._tokenize(req, tok.encode, first, bool(body.get("add_special_tokens", True)), limit)
            except PromptTooLong as exc:
                raise too_many_tokens(exc.limit, exc.tokens) from None
        else:
            tokens = await self._remote_tokens(req, prompt=first)
        if limit is not None and (len(tokens or ()) == limit or any(isinstance(p, list) and len(p) == limit for p in prompts)):
            raise no_room_for_output()
        for p in prompts:  # vLLM's engine checks ids against the vocabulary last; none is 2^32 or more
            if isinstance(p, list) and p and max(p) >= UINT32:
                raise bad_request(f"Token id {max(p)} is out of vocabulary")
        return tokens

    def _chat_options(self, req: ProxyRequest, body: Mapping[str, Any] | None = None) -> ChatOptions:
        """vLLM's ChatParams for this request: the template trust rule, then vLLM 0.33's merge of
        the request's fields and ``chat_template_kwargs`` (``ChatOptions.for_request``: tools
        dumped as vLLM's model does, documents, reasoning_effort, unset values dropped)."""
        body = req.body if body is None else body
        kwargs = body.get("chat_template_kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        request_template = body.get("chat_template")
        if request_template is None:
            request_template = kwargs.get("chat_template")
        if request_template is not None:
            if not self.cfg.model_config(req.ctx.model).trust_request_chat_template:
                raise bad_request(UNTRUSTED_TEMPLATE)
            if not isinstance(request_template, str):
                raise validation_error("body.chat_template", "string_type", "Input should be a valid string", request_template)
        if "conversation" in kwargs:  # vLLM passes the kwargs next to its own ``conversation`` argument
            raise bad_request("safe_apply_chat_template() got multiple values for argument 'conversation'")
        return ChatOptions.for_request(body, request_template)

    async def _chat_tokens(self, req: ProxyRequest) -> list[int] | None:
        body = req.body
        opts = self._chat_options(req)
        max_len = self.max_model_len(req.model)
        limit = max_len if body.get("truncate_prompt_tokens") is None else None
        if max_len is not None:
            name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            out = body.get(name)
            if out is not None and out > max_len:
                raise too_many_output_tokens(name, out, max_len)
        tok = self.tokenizer_for(req.ctx.model)
        if tok is None:
            extra = body.get("chat_template_kwargs")
            return await self._remote_tokens(
                req,
                messages=body["messages"],
                add_generation_prompt=opts.add_generation_prompt,
                continue_final_message=opts.continue_final_message,
                tools=body.get("tools"),
                chat_template_kwargs=extra if isinstance(extra, dict) else None,
                chat_template=body.get("chat_template") if isinstance(body.get("chat_template"), str) else None,
            )
        bound = limit * tok.max_chars_per_token if limit is not None else None
        job = functools.partial(tok.chat_tokens, body["messages"], opts, max_chars=bound, max_tokens=limit)
        try:
            # a request's own template always goes to the pool: its render (in the sandbox
            # process) may take up to tokenize.template_timeout_s
            tokens = await self._tokenize(req, job, inline=_inline_chat(opts, body["messages"]))
        except TemplateLimitError as exc:
            raise bad_request(str(exc), None, "chat_template_limit") from None
        except ChatTemplateError as exc:  # vLLM: the template's own reason, 400
            raise bad_request(str(exc)) from None
        except TextTooLong as exc:
            raise too_many_chars(exc.limit // tok.max_chars_per_token, exc.chars, exc.limit) from None
        except PromptTooLong as exc:
            raise too_many_tokens(exc.limit, exc.tokens) from None
        if limit is not None and len(tokens) == limit:
            raise no_room_for_output()
        return tokens

    async def _responses_tokens(self, req: ProxyRequest) -> list[int] | None:
        """The prompt vLLM builds for a /v1/responses body: the chat of its instructions and
        input, tokenized as chat is. A request continuing a stored conversation
        (``previous_response_id``) is pinned to its replica and needs no prefix: None."""
        body = req.body
        if body.get("previous_response_id"):
            return None
        chat = responses.chat_body(body)
        if not chat["messages"]:
            return None
        opts = self._chat_options(req, chat)
        max_len = self.max_model_len(req.model)
        # truncation "auto" lets vLLM cut the prompt to fit: nothing to refuse then
        limit = max_len if body.get("truncation") in (None, "disabled") else None
        tok = self.tokenizer_for(req.ctx.model)
        if tok is None:
            return await self._remote_tokens(
                req,
                messages=chat["messages"],
                add_generation_prompt=opts.add_generation_prompt,
                continue_final_message=opts.continue_final_message,
                tools=chat.get("tools"),
                chat_template_kwargs=chat["chat_template_kwargs"] or None,
            )
        bound = limit * tok.max_chars_per_token if limit is not None else None
        job = functools.partial(tok.chat_tokens, chat["messages"], opts, max_chars=bound, max_tokens=limit)
        try:
            tokens = await self._tokenize(req, job, inline=_inline_chat(opts, chat["messages"]))
        except TemplateLimitError as exc:
            raise bad_request(str(exc), None, "chat_template_limit") from None
        except ChatTemplateError as exc:
            raise bad_request(str(exc)) from None
        except TextTooLong:
            assert limit is not None
            raise responses.prompt_too_long(limit + 1, limit, at_least=True) from None
        except PromptTooLong as exc:
            raise responses.prompt_too_long(exc.tokens, exc.limit, at_least=exc.tokens == exc.limit + 1) from None
        if limit is not None and len(tokens) >= limit:  # vLLM: a prompt must leave room for one token
            raise responses.prompt_too_long(len(tokens), limit)
        return tokens

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

    def request_keys(self, tokens: list[int], bs: int, base: str, lora: str | None, salt: str | None) -> list[int]:
        """The request's block keys as the index holds the replicas' blocks: cut with the
        lookahead their events showed (vLLM 0.33 EAGLE hashes), and through the model's
        ``RootCheck`` when one is configured (a salted prompt on vLLM <= 0.14)."""
        lookahead = self.index.lookahead(base)
        check = self.index.root_check(base)
        if check is not None:
            return check.request_keys(tokens, bs, model=base, lora=lora, salt=salt, lookahead=lookahead)
        return block_keys(tokens, bs, model=base, lora=lora, salt=salt, lookahead=lookahead)

    async def lookup(self, keys: list[int], base_model: str) -> tuple[dict[str, PrefixMatch], bool]:
        found, ok, _ = await self.lookup_with_claims(keys, base_model)
        return found, ok

    async def lookup_with_claims(self, keys: list[int], base_model: str) -> tuple[dict[str, PrefixMatch], bool, dict[str, int]]:
        """The index lookup: (matches, index answered, claims). With several gateways on one
        Redis index (``shared``) the same round trip publishes this gateway's in-flight load,
        reads the others' into the fleet, and returns what gateways just routed where."""
        if not keys:
            return {}, True, {}
        try:
            if self.shared is not None:
                found, claims = await self.shared.lookup(keys, base_model)  # its own deadlines
                return dict(found), True, claims
            lookup_now = getattr(self.index, "lookup_now", None)
            if lookup_now is not None:  # the memory index answers at once: no task and timer (wait_for's)
                return dict(lookup_now(keys)), True, {}
            found = await asyncio.wait_for(self.index.lookup(keys, model=base_model), self.cfg.index.lookup_timeout_ms / 1000)
            return dict(found), True, {}
        except Exception as exc:  # Redis down, timeout, script error: degrade to load-only routing
            self.metrics.index_errors.inc()
            outage = getattr(self.index, "outage", None)  # RedisIndex: one log line per state change
            if outage is not None and not isinstance(exc, IndexUnavailableError):  # those the index logged itself
                outage.down(f"lookup abandoned after {self.cfg.index.lookup_timeout_ms} ms ({type(exc).__name__})")
            log.debug("index lookup failed: %s", exc)
            return {}, False, {}

    async def build_context(self, req: ProxyRequest) -> RequestContext:
        t0 = time.perf_counter()
        body = req.body
        base, lora = req.ctx.model, req.ctx.lora
        tokens = await self.tokens_for(req)
        bs = self.block_size(base)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        keys = self.request_keys(tokens, bs, base, lora, salt) if tokens else []
        t1 = time.perf_counter()
        prefix, index_ok, claims = await self.lookup_with_claims(keys, base)
        t2 = time.perf_counter()
        self.metrics.sched_tokenize.observe(t1 - t0)
        self.metrics.sched_index.observe(t2 - t1)
        ctx = RequestContext(
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
            peer_prefix=claims,
        )
        if req.otel is not None:
            req.otel.tokenized(t0, t1, req.kind, ctx, remote=self.tokenizer_for(base) is None)
            req.otel.looked_up(t1, t2, prefix, index_ok, len(keys))
        return ctx

    def decide_and_claim(self, req: ProxyRequest, phase: str) -> list[EndpointState]:
        """``decide``, then (several gateways on one Redis index) claim the prompt for the chosen
        replica in the background: a speculative entry the other gateways read with their
        lookups, until the replica's KV events reach the index."""
        ranked = self.decide(req, phase)
        shared, ctx = self.shared, req.ctx
        if shared is not None and ctx.block_keys and ctx.index_ok:
            chosen = ranked[0].id
            match = ctx.prefix.get(chosen)
            held = max(match.blocks if match is not None else 0, ctx.peer_prefix.get(chosen, 0))
            shared.remember(ctx.block_keys, ctx.model, chosen, held=held)
        return ranked

    def _panic(self, ctx: RequestContext, profile: str | None) -> Decision | None:
        """Nothing healthy can serve the request: schedule it over the replicas whose circuit is
        open too (``health.panic``). Circuits open on probe timeouts, and a fleet saturated at
        peak answers its probes late, all of its replicas at once; a 503 for every request
        then would turn a slow fleet into a dead one. A replica really down refuses the
        connection and the request moves on to the next (as any connection failure does); one
        that answers closes its circuit. No prefill phase: without a prefill replica the
        request is served in one hop, which is no outage."""
        opened = self.fleet.circuit_open()
        if not opened:
            return None
        for s in opened:  # seen healthy by the filters for this one decision (no await in between)
            s.healthy = True
        try:
            decision = self.scheduler.schedule(ctx, self.fleet.all(), profile)
        finally:
            for s in opened:
                s.healthy = False
        if decision.ranked:
            self.metrics.panic_routes.inc()
            model = ctx.lora or ctx.model
            self._say.warning(("panic", model), "no healthy replica for %s: routing to replicas with open circuits (health.panic)", model)
        return decision

    def decide(self, req: ProxyRequest, phase: str = PHASE_ANY) -> list[EndpointState]:
        """Ranked endpoints for one hop; raises 503 when nothing can serve it."""
        ctx = req.ctx
        ctx.phase = phase
        t0 = time.perf_counter()
        decision = self.scheduler.schedule(ctx, self.fleet.all(), req.profile)
        if not decision.ranked and self.panic and phase != PHASE_PREFILL:
            decision = self._panic(ctx, req.profile) or decision
        t1 = time.perf_counter()
        self.metrics.sched_schedule.observe(t1 - t0)
        if req.otel is not None:
            req.otel.scheduled(t0, t1, phase, decision, ctx)
        if req.trace is not None:
            req.trace.scores[phase] = {k: round(v, 4) for k, v in decision.scores.items()}
        if not decision.ranked:
            raise GatewayError(503, f"no healthy replica can serve model '{ctx.lora or ctx.model}' ({phase} phase)", "no_healthy_replica")
        return decision.ranked
