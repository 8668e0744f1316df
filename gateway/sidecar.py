"""``kvgate sidecar``: prefill→decode in the decode pod, as llm-d runs it behind Envoy.

The endpoint picker (``kvgate extproc``, or llm-d's) chooses a decode pod and, for a long
uncached prompt, a prefill endpoint, which it names in ``x-prefiller-host-port: <ip:port>``.
Envoy sends the request to the decode pod's sidecar; the sidecar runs hop 1 on that prefill
endpoint (``do_remote_decode``, one token, not streamed) and hop 2 on the local vLLM with the
``kv_transfer_params`` hop 1 returned — the same ``gateway.hops`` code as the HTTP gateway's
own P/D, so one request id for both hops, unbuffered streaming, a client leaving cancels
whichever hop is running, and a failing prefill falls back to prefilling locally.

Without the header the request goes straight to the local vLLM. The sidecar only ever calls
prefill endpoints it was told about (``--prefill`` or the config's prefill replicas, by name
or address, resolved once at start; and with a ``discovery:`` section in ``--config``, the
pods Kubernetes lists with role prefill or both, at the address and port discovery gives them,
followed live: a prefill pod added later is accepted as soon as its watch event arrives, one
deleted or relabelled is refused from then on): any other target is refused with 403 and
nothing is sent — no open relay.
Client-sent ``kv_transfer_params`` are stripped at the front door. Every other path
(``/v1/models``, ``/health``, ``/metrics``, ``/tokenize`` ...) passes through to the local vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlparse

import aiohttp
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from scorers.base import ROLE_BOTH, ROLE_DECODE, ROLE_PREFILL, EndpointState

from .app import Gateway, proxy_request
from .config import ConfigError, DiscoveryConfig, GatewayConfig, load_config, parse_config
from .errors import GatewayError, error_response
from .forward import RelayResponse
from .hops import Plan
from .request import CHAT, COMPLETIONS, RESPONSES, ProxyRequest

log = logging.getLogger("kvgate.sidecar")

#: the header llm-d's endpoint picker sets on requests that need a remote prefill
#: (llm-d-router ``routing.PrefillEndpointHeader``): ``host:port`` of the prefill endpoint
PREFILL_HEADER = "x-prefiller-host-port"
LOCAL_ID = "local"
_ROUTES = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT, "/v1/responses": RESPONSES}
_HOP_BY_HOP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", PREFILL_HEADER}
)


def sidecar_config(vllm_url: str, prefill: list[str], base: GatewayConfig | None = None) -> GatewayConfig:
    """The gateway configuration a sidecar runs with: the local vLLM as the one decode replica,
    each allowed prefill endpoint as a prefill replica, no index (the picker routed already).
    A ``discovery`` section of ``base`` stays: the sidecar follows its prefill pods."""
    data: dict[str, Any] = {} if base is None else _as_dict(base)
    prefills = [r for r in data.get("replicas", []) if r.get("role") == ROLE_PREFILL]
    for i, target in enumerate(prefill):
        url = target if "://" in target else f"http://{target}"
        prefills.append({"id": f"prefill-{i}", "url": url, "role": ROLE_PREFILL})
    data["replicas"] = [{"id": LOCAL_ID, "url": vllm_url, "role": ROLE_DECODE}, *prefills]
    data["index"] = {**data.get("index", {}), "backend": "memory", "ingest": False}
    data.setdefault("pd", {})["enabled"] = True
    return parse_config(data)


def _as_dict(cfg: GatewayConfig) -> dict[str, Any]:
    return msgspec.to_builtins(cfg)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


class PrefillTargets:
    """The prefill endpoints this sidecar may call, by every name the picker may use for them:
    ``host:port`` as configured and ``ip:port`` of what the host resolves to (resolved once,
    here), plus the discovered ones (``follow``: pod IPs, nothing to resolve)."""

    def __init__(self, states: list[EndpointState]) -> None:
        self.static: dict[str, EndpointState] = {}
        for s in states:
            host, port = _host_port(s.url)
            self.static[_addr(host, port)] = s
            with contextlib.suppress(OSError):
                for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                    self.static[_addr(str(info[4][0]), port)] = s
        self.by_addr: dict[str, EndpointState] = dict(self.static)

    def follow(self, discovered: Iterable[EndpointState]) -> None:
        """The discovered prefill endpoints are now these (replacing the previous set)."""
        by_addr = dict(self.static)
        for s in discovered:
            by_addr.setdefault(_addr(*_host_port(s.url)), s)
        self.by_addr = by_addr

    def lookup(self, value: str) -> EndpointState | None:
        """The endpoint a header value names (first of a comma-separated list; scheme ignored)."""
        first = value.split(",")[0].strip()
        for scheme in ("http://", "https://"):
            first = first.removeprefix(scheme)
        return self.by_addr.get(first.rstrip("/"))


class Sidecar:
    """The decode pod's proxy: the gateway's front door and hops, with a plan from the picker."""

    def __init__(self, cfg: GatewayConfig) -> None:
        # discovery is the sidecar's own (prefill pods only, whole API servers), not the
        # gateway's (which would take in every serving pod)
        self.discovery_cfg: DiscoveryConfig | None = cfg.discovery
        self.gw = Gateway(msgspec.structs.replace(cfg, discovery=None))
        if self.gw.tracing is not None:  # its spans: the request, the prefill and decode hops, the relay
            self.gw.tracing.component = "sidecar"
        self.local = self.gw.fleet.get(LOCAL_ID)
        if self.local is None:
            raise ConfigError("sidecar: no local vLLM replica")
        self.targets = PrefillTargets([s for s in self.gw.fleet.all() if s.role == ROLE_PREFILL])
        self.discovery: Any = None  # gateway.discovery.Discovery, with a discovery section
        self.passthrough: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await self.gw.start()
        self.passthrough = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        if self.discovery_cfg is not None:
            from .discovery import Discovery

            # pods of role prefill or both, each its API server as a whole (the picker names
            # host:port; vLLM balances a data-parallel pod's ranks itself)
            self.discovery = Discovery(self.gw, cfg=self.discovery_cfg, roles=(ROLE_PREFILL, ROLE_BOTH), data_parallel=False)
            self.discovery.on_change.append(self._follow)
            await self.discovery.start()

    def _follow(self) -> None:
        """After each reconcile: the allowed prefill endpoints are the discovered ones (and the
        static ones)."""
        assert self.discovery is not None
        fleet = self.gw.fleet
        self.targets.follow(s for rid in self.discovery.current if (s := fleet.get(rid)) is not None)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.passthrough is not None:
            await self.passthrough.close()
        await self.gw.stop()

    def plan(self, req: ProxyRequest) -> Plan:
        """One hop on the local vLLM, or two with the prefill endpoint the picker named."""
        assert self.local is not None
        value = req.headers.get(PREFILL_HEADER)
        if not value:
            return Plan([self.local])
        target = self.targets.lookup(value)
        if target is None:
            raise GatewayError(403, f"prefill target {value[:64]!r} is not one this sidecar may call", "prefill_target_refused")
        return Plan([self.local], pd=True, prefill=[target])

    async def serve(self, req: ProxyRequest) -> Response | RelayResponse:
        return await self.gw.hops.serve(req, self.plan(req))

    async def generate(self, request: Request, kind: str, path: str) -> Response | RelayResponse:
        """The gateway's own request handling (front door, accounting, cancellation), with the
        sidecar's plan in place of routing."""
        return await proxy_request(self.gw, request, kind, path, self.serve)

    async def forward(self, request: Request) -> Response:
        """Any other request: to the local vLLM and back, streamed both ways."""
        assert self.passthrough is not None and self.local is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = self.local.url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            upstream = await self.passthrough.request(
                request.method, url, headers=headers, data=request.stream() if request.method in ("POST", "PUT", "PATCH") else None
            )
        except (aiohttp.ClientError, OSError) as exc:
            return error_response(GatewayError(502, f"local vLLM unreachable: {type(exc).__name__}", "upstream_unavailable"))
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-encoding", "date", "server")}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(body(), status_code=upstream.status, headers=out)


