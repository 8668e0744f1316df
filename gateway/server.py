"""``kvgate serve``: load the YAML config, apply CLI overrides, run uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from .config import ConfigError, GatewayConfig, LimitsConfig, load_config
from .connections import GuardedHttpToolsProtocol

_STD_ATTRS = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("kvgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def shutdown_event() -> asyncio.Event:
    """An event set on SIGINT/SIGTERM, for the long-running commands (extproc, indexer, demo)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def load_for_command(path: str | None) -> GatewayConfig | None:
    """Config + logging for a long-running command; prints the error and returns None if invalid."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return None
    setup_logging(cfg.log_level, cfg.log_json)
    return cfg


def uvicorn_config(app, host: str, port: int, *, loop: str = "uvloop", limits: LimitsConfig | None = None):
    """The one uvicorn setup for the gateway (serve, demo, tests): httptools, no access log.

    Client connections go through ``gateway.connections`` (header deadline, connection cap,
    JSON protocol errors) with the ``limits`` section's values.

    Every accepted socket has TCP_NODELAY (asyncio and uvloop both set it on TCP
    transports; tests/gateway/test_gw_ops.py checks it on live connections), so a streamed
    chunk leaves as soon as it is written instead of waiting on a delayed ACK.
    """
    import uvicorn

    limits = limits or LimitsConfig()
    # proxy_headers off: nothing here reads the client address, and it is one more ASGI layer
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http=GuardedHttpToolsProtocol.configured(limits.header_timeout_s, limits.max_connections),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        proxy_headers=False,
        server_header=False,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvgate serve", description="Run the kvgate gateway.")
    p.add_argument("--config", "-c", help="gateway YAML config (defaults apply to everything omitted)")
    p.add_argument("--host", help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    p.add_argument("--index", help="index backend: memory or redis://host:port/db (overrides index.backend)")
    p.add_argument("--log-level", help="debug|info|warning|error (overrides log_level)")
    p.add_argument("--debug-headers", action="store_true", help="add x-kvgate-replica / x-kvgate-prefix-blocks headers")
    p.add_argument("--workers", type=int, default=1, help="gateway processes sharing the listening socket (gateway.workers); 1: this process serves")
    return p


def apply_overrides(cfg: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    if args.host:
        cfg.listen.host = args.host
    if args.port is not None:
        cfg.listen.port = args.port
    if args.index:
        cfg.index.backend = args.index
    if args.log_level:
        cfg.log_level = args.log_level
    if args.debug_headers:
        cfg.debug_headers = True
    return cfg


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # HF tokenizers spreads encode_batch over a rayon pool of its own; the gateway encodes one
    # prompt (or a few uncached pieces) per call, already on a tokenize-pool thread, and the
    # rayon workers' spinning and waking cost more CPU than they save: bench_cpu, short chats at
    # time scale 0, 0.88x the gateway's CPU per request with it off (long chats 0.94x), no
    # fewer requests/s. Set here, before any tokenizer runs; workers inherit it; an operator's
    # own TOKENIZERS_PARALLELISM wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_json)
    if args.workers < 1:
        print("kvgate: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        from scorers.scheduler import Scheduler

        from .workers import run_workers

        try:  # what the workers would each refuse at start, refused once here
            Scheduler.from_config(cfg.scheduling or None)
        except ValueError as exc:
            print(f"kvgate: config error: {exc}", file=sys.stderr)
            return 2
        return run_workers(cfg, argv, args.workers)
    import uvicorn

    from .app import build_app

    try:
        app = build_app(cfg)
    except ValueError as exc:  # scheduling section rejected by the scheduler
        print(f"kvgate: config error: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(uvicorn_config(app, cfg.listen.host, cfg.listen.port, limits=cfg.limits)).run()
    return 0
