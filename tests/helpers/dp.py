"""A stand-in for one vLLM API server with ``--data-parallel-size N`` (internal load balancing)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers.net import bound_socket
from tests.helpers.relay import relay


class DPFront:
    """What vLLM's API server does with ``--data-parallel-size N`` (internal load balancing),
    reduced to what the gateway can observe: requests go to the engine the rank header names
    (no header: rank 0 here), and ``/metrics`` holds every engine's series with ``engine``."""

    def __init__(self, engines: list[str]) -> None:
        self.engines = engines
        self.ranks_seen: list[str | None] = []
        self.sock = bound_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]

        async def metrics(request: Request) -> Response:
            parts = []
            async with httpx.AsyncClient() as c:
                for rank, url in enumerate(self.engines):
                    text = (await c.get(f"{url}/metrics")).text
                    for line in text.splitlines():
                        if line.startswith("vllm:") and 'engine="' in line:  # the simulator labels its one engine 0
                            line = line.replace('engine="0"', f'engine="{rank}"', 1)
                        elif line.startswith("vllm:") and "{" in line:
                            line = line.replace("{", f'{{engine="{rank}",', 1)
                        elif line.startswith("vllm:"):
                            name, _, value = line.partition(" ")
                            line = f'{name}{{engine="{rank}"}} {value}'
                        elif rank:
                            continue  # HELP/TYPE once
                        parts.append(line)
            return Response("\n".join(parts) + "\n", media_type="text/plain")

        async def forward(request: Request) -> Response:
            rank_header = request.headers.get("x-data-parallel-rank")
            if request.method == "POST":  # the requests, not the gateway's health probes
                self.ranks_seen.append(rank_header)
            # streamed whatever it is: a client leaving mid-answer closes the engine's connection
            return await relay(request, self.engines[int(rank_header or 0)], buffer=False)

        app = Starlette(routes=[Route("/metrics", metrics), Route("/{path:path}", forward, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", loop="none"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DPFront:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
