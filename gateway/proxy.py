"""Talking to replicas: our own keep-alive HTTP/1.1 client, header hygiene, chunk-by-chunk relay.

Latency and CPU matter here more than anywhere: every proxied request and every streamed
event passes through this module. The hot path is a small HTTP/1.1 client on asyncio
protocols and httptools' C parser (the one uvicorn uses) rather than a general-purpose
client: a request is one ``transport.write`` of head and body on a pooled connection, and a
relayed stream needs no task wake-up per event — the parser's body callback hands each
chunk straight to the client's transport (``UpstreamResponse.relay``), so an SSE event
costs the parser, one Python call and one write. Measured against aiohttp's client (its C
parser, a StreamReader, a future and a task step per chunk, a timer rescheduled per read):
see README "Where the gateway's CPU goes".

Every socket has TCP_NODELAY (set at connect; a kept-alive stream without it stalls ~40 ms
per response on delayed ACKs), and the relay hands each upstream chunk on as it arrives,
never re-framing or buffering SSE. Idle connections are dropped after
``limits.upstream_keepalive_s``. httpx stays for the cold paths (health probes, scrapes,
/tokenize fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import httpx

from .config import LimitsConfig

#: request headers a replica gets from the client: what vLLM reads (content type, W3C trace
#: context) and nothing else — cookies, other services' keys and proxy headers stay here; the
#: gateway itself sets x-request-id and the replica's authorization. ``forward_headers`` in the
#: config adds names.
FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "accept", "traceparent", "tracestate"})
#: a forwarded or relayed header value longer than this is dropped, not cut (a cut value lies)
MAX_HEADER_VALUE = 4096
#: response headers never relayed to the client
_DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "server", "date", "content-encoding"})
#: request headers the client writes itself (a caller's value is ignored)
_OWN_REQUEST_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
#: buffered body bytes (nobody reading) past which the replica's socket is paused, and below
#: which it resumes: the body of a stream that is not relayed straight through stays bounded
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamConnectError(Exception):
    """The replica failed before producing anything: safe to retry elsewhere.

    ``accepted`` is False when the request never reached the replica (connection refused,
    connect timeout) and True when the replica may have started on it (it closed the
    connection before answering) — the P/D path cares, because a decode replica that
    accepted the request may already have pulled, and so released, the prefill's KV blocks.
    """

    def __init__(self, message: str, *, accepted: bool) -> None:
        super().__init__(message)
        self.accepted = accepted


class UpstreamTimeout(Exception):
    """The replica did not answer (headers, first chunk or next chunk) in time."""


class UpstreamBroken(Exception):
    """The replica failed after the response started (connection reset mid-body)."""


class ServerDisconnected(ConnectionError):
    """The replica closed the connection before the answer was complete."""


class BadResponse(ConnectionError):
    """The replica's bytes are not an HTTP/1.1 response."""


def make_client(limits: LimitsConfig) -> httpx.AsyncClient:
    """The client for cold paths (probes, scrapes, /tokenize): simple and well-behaved."""
    timeout = httpx.Timeout(connect=limits.connect_timeout_s, read=limits.read_timeout_s, write=limits.read_timeout_s, pool=limits.connect_timeout_s)
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, limits=httpx.Limits(max_connections=256))


