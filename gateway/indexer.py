"""``kvgate indexer``: KV-event ingestion as its own process, feeding a shared Redis index.

With several gateway replicas, one indexer (or one per shard of the fleet) consumes every
replica's events into Redis and the gateways run with ``index.ingest: false``: each event is
applied once, not once per gateway. The replicas' models must be listed in the config
(there is no HTTP discovery here).

If Redis loses its data (restarted empty, failover to an empty replica), the subscriber notices
(a generation marker checked every ``--loss-check-every`` seconds and on every write) and
rebuilds the index from every replica's replay buffer; see ``kvindex.subscriber``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from kvindex.backends import make_index
from kvindex.subscriber import EventSubscriber, ReplicaSource

from .config import GatewayConfig
from .server import load_for_command, shutdown_event

log = logging.getLogger("kvgate.indexer")


async def run(cfg: GatewayConfig, index_url: str | None, stats_every_s: float, loss_check_s: float = 1.0) -> int:
    url = index_url or cfg.index.backend
    if not url.startswith(("redis://", "rediss://", "unix://")):
        print("kvgate indexer: needs a Redis index (index.backend or --index redis://...)", file=sys.stderr)
        return 2
    sources = []
    for r in cfg.replicas:
        if r.kv_events is None:
            continue
        if not r.models:
            print(f"kvgate indexer: replica {r.id} has kv_events but no models listed", file=sys.stderr)
            return 2
        sources.append(ReplicaSource(replica=r.id, model=r.models[0], endpoint=r.kv_events, replay_endpoint=r.replay, topic=r.topic))
    if not sources:
        print("kvgate indexer: no replica has a kv_events endpoint", file=sys.stderr)
        return 2
    index = make_index(url, root_checks=cfg.root_checks(), ttl_s=cfg.index.ttl_s)
    sub = EventSubscriber(index, sources, loss_check_s=loss_check_s)
    await sub.start()
    stop = shutdown_event()
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), stats_every_s)
            log.info("indexer stats", extra={"stats": str(sub.stats)})
    finally:
        await sub.stop()
        await index.close()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvgate indexer", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, help="gateway YAML (replicas with kv_events and models)")
    p.add_argument("--index", help="redis://host:port/db (overrides index.backend)")
    p.add_argument("--stats-every", type=float, default=30.0, help="seconds between stats log lines")
    p.add_argument(
        "--loss-check-every",
        type=float,
        default=None,
        help="seconds between checks that Redis still holds the index (one small round trip; default: index.loss_check_s)",
    )
    args = p.parse_args(argv)
    if args.loss_check_every is not None and args.loss_check_every <= 0:
        p.error("--loss-check-every must be positive")
    cfg = load_for_command(args.config)
    if cfg is None:
        return 2
    every = args.loss_check_every if args.loss_check_every is not None else cfg.index.loss_check_s
    return asyncio.run(run(cfg, args.index, args.stats_every, every))
