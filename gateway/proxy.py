"""Talking to replicas: one pooled HTTP client, header hygiene, chunk-by-chunk relay.

Latency matters here more than anywhere: the gateway must add well under a millisecond.
So the client keeps connections alive per replica, sets TCP_NODELAY on every socket (a
kept-alive stream without it stalls ~40 ms per response on delayed ACKs), and the relay hands
each upstream chunk to the client as it arrives, never re-framing or buffering SSE.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping

import httpx

from .config import LimitsConfig

#: request headers never forwarded upstream (hop-by-hop, or recomputed by the client)
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "accept-encoding",
        "x-kvgate-profile",
    }
)
#: response headers never relayed to the client
_DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "server", "date", "content-encoding"})


class UpstreamConnectError(Exception):
    """The replica could not be reached or broke before sending response headers: safe to retry."""


def make_client(limits: LimitsConfig, max_connections: int = 4096) -> httpx.AsyncClient:
    """The shared upstream client: keep-alive pool, TCP_NODELAY, no automatic decompression."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        retries=0,
    )
    timeout = httpx.Timeout(connect=limits.connect_timeout_s, read=limits.read_timeout_s, write=limits.read_timeout_s, pool=limits.connect_timeout_s)
    return httpx.AsyncClient(transport=transport, timeout=timeout, follow_redirects=False)


def forward_headers(incoming: Mapping[str, str], request_id: str) -> dict[str, str]:
    """Client headers worth passing on, plus the shared X-Request-Id."""
    out = {k: v for k, v in incoming.items() if k.lower() not in _DROP_REQUEST}
    out["x-request-id"] = request_id
    out.setdefault("content-type", "application/json")
    return out


def relay_headers(upstream: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower() not in _DROP_RESPONSE}


async def open_upstream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    content: bytes | None,
    headers: Mapping[str, str],
    first_byte_timeout_s: float,
) -> httpx.Response:
    """Send a request and wait for the response *headers* only (body left streaming).

    Connection failures and a peer that closes before answering raise
    ``UpstreamConnectError`` (nothing was produced, the caller may retry elsewhere).
    """
    request = client.build_request(method, url, content=content, headers=headers)
    request.extensions["timeout"] = {**request.extensions.get("timeout", {}), "read": first_byte_timeout_s}
    try:
        return await client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.PoolTimeout) as exc:
        raise UpstreamConnectError(f"{type(exc).__name__}: {exc}") from exc


async def iter_body(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body chunk by chunk, exactly as received (SSE framing untouched)."""
    async for chunk in response.aiter_raw():
        if chunk:
            yield chunk
