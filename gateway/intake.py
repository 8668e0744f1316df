"""The front door: what every request passes before it is routed.

Client auth, the body read within its size limit, JSON decoding, the checks an OpenAI server
makes before doing any work, model resolution and admission — in that order, and in one place
for every way in: the HTTP gateway (``FrontDoor.serve``) and the Envoy ext-proc picker
(``FrontDoor.check`` + ``FrontDoor.admit``, which routes but does not proxy).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from . import responses
from .admission import Admission
from .config import GatewayConfig
from .errors import GatewayError, bad_request
from .fleet import Fleet
from .metrics import GatewayMetrics
from .request import CHAT, COMPLETIONS, DETOKENIZE, EMBEDDINGS, RESPONSES, TOKENIZE, UNROUTED, DisconnectWatch, ProxyRequest

if TYPE_CHECKING:
    from starlette.responses import Response

    from .forward import RelayResponse
    from .routing import Router


def _bearer(authorization: str) -> str | None:
    return authorization[7:].strip() if authorization.lower().startswith("bearer ") else None


def key_matches(authorization: str, allowed: list[str]) -> bool:
    """The bearer token of ``authorization`` is one of ``allowed`` (constant-time compare)."""
    given = _bearer(authorization)
    return given is not None and any(hmac.compare_digest(given, k) for k in allowed)


def require_client_key(keys: list[str], authorization: str) -> None:
    """401 unless ``authorization`` carries one of the client keys (none configured: open)."""
    if keys and not key_matches(authorization, keys):
        raise GatewayError(401, "invalid or missing API key (Authorization: Bearer ...)", "invalid_api_key")


#: fields of a request body only the gateway may set: a client's ``kv_transfer_params`` would
#: make a replica reserve KV blocks and hand back its side channel, or connect where the client
#: says; hop 2 carries exactly what hop 1 returned
INTERNAL_FIELDS = ("kv_transfer_params",)
#: deepest JSON nesting accepted (tool schemas nest a few tens of levels); deeper bodies would
#: exhaust the recursion limit further down (copies, templates, re-encoding)
MAX_JSON_DEPTH = 64


#: on an answer sent before the body was read: the connection cannot carry another request (the
#: unread rest would parse as one), so uvicorn closes it at once instead of after its keep-alive
CLOSE = {"connection": "close"}


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``, and with 408
    unless it all arrives within ``timeout_s`` (a client trickling it in holds a connection)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"request body larger than {limit} bytes", "body_too_large", headers=CLOSE)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, f"request body larger than {limit} bytes", "body_too_large", headers=CLOSE)
                chunks.append(chunk)
    except ClientDisconnect:
        raise GatewayError(400, "client disconnected while sending the body", "client_disconnected") from None
    except TimeoutError:
        raise GatewayError(408, f"request body not received within {timeout_s:g}s", "body_timeout", headers=CLOSE) from None
    return b"".join(chunks)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def decode_json(raw: bytes) -> Any:
    if not raw:
        raise bad_request("request body is empty; expected JSON")
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        value = None  # nested deeper than the decoder goes: certainly too deep
    else:
        # fewer brackets than the limit cannot nest deeper than it: skip the walk (token lists)
        if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH or not isinstance(value, (dict, list)) or not _depth_exceeds(value, MAX_JSON_DEPTH):
            return value
    raise bad_request(f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels")


def _is_prompt(value: Any) -> bool:
    """The shape of vLLM's prompt (and embeddings input): str | list[str] | list[int] |
    list[list[int]], nothing empty. Token ids themselves (negative, too large, ``2.0``) are
    checked where the prompt is tokenized, with vLLM's own messages."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(x, str) for x in value):
        return True
    if all(isinstance(x, int | float) for x in value):
        return True
    return all(isinstance(x, list) and x and all(isinstance(t, int | float) for t in x) for x in value)


