"""The simulated replica's HTTP face: vLLM's OpenAI-compatible server, byte for byte where it counts.

Endpoints, response and stream-chunk shapes, error bodies and status codes follow vLLM's
``vllm serve``: completions and chat (SSE with ``data: [DONE]``, a usage chunk when
``stream_options.include_usage``, per-chunk usage with ``continuous_usage_stats``),
``usage.prompt_tokens_details.cached_tokens`` (as vLLM with ``--enable-prompt-tokens-details``),
/v1/models (LoRA adapters as child cards), /v1/embeddings, /tokenize, /detokenize, /health,
/version, /metrics, /reset_prefix_cache, and the NixlConnector's ``kv_transfer_params`` for
prefill→decode. Also ``n`` choices, ``logprobs`` (completions' dict form, chat's ``content``
list) and ``weight_versions`` (with ``return_weight_versions``); /v1/responses (stored for
``previous_response_id`` and ``GET /v1/responses/{id}`` unless
``VLLM_ENABLE_RESPONSES_API_STORE=0`` — vLLM's default is off, the simulator's on); and the
render endpoints (/v1/chat/completions/render, /v1/completions/render, /v1/responses/render)
that answer a request's token ids and sampling parameters without generating. With ``api_key`` set, ``ApiKeyMiddleware`` guards /v1/* as vLLM's ``--api-key``
does (401 ``{"error": "Unauthorized"}``), leaving /health, /metrics, /version and /tokenize open.

Errors come in vLLM's two flavours: request-validation errors (FastAPI/pydantic level: bad
JSON, wrong types, a wrong content type) answer 400 with ``type: "Bad Request"`` and a
"N validation error(s)" message; serving errors (unknown model 404, context too long,
max_tokens out of range) answer with ``type: "BadRequestError"``/``"NotFoundError"``.
A client that disconnects aborts its request in the engine (blocks freed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import zmq.asyncio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kvindex.tokenize import ChatOptions, ChatTemplateError, load_tokenizer

from . import responses as rs
from .config import SimConfig
from .engine import FINISH_LENGTH, Engine
from .engine import Request as EngineRequest
from .events_publisher import EventPublisher
from .kvtransfer import KVTransfer, KVTransferError
from .metrics import SimMetrics

log = logging.getLogger("kvgate.sim")

VLLM_VERSION = "0.33.0"
#: vLLM's default --max-logprobs
MAX_LOGPROBS = 20
#: the label vLLM's engine gives its weights until an RL trainer sets another (/update_weight_version)
WEIGHT_VERSION = "default"
_INT64 = (-(2**63), 2**63 - 1)


class SimError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def bad_request(message: str, param: str | None = None) -> SimError:
    """A serving-level 400, as vLLM's create_error_response makes for a VLLMValidationError."""
    return SimError(400, message, "BadRequestError", param)


def invalid(errors: list[dict | str], param: str | None = None) -> SimError:
    """A request-validation 400, as vLLM's RequestValidationError handler renders it."""
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {e}\n" for e in errors)
    return SimError(400, message.rstrip(), "Bad Request", param)


def field_error(field: str, kind: str, msg: str, value: Any) -> SimError:
    return invalid([{"type": kind, "loc": ("body", field), "msg": msg, "input": value}], f"body.{field}")


def value_error(msg: str, param: str | None) -> SimError:
    """A model validator's VLLMValidationError, surfacing through pydantic."""
    return invalid([{"type": "value_error", "loc": ("body",), "msg": f"Value error, {msg}"}], param)


def error_response(e: SimError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}, status_code=e.status)


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def block_bytes_for(digest: bytes, size: int) -> bytes:
    """A block's simulated KV content: derived from its hash, so the decode side can verify it."""
    return hashlib.shake_256(digest).digest(size)


# -- pydantic-level field checks (what vLLM's request models reject before any serving code) --


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise field_error(name, "int_type", "Input should be a valid integer", v)
    if lo is not None and v < lo:
        raise field_error(name, "greater_than_equal", f"Input should be greater than or equal to {lo}", v)
    return v


def _opt_bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None or isinstance(v, bool):
        return v
    raise field_error(name, "bool_type", "Input should be a valid boolean", v)


def _opt_number(body: dict, name: str) -> None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise field_error(name, "float_type", "Input should be a valid number", v)


def _opt_str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is None or isinstance(v, str):
        return v
    raise field_error(name, "string_type", "Input should be a valid string", v)


def _opt_dict(body: dict, name: str) -> dict | None:
    v = body.get(name)
    if v is None or isinstance(v, dict):
        return v
    raise field_error(name, "dict_type", "Input should be a valid dictionary", v)


