"""The simulated replica's HTTP face: vLLM's OpenAI-compatible server, byte for byte where it counts.

Endpoints, response and stream-chunk shapes, error bodies and status codes follow vLLM's
``vllm serve``: completions and chat (SSE with ``data: [DONE]``, a usage chunk when
``stream_options.include_usage``), ``usage.prompt_tokens_details.cached_tokens``, /v1/models,
/v1/embeddings, /tokenize, /detokenize, /health, /version, /metrics, /reset_prefix_cache, and
the NixlConnector's ``kv_transfer_params`` for prefill→decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq.asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvindex.tokenize import ChatTemplateError, load_tokenizer

from .config import SimConfig
from .engine import FINISH_ABORT, Engine, Request as EngineRequest
from .events_publisher import EventPublisher
from .kvtransfer import KVTransfer, KVTransferError
from .metrics import SimMetrics

log = logging.getLogger("kvgate.sim")

VLLM_VERSION = "0.33.0"


class SimError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(e: SimError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}, status_code=e.status)


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def block_bytes_for(digest: bytes, size: int) -> bytes:
    """A block's simulated KV content: derived from its hash, so the decode side can verify it."""
    return hashlib.shake_256(digest).digest(size)


class SimServer:
    """One simulated vLLM replica: engine, events, KV transfer, HTTP app."""

    def __init__(self, cfg: SimConfig, zmq_ctx: zmq.asyncio.Context | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.tokenizer)
        self.metrics = SimMetrics(cfg.model)
        self.zmq_ctx = zmq_ctx
        self.publisher: EventPublisher | None = None
        self.engine: Engine | None = None
        self.transfer: KVTransfer | None = None
        self.engine_id = cfg.engine_id or f"sim-{cfg.host}-{cfg.port}-{uuid.uuid4().hex[:6]}"
        self.leases: dict[str, tuple[EngineRequest, asyncio.TimerHandle]] = {}
        self.created = int(time.time())

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.kv_events:
            ctx = self.zmq_ctx or zmq.asyncio.Context.instance()
            self.publisher = EventPublisher(
                ctx,
                f"tcp://{cfg.host}:{cfg.kv_events_port}",
                f"tcp://{cfg.host}:{cfg.replay_port}" if cfg.replay_port else None,
                cfg.kv_events_topic,
                legacy=cfg.legacy_events,
                buffer=cfg.replay_buffer,
            )
            self.publisher.start()
        self.engine = Engine(cfg, self.tok, self.publisher.publish if self.publisher else None)
        self.engine.on_finished.append(self._on_finished)
        if cfg.role in ("prefill", "decode", "both"):
            self.transfer = KVTransfer(self.engine_id, cfg.num_blocks, cfg.kv_block_bytes, host=cfg.host, prefer_nixl=cfg.prefer_nixl and cfg.role != "both")
            await self.transfer.start()
            self.transfer.set_release_callback(self._release_lease)
            self.engine.on_prefill_done = self._prefill_done
            self.engine.pull_remote = self._pull
        self.engine.start()

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
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
        self.leases[req.id] = (req, loop.call_later(self.cfg.lease_s, self._release_lease, req.id))

    def _release_lease(self, request_id: str) -> None:
        item = self.leases.pop(request_id, None)
        if item is None:
            return
        req, timer = item
        timer.cancel()
        assert self.engine is not None
        self.engine.release_remote(req)

    async def _pull(self, req: EngineRequest) -> bool:
        """Decode role: pull the prompt's KV from the prefill replica and verify it."""
        assert self.transfer is not None and req.alloc is not None
        p = req.remote_prefill or {}
        remote_ids = p.get("remote_block_ids") or []
        if remote_ids and isinstance(remote_ids[0], list):
            remote_ids = remote_ids[0]  # one KV-cache group
        n = min(len(remote_ids), -(-len(req.prompt) // self.cfg.block_size))
        local_ids = req.alloc.blocks[:n]
        try:
            await self.transfer.pull(
                remote_host=str(p.get("remote_host")),
                remote_port=int(p.get("remote_port")),
                remote_engine_id=str(p.get("remote_engine_id")),
                remote_request_id=str(p.get("remote_request_id")),
                remote_block_ids=[int(x) for x in remote_ids[:n]],
                local_block_ids=local_ids,
            )
        except (KVTransferError, TypeError, ValueError) as exc:
            log.warning("KV pull failed for %s: %s (recomputing)", req.id, exc)
            return False
        # verify every full block against the hash this replica computes itself
        assert self.engine is not None
        digests = self.engine.cache.prompt_digests(req.prompt, self.engine.extra_keys(req, len(req.prompt) // self.cfg.block_size))
        for i, d in enumerate(digests[:n]):
            if self.transfer.read_block(local_ids[i]) != block_bytes_for(d, self.cfg.kv_block_bytes):
                log.warning("KV block %d of %s failed verification (recomputing)", i, req.id)
                return False
        return True

    def _on_finished(self, req: EngineRequest) -> None:
        if req.finished_at is not None and req.finish_reason != FINISH_ABORT:
            self.metrics.observe_e2e(req.finished_at - req.arrival)

    # -- request parsing ------------------------------------------------------------------------

    def _check_model(self, body: dict) -> str | None:
        model = body.get("model")
        if model is None:
            return None
        if model == self.cfg.model:
            return None
        if model in self.cfg.lora_modules:
            return model
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")

    def _prompt_tokens(self, kind: str, body: dict) -> list[int]:
        if kind == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise SimError(400, "messages must be a non-empty list", param="messages")
            kwargs: dict[str, Any] = {
                "add_generation_prompt": body.get("add_generation_prompt", True),
                "continue_final_message": body.get("continue_final_message", False),
                "tools": body.get("tools"),
            }
            if isinstance(body.get("chat_template_kwargs"), dict):
                kwargs.update(body["chat_template_kwargs"])
            try:
                ids = self.tok.encode_chat(msgs, **kwargs)
            except ChatTemplateError as exc:
                raise SimError(400, str(exc), param="messages") from None
            if body.get("add_special_tokens"):
                ids = self.tok.encode(self.tok.apply_chat_template(msgs, **kwargs), add_special_tokens=True)
            return ids
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens=body.get("add_special_tokens", True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(t < 0 or t >= self.tok.vocab_size for t in prompt):
                raise SimError(400, f"Token id out of vocabulary (size {self.tok.vocab_size})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise SimError(400, "this simulator serves one prompt per request", param="prompt")
        raise SimError(400, "prompt must be a string, a list with one string, or a list of token ids", param="prompt")

    def _sampling(self, kind: str, body: dict, n_prompt: int) -> tuple[int, int, list[str]]:
        max_tokens = body.get("max_completion_tokens") if kind == "chat" and body.get("max_completion_tokens") is not None else body.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.cfg.max_model_len - n_prompt if kind == "chat" else 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise SimError(400, "max_tokens must be at least 1, got %r." % (max_tokens,), param="max_tokens")
        if n_prompt + max_tokens > self.cfg.max_model_len:
            if n_prompt >= self.cfg.max_model_len:
                raise SimError(
                    400,
                    f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, your request has {n_prompt} input tokens. "
                    "Please reduce the length of the input messages.",
                    param="messages" if kind == "chat" else "prompt",
                )
            raise SimError(
                400,
                f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you requested {n_prompt + max_tokens} tokens "
                f"({n_prompt} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        n = body.get("n", 1)
        if n != 1:
            raise SimError(400, "n > 1 is not supported by the simulator", param="n")
        min_tokens = body.get("min_tokens", 0) or 0
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise SimError(400, "stop must be a string or a list of strings", param="stop")
        return max_tokens, int(min_tokens), stop

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, request: Request, kind: str) -> Response:
        try:
            try:
                body = msgspec.json.decode(await request.body())
            except msgspec.DecodeError as exc:
                raise SimError(400, f"Invalid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise SimError(400, "request body must be a JSON object")
            lora = self._check_model(body)
            prompt = self._prompt_tokens(kind, body)
            max_tokens, min_tokens, stop = self._sampling(kind, body, len(prompt))
            stream = bool(body.get("stream", False))
            if "stream" in body and not isinstance(body["stream"], bool):
                raise SimError(400, "stream must be a boolean", param="stream")
        except SimError as e:
            return error_response(e)
        kvp = body.get("kv_transfer_params") if isinstance(body.get("kv_transfer_params"), dict) else None
        rid_header = request.headers.get("x-request-id")
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        req_id = f"{prefix}-{rid_header or uuid.uuid4().hex}"
        engine_req = EngineRequest(
            id=req_id,
            prompt=prompt,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=stop,
            lora=lora,
            salt=body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None,
        )
        if kvp and kvp.get("do_remote_decode"):
            engine_req.remote_decode = True
            engine_req.max_tokens = 1
        elif kvp and kvp.get("do_remote_prefill") and kvp.get("remote_engine_id"):
            engine_req.remote_prefill = kvp
        assert self.engine is not None
        self.engine.add(engine_req)
        headers = {"x-request-id": rid_header} if rid_header else {}
        model = lora or self.cfg.model
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False
        if stream:
            gen = self._stream(kind, engine_req, model, include_usage)
            return _AbortingStream(gen, self.engine, engine_req, media_type="text/event-stream", headers=headers)
        try:
            while True:
                _, finish = await engine_req.events.get()
                if finish is not None:
                    break
        except asyncio.CancelledError:
            self.engine.abort(engine_req)
            raise
        return Response(_json(self._final_body(kind, engine_req, model)), media_type="application/json", headers=headers)

    def _usage(self, r: EngineRequest) -> dict:
        return {
            "prompt_tokens": len(r.prompt),
            "total_tokens": len(r.prompt) + len(r.output),
            "completion_tokens": len(r.output),
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
        }

    def _kv_params_out(self, r: EngineRequest) -> dict | None:
        if not r.remote_decode or r.alloc is None or self.transfer is None:
            return None
        n = -(-len(r.prompt) // self.cfg.block_size)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(r.alloc.blocks[:n])],
            "remote_engine_id": self.engine_id,
            "remote_request_id": r.id,
            "remote_host": self.cfg.host,
            "remote_port": self.transfer.side_channel_port,
            "tp_size": 1,
        }

    def _final_body(self, kind: str, r: EngineRequest, model: str) -> dict:
        created = int(time.time())
        finish = r.finish_reason if r.finish_reason != FINISH_ABORT else "abort"
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": r.text, "refusal": None, "annotations": None, "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
            return {"id": r.id, "object": "chat.completion", "created": created, "model": model, "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": self._usage(r), "prompt_logprobs": None, "kv_transfer_params": self._kv_params_out(r)}
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": finish, "stop_reason": None, "prompt_logprobs": None}
        return {"id": r.id, "object": "text_completion", "created": created, "model": model, "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": self._usage(r), "kv_transfer_params": self._kv_params_out(r)}

    async def _stream(self, kind: str, r: EngineRequest, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choice: dict | None, usage: dict | None = None) -> bytes:
            body: dict[str, Any] = {"id": r.id, "object": obj, "created": created, "model": model, "choices": [choice] if choice else []}
            if usage is not None:
                body["usage"] = usage
            return b"data: " + _json(body) + b"\n\n"

        first = True
        while True:
            piece, finish = await r.events.get()
            if kind == "chat" and first:
                first = False
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            if finish is not None:
                reason = finish if finish != FINISH_ABORT else "abort"
                if kind == "chat":
                    yield chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason, "stop_reason": None})
                else:
                    yield chunk({"index": 0, "text": "", "logprobs": None, "finish_reason": reason, "stop_reason": None})
                break
            if piece:
                if kind == "chat":
                    yield chunk({"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None})
                else:
                    yield chunk({"index": 0, "text": piece, "logprobs": None, "finish_reason": None, "stop_reason": None})
        if include_usage:
            yield chunk(None, self._usage(r))
        yield b"data: [DONE]\n\n"

    # -- the app --------------------------------------------------------------------------------

    def build_app(self) -> Starlette:
        async def completions(request: Request) -> Response:
            return await self.generate(request, "completions")

        async def chat(request: Request) -> Response:
            return await self.generate(request, "chat")

        async def models(request: Request) -> Response:
            def card(mid: str, parent: str | None) -> dict:
                return {"id": mid, "object": "model", "created": self.created, "owned_by": "vllm", "root": mid if parent is None else f"/adapters/{mid}", "parent": parent, "max_model_len": self.cfg.max_model_len, "permission": []}

            data = [card(self.cfg.model, None)] + [card(m, self.cfg.model) for m in self.cfg.lora_modules]
            return JSONResponse({"object": "list", "data": data})

        async def embeddings(request: Request) -> Response:
            try:
                body = msgspec.json.decode(await request.body())
                self._check_model(body)
            except SimError as e:
                return error_response(e)
            except msgspec.DecodeError:
                return error_response(SimError(400, "Invalid JSON"))
            inputs = body.get("input")
            items = inputs if isinstance(inputs, list) and inputs and isinstance(inputs[0], str) else [inputs]
            data, total = [], 0
            for i, text in enumerate(items):
                ids = self.tok.encode(text) if isinstance(text, str) else list(text or [])
                total += len(ids)
                raw = hashlib.shake_256(repr(ids).encode()).digest(self.cfg.embedding_dim)
                data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 - 0.5 for b in raw]})
            return JSONResponse({"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": self.cfg.model, "data": data, "usage": {"prompt_tokens": total, "total_tokens": total}})

        async def tokenize(request: Request) -> Response:
            try:
                body = msgspec.json.decode(await request.body())
                self._check_model(body)
                if "messages" in body:
                    text = self.tok.apply_chat_template(body["messages"], add_generation_prompt=body.get("add_generation_prompt", True))
                    ids = self.tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
                else:
                    ids = self.tok.encode(body.get("prompt", ""), add_special_tokens=body.get("add_special_tokens", True))
            except SimError as e:
                return error_response(e)
            except (msgspec.DecodeError, ChatTemplateError, TypeError, AttributeError) as exc:
                return error_response(SimError(400, str(exc)))
            strs = [self.tok.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
            return JSONResponse({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids, "token_strs": strs})

        async def detokenize(request: Request) -> Response:
            try:
                body = msgspec.json.decode(await request.body())
                self._check_model(body)
                return JSONResponse({"prompt": self.tok.decode(body.get("tokens", []))})
            except SimError as e:
                return error_response(e)
            except (msgspec.DecodeError, TypeError, ValueError, OverflowError) as exc:
                return error_response(SimError(400, str(exc)))

        async def health(request: Request) -> Response:
            return Response(status_code=200)

        async def version(request: Request) -> Response:
            return JSONResponse({"version": VLLM_VERSION})

        async def metrics(request: Request) -> Response:
            assert self.engine is not None
            return Response(self.metrics.sync(self.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

        async def reset(request: Request) -> Response:
            assert self.engine is not None
            if not self.engine.reset_prefix_cache():
                return error_response(SimError(400, "Failed to reset prefix cache: requests are running"))
            return Response(status_code=200)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette):
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        async def not_found(request: Request, exc: Exception) -> Response:
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        routes = [
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/reset_prefix_cache", reset, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found})


class _AbortingStream(StreamingResponse):
    """A stream that aborts the engine request when the client goes away."""

    def __init__(self, content, engine: Engine, req: EngineRequest, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._engine = engine
        self._req = req

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._req.finish_reason is None:
                self._engine.abort(self._req)