class ProbeResponse:
    """What ``ProbeClient.get`` returns: the part of httpx's Response the fleet reads."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class ProbeClient:
    """GETs for the fleet's health probes and metric scrapes, on the upstream client.

    Several per replica every second or two, forever: httpx (with httpcore, h11 and anyio
    under it) spent ~0.75 ms of CPU on each, most of an idle gateway's CPU. Same contract as
    ``httpx.AsyncClient.get`` for what the fleet uses: ``timeout`` bounds the whole call, and
    failures raise httpx's own exceptions (``ConnectError``, ``ReadTimeout``, ``ReadError``:
    ``httpx.HTTPError``), so code written against httpx keeps its ``except`` clauses.
    """

    def __init__(self, limits: LimitsConfig) -> None:
        self.pool = make_session(limits, max_connections=256)

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> ProbeResponse:  # noqa: ASYNC109 (httpx's signature)
        resp: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                resp = await open_upstream(self.pool, "GET", url, content=None, headers=headers or {}, first_byte_timeout_s=timeout)
                body = await resp.aread()
        except UpstreamConnectError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except (UpstreamTimeout, TimeoutError) as exc:
            raise httpx.ReadTimeout(f"no answer from {url} within {timeout:g}s") from exc
        except UpstreamBroken as exc:
            raise httpx.ReadError(f"{url}: {exc}") from exc
        finally:
            if resp is not None:
                await resp.aclose()
        return ProbeResponse(resp.status_code, resp.headers, body)

    async def aclose(self) -> None:
        await self.pool.close()


def make_session(limits: LimitsConfig, max_connections: int = 4096) -> UpstreamPool:
    """The proxy's keep-alive pool (must be created on the running event loop).

    Idle connections are dropped after ``limits.upstream_keepalive_s``, which must stay below
    the replicas' own keep-alive timeout (uvicorn, hence vLLM, closes idle connections after
    5 s): the side that closes first decides, and reusing a connection the replica is closing
    at that instant fails a request that never reached it.
    """
    return UpstreamPool(connect_timeout_s=limits.connect_timeout_s, keepalive_s=limits.upstream_keepalive_s, max_connections=max_connections)


# -- the connection ------------------------------------------------------------------------------


class _Target:
    """Where a URL goes: the pool key, the connect arguments and the request line's parts."""

    __slots__ = ("host", "host_header", "key", "path", "port", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(f"not an http(s) URL: {url!r}", accepted=False)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.key = (parts.scheme, self.host, self.port)
        netloc = parts.netloc.rpartition("@")[2]  # never userinfo in Host
        self.host_header = netloc.encode("idna" if not netloc.isascii() else "ascii")
        path = parts.path or "/"
        self.path = (path + ("?" + parts.query if parts.query else "")).encode("latin-1")


class UpstreamProtocol(asyncio.Protocol):
    """One kept-alive connection to a replica; at most one request in flight on it.

    httptools calls back into it while parsing: the head goes to the current
    ``UpstreamResponse`` (waking ``open_upstream``), each body chunk to the response's
    ``sink`` when a relay is attached (no task wakes up) or into its buffer, and the
    message's end hands the connection back to the pool before anyone has read the body.
    A gap timer (the read timeout) is re-armed lazily: data only stamps the time.
    """

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.resp: UpstreamResponse | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.closed = False
        self.idle_since = 0.0
        # the gap timeout while a request is in flight
        self.timeout: float | None = None
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False  # reading paused (a full buffer, or the relay's client)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.pool._open += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:  # bytes with no request in flight: the connection is not reusable
            self._abort()
            return
        self.last_data = self.loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed response from the replica: {exc}"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self.pool._lost(self)
        resp = self.resp
        if resp is not None:
            if resp.head_done and resp.until_eof and exc is None:
                self._complete(keep=False)  # a body delimited by the connection's end
            else:
                self._fail(exc if isinstance(exc, OSError) else ServerDisconnected("the replica closed the connection"))
        self.transport = None

    def pause_writing(self) -> None:  # request bodies are written whole; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp is not None:
            resp.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        parser = self.parser
        if resp is None or parser is None:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:  # informational (100 Continue): the real answer follows
            resp.raw_headers.clear()
            resp.skip_message = True
            return
        resp._head(status)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None:
            return
        sink = resp.sink
        if sink is not None:
            if sink(body):  # the client's transport is full: stop reading until it drains
                self.pause()
                resp._wake()
            return
        resp.buffer.append(body)
        resp.buffered += len(body)
        if resp.buffered > _HIGH_WATER:
            self.pause()
        resp._wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        if resp.skip_message:
            resp.skip_message = False
            return
        parser = self.parser
        self._complete(keep=parser is not None and parser.should_keep_alive())

    # -- the request ---------------------------------------------------------------------

    def start(self, resp: UpstreamResponse, data: bytes, timeout: float) -> None:
        """Send one request (head and body in ``data``) and route its answer to ``resp``."""
        assert self.transport is not None
        self.resp = resp
        resp.proto = self
        self.parser = httptools.HttpResponseParser(self)
        self.set_timeout(timeout)
        self.transport.write(data)

    def set_timeout(self, seconds: float | None) -> None:
        """The longest gap allowed between two reads from now on (None: none)."""
        self.timeout = seconds
        self.last_data = self.loop.time()
        self._stop_timer()
        if seconds is not None and not self.paused:
            self.timer = self.loop.call_at(self.last_data + seconds, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        timeout = self.timeout
        if timeout is None or self.resp is None or self.paused:
            return
        due = self.last_data + timeout
        if self.loop.time() < due:  # data came meanwhile: wait the rest of the gap
            self.timer = self.loop.call_at(due, self._on_timer)
            return
        self._fail(TimeoutError("the replica sent nothing in time"))
        self._abort()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self._stop_timer()  # a paused reader is not a silent replica
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
            self.set_timeout(self.timeout)

    def _complete(self, keep: bool) -> None:
        """The answer is whole: detach it and give the connection back (or close it)."""
        resp = self.resp
        self.resp = None
        self.parser = None
        self._stop_timer()
        self.timeout = None
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        if resp is not None:
            resp.proto = None
            resp._eof()
        if keep and not self.closed:
            self.pool._release(self)
        else:
            self._abort()

    def _fail(self, exc: BaseException) -> None:
        resp = self.resp
        self.resp = None
        self.parser = None
        self._stop_timer()
        if resp is not None:
            resp.proto = None
            resp._error(exc)

    def _abort(self) -> None:
        """Drop the connection (an unfinished answer tells the replica to abort its request)."""
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()


# -- the response --------------------------------------------------------------------------------


class UpstreamResponse:
    """A replica's response with headers read and the body still streaming.

    The body is read one of two ways: from a buffer (``first_chunk``, ``aread``,
    ``aiter_raw``: a task waits for data), or straight through (``relay``: each chunk is
    handed to a sink as the parser produces it, and the caller's task only wakes at the end,
    on an error, or when the sink asks to wait for its client to drain).
    """

    __slots__ = (
        "buffer",
        "buffered",
        "done",
        "exc",
        "head_done",
        "headers",
        "proto",
        "raw_headers",
        "sink",
        "skip_message",
        "status_code",
        "until_eof",
        "waiter",
    )

    def __init__(self) -> None:
        self.proto: UpstreamProtocol | None = None
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.until_eof = False  # no length, not chunked: the body ends with the connection
        self.skip_message = False
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.done = False
        self.exc: BaseException | None = None
        self.sink: Callable[[bytes], bool] | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- fed by the protocol ---------------------------------------------------------------

    def _head(self, status: int) -> None:
        self.status_code = status
        headers: dict[str, str] = {}
        length = chunked = False
        for name, value in self.raw_headers:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            headers[k] = v
            if k == "content-length":
                length = True
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        self.headers = headers
        self.raw_headers = []
        self.until_eof = not length and not chunked and status not in (204, 304)
        self.head_done = True
        self._wake()

    def _eof(self) -> None:
        self.done = True
        self._wake()

    def _error(self, exc: BaseException) -> None:
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        """Until the protocol has something new for us (head, data, end, error)."""
        w = self.waiter = asyncio.get_running_loop().create_future()
        try:
            await w
        finally:
            self.waiter = None

    # -- read by the forwarder ---------------------------------------------------------------

    @property
    def is_sse(self) -> bool:
        return "text/event-stream" in self.headers.get("content-type", "")

    def set_read_timeout(self, seconds: float | None) -> None:
        """From now on, the longest gap allowed between two chunks of the body."""
        if self.proto is not None:
            self.proto.set_timeout(seconds)

    def _take(self) -> bytes:
        """Everything buffered, as one chunk (what arrived between two wake-ups)."""
        buf = self.buffer
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.buffered = 0
        proto = self.proto
        if proto is not None and proto.paused and proto.resp is self:
            proto.resume()
        return data

    def _raise(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(str(exc) or "timeout") from None
        raise UpstreamBroken(type(exc).__name__) from exc

    async def first_chunk(self) -> bytes:
        """The body's first non-empty chunk (b"" if the body is empty)."""
        while not self.buffer:
            if self.exc is not None:
                self._raise(self.exc)
            if self.done:
                return b""
            await self._wait()
        return self._take()

    async def aread(self) -> bytes:
        """The whole body."""
        while not self.done:
            if self.exc is not None:
                self._raise(self.exc)
            await self._wait()
        return self._take() if self.buffer else b""

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk, exactly as received (SSE framing untouched); chunks that
        arrived between two wake-ups come as one."""
        while True:
            if self.buffer:
                yield self._take()
                continue
            if self.exc is not None:
                self._raise(self.exc)
            if self.done:
                return
            await self._wait()

    async def relay(self, sink: Callable[[bytes], bool], drain: Callable[[], object]) -> None:
        """Hand every body chunk to ``sink`` as it arrives, until the end of the body.

        ``sink(chunk)`` is called from the protocol's data callback (first with what is
        buffered already); it returns True when its own transport is full, which pauses
        reading from the replica until ``await drain()`` returns. Raises ``UpstreamBroken``
        or ``UpstreamTimeout`` like the other readers.
        """
        self.sink = sink  # from now on the protocol never buffers: what is buffered is older
        try:
            if self.buffer and sink(self._take()) and self.proto is not None:
                self.proto.pause()
            while True:
                if self.exc is not None:
                    self._raise(self.exc)
                if self.done:
                    return
                proto = self.proto
                if proto is not None and proto.paused:
                    await drain()  # type: ignore[misc]
                    if self.proto is proto:
                        proto.resume()
                    continue
                await self._wait()
        finally:
            self.sink = None

    async def aclose(self) -> None:
        """Done with the answer: a whole one has already given its connection back; an
        unfinished one drops the connection, which tells the replica to abort the request."""
        proto = self.proto
        self.proto = None
        if proto is not None and proto.resp is self:
            proto.resp = None
            proto.parser = None
            proto._abort()


# -- the pool ------------------------------------------------------------------------------------


class UpstreamPool:
    """Kept-alive connections to the replicas, per (scheme, host, port), most recent first.

    A connection idle for ``keepalive_s`` is never reused (a sweep closes it); at most
    ``max_connections`` are open at once (past that, a request waits for one to free up).
    """

    def __init__(self, *, connect_timeout_s: float, keepalive_s: float, max_connections: int = 4096) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        #: idle connections: key -> [(protocol, idle since)], the most recently used last
        self._conns: dict[tuple[str, str, int], list[tuple[UpstreamProtocol, float]]] = {}
        self._open = 0  # connections made and not yet lost
        self._connecting = 0
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def connector(self) -> UpstreamPool:
        """aiohttp's name for where the pooled connections live (``_conns``), kept so code
        that inspects idle connections' sockets reads them the same way."""
        return self

    def target(self, url: str) -> _Target:
        t = self._targets.get(url)
        if t is None:
            if len(self._targets) > 4096:
                self._targets.clear()
            t = self._targets[url] = _Target(url)
        return t

    async def acquire(self, t: _Target) -> UpstreamProtocol:
        """An idle kept-alive connection to ``t``, else a new one."""
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed", accepted=False)
        idle = self._conns.get(t.key)
        if idle:
            loop = asyncio.get_running_loop()
            now = loop.time()
            while idle:
                proto, since = idle.pop()
                if proto.closed or proto.transport is None or proto.transport.is_closing():
                    continue
                if now - since >= self.keepalive_s:
                    # every one below it is older still
                    proto._abort()
                    for older, _ in idle:
                        older._abort()
                    idle.clear()
                    break
                return proto
        while self._open + self._connecting >= self.max_connections:
            if not self._close_one_idle():
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                try:
                    await fut
                finally:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
        return await self._connect(t)

    async def _connect(self, t: _Target) -> UpstreamProtocol:
        loop = asyncio.get_running_loop()
        ctx = None
        if t.tls:
            ctx = self._ssl = self._ssl or ssl.create_default_context()
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: UpstreamProtocol(self, t.key), t.host, t.port, ssl=ctx, server_hostname=t.host if ctx is not None else None
                )
        except TimeoutError as exc:
            raise UpstreamConnectError(f"connect timeout: {t.host}:{t.port}", accepted=False) from exc
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, DNS
            raise UpstreamConnectError(f"ClientConnectorError: cannot connect to {t.host}:{t.port}: {exc}", accepted=False) from exc
        finally:
            self._connecting -= 1
            self._notify()
        return proto

    def _release(self, proto: UpstreamProtocol) -> None:
        """A connection whose answer was read in full: idle, ready for the next request."""
        if self._closed or proto.closed:
            proto._abort()
            return
        now = proto.loop.time()
        self._conns.setdefault(proto.key, []).append((proto, now))
        if self._waiters:
            self._notify()
        if self._sweep is None:
            self._sweep = proto.loop.call_at(now + self.keepalive_s, self._sweep_idle)

    def _lost(self, proto: UpstreamProtocol) -> None:
        """A connection closed (either side)."""
        self._open -= 1
        idle = self._conns.get(proto.key)
        if idle:
            for i, (p, _) in enumerate(idle):
                if p is proto:
                    del idle[i]
                    break
        self._notify()

    def _notify(self) -> None:
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def _close_one_idle(self) -> bool:
        for idle in self._conns.values():
            if idle:
                proto, _ = idle.pop(0)
                proto._abort()
                return True
        return False

    def _sweep_idle(self) -> None:
        """Close connections idle for ``keepalive_s``; come back while any stays idle."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest = None
        for key, idle in list(self._conns.items()):
            keep = []
            for proto, since in idle:
                if now - since >= self.keepalive_s or proto.closed:
                    proto._abort()
                else:
                    keep.append((proto, since))
                    oldest = since if oldest is None else min(oldest, since)
            if keep:
                self._conns[key] = keep
            else:
                del self._conns[key]
        if oldest is not None:
            self._sweep = loop.call_at(oldest + self.keepalive_s, self._sweep_idle)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._conns.values():
            for proto, _ in idle:
                proto._abort()
        self._conns.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)


# -- headers and the call ------------------------------------------------------------------------


def forward_headers(incoming: Mapping[str, str], request_id: str, allowed: frozenset[str] = FORWARDED_REQUEST_HEADERS) -> dict[str, str]:
    """The client headers a replica may see (``allowed`` names, values within the cap), plus the
    shared X-Request-Id."""
    out = {}
    for k, v in incoming.items():
        lk = k.lower()
        if lk in allowed and len(v) <= MAX_HEADER_VALUE:
            out[lk] = v
    out["x-request-id"] = request_id
    out.setdefault("content-type", "application/json")
    return out


def relay_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Upstream response headers to pass on, lower-cased so ours replace theirs, not duplicate."""
    out: dict[str, str] = {}
    for k, v in upstream.items():
        lk = k.lower()
        if lk not in _DROP_RESPONSE and len(v) <= MAX_HEADER_VALUE:
            out[lk] = v
    return out


def request_head(method: str, t: _Target, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and headers: Host, ours (names lower-cased, never CR or LF in a value:
    such a header is left out), Accept ``*/*`` unless given, Content-Length."""
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode("ascii"), t.path, t.host_header)]
    accept = False
    for k, v in headers.items():
        name = k.lower()
        if name in _OWN_REQUEST_HEADERS or "\r" in v or "\n" in v or "\r" in name or "\n" in name or ":" in name:
            continue
        accept = accept or name == "accept"
        lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), v.encode("latin-1", "replace")))
    if not accept:
        lines.append(b"accept: */*\r\n")
    lines.append(b"content-length: %d\r\n\r\n" % length)
    return b"".join(lines)


async def open_upstream(
    session: UpstreamPool,
    method: str,
    url: str,
    *,
    content: bytes | None,
    headers: Mapping[str, str],
    first_byte_timeout_s: float,
) -> UpstreamResponse:
    """Send a request and wait for the response *headers* only (body left streaming).

    Connection failures and a peer that closes before answering raise
    ``UpstreamConnectError`` (nothing was produced, the caller may retry elsewhere);
    no headers within ``first_byte_timeout_s`` raises ``UpstreamTimeout``. Until the body's
    end (or ``aclose``) the connection is the response's; then it goes back to the pool.
    """
    t = session.target(url)
    proto = await session.acquire(t)
    body = content or b""
    resp = UpstreamResponse()
    data = request_head(method, t, headers, len(body))
    proto.start(resp, data + body if len(body) < 65536 else data, first_byte_timeout_s)
    if len(body) >= 65536 and proto.transport is not None:
        proto.transport.write(body)  # large: no copy into the head
    try:
        while not resp.head_done:
            exc = resp.exc
            if exc is not None:
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(f"no answer within {first_byte_timeout_s:g}s")
                raise UpstreamConnectError(f"{type(exc).__name__}: {exc}", accepted=True)
            await resp._wait()
    except BaseException:
        await resp.aclose()
        raise
    return resp
