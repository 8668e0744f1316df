"""Run a real gateway (uvicorn on loopback) in a background thread for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop

from gateway.app import build_app
from gateway.config import GatewayConfig, parse_config
from gateway.server import uvicorn_config
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.net import bound_socket
from tests.helpers.relay import relay

MODEL = "kvgate/demo-8b"


def fleet_config(handles, *, roles: list[str] | None = None, **overrides: Any) -> GatewayConfig:
    """A gateway config in front of simulator handles (ids r0, r1, ... or role-i with roles)."""
    replicas = []
    for i, h in enumerate(handles):
        role = roles[i] if roles else h.config.role
        replicas.append(
            {
                "id": f"r{i}",
                "url": h.url,
                "role": role,
                "models": [h.config.model],
                "kv_events": h.events_endpoint,
                "replay": h.replay_endpoint,
            }
        )
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},  # GatewayThread binds port 0 and reports the port
        "replicas": replicas,
        "models": {MODEL: {"tokenizer": "demo"}},
        "debug_headers": True,
        "health": {"interval_s": 0.3, "timeout_s": 0.5, "failure_threshold": 2, "cooldown_s": 1.0},
        "scrape": {"interval_s": 0.2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def fleet_fixture(replicas: int, *, time_scale: float):
    """A module-scoped ``fleet`` fixture: ``replicas`` simulated replicas of MODEL with seeds
    0, 1, ... (``fleet = fleet_fixture(2, time_scale=0.01)`` at a test module's top level)."""

    @pytest.fixture(scope="module")
    def fleet() -> Iterator[SimFleet]:
        with SimFleet([SimConfig(model=MODEL, seed=i, time_scale=time_scale) for i in range(replicas)]) as f:
            yield f

    return fleet


class GatewayThread:
    """uvicorn serving build_app(cfg) on its own uvloop event loop in a daemon thread.

    Same server settings as ``kvgate serve`` (uvloop, httptools), so socket-level behaviour
    (TCP_NODELAY, disconnect detection) is what production gets.
    """

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.app = build_app(cfg)
        # bound here (port 0 = the kernel's choice, reported back) and handed to uvicorn
        self.sock = bound_socket(cfg.listen.host, cfg.listen.port)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app, cfg.listen.host, self.port, loop="none", limits=cfg.limits))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen.host}:{self.port}"

    @property
    def gateway(self):
        return self.app.state.gateway

    def _run(self) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the gateway's loop (to read its state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of samples named ``name`` (with matching labels) in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def get_metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=5).text


class RecordingProxy:
    """A transparent HTTP proxy in front of one replica that records what crosses it.

    Used to check the exact bodies and headers the gateway sends on each P/D hop, and the
    prefill replica's answers. Each exchange is a dict: method, path, headers (lower-case),
    body (parsed JSON or raw bytes), status, response (parsed JSON for non-streaming answers).
    """

    def __init__(self, target: str) -> None:
        import json

        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        self.target = target.rstrip("/")
        self.sock = bound_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.exchanges: list[dict[str, Any]] = []

        async def forward(request: Request):
            raw = await request.body()
            try:
                parsed: Any = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw
            rec: dict[str, Any] = {
                "method": request.method,
                "path": request.url.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": parsed,
            }
            self.exchanges.append(rec)  # before the answer: a test sees what is in flight
            response = await relay(request, self.target, timeout=60)
            rec["status"] = response.status_code
            if not isinstance(response, StreamingResponse):
                try:
                    rec["response"] = json.loads(response.body)
                except ValueError:
                    rec["response"] = response.body
            return response

        app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="off", loop="none"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def posts(self, path_suffix: str = "completions") -> list[dict[str, Any]]:
        return [e for e in self.exchanges if e["method"] == "POST" and e["path"].endswith(path_suffix)]

    def start(self) -> RecordingProxy:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("proxy did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def replica_metric(url: str, name: str) -> float:
    """A metric read straight from a replica's /metrics (e.g. vllm:num_requests_running)."""
    return metric_value(httpx.get(f"{url}/metrics", timeout=5).text, name)


@contextlib.contextmanager
def recorded_gateway(handles, **overrides: Any) -> Iterator[tuple[GatewayThread, list[RecordingProxy]]]:
    """A gateway over ``handles`` with a recording proxy in front of each replica (the proxies
    are what the gateway calls): what every replica received, per request."""
    proxies = [RecordingProxy(h.url).start() for h in handles]
    cfg = fleet_config(handles, **overrides)
    for r, p in zip(cfg.replicas, proxies, strict=True):
        r.url = p.url
    try:
        with GatewayThread(cfg) as g:
            yield g, proxies
    finally:
        for p in proxies:
            p.stop()
