"""OpenAI-style errors: every failure a client can see has a status, a message, a type, a code.

The shape matches what the OpenAI SDK parses (``{"error": {"message", "type", "param",
"code"}}``), so SDK users get ``BadRequestError``, ``NotFoundError``, ``RateLimitError`` and so
on with our message, never a traceback.
"""

from __future__ import annotations

import msgspec
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """Raised anywhere in request handling; rendered as an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


#: ``code`` for a replica's error whose own code is its HTTP status (vLLM's ``ErrorInfo.code``)
_CODES = {
    400: "invalid_request",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "body_too_large",
    422: "invalid_request",
    429: "rate_limited",
    500: "upstream_error",
    501: "not_implemented",
    502: "upstream_error",
    503: "upstream_unavailable",
    504: "upstream_timeout",
}


def normalize_error(status: int, content: bytes) -> bytes | None:
    """A replica's JSON error body in the gateway's one shape, or None to relay it unchanged.

    vLLM answers ``{"error": {"message", "type": "BadRequestError", "param", "code": 400}}``
    (older releases the same fields at the top level with ``"object": "error"``) while the
    gateway's own errors follow OpenAI (``type: invalid_request_error``, a string ``code``).
    Clients switch on ``type`` and ``code``, so every error leaves the gateway in one shape;
    the replica's message and param are kept.
    """
    try:
        data = msgspec.json.decode(content)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    err = data.get("error") if isinstance(data.get("error"), dict) else data if data.get("object") == "error" else None
    if err is None or not isinstance(err.get("message"), str):
        return None
    code = err.get("code")
    if not isinstance(code, str) or not code:
        code = _CODES.get(status, f"upstream_{status}")
    param = err.get("param") if isinstance(err.get("param"), str) else None
    return msgspec.json.encode(error_body(status, err["message"], code, param))


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_response(exc: GatewayError, extra_headers: dict[str, str] | None = None) -> Response:
    headers = dict(exc.headers)
    if extra_headers:
        headers.update(extra_headers)
    return Response(msgspec.json.encode(exc.body()), status_code=exc.status, media_type="application/json", headers=headers)


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """An SSE ``data:`` event carrying an error, sent when a stream breaks after it started.

    The OpenAI SDK raises ``APIError`` on a streamed event with an ``error`` key, so the client
    learns the answer is incomplete instead of seeing a silently truncated stream.
    """
    return b"data: " + msgspec.json.encode(error_body(status, message, code)) + b"\n\n"


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code, param)
