"""``kvgate serve --workers N``: N gateway processes on one listening socket.

One Python process is one core of routing at most (the event loop holds the GIL), so a node
with more cores runs several. The supervisor (this module, in the parent process) binds the
listening socket once and starts N workers with the ``spawn`` method, handing each the socket
(the kernel spreads accepted connections over the processes waiting on it); each worker builds
its own gateway from the same configuration and serves on that socket. A worker that dies is
started again (at most one restart per ``RESTART_BACKOFF_S``); SIGINT/SIGTERM stop them all,
each with its graceful shutdown.

What workers share is what several gateways share: with a Redis index (``index.backend:
redis://...``) the index, the in-flight load and the "just routed here" claims
(``index.share_load``, ``gateway.shared_load``), so N workers route like one. With the memory
index every worker subscribes to every replica's KV events itself (the same events, so the
same index), but each sees only its own in-flight requests. ``/metrics`` is per worker (a
scrape reaches one of them; the ``kvgate_worker_info`` gauge says which).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

from .config import GatewayConfig

log = logging.getLogger("kvgate.workers")

#: shortest time between two starts of one worker slot (a worker that dies at start-up must
#: not be restarted in a tight loop)
RESTART_BACKOFF_S = 1.0
#: how long a stop waits for the workers' graceful shutdown before killing them
STOP_TIMEOUT_S = 10.0
#: a worker slot that dies this many times in a row within ``QUICK_EXIT_S`` of its start (a
#: configuration it cannot serve, a port it cannot use) stops the whole gateway
MAX_QUICK_EXITS = 5
QUICK_EXIT_S = 5.0


def bind_listener(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(argv: list[str], sock: socket.socket, slot: int, workers: int = 1, share_dir: str = "") -> None:
    """A worker's entry point (a fresh interpreter: ``spawn``): the same config as the parent
    (re-read from the same arguments), served on the inherited socket."""
    _die_with_parent()
    import uvicorn

    from .app import build_app
    from .server import apply_overrides, build_parser, load_config, setup_logging, uvicorn_config

    args = build_parser().parse_args(argv)
    cfg = apply_overrides(load_config(args.config), args)
    setup_logging(cfg.log_level, cfg.log_json)
    app = build_app(cfg)
    app.gw.share_with_workers(slot, workers, share_dir)
    server = uvicorn.Server(uvicorn_config(app, cfg.listen.host, cfg.listen.port, limits=cfg.limits))
    server.run(sockets=[sock])


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, however it dies (a killed supervisor
    must not leave workers serving on its socket)."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() == 1:  # the supervisor died before the call
            os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, argv: list[str], sock: socket.socket, workers: int) -> None:
        self.argv = argv
        self.sock = sock
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess | None] = [None] * workers
        self.started_at = [0.0] * workers
        self.restarts = 0
        self.quick_exits = [0] * workers
        self.stopping = False
        self.failed = False
        #: where the workers' sockets for sharing load and claims live (gateway.worker_share)
        self.share_dir = tempfile.mkdtemp(prefix="kvgate-workers-")

    def _start(self, slot: int) -> None:
        proc = self.ctx.Process(target=_worker, args=(self.argv, self.sock, slot, len(self.procs), self.share_dir), name=f"kvgate-worker-{slot}", daemon=False)
        proc.start()
        self.procs[slot] = proc
        self.started_at[slot] = time.monotonic()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        for slot in range(len(self.procs)):
            self._start(slot)
        log.warning("kvgate serving on %s with %d workers (pids %s)", _address(self.sock), len(self.procs), ", ".join(str(p.pid) for p in self.procs if p))
        while not self.stopping:
            time.sleep(0.2)
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.is_alive() or self.stopping:
                    continue
                lived = time.monotonic() - self.started_at[slot]
                if lived < RESTART_BACKOFF_S:
                    continue
                self.quick_exits[slot] = self.quick_exits[slot] + 1 if lived < QUICK_EXIT_S + RESTART_BACKOFF_S else 0
                if self.quick_exits[slot] >= MAX_QUICK_EXITS:
                    log.error("worker %d exited %d times right after starting (last exit code %s); stopping", slot, MAX_QUICK_EXITS, proc.exitcode)
                    self.failed = self.stopping = True
                    break
                log.warning("worker %d (pid %s) exited with %s; starting it again", slot, proc.pid, proc.exitcode)
                self.restarts += 1
                self._start(slot)
        self._stop_all()
        return 1 if self.failed else 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)  # uvicorn's graceful shutdown
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self.sock.close()
        shutil.rmtree(self.share_dir, ignore_errors=True)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def run_workers(cfg: GatewayConfig, argv: list[str], workers: int) -> int:
    """Serve with ``workers`` processes (the parent only supervises)."""
    try:
        sock = bind_listener(cfg.listen.host, cfg.listen.port)
    except OSError as exc:
        print(f"kvgate: cannot listen on {cfg.listen.host}:{cfg.listen.port}: {exc}", file=sys.stderr)
        return 1
    return Supervisor(argv, sock, workers).run()