def build_sidecar_app(cfg: GatewayConfig) -> SidecarApp:
    sidecar = Sidecar(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sidecar.start()
        try:
            yield
        finally:
            await sidecar.stop()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return Response(sidecar.gw.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/sidecar/health", health, methods=["GET"]),
        Route("/sidecar/metrics", metrics, methods=["GET"]),
        Route("/{path:path}", sidecar.forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sidecar = sidecar
    return SidecarApp(app, sidecar)


class SidecarApp:
    """ASGI entry point: the generation routes to the P/D path, the rest to Starlette."""

    def __init__(self, app: Starlette, sidecar: Sidecar) -> None:
        self.app = app
        self.state = app.state
        self.sidecar = sidecar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _ROUTES:
            path = scope["path"]
            started = False

            async def tracking_send(message: Any) -> None:
                nonlocal started
                started = True
                await send(message)

            try:
                response = await self.sidecar.generate(Request(scope, receive), _ROUTES[path], path)
                await response(scope, receive, tracking_send)
            except Exception:
                log.exception("unhandled error")
                if not started:
                    await error_response(GatewayError(500, "internal sidecar error", "internal_error"))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def main(argv: list[str]) -> int:
    from .server import setup_logging, uvicorn_config

    p = argparse.ArgumentParser(prog="kvgate sidecar", description="Prefill→decode proxy in front of the decode pod's vLLM (llm-d's routing sidecar protocol).")
    p.add_argument("--vllm", default="http://127.0.0.1:8200", help="the local vLLM's URL")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT", help="a prefill endpoint this sidecar may call (repeatable)")
    p.add_argument(
        "--config",
        "-c",
        help="gateway YAML: limits, pd timeouts, auth, prefill replicas (role: prefill) allowed as targets, and a discovery: section whose prefill (and both) pods are allowed, live",
    )
    args = p.parse_args(argv)
    try:
        base = load_config(args.config) if args.config else None
        cfg = sidecar_config(args.vllm, args.prefill, base)
    except ConfigError as exc:
        print(f"kvgate sidecar: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_json)
    if not any(r.role == ROLE_PREFILL for r in cfg.replicas) and cfg.discovery is None:
        log.warning("no prefill endpoint allowed (--prefill / config replicas / discovery): every request is served locally")
    import uvicorn

    uvicorn.Server(uvicorn_config(build_sidecar_app(cfg), args.host, args.port, limits=cfg.limits)).run()
    return 0
