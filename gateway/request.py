"""One proxied request, carried unchanged from intake to its last byte.

Every stage takes this one object instead of a dozen loose arguments: intake fills the body,
the model and the admission slot; routing the context, the profile and the trace; the hops
and the forwarder read it and close it. What travels with it (the disconnect watch, the
debug trace) is defined here too, so no stage reaches back into another for its types.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Receive

from scorers.base import RequestContext

if TYPE_CHECKING:
    from .admission import Admission
    from .tracing import RequestTracer

req_log = logging.getLogger("kvgate.request")

COMPLETIONS = "completions"
CHAT = "chat"
EMBEDDINGS = "embeddings"
RESPONSES = "responses"  # /v1/responses: a chat built from instructions + input items
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
#: kinds routed on load alone: no prompt to tokenize, no prefix to look up, no P/D
UNROUTED = frozenset({EMBEDDINGS, TOKENIZE, DETOKENIZE})


#: a client's X-Request-Id is kept only if it looks like an id: it is forwarded to every hop,
#: echoed by replicas, logged and used as vLLM's request id, so an unbounded or odd one would
#: travel everywhere (an 8 KB id made replicas' echoed headers fail to parse)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")


def new_request_id() -> str:
    return f"kvg-{uuid.uuid4().hex}"


def request_id_from(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is a sane id (≤ 128 URL/base64-safe characters), else a
    fresh one — as Envoy does with an external id it does not trust."""
    given = headers.get("x-request-id")
    return given if given is not None and _REQUEST_ID.fullmatch(given) else new_request_id()


class DisconnectWatch:
    """Cancels the request's task when the client goes away, at any stage.

    Started once the request body is read; from then on the only ASGI message left is
    ``http.disconnect``. The cancellation lands in whatever the request awaits (admission,
    the index, a replica's answer, the next streamed chunk), whose cleanup closes the upstream
    connection — which is how a replica learns to abort. ``absorb()`` tells our own
    cancellation apart from a server shutdown.
    """

    __slots__ = ("_owner", "_task", "finishing", "fired")

    def __init__(self, receive: Receive) -> None:
        self.fired = False
        self.finishing = False  # the response is complete: uvicorn's receive() returns at once
        self._owner = asyncio.current_task()
        self._task = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finishing and self._owner is not None:
            self.fired = True
            self._owner.cancel()

    def stop(self) -> None:
        self.finishing = True
        self._task.cancel()

    def absorb(self) -> bool:
        """Inside ``except CancelledError``: True (cancellation undone) if it was ours."""
        if self.fired and self._owner is not None:
            self.fired = False
            self._owner.uncancel()
            return True
        return False


@dataclass(slots=True)
class Trace:
    """What the per-request debug log line says (built only when debug logging is on)."""

    request_id: str
    kind: str
    model: str
    stream: bool
    profile: str
    prompt_tokens: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    replicas: list[str] = field(default_factory=list)
    prefix_blocks: int = 0
    path: str = "one_hop"
    retries: int = 0

    def emit(self, status: int, ok: bool, ttft_s: float | None, e2e_s: float) -> None:
        req_log.debug(
            "request",
            extra={
                "request_id": self.request_id,
                "kind": self.kind,
                "model": self.model,
                "stream": self.stream,
                "profile": self.profile,
                "pd_path": self.path,
                "replica": ",".join(self.replicas),
                "prefix_blocks": self.prefix_blocks,
                "prompt_tokens": self.prompt_tokens,
                "scores": self.scores,
                "retries": self.retries,
                "status": status,
                "ok": ok,
                "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
                "e2e_ms": round(e2e_s * 1000, 3),
            },
        )


@dataclass(slots=True, eq=False)
class ProxyRequest:
    """A client request on its way to a replica.

    Built by the HTTP handler (or the ext-proc stream) from what the transport knows; the
    stages fill in the rest in order: intake (``raw``, ``body``, ``model``, ``stream``,
    ``watch``, the admission slot), routing (``ctx``, ``profile``, ``trace``).
    """

    kind: str  # COMPLETIONS | CHAT | RESPONSES | EMBEDDINGS | TOKENIZE | DETOKENIZE
    path: str  # the replica path it goes to (/v1/completions, ...)
    request_id: str
    headers: Mapping[str, str]  # the client's, as received
    t0: float = field(default_factory=time.perf_counter)
    raw: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # the name the client asked for (base model or LoRA adapter)
    stream: bool = False
    ctx: RequestContext = field(init=False)
    profile: str = "default"
    watch: DisconnectWatch | None = None
    trace: Trace | None = None
    admission: Admission | None = None  # set while the request holds an admission slot
    upstream_headers: dict[str, str] | None = None  # what every hop forwards (the forwarder fills it once)
    #: the request's OpenTelemetry spans (``gateway.tracing``); None when tracing is off, so each
    #: hook on the path costs one attribute check
    otel: RequestTracer | None = None

    def __post_init__(self) -> None:
        self.ctx = RequestContext(request_id=self.request_id, model="", headers=self.headers)

    def check_client(self) -> None:
        """Raise CancelledError if the client has left.

        The disconnect watch cancels the request's task, but Python 3.11's ``asyncio.wait_for``
        can swallow a cancellation that arrives as its awaitable completes; checked before each
        costly step (admission done, each dispatch), a lost one still stops the request.
        """
        if self.watch is not None and self.watch.fired:
            raise asyncio.CancelledError

    def release(self) -> None:
        """Give the admission slot back (once; later calls do nothing)."""
        admission, self.admission = self.admission, None
        if admission is not None:
            admission.release()

    def close(self) -> None:
        """Everything the request holds, given back: the slot and the disconnect watch."""
        if self.watch is not None:
            self.watch.stop()
        self.release()
        if self.otel is not None:
            self.otel.end()
