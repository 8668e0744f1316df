"""Forward one Starlette request to an upstream with httpx and hand its answer back.

The test-side proxies (DPFront, RecordingProxy) differ only in how they pick the upstream and
what they record; the relay itself lives here once, so they all drop the same hop-by-hop
headers (Envoy's full-duplex mode sends chunked request bodies: forwarding its
``transfer-encoding`` beside the content-length httpx sets breaks the upstream request).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

# Connection-level headers (RFC 9110 §7.6.1) plus the framing both sides recompute.
HOP_BY_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade"})


def _end_to_end(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def relay(request: Request, upstream: str, *, timeout: float = 30.0, buffer: bool = True) -> Response:
    """Send ``request`` (method, path and query, end-to-end headers, body) to ``upstream`` and
    return the answer with its status and end-to-end headers.

    Server-sent events are always streamed chunk by chunk (the client sees each token as the
    upstream sends it). Other answers are read whole when ``buffer`` (the caller can then read
    ``response.body`` to record it) and streamed too when not (a client leaving mid-answer then
    closes the upstream connection, as a real front would)."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    client = httpx.AsyncClient(timeout=timeout)
    try:
        outgoing = client.build_request(request.method, upstream.rstrip("/") + path, content=await request.body(), headers=_end_to_end(request.headers))
        answer = await client.send(outgoing, stream=True)
    except BaseException:
        await client.aclose()
        raise
    headers = _end_to_end(answer.headers)
    if buffer and "text/event-stream" not in answer.headers.get("content-type", ""):
        try:
            content = await answer.aread()
        finally:
            await answer.aclose()
            await client.aclose()
        return Response(content, status_code=answer.status_code, headers=headers)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        finally:
            await answer.aclose()
            await client.aclose()

    return StreamingResponse(chunks(), status_code=answer.status_code, headers=headers)
