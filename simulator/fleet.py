"""Start a fleet of simulated replicas for tests, the demo and benchmarks.

``mode="thread"``: every replica on one background thread and event loop (fast to start, no
extra processes). ``mode="process"``: one ``python -m simulator.cli`` per replica, so
``kill()`` is a real SIGKILL with connections reset, as when a GPU node dies.

Ports: a config's port 0 (HTTP, KV events, replay, KV side channel) means any free port, and
it is the replica that binds it, never a number chosen here and bound later (on a busy machine
another process can take it in between). Thread mode binds the HTTP socket itself and hands
it to uvicorn, and reads the ZMQ and side-channel ports from the started replica; process mode
passes ``--ready-file`` and reads what the child bound from there. Once started, ``configs``
and ``handles`` hold the real ports, and ``restart(i)`` binds the same numbers again.

A replica that cannot start (a port taken, a bad config) makes ``start()`` raise at once with
the reason, after stopping the replicas already started; nothing is left running on the
fleet's event loop to complain when it is collected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from .config import SimConfig
from .ports import bind_tcp
from .server import SimServer

__all__ = ["SimConfig", "SimFleet", "SimHandle"]


@dataclass
class SimHandle:
    config: SimConfig
    url: str
    events_endpoint: str | None
    replay_endpoint: str | None
    engine_id: str


def _handle(cfg: SimConfig) -> SimHandle:
    return SimHandle(
        config=cfg,
        url=f"http://{cfg.host}:{cfg.port}",
        events_endpoint=f"tcp://{cfg.host}:{cfg.kv_events_port}" if cfg.kv_events else None,
        replay_endpoint=f"tcp://{cfg.host}:{cfg.replay_port}" if cfg.kv_events and cfg.replay else None,
        engine_id=cfg.engine_id,
    )


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    """``server.serve`` on a socket bound beforehand. uvicorn ends a failed start with
    ``sys.exit``: as a SystemExit it would stop the whole event loop (every replica on it) and
    leave its tasks to die noisily at collection, so it becomes an ordinary error here."""
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:
        raise RuntimeError(f"uvicorn exited with {exc.code}") from None
    finally:
        sock.close()


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
        args += ["--kv-events-endpoint", f"tcp://{cfg.host}:{cfg.kv_events_port}"]
        if cfg.replay:
            args += ["--replay-endpoint", f"tcp://{cfg.host}:{cfg.replay_port}"]
        if cfg.kv_events_topic:
            args += ["--kv-events-topic", cfg.kv_events_topic]
    if cfg.legacy_events:
        args.append("--legacy-events")
    if cfg.vllm_version != SimConfig.vllm_version:
        args += ["--vllm-version", cfg.vllm_version]
    if cfg.hash_lookahead_tokens:
        args += ["--hash-lookahead-tokens", str(cfg.hash_lookahead_tokens)]
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
        """Cancel what is left on the loop and wait for it, then stop and close the loop, so
        no task or transport outlives it (they would complain when collected: 'Event loop is
        closed', 'Task was destroyed but it is pending')."""
        loop = self.loop

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        cleaned = False
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(5)
                cleaned = True
            loop.call_soon_threadsafe(loop.stop)
            self.thread.join(5)
        if self.thread.is_alive() or loop.is_closed():
            return
        if not cleaned:
            # the loop's thread ended early (something escaped run_forever): clean up on a
            # thread of its own, since the caller's thread may be running an event loop
            def finish() -> None:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(cancel_all())

            helper = threading.Thread(target=finish, daemon=True)
            helper.start()
            helper.join(5)
        loop.close()


class SimFleet:
    def __init__(self, configs: list[SimConfig], *, mode: str = "thread") -> None:
        if mode not in ("thread", "process"):
            raise ValueError("mode must be 'thread' or 'process'")
        self.mode = mode
        self.configs = [dataclasses.replace(c, lora_modules=list(c.lora_modules)) for c in configs]
        self.handles: list[SimHandle] = []
        self._servers: list[uvicorn.Server | None] = []
        self._sims: list[SimServer | None] = []
        self._tasks: list[concurrent.futures.Future[None] | None] = []  # server.serve() on the runner's loop
        self._procs: list[subprocess.Popen | None] = []
        self._runner: _ThreadRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None  # process mode: ready files, logs

    # -- start / stop -----------------------------------------------------------------------------

    def start(self) -> list[SimHandle]:
        """Start every replica (concurrently) and wait until each answers; ``handles`` then
        hold their real ports. If one cannot start, the others are stopped and this raises."""
        n = len(self.configs)
        self._servers, self._sims, self._tasks, self._procs = [None] * n, [None] * n, [None] * n, [None] * n
        if self.mode == "thread":
            self._runner = _ThreadRunner()
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="simfleet-")
        try:
            for i in range(n):
                self._launch(i)
            for i in range(n):
                self._wait_started(i)
        except BaseException:
            self.stop()
            raise
        self.handles = [_handle(cfg) for cfg in self.configs]
        return self.handles

    def _launch(self, i: int) -> None:
        cfg = self.configs[i]
        if self.mode == "process":
            assert self._tmp is not None
            if not cfg.engine_id:
                cfg.engine_id = f"sim-{uuid.uuid4().hex[:12]}"
            env = {**os.environ}
            env.pop("VLLM_API_KEY", None)  # the replica's keys are cfg.api_key's, passed as --api-key
            ready = self._ready_file(i)
            ready.unlink(missing_ok=True)
            with open(self._log_file(i), "ab") as log:
                self._procs[i] = subprocess.Popen(
                    [sys.executable, "-m", "simulator.cli", *cli_args(cfg), "--ready-file", str(ready)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            return
        assert self._runner is not None
        try:
            sock = bind_tcp(cfg.host, cfg.port)
        except OSError as exc:  # the port asked for is taken: say so at once
            raise RuntimeError(f"simulator {i} cannot listen: {exc}") from exc
        cfg.port = sock.getsockname()[1]
        if not cfg.engine_id:
            cfg.engine_id = f"sim-{cfg.port}"
        sim = SimServer(dataclasses.replace(cfg, lora_modules=list(cfg.lora_modules)))
        server = uvicorn.Server(
            uvicorn.Config(sim.build_app(), host=cfg.host, port=cfg.port, log_level="warning", access_log=False, lifespan="on", loop="asyncio")
        )
        self._sims[i] = sim
        self._servers[i] = server
        self._tasks[i] = asyncio.run_coroutine_threadsafe(_serve(server, sock), self._runner.loop)

    def _ready_file(self, i: int) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / f"replica-{i}.json"

    def _log_file(self, i: int) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / f"replica-{i}.log"

    def _wait_started(self, i: int, timeout: float = 30.0) -> None:
        """Wait until replica ``i`` is up, then record the ports it bound in ``configs[i]``."""
        cfg = self.configs[i]
        deadline = time.monotonic() + timeout
        if self.mode == "process":
            ready = self._ready_file(i)
            while not ready.exists():
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    tail = self._log_file(i).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"simulator {i} exited with {proc.returncode if proc else None}: {tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator {i} did not start in {timeout:.0f} s")
                time.sleep(0.02)
            (got,) = json.loads(ready.read_text())["replicas"]
        else:
            fut, sim, server = self._tasks[i], self._sims[i], self._servers[i]
            assert fut is not None and sim is not None and server is not None
            while not server.started:
                if fut.done():
                    cause = sim.start_error or (fut.exception() if not fut.cancelled() else None) or "it stopped"
                    raise RuntimeError(f"simulator {i} did not start: {cause}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator {i} did not start in {timeout:.0f} s")
                time.sleep(0.01)
            got = sim.bound_ports()
        cfg.port, cfg.kv_events_port, cfg.replay_port = got["port"], got["kv_events_port"], got["replay_port"]
        cfg.side_channel_port, cfg.engine_id = got["side_channel_port"], got["engine_id"]
        self._wait_healthy(i, deadline)

    def _wait_healthy(self, i: int, deadline: float) -> None:
        url = f"http://{self.configs[i].host}:{self.configs[i].port}/health"
        while True:
            proc = self._procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"simulator {i} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=0.5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulator {i} did not become healthy")
            time.sleep(0.05)

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
        self._wait_started(i)

    def stop(self) -> None:
        """Stop every replica (idempotent; also after a failed ``start``)."""
        for i in range(len(self._servers)):
            self._stop_one(i, graceful=True)
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SimFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
