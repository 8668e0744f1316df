"""``kvgate indexer``: KV-event ingestion as its own process, feeding a shared Redis index.

With several gateway replicas, one indexer (or one per shard of the fleet) consumes every
replica's events into Redis and the gateways run with ``index.ingest: false``: each event is
applied once, not once per gateway.

Which replicas: the static ``replicas`` that publish events (their models listed: there is no
probe for them), and with a ``discovery:`` section the pods Kubernetes has, live, by the
gateway's own code (``gateway.discovery``): a pod that appears is subscribed as soon as its
model is known (annotation ``kvgate.io/models``, ``discovery.models``, else its /v1/models,
asked again every health interval until it answers), one that leaves is unsubscribed and its
index entries are dropped, one replaced under the same name starts over, and a data-parallel
pod (``kvgate.io/data-parallel-size``) is one source per rank. Pod names are the replica ids,
as at the gateways, so their lookups find what this process writes.

If Redis loses its data (restarted empty, failover to an empty replica), the subscriber notices
(a generation marker checked every ``--loss-check-every`` seconds and on every write) and
rebuilds the index from every replica's replay buffer; see ``kvindex.subscriber``.

``--metrics-port`` serves ``/metrics`` (Prometheus text: the subscriber's counters per replica
under the same names a gateway that ingests uses, malformed frames, the subscriptions, and
discovery's figures) and ``/health`` on a small HTTP server; port 0 takes a free port, which the
start-up log line names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from kvindex.backends import make_index
from kvindex.index import KVIndex
from kvindex.subscriber import EventSubscriber, ReplicaSource

from .config import ConfigError, GatewayConfig
from .fleet import Fleet
from .metrics import counter, gauge
from .server import load_for_command, shutdown_event

log = logging.getLogger("kvgate.indexer")

#: (family, ReplicaStats attribute, help): the per-replica counters, named as a gateway exports them
SUBSCRIBER_COUNTERS = (
    ("kvgate_kv_events_applied", "events_applied", "KV events applied to the index"),
    ("kvgate_kv_batches_lost", "batches_lost", "KV-event batches lost and not recovered by replay"),
    ("kvgate_kv_batches_replayed", "batches_replayed", "KV-event batches recovered by replay"),
    ("kvgate_kv_decode_errors", "decode_errors", "Malformed KV-event messages skipped"),
    ("kvgate_kv_index_apply_errors", "index_errors", "KV-event batches the index failed to apply (index unreachable)"),
    ("kvgate_kv_replica_restarts", "restarts_detected", "Replica restarts seen in the KV-event sequence"),
    ("kvgate_index_rebuilds", "rebuilds", "Times a replica's entries were re-applied from its replay buffer after the index lost its data"),
    ("kvgate_index_rebuild_failures", "rebuild_failures", "Rebuilds whose replay could not be fetched"),
    ("kvgate_index_batches_unrecoverable", "batches_unrecoverable", "At a rebuild: batches older than the replica's replay buffer"),
)


def subscriber_families(sub: EventSubscriber) -> Iterator[Any]:
    """The subscriber's figures as metric families, read at scrape time."""
    st = sub.stats
    per = dict(st.per_replica)
    for name, attr, doc in SUBSCRIBER_COUNTERS:
        yield counter(name, doc, ["replica"], (([rid], float(getattr(s, attr))) for rid, s in per.items()))
    yield counter("kvgate_index_losses", "Times the index reported its whole contents lost (e.g. Redis restarted empty)", [], [([], float(st.index_losses))])
    yield counter(
        "kvgate_kv_malformed_frames",
        "KV-event messages dropped for their framing (not topic, seq, payload; a seq that is not 8 bytes)",
        [],
        [([], float(st.malformed_frames))],
    )
    yield gauge(
        "kvgate_kv_subscriptions", "Replicas whose KV events this process subscribes to", [], [([], float(sum(1 for s in sub.sources.values() if s.endpoint)))]
    )


class _Live(Collector):
    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Any]:
        yield from self._read()


