"""``kvgate sim``: run one or several simulated vLLM replicas (flags mirror ``vllm serve`` where they exist)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlparse

from .config import SimConfig


def _endpoint_port(endpoint: str | None) -> int:
    if not endpoint:
        return 0
    return urlparse(endpoint.replace("tcp://*", "tcp://0.0.0.0")).port or 0


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="kvgate sim", description="Simulated vLLM replica(s): same HTTP API, metrics, KV events and P/D protocol.")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=8001, help="HTTP port (the first one with --replicas; 0: any free port, see --ready-file)")
    p.add_argument("--model", default=d.model, help="served model name")
    p.add_argument("--role", choices=["both", "prefill", "decode"], default=d.role)
    p.add_argument("--replicas", type=int, default=1, help="replicas in this process, on consecutive ports")
    p.add_argument("--kv-events-endpoint", help="ZMQ PUB bind endpoint, e.g. tcp://*:5557 (omit: no events; port 0: any free port)")
    p.add_argument("--replay-endpoint", help="ZMQ ROUTER replay endpoint, e.g. tcp://*:5558 (port 0: any free port)")
    p.add_argument("--kv-events-topic", default=d.kv_events_topic)
    p.add_argument("--legacy-events", action="store_true", help="encode events in the older array form")
    p.add_argument(
        "--vllm-version",
        default=d.vllm_version,
        help="behave like this vLLM release (0.10, 0.11, 0.14, 0.20, 0.27, 0.33): event form, hash extra keys, replay frames, NONE_HASH seeding",
    )
    p.add_argument(
        "--hash-lookahead-tokens", type=int, default=d.hash_lookahead_tokens, help="vLLM 0.33 lookahead block hashes (EAGLE): tokens after a block in its hash"
    )
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-blocks", type=int, default=d.num_blocks, help="KV cache capacity in blocks")
    p.add_argument("--hash-algo", choices=["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"], default=d.hash_algo)
    p.add_argument("--hash-seed", default=os.environ.get("PYTHONHASHSEED"), help="NONE_HASH seed (default: $PYTHONHASHSEED, else vLLM's fixed seed)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="'demo' or a directory with tokenizer.json")
    p.add_argument("--seed", type=int, default=d.seed, help="output seed (deterministic text)")
    p.add_argument("--time-scale", type=float, default=d.time_scale, help="multiplier on every simulated duration (0: none)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--prefill-tokens-per-s", type=float, default=d.prefill_tokens_per_s)
    p.add_argument("--decode-step-ms", type=float, default=d.decode_step_ms)
    p.add_argument("--decode-ms-per-1k-kv-tokens", type=float, default=d.decode_ms_per_1k_kv_tokens)
    p.add_argument("--lora-module", action="append", default=[], help="a LoRA adapter name served on top (repeatable)")
    p.add_argument("--kv-block-bytes", type=int, default=d.kv_block_bytes, help="bytes moved per block in P/D transfers")
    p.add_argument(
        "--lease-s",
        type=float,
        default=float(os.environ.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", d.lease_s)),
        help="how long prefilled blocks wait for the decode replica (default: $VLLM_NIXL_ABORT_REQUEST_TIMEOUT, else 30)",
    )
    p.add_argument(
        "--side-channel-host",
        default=os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", ""),
        help="host advertised as remote_host (default: $VLLM_NIXL_SIDE_CHANNEL_HOST, else --host)",
    )
    p.add_argument(
        "--side-channel-port",
        type=int,
        default=int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "0")),
        help="KV side-channel port, +1 per extra replica (default: $VLLM_NIXL_SIDE_CHANNEL_PORT, else a free port)",
    )
    p.add_argument("--engine-id", default="", help="NIXL engine id (default derived from the port)")
    p.add_argument(
        "--kv-transfer",
        choices=["auto", "nixl", "tcp"],
        default="auto",
        help="KV transfer backend: auto = NIXL for prefill/decode roles, TCP for both; NIXL falls back to TCP when not installed",
    )
    p.add_argument("--no-nixl", action="store_true", help="same as --kv-transfer tcp")
    p.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (several keys: any is accepted; default: $VLLM_API_KEY, as vllm serve)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once every replica listens, write there (atomically) a JSON object whose 'replicas' list gives each one's "
        "port, kv_events_port, replay_port, side_channel_port and engine_id: how a parent learns the ports that 0 picked",
    )
    return p


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    out = []
    ev_port, rp_port = _endpoint_port(args.kv_events_endpoint), _endpoint_port(args.replay_endpoint)
    # as vllm serve: --api-key wins over VLLM_API_KEY; empty keys are ignored
    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if k]
    for i in range(args.replicas):
        out.append(
            SimConfig(
                model=args.model,
                host=args.host,
                port=args.port + i if args.port else 0,
                role=args.role,
                block_size=args.block_size,
                num_blocks=args.num_blocks,
                hash_algo=args.hash_algo,
                hash_seed=args.hash_seed,
                tokenizer=args.tokenizer,
                kv_events=bool(args.kv_events_endpoint),
                kv_events_port=ev_port + 2 * i if ev_port else 0,
                replay=bool(args.replay_endpoint),
                replay_port=(rp_port + 2 * i) if rp_port else 0,
                kv_events_topic=args.kv_events_topic,
                legacy_events=args.legacy_events,
                vllm_version=args.vllm_version,
                hash_lookahead_tokens=args.hash_lookahead_tokens,
                time_scale=args.time_scale,
                seed=args.seed + i,
                max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                prefill_tokens_per_s=args.prefill_tokens_per_s,
                decode_step_ms=args.decode_step_ms,
                decode_ms_per_1k_kv_tokens=args.decode_ms_per_1k_kv_tokens,
                lora_modules=list(args.lora_module),
                kv_block_bytes=args.kv_block_bytes,
                lease_s=args.lease_s,
                engine_id=f"{args.engine_id}-{i}" if args.engine_id and args.replicas > 1 else args.engine_id,
                side_channel_host=args.side_channel_host,
                side_channel_port=args.side_channel_port + i if args.side_channel_port else 0,
                kv_transfer="tcp" if args.no_nixl else args.kv_transfer,
                api_key=list(keys) or None,
            )
        )
    return out


async def serve(configs: list[SimConfig], ready_file: Path | None = None) -> int:
    """Run the replicas until SIGINT/SIGTERM (0), or until one fails to start or stops (1).

    Each binds its own ports (0: any free one; the HTTP socket is bound here and handed to
    uvicorn), and once all listen their ports go to ``ready_file`` and to stderr."""
    import uvicorn

    from .ports import bind_tcp
    from .server import SimServer

    servers, sims, socks = [], [], []
    try:
        for cfg in configs:
            cfg.validate()
            sock = bind_tcp(cfg.host, cfg.port)
            socks.append(sock)
            cfg.port = sock.getsockname()[1]
            sim = SimServer(cfg)
            sims.append(sim)
            servers.append(uvicorn.Server(uvicorn.Config(sim.build_app(), host=cfg.host, port=cfg.port, log_level="warning", access_log=False, lifespan="on")))
    except OSError as exc:
        for sock in socks:
            sock.close()
        print(f"kvgate sim: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(_serve_one(s, sock)) for s, sock in zip(servers, socks, strict=True)]
    stopped = asyncio.create_task(stop.wait())
    rc = 0
    try:
        while not all(s.started for s in servers):  # every lifespan done, every socket listening
            done, _ = await asyncio.wait([stopped, *tasks], timeout=0.01, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
        else:
            _announce(sims, ready_file)
        if not stop.is_set():
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():  # a replica ended by itself: its start failed (uvicorn logged why)
            for sim in sims:
                if sim.start_error is not None:
                    print(f"kvgate sim: a replica did not start: {sim.start_error}", file=sys.stderr)
            rc = 1
    finally:
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        stopped.cancel()
    return rc


async def _serve_one(server, sock) -> None:
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()


def _announce(sims: list, ready_file: Path | None) -> None:
    ports = [sim.bound_ports() for sim in sims]
    for p in ports:
        print(f"kvgate sim: {p['engine_id']} on port {p['port']} (KV events {p['kv_events_port']}, replay {p['replay_port']})", file=sys.stderr, flush=True)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "replicas": ports}))
        os.replace(tmp, ready_file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        configs = configs_from_args(args)
        for c in configs:
            c.validate()
    except ValueError as exc:
        print(f"kvgate sim: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(configs, args.ready_file))


if __name__ == "__main__":
    sys.exit(main())
