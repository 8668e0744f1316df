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
from typing import Any, ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