class IndexerMetrics:
    """The indexer's registry: only families read from live objects at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def add_live(self, read: Callable[[], Iterable[Any]]) -> None:
        self.registry.register(_Live(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class _Host:
    """What ``gateway.discovery`` keeps in step here: a fleet (membership, readiness, the
    probe that learns a pod's model) and the subscriber; no routing."""

    cfg: GatewayConfig
    fleet: Fleet
    subscriber: EventSubscriber | None
    metrics: IndexerMetrics


def static_sources(cfg: GatewayConfig) -> list[ReplicaSource]:
    """One source per static replica with a KV-event endpoint (its first model: the key root)."""
    out = []
    for r in cfg.replicas:
        if r.kv_events is None:
            continue
        if not r.models:
            raise ConfigError(f"replica {r.id} has kv_events but no models listed")
        out.append(ReplicaSource(replica=r.id, model=r.models[0], endpoint=r.kv_events, replay_endpoint=r.replay, topic=r.topic))
    return out


class Indexer:
    """The indexer's parts: index, subscriber, discovery (with a ``discovery:`` section) and the
    /metrics + /health server (with ``metrics_port``; 0 = a free port, then in ``metrics_port``)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        index_url: str | None = None,
        *,
        loss_check_s: float | None = None,
        metrics_host: str = "0.0.0.0",
        metrics_port: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.url = index_url or cfg.index.backend
        self.loss_check_s = loss_check_s if loss_check_s is not None else cfg.index.loss_check_s
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self.metrics = IndexerMetrics()
        self.index: KVIndex | None = None
        self.subscriber: EventSubscriber | None = None
        self.fleet: Fleet | None = None
        self.discovery: Any = None  # gateway.discovery.Discovery
        self._client: httpx.AsyncClient | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Raises ConfigError (nothing to index, no Redis), DiscoveryError (no Kubernetes
        configuration) or OSError (the metrics port is taken); ``stop`` cleans up after any."""
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("needs a Redis index (index.backend or --index redis://...)")
        sources = static_sources(self.cfg)
        if not sources and self.cfg.discovery is None:
            raise ConfigError("no replica has a kv_events endpoint, and there is no discovery: section")
        if self.metrics_port is not None:
            await self._serve_http()  # first: /health answers while discovery makes its first list
        self.index = make_index(self.url, root_checks=self.cfg.root_checks(), ttl_s=self.cfg.index.ttl_s)
        self.subscriber = EventSubscriber(self.index, sources, loss_check_s=self.loss_check_s)
        self.metrics.add_live(self._live_metrics)
        await self.subscriber.start()
        if self.cfg.discovery is not None:
            from .discovery import Discovery

            self._client = httpx.AsyncClient()
            self.fleet = Fleet([], self._client, self.cfg.health, self.cfg.scrape)  # no loops: discovery's probes only
            self.discovery = Discovery(_Host(self.cfg, self.fleet, self.subscriber, self.metrics), reprobe=True)
            await self.discovery.start()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.subscriber is not None:
            await self.subscriber.stop()
        if self.index is not None:
            with contextlib.suppress(Exception):
                await self.index.close()
        if self._client is not None:
            await self._client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _live_metrics(self) -> Iterator[Any]:
        if self.subscriber is not None:
            yield from subscriber_families(self.subscriber)

    def health(self) -> dict[str, Any]:
        sub = self.subscriber
        out: dict[str, Any] = {"status": "ok", "subscriptions": sum(1 for s in sub.sources.values() if s.endpoint) if sub is not None else 0}
        if self.discovery is not None:
            out["discovery"] = {"synced": self.discovery.synced, "replicas": len(self.discovery.current)}
        return out

    async def _serve_http(self) -> None:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(request: web.Request) -> web.Response:
            return web.json_response(self.health())

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.metrics_host, self.metrics_port).start()
        self.metrics_port = int(self._runner.addresses[0][1])
        host = f"[{self.metrics_host}]" if ":" in self.metrics_host else self.metrics_host
        log.warning("indexer: /metrics and /health on http://%s:%d", host, self.metrics_port, extra={"metrics_port": self.metrics_port})


async def run(
    cfg: GatewayConfig,
    index_url: str | None,
    stats_every_s: float,
    loss_check_s: float = 1.0,
    *,
    metrics_host: str = "0.0.0.0",
    metrics_port: int | None = None,
) -> int:
    from .discovery import DiscoveryError

    indexer = Indexer(cfg, index_url, loss_check_s=loss_check_s, metrics_host=metrics_host, metrics_port=metrics_port)
    try:
        try:
            await indexer.start()
        except (ConfigError, DiscoveryError, OSError) as exc:
            print(f"kvgate indexer: {exc}", file=sys.stderr)
            return 2
        stop = shutdown_event()
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), stats_every_s)
            if indexer.subscriber is not None:
                log.info("indexer stats", extra={"stats": str(indexer.subscriber.stats)})
    finally:
        await indexer.stop()
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvgate indexer", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, help="gateway YAML (replicas with kv_events and models, and/or a discovery: section)")
    p.add_argument("--index", help="redis://host:port/db (overrides index.backend)")
    p.add_argument("--stats-every", type=float, default=30.0, help="seconds between stats log lines")
    p.add_argument(
        "--loss-check-every",
        type=float,
        default=None,
        help="seconds between checks that Redis still holds the index (one small round trip; default: index.loss_check_s)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics and /health on this port (0: a free one, logged); default: none")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the /metrics server (default 0.0.0.0)")
    args = p.parse_args(argv)
    if args.loss_check_every is not None and args.loss_check_every <= 0:
        p.error("--loss-check-every must be positive")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        p.error("--metrics-port must be a port (0..65535)")
    cfg = load_for_command(args.config)
    if cfg is None:
        return 2
    every = args.loss_check_every if args.loss_check_every is not None else cfg.index.loss_check_s
    return asyncio.run(run(cfg, args.index, args.stats_every, every, metrics_host=args.metrics_host, metrics_port=args.metrics_port))
