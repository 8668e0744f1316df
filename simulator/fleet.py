"""Start a fleet of simulated replicas for tests, the demo and benchmarks.

``mode="thread"``: every replica on one background thread and event loop (fast to start, no
extra processes). ``mode="process"``: one ``python -m simulator.cli`` per replica, so
``kill()`` is a real SIGKILL with connections reset, as when a GPU node dies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn

from .config import SimConfig
from .server import SimServer

__all__ = ["SimConfig", "SimFleet", "SimHandle"]


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class SimHandle:
    config: SimConfig
    url: str
    events_endpoint: str | None
    replay_endpoint: str | None
    engine_id: str


def _resolve_ports(cfg: SimConfig) -> SimConfig:
    cfg = dataclasses.replace(cfg, lora_modules=list(cfg.lora_modules))
    if cfg.port == 0:
        cfg.port = _free_port(cfg.host)
    if cfg.kv_events:
        if cfg.kv_events_port == 0:
            cfg.kv_events_port = _free_port(cfg.host)
        if cfg.replay_port == 0:
            cfg.replay_port = _free_port(cfg.host)
    if not cfg.engine_id:
        cfg.engine_id = f"sim-{cfg.port}"
    return cfg


def cli_args(cfg: SimConfig) -> list[str]:
    """The ``kvgate sim`` arguments that reproduce ``cfg`` (used by process mode)."""
    args = [
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--model",
        cfg.model,
        "--role",
        cfg.role,
        "--block-size",
        str(cfg.block_size),
        "--num-blocks",
        str(cfg.num_blocks),
        "--hash-algo",
        cfg.hash_algo,
        "--tokenizer",
        cfg.tokenizer,
        "--seed",
        str(cfg.seed),
        "--time-scale",
        str(cfg.time_scale),
        "--max-model-len",
        str(cfg.max_model_len),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
        "--prefill-tokens-per-s",
        str(cfg.prefill_tokens_per_s),
        "--decode-step-ms",
        str(cfg.decode_step_ms),
        "--decode-ms-per-1k-kv-tokens",
        str(cfg.decode_ms_per_1k_kv_tokens),
        "--kv-block-bytes",
        str(cfg.kv_block_bytes),
        "--lease-s",
        str(cfg.lease_s),
        "--engine-id",
        cfg.engine_id,
    ]
    if cfg.hash_seed is not None:
        args += ["--hash-seed", cfg.hash_seed]
    if cfg.side_channel_host:
        args += ["--side-channel-host", cfg.side_channel_host]
    if cfg.side_channel_port:
        args += ["--side-channel-port", str(cfg.side_channel_port)]
    if cfg.kv_events:
        args += ["--kv-events-endpoint", f"tcp://{cfg.host}:{cfg.kv_events_port}", "--replay-endpoint", f"tcp://{cfg.host}:{cfg.replay_port}"]
        if cfg.kv_events_topic:
            args += ["--kv-events-topic", cfg.kv_events_topic]
    if cfg.legacy_events:
        args.append("--legacy-events")
    for m in cfg.lora_modules:
        args += ["--lora-module", m]
    if not cfg.prefer_nixl:
        args.append("--no-nixl")
    elif cfg.kv_transfer != "auto":
        args += ["--kv-transfer", cfg.kv_transfer]
    if cfg.api_keys():
        args += ["--api-key", *cfg.api_keys()]
    return args


class _ThreadRunner:
    """All thread-mode replicas share one event loop on one daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="sim-fleet")
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class SimFleet:
    def __init__(self, configs: list[SimConfig], *, mode: str = "thread") -> None:
        if mode not in ("thread", "process"):
            raise ValueError("mode must be 'thread' or 'process'")
        self.mode = mode
        self.configs = [_resolve_ports(c) for c in configs]
        self.handles: list[SimHandle] = []
        self._servers: list[uvicorn.Server | None] = []
        self._sims: list[SimServer | None] = []
        self._tasks: list[concurrent.futures.Future[None] | None] = []  # server.serve() on the runner's loop
        self._procs: list[subprocess.Popen | None] = []
        self._runner: _ThreadRunner | None = None

    # -- start / stop -----------------------------------------------------------------------------

    def start(self) -> list[SimHandle]:
        if self.mode == "thread":
            self._runner = _ThreadRunner()
        for i, cfg in enumerate(self.configs):
            self.handles.append(
                SimHandle(
                    config=cfg,
                    url=f"http://{cfg.host}:{cfg.port}",
                    events_endpoint=f"tcp://{cfg.host}:{cfg.kv_events_port}" if cfg.kv_events else None,
                    replay_endpoint=f"tcp://{cfg.host}:{cfg.replay_port}" if cfg.kv_events else None,
                    engine_id=cfg.engine_id,
                )
            )
            self._servers.append(None)
            self._sims.append(None)
            self._tasks.append(None)
            self._procs.append(None)
            self._launch(i)
        for i in range(len(self.configs)):
            self._wait_healthy(i)
        return self.handles

    def _launch(self, i: int) -> None:
        cfg = self.configs[i]
        if self.mode == "process":
            env = {**os.environ}
            env.pop("VLLM_API_KEY", None)  # the replica's keys are cfg.api_key's, passed as --api-key
            self._procs[i] = subprocess.Popen(
                [sys.executable, "-m", "simulator.cli", *cli_args(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            return
        assert self._runner is not None
        sim = SimServer(dataclasses.replace(cfg))
        server = uvicorn.Server(
            uvicorn.Config(sim.build_app(), host=cfg.host, port=cfg.port, log_level="warning", access_log=False, lifespan="on", loop="asyncio")
        )
        self._sims[i] = sim
        self._servers[i] = server
        self._tasks[i] = asyncio.run_coroutine_threadsafe(server.serve(), self._runner.loop)

    def _wait_healthy(self, i: int, timeout: float = 30.0) -> None:
        url = self.handles[i].url + "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"simulator {i} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=0.5).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"simulator {i} did not become healthy")

    def _stop_one(self, i: int, graceful: bool) -> None:
        proc = self._procs[i]
        if proc is not None:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._procs[i] = None
        server = self._servers[i]
        if server is not None and self._runner is not None:
            if not graceful:
                server.force_exit = True
                # close listening and live connections at once
                for s in getattr(server, "servers", []) or []:
                    s.close()
                for conn in list(getattr(server.server_state, "connections", [])):
                    with contextlib.suppress(Exception):
                        conn.transport.abort()
            server.should_exit = True
            fut = self._tasks[i]
            if fut is not None:
                with contextlib.suppress(Exception):
                    fut.result(10)
            self._servers[i] = None
            self._tasks[i] = None

    def kill(self, i: int) -> None:
        """Abrupt death: no graceful shutdown, open connections reset."""
        self._stop_one(i, graceful=False)

    def restart(self, i: int) -> None:
        """Start replica ``i`` again on the same ports (its event seq restarts at 0)."""
        self._stop_one(i, graceful=True)
        self._launch(i)
        self._wait_healthy(i)

    def stop(self) -> None:
        for i in range(len(self.handles)):
            self._stop_one(i, graceful=True)
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
