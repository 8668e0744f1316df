"""Client connections, guarded before the app sees a request.

uvicorn bounds nothing between accepting a connection and the end of its request headers: a
client sending a header byte every few seconds (slowloris) holds a socket and a file
descriptor for as long as it likes, and enough of them stop the gateway accepting at all. Its
own protocol errors are answered in plain text. This protocol (uvicorn's httptools one, which
the gateway uses) adds three things, cheap per connection (one timer handle):

* the request headers must be complete ``header_timeout_s`` after the connection opens, or
  after the first byte of a later request on a kept-alive connection: else 408 and closed;
* past ``max_connections`` open client connections, a new one gets a 503 and is closed;
* malformed HTTP gets an OpenAI-style JSON 400, like every other error the gateway gives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _HttpToolsCycle

from .errors import error_body

log = logging.getLogger("kvgate.connections")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def error_bytes(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = msgspec.json.encode(error_body(status, message, code))
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (status, _REASONS[status], len(body))
    return head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a connection cap and JSON errors."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 4096

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def configured(cls, header_timeout_s: float, max_connections: int) -> type[GuardedHttpToolsProtocol]:
        """A subclass carrying these limits (uvicorn instantiates the class it is given)."""
        return type("GuardedHttpToolsProtocol", (cls,), {"header_timeout_s": header_timeout_s, "max_connections": max_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(error_bytes(503, "the gateway has too many open connections; retry later", "too_many_connections"))
            transport.close()
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a later request on a kept-alive connection gets its own deadline

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(400, msg, "invalid_http"))
        self.transport.close()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(error_bytes(408, f"request headers not received within {self.header_timeout_s:g}s", "header_timeout"))
            self.transport.close()


class ChunkWriter:
    """Writes a started chunked response's body straight to the client's transport.

    uvicorn's ``send`` does per body message what an ASGI server must (type checks, a dict
    lookup per key, HEAD and content-length handling), then one ``transport.write``; for a
    relayed stream of one-event chunks that is most of the per-event Python work, and it has
    to run in a task. Once ``http.response.start`` went through uvicorn and it chose chunked
    encoding (the relayed headers never carry a length), each chunk needs only its framing
    and the write, which ``sink`` does from any callback (the upstream parser's, with no task
    woken per chunk). The end of the body still goes through uvicorn's ``send``, which
    finishes the cycle (the terminating chunk, keep-alive). Flow control and a client that
    left are honoured as uvicorn does: nothing is written once the client is gone, and the
    writer says when the transport's buffer is above its high-water mark (``drain`` waits).
    """

    __slots__ = ("_cycle", "_flow", "_write", "last")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._write = cycle.transport.write
        self.last = b""  # the last chunk written

    @classmethod
    def for_send(cls, send: Any) -> ChunkWriter | None:
        """The writer for ``send`` — uvicorn's httptools ``RequestResponseCycle.send`` after a
        chunked response start — else None (another server, a wrapped send, a HEAD request,
        a length-framed response): the caller then sends body messages as usual."""
        cycle = getattr(send, "__self__", None)
        if type(cycle) is not _HttpToolsCycle or cycle.chunked_encoding is not True or cycle.scope["method"] == "HEAD":
            return None
        if not cycle.response_started or cycle.response_complete:
            return None
        return cls(cycle)

    async def drain(self) -> None:
        """Until the client's transport takes more (or the client is gone)."""
        if self._flow.write_paused and not self._cycle.disconnected:
            await self._flow.drain()

    async def write(self, chunk: bytes) -> None:
        """One body chunk (non-empty), once the transport takes more."""
        await self.drain()
        self.put(chunk)

    def put(self, chunk: bytes) -> bool:
        """Write one body chunk (non-empty) now; True if the transport is full (``drain``)."""
        self.last = chunk
        if not self._cycle.disconnected:
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        return self._flow.write_paused

    def sink(self, feed: Callable[[bytes], object] | None = None) -> Callable[[bytes], bool]:
        """``put`` as one closure (a parser callback calls it per chunk), telling ``feed``
        about each chunk first."""
        cycle, flow, write = self._cycle, self._flow, self._write
        me = self
        if feed is None:

            def put(chunk: bytes) -> bool:
                me.last = chunk
                if not cycle.disconnected:
                    write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                return flow.write_paused

        else:

            def put(chunk: bytes) -> bool:
                me.last = chunk
                feed(chunk)
                if not cycle.disconnected:
                    write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                return flow.write_paused

        return put