def validate_body(kind: str, body: Any) -> None:
    """The checks an OpenAI server makes before doing any work (400 with the offending param)."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    if kind in (TOKENIZE, DETOKENIZE):
        _validate_tokenize(kind, body)
        return
    if kind == EMBEDDINGS:
        if not isinstance(model, str):
            raise bad_request("'model' is required and must be a string", "model")
        if "input" not in body:
            raise bad_request("'input' is required", "input")
        if not _is_prompt(body["input"]):
            raise bad_request("'input' must be a string, a list of strings, a list of token ids, or a list of lists of token ids", "input")
        return
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    if kind == CHAT:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    elif kind == COMPLETIONS and not _is_prompt(body.get("prompt")):
        embeds = body.get("prompt_embeds")
        if body.get("prompt") in (None, "") and isinstance(embeds, (str, list)) and embeds:
            pass  # vLLM's prompt_embeds (base64 tensors) alone: valid, routed on load only
        elif body.get("prompt") in (None, "") and embeds in (None, [], ""):
            raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        else:
            raise bad_request("'prompt' must be a string, a list of strings, a list of token ids, or a list of lists of token ids", "prompt")
    elif kind == RESPONSES:
        responses.validate(body)
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{key}' must be a positive integer", key)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be a boolean", "stream")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise bad_request("'n' must be a positive integer", "n")


def _validate_tokenize(kind: str, body: dict) -> None:
    """vLLM's /tokenize (a prompt, or messages) and /detokenize (token ids) bodies; ``model`` may
    be left out there (the gateway then picks the one model it serves)."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad_request("'model' must be a string", "model")
    if kind == DETOKENIZE:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("'tokens' must be a list of token ids", "tokens")
        return
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise bad_request("'messages' must be a list of objects with a string 'role'", "messages")
    elif not isinstance(body.get("prompt"), str):
        raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")


def unknown_model(fleet: Fleet, name: str) -> GatewayError:
    """404 for a model no replica serves; says so when replicas refused to list their models."""
    message = f"The model `{name}` does not exist."
    refused = sorted(rid for rid in fleet.auth_rejected if not fleet.states[rid].models)
    if refused:
        message += f" (replica {', '.join(refused)} rejected the gateway's credentials on /v1/models, so its models are unknown)"
    return GatewayError(404, message, "model_not_found", "model")


class FrontDoor:
    """Auth → body → validation → model → admission, then hands the request to routing."""

    def __init__(self, cfg: GatewayConfig, fleet: Fleet, admission: Admission, metrics: GatewayMetrics, router: Router) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.admission = admission
        self.metrics = metrics
        self.router = router

    async def serve(self, req: ProxyRequest, request: Request) -> Response | RelayResponse:
        """The HTTP gateway's whole request: admitted here, then routed and proxied."""
        await self.accept(req, request)
        return await self.router.route(req)

    async def accept(self, req: ProxyRequest, request: Request) -> None:
        """Everything up to routing, for an HTTP request: key, body, checks, model, admission."""
        self.authenticate(req)
        req.raw = await read_body(request, self.cfg.limits.max_body_bytes, self.cfg.limits.body_timeout_s)
        self.check(req)
        await self.admit(req, request.receive)

    def authenticate(self, req: ProxyRequest) -> None:
        require_client_key(self.cfg.auth.api_keys, req.headers.get("authorization", ""))

    def check(self, req: ProxyRequest) -> None:
        """Decode and validate ``req.raw``; resolve the model (404 if nobody serves it)."""
        body = decode_json(req.raw)
        validate_body(req.kind, body)
        if body.get("model") is None and req.kind in (TOKENIZE, DETOKENIZE):
            # vLLM answers for its one model; a gateway in front of several cannot guess
            bases = sorted({m.base for m in self.fleet.models().values()})
            if len(bases) != 1:
                raise bad_request("'model' is required: the gateway serves several models", "model")
            body["model"] = bases[0]
            req.raw = msgspec.json.encode(body)
        info = self.fleet.resolve_model(body["model"])
        if info is None:
            raise unknown_model(self.fleet, body["model"])
        if any(f in body for f in INTERNAL_FIELDS):
            for f in INTERNAL_FIELDS:
                body.pop(f, None)
            req.raw = msgspec.json.encode(body)
        req.body = body
        req.model = body["model"]
        req.stream = req.kind not in UNROUTED and body.get("stream") is True
        req.ctx.model = info.base
        req.ctx.lora = info.lora

    async def admit(self, req: ProxyRequest, receive: Receive | None = None) -> None:
        """Wait for an admission slot (429 when the queue is full), watching for the client
        leaving meanwhile when there is a connection to watch."""
        if receive is not None:
            req.watch = DisconnectWatch(receive)
        waited = await self.admission.acquire()
        req.admission = self.admission
        self.metrics.queue_wait.observe(waited)
        req.check_client()