def _own_address() -> str:
    """This machine's address for peers (the side channel is bound to a wildcard)."""
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _json_object(raw: bytes) -> dict:
    """A request body as FastAPI validates it for vLLM: JSON, and an object (else a 400 with
    pydantic's error list)."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error", "input": {}, "ctx": {"error": str(exc)}}], "body.0") from None
    if not isinstance(body, dict):
        raise invalid(
            [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a valid dictionary or object to extract fields from", "input": body}],
            "body",
        )
    return body


def uses_nixl(cfg: SimConfig) -> bool:
    """Whether this replica moves KV over NIXL (when installed) rather than plain TCP."""
    if not cfg.prefer_nixl or cfg.kv_transfer == "tcp":
        return False
    return cfg.kv_transfer == "nixl" or cfg.role != "both"


class SimServer:
    """One simulated vLLM replica: engine, events, KV transfer, HTTP app."""

    def __init__(self, cfg: SimConfig, zmq_ctx: zmq.asyncio.Context | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.tokenizer)
        self.metrics = SimMetrics(cfg.model, lora_modules=cfg.lora_modules)
        self.zmq_ctx = zmq_ctx
        self.publisher: EventPublisher | None = None
        self.engine: Engine | None = None
        self.transfer: KVTransfer | None = None
        self.engine_id = cfg.engine_id or f"sim-{cfg.host}-{cfg.port}-{uuid.uuid4().hex[:6]}"
        self.leases: dict[str, tuple[EngineRequest, asyncio.TimerHandle]] = {}
        self._releases: set[asyncio.Task[None]] = set()  # running notify_release tasks (the loop keeps only weak references)
        self.created = int(time.time())
        # /v1/responses kept for previous_response_id and GET /v1/responses/{id}: id → (the
        # conversation's messages, the response object); on unless VLLM_ENABLE_RESPONSES_API_STORE=0
        self.store_responses = os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "1").lower() not in ("0", "false", "")
        self.response_store: OrderedDict[str, tuple[list[dict], dict]] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self.start_error: BaseException | None = None  # why start() failed, if it did
        # LoRA adapters get vLLM's lora_int_id (1, 2, ... in load order) and a path
        self.lora_ids = {name: i + 1 for i, name in enumerate(cfg.lora_modules)}
        self.advertised_host = cfg.side_channel_host or (cfg.host if cfg.host not in ("0.0.0.0", "::", "") else _own_address())
        # the longest token string: no text longer than max_input_tokens × this can fit (vLLM's precheck)
        self._max_chars_per_token = max(1, max((len(t) for t in self.tok._tok.get_vocab()), default=1))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.kv_events:
            ctx = self.zmq_ctx or zmq.asyncio.Context.instance()
            self.publisher = EventPublisher(
                ctx,
                f"tcp://{cfg.host}:{cfg.kv_events_port}",
                f"tcp://{cfg.host}:{cfg.replay_port}" if cfg.replay else None,
                cfg.kv_events_topic,
                legacy=cfg.event_form(),
                buffer=cfg.replay_buffer,
            )
            # port 0 asked for any free port: from now on the config says which
            cfg.kv_events_port, cfg.replay_port = self.publisher.port, self.publisher.replay_port
            self.publisher.start()
        self.engine = Engine(cfg, self.tok, self.publisher.publish if self.publisher else None)
        self.engine.on_finished.append(self._on_finished)
        self.engine.on_first_token.append(lambda r, ttft: self.metrics.observe_ttft(ttft))
        if cfg.role in ("prefill", "decode", "both"):
            self.transfer = KVTransfer(
                self.engine_id,
                cfg.num_blocks,
                cfg.kv_block_bytes,
                host=cfg.host,
                side_channel_port=cfg.side_channel_port,
                prefer_nixl=uses_nixl(cfg),
            )
            await self.transfer.start()
            self.transfer.set_release_callback(self._release_lease)
            self.transfer.has_pending = lambda: bool(self.leases)
            self.engine.on_prefill_done = self._prefill_done
            self.engine.pull_remote = self._pull
            self.engine.on_remote_abort = self._remote_abort
        self.engine.start()

    def bound_ports(self) -> dict[str, Any]:
        """Where this replica listens, once started (the ports port 0 asked the kernel for)."""
        cfg = self.cfg
        return {
            "port": cfg.port,
            "kv_events_port": cfg.kv_events_port,
            "replay_port": cfg.replay_port,
            "side_channel_port": self.transfer.side_channel_port if self.transfer is not None else cfg.side_channel_port,
            "engine_id": self.engine_id,
        }

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        for _, timer in self.leases.values():
            timer.cancel()
        if self.transfer is not None:
            await self.transfer.close()
        if self.publisher is not None:
            await self.publisher.close()

    # -- P/D ------------------------------------------------------------------------------------

    def _prefill_done(self, req: EngineRequest) -> None:
        """Prefill role: write the prompt blocks' KV into the transfer buffer and lease them."""
        assert self.transfer is not None and req.alloc is not None
        bs = self.cfg.block_size
        for i, bid in enumerate(req.alloc.blocks[: -(-len(req.prompt) // bs)]):
            if i < len(req.alloc.digests):
                data = block_bytes_for(req.alloc.digests[i], self.cfg.kv_block_bytes)
            else:
                data = block_bytes_for(repr(req.prompt[i * bs :]).encode(), self.cfg.kv_block_bytes)
            self.transfer.write_block(bid, data)
        loop = asyncio.get_running_loop()
        self.leases[req.engine_id] = (req, loop.call_later(self.cfg.lease_s, self._expire_lease, req.engine_id))
        self.transfer.wake()

    def _expire_lease(self, request_id: str) -> None:
        if request_id in self.leases:
            log.warning("KV of %s was not pulled within %.1f s: freeing its blocks", request_id, self.cfg.lease_s)
            self.metrics.nixl_expired.labels(*self.metrics.lv).inc()
        self._release_lease(request_id)

    def _release_lease(self, request_id: str) -> None:
        item = self.leases.pop(request_id, None)
        if item is None:
            return
        req, timer = item
        timer.cancel()
        assert self.engine is not None
        self.engine.release_remote(req)

    def _remote_ids(self, p: dict) -> list[int]:
        remote_ids = p.get("remote_block_ids") or []
        if remote_ids and isinstance(remote_ids[0], list):
            remote_ids = remote_ids[0]  # one KV-cache group
        return [int(x) for x in remote_ids]

    def _remote_abort(self, req: EngineRequest) -> None:
        """Decode role: aborted before pulling; tell the prefill replica to free its blocks."""
        p = req.remote_prefill or {}
        if self.transfer is None:
            return
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(
                self.transfer.notify_release(
                    str(p.get("remote_host")), int(p.get("remote_port") or 0), str(p.get("remote_engine_id")), str(p.get("remote_request_id"))
                )
            )
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _pull(self, req: EngineRequest) -> bool:
        """Decode role: pull the KV of the blocks not cached here from the prefill replica, verify it."""
        assert self.transfer is not None and req.alloc is not None and self.engine is not None
        p = req.remote_prefill or {}
        bs = self.cfg.block_size
        try:
            remote_ids = self._remote_ids(p)
            raw_port = p.get("remote_port")
            if raw_port is None:
                raise ValueError("no remote_port")
            host, port, eid, rid = str(p.get("remote_host")), int(raw_port), str(p.get("remote_engine_id")), str(p.get("remote_request_id"))
        except (TypeError, ValueError) as exc:
            log.warning("bad kv_transfer_params for %s: %s (recomputing)", req.id, exc)
            return False
        n = min(len(remote_ids), -(-len(req.prompt) // bs))
        hit = min(req.alloc.cached_blocks, n)
        local_ids = req.alloc.blocks[hit:n]
        t0 = time.perf_counter()
        try:
            if local_ids:
                # vLLM reads only the blocks that missed the local prefix cache (the tail)
                await self.transfer.pull(
                    remote_host=host,
                    remote_port=port,
                    remote_engine_id=eid,
                    remote_request_id=rid,
                    remote_block_ids=remote_ids[hit:n],
                    local_block_ids=local_ids,
                )
            else:
                await self.transfer.notify_release(host, port, eid, rid)  # full local hit: just free the prefill's blocks
        except KVTransferError as exc:
            log.warning("KV pull failed for %s: %s (recomputing)", req.id, exc)
            self.metrics.nixl_failed.labels(*self.metrics.lv).inc()
            return False
        if local_ids and self.transfer.last_backend == "nixl":
            self.metrics.observe_nixl(time.perf_counter() - t0, len(local_ids) * self.cfg.kv_block_bytes, len(local_ids))
        # verify every pulled full block against the hash this replica computes itself
        assert req.keys is not None
        digests = self.engine.cache.prompt_digests(req.prompt, req.keys)
        for i in range(hit, min(n, len(digests))):
            if self.transfer.read_block(req.alloc.blocks[i]) != block_bytes_for(digests[i], self.cfg.kv_block_bytes):
                log.warning("KV block %d of %s failed verification (recomputing)", i, req.id)
                self.metrics.kv_verify_failed.labels(*self.metrics.lv).inc()
                return False
        return True

    def _on_finished(self, req: EngineRequest) -> None:
        self.metrics.finished(req)

    # -- request parsing ------------------------------------------------------------------------

    def _check_model(self, body: dict) -> str | None:
        model = _opt_str(body, "model")
        if not model or model == self.cfg.model:
            return None
        if model in self.lora_ids:
            return model
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _check_fields(self, kind: str, body: dict) -> None:
        """Types and model validators of vLLM's ChatCompletionRequest / CompletionRequest."""
        for name in ("max_tokens", "max_completion_tokens", "min_tokens", "logprobs" if kind != "chat" else "top_logprobs", "prompt_logprobs"):
            _opt_int(body, name)
        _opt_int(body, "n", 1)
        for name in ("seed", "priority"):
            v = _opt_int(body, name)
            if v is not None and not _INT64[0] <= v <= _INT64[1]:
                raise field_error(name, "less_than_equal", f"Input should be less than or equal to {_INT64[1]}", v)
        for name in (
            "stream",
            "echo",
            "ignore_eos",
            "add_special_tokens",
            "skip_special_tokens",
            "include_stop_str_in_output",
            "add_generation_prompt",
            "continue_final_message",
            "return_weight_versions",
        ):
            _opt_bool(body, name)
        if kind == "chat":
            _opt_bool(body, "logprobs")
            top = body.get("top_logprobs")
            if top is not None and not body.get("logprobs"):
                raise value_error("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
            if top is not None and not 0 <= top <= MAX_LOGPROBS:
                raise bad_request(f"Requested sample logprobs of {top}, which is greater than max allowed: {MAX_LOGPROBS}", "top_logprobs")
        else:
            lp = body.get("logprobs")
            if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
                raise bad_request(f"Requested sample logprobs of {lp}, which is greater than max allowed: {MAX_LOGPROBS}", "logprobs")
        for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            _opt_number(body, name)
        _opt_str(body, "request_id")
        _opt_str(body, "user")
        _opt_dict(body, "kv_transfer_params")
        so = _opt_dict(body, "stream_options")
        if so is not None:
            for k in ("include_usage", "continuous_usage_stats"):
                _opt_bool(so, k)
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise field_error("stop", "string_type", "Input should be a valid string", stop)
        salt = body.get("cache_salt")
        if salt is not None:
            if not isinstance(salt, str):
                raise field_error("cache_salt", "string_type", "Input should be a valid string", salt)
            if not salt:
                raise value_error("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
            if len(salt) > 1024:
                raise field_error("cache_salt", "string_too_long", "String should have at most 1024 characters", salt[:32] + "...")
        if body.get("stream_options") and not body.get("stream"):
            raise value_error("Stream options can only be defined when `stream=True`.", "stream_options")
        if kind == "chat":
            msgs = body.get("messages")
            if msgs is None:
                raise invalid([{"type": "missing", "loc": ("body", "messages"), "msg": "Field required"}], "body.messages")
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise field_error("messages", "list_type", "Input should be a valid list of messages", msgs if not isinstance(msgs, list) else "...")
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                raise value_error("Cannot set both `continue_final_message` and `add_generation_prompt` to True.", None)
        else:
            prompt = body.get("prompt")
            if prompt is None or prompt == "" or prompt == []:
                raise value_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
            ok = isinstance(prompt, str) or (
                isinstance(prompt, list)
                and (
                    all(_is_int(t) and t >= 0 for t in prompt)
                    or all(isinstance(p, str) for p in prompt)
                    or all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt)
                )
            )
            if not ok:
                raise field_error("prompt", "union_type", "Input should be a string, a list of strings, or a list of (lists of) token ids >= 0", "...")

    def _chat_text(self, body: dict) -> str:
        """A chat rendered by the model's template, from the same inputs for /v1/chat/completions
        and /tokenize (vLLM's renderer), so a client's token count matches the served prompt."""
        opts = ChatOptions.for_request(body)  # vLLM 0.33's merge: request fields over the kwargs, tools dumped
        kwargs: dict[str, Any] = {
            **opts.template_kwargs,
            "add_generation_prompt": opts.add_generation_prompt,
            "continue_final_message": opts.continue_final_message,
            "tools": opts.tools,
            "documents": opts.documents,
        }
        extra = body.get("chat_template_kwargs")
        template = body.get("chat_template") or (extra.get("chat_template") if isinstance(extra, dict) else None)
        if isinstance(template, str):
            kwargs["chat_template"] = template
        try:
            return self.tok.apply_chat_template(body["messages"], **kwargs)
        except ChatTemplateError as exc:
            raise bad_request(str(exc)) from None

    def _prompts(self, kind: str, body: dict) -> list[list[int]]:
        """The request's prompt(s) as token ids, tokenized as vLLM's renderer does."""
        if kind == "chat":
            text = self._chat_text(body)
            self._check_text_len(text, self._check_out(kind, body))
            return [self.tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))]
        prompt = body["prompt"]
        add_special = body.get("add_special_tokens", True) is not False
        out = self._check_out(kind, body)
        for p in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(p, str):
                self._check_text_len(p, out)
        if isinstance(prompt, str):
            return [self.tok.encode(prompt, add_special_tokens=add_special)]
        if prompt and _is_int(prompt[0]):
            prompts = [list(prompt)]
        else:
            prompts = [self.tok.encode(p, add_special_tokens=add_special) if isinstance(p, str) else list(p) for p in prompt]
        vocab = self.tok.vocab_size
        for p in prompts:
            top = max(p, default=0)
            if top >= vocab:
                raise bad_request(f"Token id {top} is out of vocabulary", "prompt")
        return prompts

    def _requested(self, kind: str, body: dict) -> tuple[int | None, str]:
        """The output tokens the request asks for (None: up to the context) and the field's name."""
        if kind == "chat":
            if body.get("max_completion_tokens") is not None:
                return body["max_completion_tokens"], "max_completion_tokens"
            return body.get("max_tokens"), "max_tokens"
        v = body.get("max_tokens")
        return (16 if v is None else v), "max_tokens"

    def _check_out(self, kind: str, body: dict) -> int:
        """TokenizeParams' first check: the output alone must fit the context."""
        requested, name = self._requested(kind, body)
        out, L = requested or 0, self.cfg.max_model_len
        if out > L:
            raise bad_request(f"{name}={out} cannot be greater than max_model_len=max_total_tokens={L}. Please request fewer output tokens.", name)
        return out

    def _check_text_len(self, text: str, out: int) -> None:
        """vLLM's renderer refuses a text prompt longer than any tokenization of it could fit."""
        L = self.cfg.max_model_len
        limit = (L - out) * self._max_chars_per_token
        if len(text) > limit:
            raise bad_request(
                f"This model's maximum context length is {L} tokens. However, you requested {out} output tokens and your prompt contains "
                f"{len(text)} characters (more than {limit} characters, which is the upper bound for {L - out} input tokens). "
                "Please reduce the length of the input prompt or the number of requested output tokens.",
                "input_text",
            )

    def _max_tokens(self, kind: str, body: dict, prompt_len: int) -> int:
        """vLLM's length checks (renderer) and max_tokens default (get_max_tokens)."""
        L = self.cfg.max_model_len
        requested, _ = self._requested(kind, body)
        out = self._check_out(kind, body)
        if prompt_len > L - out:
            raise bad_request(
                f"This model's maximum context length is {L} tokens. However, you requested {out} output tokens and your prompt contains "
                f"{prompt_len} input tokens, for a total of {prompt_len + out} tokens. "
                "Please reduce the length of the input prompt or the number of requested output tokens.",
                "input_tokens",
            )
        max_tokens = L - prompt_len if requested is None else min(requested, L - prompt_len)
        if max_tokens < 1:
            raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        return max_tokens

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, request: Request, kind: str) -> Response:
        try:
            ctype = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
            if ctype != "application/json":
                raise invalid(["Unsupported Media Type: Only 'application/json' is allowed"])
            body = _json_object(await request.body())
            self._check_fields(kind, body)
            lora = self._check_model(body)
            prompts = self._prompts(kind, body)
            max_tokens = [self._max_tokens(kind, body, len(p)) for p in prompts]
        except SimError as e:
            return error_response(e)
        stream = bool(body.get("stream"))
        kvp = body.get("kv_transfer_params")
        base_id = request.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        resp_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{base_id}"
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        min_tokens = body.get("min_tokens") or 0
        reqs: list[EngineRequest] = []
        n = body.get("n") or 1
        # one engine request per (prompt, sample), in choice-index order: prompt-major
        for i, (prompt, mt) in enumerate(zip(prompts, max_tokens, strict=True)):
            for sample in range(n):
                reqs.append(
                    EngineRequest(
                        id=resp_id if kind == "chat" else f"{resp_id}-{i}",
                        prompt=prompt,
                        max_tokens=mt,
                        min_tokens=min_tokens,
                        stop=stop,
                        lora=lora,
                        lora_id=self.lora_ids.get(lora) if lora else None,
                        salt=body.get("cache_salt"),
                        stream=stream,
                        sample=sample,
                    )
                )
        for r in reqs:
            if kvp and kvp.get("do_remote_decode") and self.transfer is not None:
                r.remote_decode = True
                r.max_tokens = 1  # the prefill hop generates one token, as vLLM's proxy asks
            elif kvp and kvp.get("do_remote_prefill") and kvp.get("remote_engine_id") and self.transfer is not None:
                r.remote_prefill = dict(kvp)
        assert self.engine is not None
        for r in reqs:
            self.engine.add(r)
        headers = {"x-request-id": request.headers["x-request-id"]} if "x-request-id" in request.headers else {}
        model = lora or self.cfg.model
        include_usage = continuous = False
        so = body.get("stream_options")
        if isinstance(so, dict):
            include_usage = bool(so.get("include_usage", True))  # StreamOptions.include_usage defaults to True
            continuous = include_usage and bool(so.get("continuous_usage_stats"))
        if stream:
            gen = self._stream(kind, reqs, resp_id, model, include_usage, continuous, body)
            return _AbortingStream(gen, self.engine, reqs, media_type="text/event-stream", headers=headers)
        if not await self._wait_or_disconnect(request, reqs):
            for r in reqs:
                self.engine.abort(r)
            return error_response(bad_request("Client disconnected"))
        return Response(_json(self._final_body(kind, reqs, resp_id, model, body)), media_type="application/json", headers=headers)

    # -- /v1/responses ----------------------------------------------------------------------------

    #: stored responses kept at most (vLLM keeps them all; a long benchmark must not grow forever)
    MAX_STORED_RESPONSES = 100_000

    def _check_responses(self, body: dict) -> None:
        """ResponsesRequest's field types and model validators (vLLM's words)."""
        if "input" not in body:
            raise invalid([{"type": "missing", "loc": ("body", "input"), "msg": "Field required"}], "body.input")
        inp = body["input"]
        if not isinstance(inp, str) and not (isinstance(inp, list) and all(isinstance(i, dict) for i in inp)):
            raise field_error("input", "union_type", "Input should be a valid string or a list of input items", "...")
        _opt_int(body, "max_output_tokens")
        _opt_int(body, "top_logprobs", 0)
        for name in ("stream", "store", "background", "ignore_eos", "parallel_tool_calls"):
            _opt_bool(body, name)
        for name in ("instructions", "previous_response_id", "user", "request_id"):
            _opt_str(body, name)
        for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            _opt_number(body, name)
        _opt_dict(body, "kv_transfer_params")
        if body.get("tools") is not None and not (isinstance(body["tools"], list) and all(isinstance(t, dict) for t in body["tools"])):
            raise field_error("tools", "list_type", "Input should be a valid list", "...")
        if body.get("background") and body.get("store") is False:
            raise value_error("background can only be used when `store` is true", "background")
        if body.get("prompt") is not None:
            raise value_error("prompt template is not supported", "prompt")
        if body.get("tool_choice") == "required" and not body.get("tools"):
            raise value_error("Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice")
        mot = body.get("max_output_tokens")
        if mot is not None and mot < 1:
            raise bad_request(f"max_tokens must be at least 1, got {mot}.", "max_tokens")

    def _responses_prompt(self, body: dict, stored: tuple[list[dict], dict] | None) -> tuple[list[dict], list[int]]:
        """The conversation vLLM renders for a responses body, and its tokens."""
        try:
            msgs = rs.conversation(body, stored)
        except rs.InputError as exc:
            raise SimError(400, str(exc), "invalid_request_error", "input") from None
        try:
            text = self.tok.apply_chat_template(msgs, tools=rs.chat_tools(body), **rs.template_kwargs(body))
        except ChatTemplateError as exc:
            raise bad_request(str(exc)) from None
        return msgs, self.tok.encode(text, add_special_tokens=False)

    def _responses_max_tokens(self, body: dict, prompt_len: int) -> int:
        L = self.cfg.max_model_len
        if prompt_len >= L and body.get("truncation") != "auto":
            raise SimError(400, f"The engine prompt length {prompt_len} exceeds the max_model_len {L}. Please reduce prompt.", "invalid_request_error", "input")
        room = max(1, L - min(prompt_len, L - 1))
        mot = body.get("max_output_tokens")
        return room if mot is None else min(mot, room)

    def _store(self, response_id: str, msgs: list[dict], obj: dict) -> None:
        self.response_store[response_id] = (msgs, obj)
        self.response_store.move_to_end(response_id)
        while len(self.response_store) > self.MAX_STORED_RESPONSES:
            self.response_store.popitem(last=False)

    def _response_logprobs(self, r: EngineRequest, start: int, end: int, top: int, stream: bool) -> list[dict]:
        """Logprobs as the Responses API shapes them: with bytes in the output item, without in
        a streamed delta event."""
        assert self.engine is not None
        piece = self.engine.piece
        out = []
        for tid, lp, tops in self.engine.logprobs(r, start, end, top):
            tok = piece(tid)
            if stream:
                out.append({"token": tok, "logprob": lp, "top_logprobs": [{"token": piece(a), "logprob": v} for a, v in tops]})
            else:
                alts = [{"token": piece(a), "bytes": list(piece(a).encode()), "logprob": v} for a, v in tops]
                out.append({"token": tok, "bytes": list(tok.encode()), "logprob": lp, "top_logprobs": alts})
        return out

    def _responses_final(self, body: dict, r: EngineRequest, rid: str, model: str, created: int, max_tokens: int, output: list[dict] | None = None) -> dict:
        status = "incomplete" if r.finish_reason == FINISH_LENGTH else "completed"
        if output is None:
            lps = self._response_logprobs(r, 0, len(r.output), body.get("top_logprobs") or 0, False) if rs.includes_logprobs(body) else None
            output = [rs.output_message(rs.new_id("msg"), r.text, status, lps)]
        return rs.response_object(
            body,
            response_id=rid,
            model=model,
            created_at=created,
            output=output,
            status=status,
            max_tokens=max_tokens,
            usage_=rs.usage(len(r.prompt), r.cached_tokens, len(r.output)),
            kv_transfer_params=self._kv_params_out(r),
        )

    async def responses(self, request: Request) -> Response:
        """POST /v1/responses as vLLM 0.33 answers it (its SimpleContext path, no parsers)."""
        try:
            ctype = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
            if ctype != "application/json":
                raise invalid(["Unsupported Media Type: Only 'application/json' is allowed"])
            body = _json_object(await request.body())
            self._check_responses(body)
            lora = self._check_model(body)
            store = bool(body.get("store", True)) and self.store_responses
            if body.get("background") and not store:
                raise SimError(
                    400,
                    "This vLLM engine does not support `store=True` and therefore does not support the background mode. To enable these "
                    "features, set the environment variable `VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.",
                    "invalid_request_error",
                    "background",
                )
            pid = body.get("previous_response_id")
            stored = None
            if pid is not None:
                stored = self.response_store.get(pid)
                if stored is None:
                    raise SimError(404, f"Response with id '{pid}' not found.", "invalid_request_error", "response_id")
            msgs, prompt = self._responses_prompt(body, stored)
            max_tokens = self._responses_max_tokens(body, len(prompt))
        except SimError as e:
            return error_response(e)
        rid = body.get("request_id") or rs.new_id("resp")
        model = lora or self.cfg.model
        stream = bool(body.get("stream"))
        stop = body.get("stop") or []  # vLLM's extension field, as on chat
        r = EngineRequest(
            id=rid,
            prompt=prompt,
            max_tokens=max_tokens,
            stop=[stop] if isinstance(stop, str) else [x for x in stop if isinstance(x, str)],
            lora=lora,
            lora_id=self.lora_ids.get(lora) if lora else None,
            salt=body.get("cache_salt"),
            stream=stream,
        )
        kvp = body.get("kv_transfer_params")
        if kvp and kvp.get("do_remote_decode") and self.transfer is not None:
            r.remote_decode = True
            r.max_tokens = 1
        elif kvp and kvp.get("do_remote_prefill") and kvp.get("remote_engine_id") and self.transfer is not None:
            r.remote_prefill = dict(kvp)
        assert self.engine is not None
        self.engine.add(r)
        created = rs.now()
        if body.get("background"):
            queued = rs.response_object(body, response_id=rid, model=model, created_at=created, output=[], status="queued", max_tokens=max_tokens, usage_=None)
            self._store(rid, msgs, queued)
            task = asyncio.get_running_loop().create_task(self._finish_background(body, r, rid, model, created, max_tokens, msgs))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return JSONResponse(queued)
        if stream:
            gen = self._responses_stream(body, r, rid, model, created, max_tokens, msgs if store else None)
            return _AbortingStream(gen, self.engine, [r], media_type="text/event-stream")
        if not await self._wait_or_disconnect(request, [r]):
            self.engine.abort(r)
            return error_response(bad_request("Client disconnected"))
        final = self._responses_final(body, r, rid, model, created, max_tokens)
        if store:
            self._store(rid, msgs, final)
        return JSONResponse(final)

    async def _finish_background(self, body: dict, r: EngineRequest, rid: str, model: str, created: int, max_tokens: int, msgs: list[dict]) -> None:
        await r.done.wait()
        current = self.response_store.get(rid)
        if current is not None and current[1]["status"] == "cancelled":
            return
        self._store(rid, msgs, self._responses_final(body, r, rid, model, created, max_tokens))

    async def _responses_stream(
        self, body: dict, r: EngineRequest, rid: str, model: str, created: int, max_tokens: int, msgs: list[dict] | None
    ) -> AsyncGenerator[bytes, None]:
        write = rs.EventWriter()
        initial = rs.response_object(
            body, response_id=rid, model=model, created_at=created, output=[], status="in_progress", max_tokens=max_tokens, usage_=None
        )
        for event in rs.created_events(write, initial):
            yield event
        want_lp = rs.includes_logprobs(body)
        top = body.get("top_logprobs") or 0
        item_id = ""
        text = ""
        reported = 0
        all_lps: list[dict] = []
        assert r.events is not None
        while True:
            delta, finish, n_out = await r.events.get()
            if delta:
                if not item_id:
                    item_id = rs.new_id("msg")
                    for event in rs.text_open(write, item_id):
                        yield event
                lps = self._response_logprobs(r, reported, n_out, top, True) if want_lp else []
                if want_lp:
                    all_lps.extend(self._response_logprobs(r, reported, n_out, top, False))
                reported = n_out
                text += delta
                yield rs.text_delta(write, item_id, delta, lps)
            if finish is not None:
                break
        status = "incomplete" if r.finish_reason == FINISH_LENGTH else "completed"
        output: list[dict] = []
        if item_id:
            events, item = rs.text_close(write, item_id, text, status, all_lps if want_lp else None)
            for event in events:
                yield event
            output.append(item)
        final = self._responses_final(body, r, rid, model, created, max_tokens, output)
        if msgs is not None:
            self._store(rid, msgs, final)
        yield rs.terminal_event(write, final)

    def stored_response(self, rid: str) -> Response:
        """GET /v1/responses/{id}: the stored response, or vLLM's 404."""
        item = self.response_store.get(rid)
        if item is None:
            return error_response(SimError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id"))
        return JSONResponse(item[1])

    def cancel_response(self, rid: str) -> Response:
        item = self.response_store.get(rid)
        if item is None:
            return error_response(SimError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id"))
        if item[1]["status"] not in ("queued", "in_progress"):
            return error_response(SimError(400, "Cannot cancel a synchronous response.", "invalid_request_error", "response_id"))
        item[1]["status"] = "cancelled"
        return JSONResponse(item[1])

    # -- render (vLLM 0.33's /v1/{chat/completions,completions,responses}/render) ----------------

    @staticmethod
    def _sampling_params(kind: str, body: dict, max_tokens: int) -> dict:
        """SamplingParams as the render endpoints dump them: msgspec with ``omit_defaults``, so only
        the fields that differ from their defaults, in the struct's field order (``stop``,
        ``stop_token_ids`` and ``bad_words`` become lists, ``output_kind`` and ``skip_clone`` are
        always set by the request's ``to_sampling_params``)."""
        sp: dict[str, Any] = {}
        n = body.get("n") or 1
        if n != 1:
            sp["n"] = n
        for name, default in (
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("repetition_penalty", 1.0),
            ("temperature", 1.0),
            ("top_p", 1.0),
            ("top_k", 0),
            ("min_p", 0.0),
        ):
            v = body.get(name)
            if v is not None and v != default:
                sp[name] = v
        if body.get("seed") is not None:
            sp["seed"] = body["seed"]
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        sp["stop"] = stop
        sp["stop_token_ids"] = list(dict.fromkeys(body.get("stop_token_ids") or []))
        if body.get("ignore_eos"):
            sp["ignore_eos"] = True
        if max_tokens != 16:
            sp["max_tokens"] = max_tokens
        if body.get("min_tokens"):
            sp["min_tokens"] = body["min_tokens"]
        if kind == "chat":
            logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        elif kind == "responses":
            logprobs = (body.get("top_logprobs") or 0) if rs.includes_logprobs(body) else None
        else:
            logprobs = body.get("logprobs")
        if logprobs is not None:
            sp["logprobs"] = logprobs
        if body.get("skip_special_tokens") is False:
            sp["skip_special_tokens"] = False
        include_stop = bool(body.get("include_stop_str_in_output"))
        if include_stop:
            sp["include_stop_str_in_output"] = True
        sp["output_kind"] = 1 if body.get("stream") else 2  # RequestOutputKind.DELTA / FINAL_ONLY
        sp["skip_clone"] = True
        if stop and not include_stop and max(len(x) for x in stop) > 1:
            sp["output_text_buffer_length"] = max(len(x) for x in stop) - 1
        sp["bad_words"] = []
        sp["skip_reading_prefix_cache"] = False
        return sp

    @staticmethod
    def _generate_request(request_id: str, token_ids: list[int], sp: dict, body: dict, parse_context: dict | None) -> dict:
        """One GenerateRequest (what /inference/v1/generate takes), as model_dump() gives it."""
        stream = bool(body.get("stream"))
        return {
            "request_id": request_id,
            "token_ids": token_ids,
            "token_offsets": None,
            "features": None,
            "content_parts": None,
            "sampling_params": sp,
            "model": body.get("model"),
            "reasoning_ended": None,
            "reasoning_parser_kwargs": None,
            "return_token_ids": body.get("return_token_ids"),
            "output_mode": "tokens",
            "parse_context": parse_context,
            "stream": stream,
            "stream_options": body.get("stream_options") if stream else None,
            "cache_salt": body.get("cache_salt"),
            "priority": body.get("priority") or 0,
            "kv_transfer_params": body.get("kv_transfer_params"),
            "ec_transfer_params": None,
        }

    async def render(self, request: Request, kind: str) -> Response:
        """The prompt's token ids and sampling parameters, without generating: what a
        cache-aware router (vllm-router) asks every worker for."""
        try:
            ctype = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
            if ctype != "application/json":
                raise invalid(["Unsupported Media Type: Only 'application/json' is allowed"])
            body = _json_object(await request.body())
            if kind == "responses":
                self._check_responses(body)
                self._check_model(body)
                if body.get("previous_response_id") is not None:
                    raise SimError(
                        400, "previous_response_id is not supported by the stateless render endpoint.", "invalid_request_error", "previous_response_id"
                    )
                _, prompt = self._responses_prompt(body, None)
                mt = self._responses_max_tokens(body, len(prompt))
                rid = body.get("request_id") or rs.new_id("resp")
                return JSONResponse(self._generate_request(rid, prompt, self._sampling_params(kind, body, mt), body, None))
            self._check_fields(kind, body)
            self._check_model(body)
            prompts = self._prompts(kind, body)
            max_tokens = [self._max_tokens(kind, body, len(p)) for p in prompts]
        except SimError as e:
            return error_response(e)
        base = request.headers.get("x-request-id") or body.get("request_id") or uuid.uuid4().hex
        if kind == "chat":
            tools = body.get("tools")
            kwargs = dict(body.get("chat_template_kwargs") or {})
            kwargs.update(add_generation_prompt=body.get("add_generation_prompt", True), continue_final_message=body.get("continue_final_message", False))
            parse_context = {
                "tools": tools,
                "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "include_reasoning": body.get("include_reasoning", True),
                "chat_template_kwargs": kwargs,
                "history_tool_call_cnt": 0,
            }
            sp = self._sampling_params(kind, body, max_tokens[0])
            return JSONResponse(self._generate_request(f"chatcmpl-{base}", prompts[0], sp, body, parse_context))
        out = []
        for i, (p, mt) in enumerate(zip(prompts, max_tokens, strict=True)):
            rid = f"cmpl-{base}" if len(prompts) == 1 else f"cmpl-{base}-{i}"
            out.append(self._generate_request(rid, p, self._sampling_params(kind, body, mt), body, None))
        return JSONResponse(out)

    async def _wait_or_disconnect(self, request: Request, reqs: list[EngineRequest]) -> bool:
        """Wait for every request to finish; False if the client went away first (vLLM's with_cancellation)."""
        if all(r.done.is_set() for r in reqs):
            return True

        async def all_done() -> None:
            for r in reqs:
                await r.done.wait()

        async def disconnected() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        done = asyncio.ensure_future(all_done())
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((done, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (done, gone):
                t.cancel()
        return done.done() and not done.cancelled() and all(r.done.is_set() for r in reqs)

    def _usage(self, reqs: list[EngineRequest], full: bool) -> dict:
        p = sum(len(r.prompt) for r in reqs if r.sample == 0)  # a prompt counts once, however many samples
        c = sum(len(r.output) for r in reqs)
        details: dict[str, Any] = {"cached_tokens": reqs[-1].cached_tokens}
        if full:
            details.update(created_cache_tokens=None, multimodal_tokens=None)
        usage: dict[str, Any] = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c, "prompt_tokens_details": details}
        if full:
            usage["completion_tokens_details"] = None
        return usage

    def _kv_params_out(self, r: EngineRequest) -> dict | None:
        """What NixlConnector.request_finished returns for a length-capped prefill (else None)."""
        if not r.remote_decode or r.alloc is None or self.transfer is None or r.engine_id not in self.leases:
            return None
        n = -(-len(r.prompt) // self.cfg.block_size)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(r.alloc.blocks[:n])],
            "remote_engine_id": self.engine_id,
            "remote_request_id": r.engine_id,
            "remote_host": self.advertised_host,
            "remote_port": self.transfer.side_channel_port,
            "tp_size": 1,
        }

    # -- logprobs and weight versions, as vLLM 0.33 shapes them ----------------------------------

    def _chat_logprobs(self, r: EngineRequest, start: int, end: int, top: int) -> dict:
        """ChatCompletionLogProbs for output tokens ``start:end``."""
        assert self.engine is not None
        piece = self.engine.piece
        content = []
        for tid, lp, tops in self.engine.logprobs(r, start, end, top):
            tok = piece(tid)
            alts = [{"token": piece(a), "logprob": v, "bytes": list(piece(a).encode())} for a, v in tops]
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": alts})
        return {"content": content}

    def _completion_logprobs(self, r: EngineRequest, start: int, end: int, top: int, offset: int) -> dict:
        """CompletionLogProbs for output tokens ``start:end`` (text offsets from ``offset``); each
        token's top dict has the sampled token too, as vLLM's engine always returns it."""
        assert self.engine is not None
        piece = self.engine.piece
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for tid, lp, tops in self.engine.logprobs(r, start, end, max(top, 1)):
            tok = piece(tid)
            out["text_offset"].append(offset)
            offset += len(tok)
            out["token_logprobs"].append(lp)
            out["tokens"].append(tok)
            out["top_logprobs"].append({piece(a): v for a, v in tops})
        return out

    def _logprobs(self, kind: str, body: dict, r: EngineRequest, start: int, end: int, offset: int = 0) -> dict | None:
        if kind == "chat":
            if not body.get("logprobs"):
                return None
            return self._chat_logprobs(r, start, end, body.get("top_logprobs") or 0)
        if body.get("logprobs") is None:
            return None
        return self._completion_logprobs(r, start, end, body["logprobs"], offset)

    @staticmethod
    def _weight_versions(body: dict, r: EngineRequest) -> list[dict] | None:
        """vLLM 0.33's ``weight_versions`` (with ``return_weight_versions``): which weights sampled
        each span of output tokens; one version here, the engine's default label."""
        if not body.get("return_weight_versions"):
            return None
        return [{"version": WEIGHT_VERSION, "start": 0, "end": len(r.output)}] if r.output else []

    def _final_body(self, kind: str, reqs: list[EngineRequest], resp_id: str, model: str, body: dict | None = None) -> dict:
        created = int(time.time())
        body = body or {}
        kvp = self._kv_params_out(reqs[0])
        if kind == "chat":
            return self._chat_body(reqs, resp_id, model, body, created, kvp)
        choices = [
            {
                "index": i,
                "text": r.text,
                "logprobs": self._logprobs(kind, body, r, 0, len(r.output)),
                "finish_reason": r.finish_reason,
                "stop_reason": r.stop_reason,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
                "weight_versions": self._weight_versions(body, r),
            }
            for i, r in enumerate(reqs)
        ]
        return {
            "id": resp_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self._usage(reqs, True),
            "kv_transfer_params": kvp,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _chat_body(self, reqs: list[EngineRequest], resp_id: str, model: str, body: dict, created: int, kvp: dict | None) -> dict:
        choices = []
        for i, r in enumerate(reqs):
            choice = {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": r.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": self._logprobs("chat", body, r, 0, len(r.output)),
                "finish_reason": r.finish_reason,
                "stop_reason": r.stop_reason,
                "token_ids": None,
                "routed_experts": None,
                "weight_versions": self._weight_versions(body, r),
            }
            choices.append(choice)
        return {
            "id": resp_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self._usage(reqs, True),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": kvp,
            "ec_transfer_params": None,
            "metrics": None,
        }

    async def _stream(
        self, kind: str, reqs: list[EngineRequest], resp_id: str, model: str, include_usage: bool, continuous: bool, body: dict
    ) -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        chat = kind == "chat"
        obj = b'"chat.completion.chunk"' if chat else b'"text_completion"'
        head = b'data: {"id":' + _json(resp_id) + b',"object":' + obj + b',"created":' + str(created).encode() + b',"model":' + _json(model) + b',"choices":'

        def usage_of(r: EngineRequest, n: int) -> bytes:
            """Usage as of the chunk's own token (the engine may already be further along)."""
            return b',"usage":' + _json({"prompt_tokens": len(r.prompt), "total_tokens": len(r.prompt) + n, "completion_tokens": n})

        if chat:
            role = "assistant" if body.get("add_generation_prompt", True) else body["messages"][-1]["role"]
            for i, r in enumerate(reqs):  # one role chunk per choice, as vLLM sends them
                first = b'[{"index":' + str(i).encode() + b',"delta":{"role":' + _json(role) + b',"content":""},"logprobs":null,"finish_reason":null}]'
                yield head + first + (usage_of(r, 0) if continuous else b"") + b',"prompt_token_ids":null,"prompt_text":null}\n\n'
        want_logprobs = body.get("logprobs") if chat else body.get("logprobs") is not None
        reported = [0] * len(reqs)  # output tokens whose logprobs were sent, per choice
        offsets = [0] * len(reqs)  # completions: text offset of the next token, per choice

        def logprobs_of(i: int, r: EngineRequest, n_out: int) -> bytes:
            if not want_logprobs:
                return b"null"
            lp = self._logprobs(kind, body, r, reported[i], n_out, offsets[i])
            if lp is not None and not chat:
                offsets[i] += sum(len(t) for t in lp["tokens"])
            reported[i] = n_out
            return _json(lp)

        def versions(r: EngineRequest) -> bytes:
            wv = self._weight_versions(body, r)
            return b"" if wv is None else b',"weight_versions":' + _json(wv)

        # merge the per-prompt streams in arrival order (vLLM's merge_async_iterators)
        queues = [(i, r) for i, r in enumerate(reqs)]
        pending: dict[asyncio.Future, tuple[int, EngineRequest]] = {}
        for i, r in queues:
            assert r.events is not None
            pending[asyncio.ensure_future(r.events.get())] = (i, r)
        try:
            while pending:
                done, _ = await asyncio.wait(pending.keys(), return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    i, r = pending.pop(fut)
                    delta, finish, n_out = fut.result()
                    if finish is None:
                        assert r.events is not None
                        pending[asyncio.ensure_future(r.events.get())] = (i, r)
                    index = str(i).encode()
                    lp = logprobs_of(i, r, n_out)
                    if chat:
                        if finish is None:
                            choice = (
                                b'[{"index":'
                                + index
                                + b',"delta":{"content":'
                                + _json(delta)
                                + b'},"logprobs":'
                                + lp
                                + b',"finish_reason":null,"token_ids":null}]'
                            )
                        else:
                            d = b'{"content":' + _json(delta) + b"}" if delta else b"{}"
                            choice = (
                                b'[{"index":'
                                + index
                                + b',"delta":'
                                + d
                                + b',"logprobs":'
                                + lp
                                + b',"finish_reason":'
                                + _json(finish)
                                + b',"stop_reason":'
                                + _json(r.stop_reason)
                                + b',"token_ids":null'
                                + versions(r)
                                + b"}]"
                            )
                    else:
                        choice = (
                            b'[{"index":'
                            + index
                            + b',"text":'
                            + _json(delta)
                            + b',"logprobs":'
                            + lp
                            + b',"finish_reason":'
                            + _json(finish)
                            + b',"stop_reason":'
                            + (_json(r.stop_reason) if finish else b"null")
                            + b',"prompt_token_ids":null,"token_ids":null'
                            + (versions(r) if finish else b"")
                            + b"}]"
                        )
                    yield head + choice + (usage_of(r, n_out) if continuous else b"") + b"}\n\n"
        finally:
            for fut in pending:
                fut.cancel()
        if include_usage:
            yield head + b"[]" + b',"usage":' + _json(self._usage(reqs, False)) + b"}\n\n"
        yield b"data: [DONE]\n\n"

    # -- the app --------------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            return await self.generate(request, "completions")

        async def chat(request: Request) -> Response:
            return await self.generate(request, "chat")

        async def responses(request: Request) -> Response:
            return await self.responses(request)

        async def stored_response(request: Request) -> Response:
            return self.stored_response(request.path_params["response_id"])

        async def cancel_response(request: Request) -> Response:
            return self.cancel_response(request.path_params["response_id"])

        async def render_chat(request: Request) -> Response:
            return await self.render(request, "chat")

        async def render_completions(request: Request) -> Response:
            return await self.render(request, "completions")

        async def render_responses(request: Request) -> Response:
            return await self.render(request, "responses")

        async def models(request: Request) -> Response:
            def card(mid: str, root: str, parent: str | None, max_len: int | None) -> dict:
                perm = {
                    "id": f"modelperm-{hashlib.md5(mid.encode()).hexdigest()}",
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
                return {
                    "id": mid,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": root,
                    "parent": parent,
                    "max_model_len": max_len,
                    "permission": [perm],
                }

            data = [card(self.cfg.model, self.cfg.model, None, self.cfg.max_model_len)]
            data += [card(m, f"/adapters/{m}", self.cfg.model, None) for m in self.cfg.lora_modules]
            return JSONResponse({"object": "list", "data": data})

        async def embeddings(request: Request) -> Response:
            try:
                body = msgspec.json.decode(await request.body())
                if not isinstance(body, dict):
                    raise invalid(["Input should be a valid dictionary or object to extract fields from"])
                self._check_model(body)
            except SimError as e:
                return error_response(e)
            except msgspec.DecodeError:
                return error_response(invalid([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}]))
            inputs = body.get("input")
            items = inputs if isinstance(inputs, list) and inputs and isinstance(inputs[0], (str, list)) else [inputs]
            data, total = [], 0
            for i, text in enumerate(items):
                ids = self.tok.encode(text) if isinstance(text, str) else [t for t in (text or []) if _is_int(t)]
                total += len(ids)
                raw = hashlib.shake_256(repr(ids).encode()).digest(self.cfg.embedding_dim)
                data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 - 0.5 for b in raw]})
            return JSONResponse(
                {
                    "id": f"embd-{uuid.uuid4().hex}",
                    "object": "list",
                    "created": int(time.time()),
                    "model": self.cfg.model,
                    "data": data,
                    "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0, "prompt_tokens_details": None},
                }
            )

        async def tokenize(request: Request) -> Response:
            try:
                body = _json_object(await request.body())
                self._check_model(body)
                for name in ("add_special_tokens", "add_generation_prompt", "continue_final_message", "return_token_strs"):
                    _opt_bool(body, name)
                if "messages" in body:
                    msgs = body["messages"]
                    if not isinstance(msgs, list):
                        raise field_error("messages", "list_type", "Input should be a valid list", msgs)
                    if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                        raise value_error("Cannot set both `continue_final_message` and `add_generation_prompt` to True.", None)
                    text = self._chat_text(body)
                    ids = self.tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))
                else:
                    prompt = body.get("prompt")
                    if prompt is None:
                        raise invalid([{"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"}], "body.prompt")
                    if not isinstance(prompt, str):
                        raise field_error("prompt", "string_type", "Input should be a valid string", prompt)
                    ids = self.tok.encode(prompt, add_special_tokens=body.get("add_special_tokens", True) is not False)
            except SimError as e:
                return error_response(e)
            strs = [self.tok.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
            return JSONResponse({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids, "token_strs": strs})

        async def detokenize(request: Request) -> Response:
            try:
                body = _json_object(await request.body())
                self._check_model(body)
                tokens = body.get("tokens")
                if tokens is None:
                    raise invalid([{"type": "missing", "loc": ("body", "tokens"), "msg": "Field required"}], "body.tokens")
                if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < 2**63 for t in tokens):
                    raise field_error("tokens", "list_type", "Input should be a valid list of integers >= 0", "...")
                top = max(tokens, default=0)
                if top >= self.tok.vocab_size:
                    raise bad_request(f"Token id {top} is out of vocabulary", "tokens")
                return JSONResponse({"prompt": self.tok.decode(tokens)})
            except SimError as e:
                return error_response(e)

        async def health(request: Request) -> Response:
            return Response(status_code=200)

        async def version(request: Request) -> Response:
            return JSONResponse({"version": VLLM_VERSION})

        async def metrics(request: Request) -> Response:
            assert self.engine is not None
            return Response(self.metrics.sync(self.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

        async def reset(request: Request) -> Response:
            # vLLM answers 200 whether or not the engine could reset (it refuses while blocks are
            # in use unless ?reset_running_requests=true)
            assert self.engine is not None
            force = request.query_params.get("reset_running_requests", "false").lower() in ("1", "true")
            if not self.engine.reset_prefix_cache(force=force):
                log.warning("reset_prefix_cache refused: blocks are in use")
            return Response(status_code=200)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette):
            try:
                await self.start()
            except Exception as exc:  # kept for whoever started us (uvicorn only logs it)
                self.start_error = exc
                await self.stop()
                raise
            try:
                yield
            finally:
                await self.stop()

        async def not_found(request: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        async def method_not_allowed(request: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": "Method Not Allowed"}, status_code=405)

        async def server_error(request: Request, exc: Exception) -> Response:
            log.exception("internal error on %s", request.url.path)
            return JSONResponse({"error": {"message": str(exc), "type": "InternalServerError", "param": None, "code": 500}}, status_code=500)

        routes = [
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", stored_response, methods=["GET"]),
            Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
            Route("/v1/chat/completions/render", render_chat, methods=["POST"]),
            Route("/v1/completions/render", render_completions, methods=["POST"]),
            Route("/v1/responses/render", render_responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/reset_prefix_cache", reset, methods=["POST"]),
        ]
        keys = self.cfg.api_keys()
        middleware = [Middleware(ApiKeyMiddleware, tokens=keys)] if keys else []
        return Starlette(
            routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error}
        )


#: URL prefixes that need the key when the replica has one (vLLM's --api-key / VLLM_API_KEY).
#: Everything else stays open: /health, /metrics, /version, /tokenize, /detokenize,
#: /reset_prefix_cache. vLLM matches the bare prefix (so "/v1x" is guarded too) on the path
#: with the root path removed and repeated slashes collapsed ("//v1/..." is no way around it).
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
_SLASHES = re.compile(r"/{2,}")


class ApiKeyMiddleware:
    """vLLM's API-key check: ``Authorization: Bearer <key>`` on the guarded routes, else 401.

    The scheme is matched case-insensitively, the token exactly (compared as SHA-256 digests in
    constant time, any of the configured keys); CORS preflights (OPTIONS) and non-HTTP scopes
    pass. The refusal is vLLM's, byte for byte: status 401, body ``{"error":"Unauthorized"}``.
    """

    def __init__(self, app: ASGIApp, tokens: list[str]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def verify(self, headers: Headers) -> bool:
        value = headers.get("authorization")
        if not value:
            return False
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for d in self.digests:  # no early exit: the time taken says nothing about which key
            ok |= secrets.compare_digest(digest, d)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = _SLASHES.sub("/", scope["path"]).removeprefix(scope.get("root_path", ""))
            if path.startswith(GUARDED_PREFIXES) and not self.verify(Headers(scope=scope)):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _AbortingStream(StreamingResponse):
    """An SSE stream that aborts its engine requests as soon as the client goes away.

    Disconnects are watched the whole time (not only when the next chunk is sent), so a
    streaming request still queued or prefilling is aborted at once, as in vLLM.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], engine: Engine, reqs: list[EngineRequest], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._content = content  # also body_iterator (Starlette keeps async iterables as they are), typed as closable
        self._engine = engine
        self._reqs = reqs

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        listening = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, listening):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                await streaming
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listening
            with contextlib.suppress(Exception):
                await self._content.aclose()
            for r in self._reqs:
                if r.finish_reason is None:
                    self._engine.abort(r)
