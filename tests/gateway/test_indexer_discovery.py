"""``kvgate indexer`` on Kubernetes discovery: the pods of a loopback API server (the real
list/watch protocol, tests/helpers/kube_api.py), each standing for a simulated vLLM replica on
loopback ports (its kvgate.io/* annotations), their KV events into a real redis-server.

Pods that appear are subscribed and their blocks become visible to a gateway's lookup (a
``RedisIndex`` of the test's own); a pod whose model is not annotated is subscribed once its
/v1/models has answered; a deleted pod's entries disappear from Redis. ``/metrics`` and
``/health`` answer, in process and from the ``kvgate indexer`` command on the port it logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from gateway.config import parse_config
from gateway.indexer import Indexer, run
from kvindex.hashing import block_keys
from kvindex.redis_index import RedisIndex
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, metric_value
from tests.helpers.kube_api import FakeKubeAPI, make_pod

pytest.importorskip("kubernetes_asyncio")

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = 10


@pytest.fixture(scope="module")
def sims():
    f = SimFleet([SimConfig(model=MODEL, seed=40 + i, time_scale=0.02, num_blocks=1024) for i in range(2)])
    f.start()
    yield f
    f.stop()


@pytest.fixture
def kube():
    with FakeKubeAPI() as api:
        yield api


def _port(endpoint: str | None) -> str:
    assert endpoint is not None
    return str(urlparse(endpoint).port)


def sim_pod(name: str, h, *, models: bool = True, role: str = "both") -> dict[str, Any]:
    ann = {"kvgate.io/port": _port(h.url), "kvgate.io/kv-events-port": _port(h.events_endpoint), "kvgate.io/replay-port": _port(h.replay_endpoint)}
    if models:
        ann["kvgate.io/models"] = MODEL
    return make_pod(name, labels={"llm-d.ai/inferenceServing": "true", "llm-d.ai/role": role}, annotations=ann)


def indexer_config(kube: FakeKubeAPI, tmp_path: Path, redis_url: str) -> dict[str, Any]:
    return {
        "replicas": [],
        "discovery": {"kubeconfig": str(kube.kubeconfig(tmp_path)), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5},
        "index": {"backend": redis_url, "ingest": False},
        "health": {"interval_s": 0.3, "timeout_s": 0.5},
    }


def tokens(tag: int) -> list[int]:
    """A prompt as token ids, ``BLOCKS`` full blocks, its own from the first block on."""
    return [1000 + tag] + [(tag * 7 + i) % 500 + 10 for i in range(BLOCKS * 16 - 1)]


async def complete(h, prompt: list[int]) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"{h.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, r.text


async def held(index: RedisIndex, prompt: list[int]) -> dict[str, int]:
    """Blocks of ``prompt`` each replica holds, as a gateway's lookup in Redis sees them."""
    return {rid: m.blocks for rid, m in (await index.lookup(block_keys(prompt, 16, model=MODEL), model=MODEL)).items()}


async def until(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_pods_are_indexed_as_they_come_and_dropped_as_they_go(sims, kube, tmp_path, redis_url):
    a, b = sims.handles
    kube.apply("pods", sim_pod("vllm-a", a))
    kube.apply("pods", make_pod("web", labels={"app": "web"}))  # not selected
    indexer = Indexer(parse_config(indexer_config(kube, tmp_path, redis_url)), loss_check_s=0.5, metrics_host="127.0.0.1", metrics_port=0)
    lookup = RedisIndex(redis_url)
    http = httpx.AsyncClient(timeout=5)
    try:
        await indexer.start()
        assert indexer.subscriber is not None and set(indexer.subscriber.sources) == {"vllm-a"}  # start waited for the first list
        assert indexer.metrics_port  # port 0: the one it got
        pa, pb = tokens(1), tokens(2)
        await complete(a, pa)
        await until(lambda: _eq(held(lookup, pa), {"vllm-a": BLOCKS}), "vllm-a's blocks in Redis")

        # a pod added while running, its model from its own /v1/models (no annotation)
        kube.apply("pods", sim_pod("vllm-b", b, models=False))
        await until(lambda: _true("vllm-b" in indexer.subscriber.sources), "vllm-b subscribed")
        await complete(b, pb)
        await until(lambda: _eq(held(lookup, pb), {"vllm-b": BLOCKS}), "vllm-b's blocks in Redis")

        text = (await http.get(f"http://127.0.0.1:{indexer.metrics_port}/metrics")).text
        for rid in ("vllm-a", "vllm-b"):
            assert metric_value(text, "kvgate_kv_events_applied_total", {"replica": rid}) > 0
            assert metric_value(text, "kvgate_kv_batches_lost_total", {"replica": rid}) == 0
        assert metric_value(text, "kvgate_kv_subscriptions") == 2
        assert metric_value(text, "kvgate_kv_malformed_frames_total") == 0
        assert metric_value(text, "kvgate_discovery_replicas", {"ready": "true"}) == 2
        assert metric_value(text, "kvgate_discovery_changes_total", {"change": "added"}) == 2
        assert metric_value(text, "kvgate_discovery_lists_total", {"resource": "pods"}) == 1
        assert "kvgate_requests_total" not in text  # an indexer routes nothing
        health = (await http.get(f"http://127.0.0.1:{indexer.metrics_port}/health")).json()
        assert health == {"status": "ok", "subscriptions": 2, "discovery": {"synced": True, "replicas": 2}}

        # the pod is deleted: its subscription, counters and entries in Redis go; the other stays
        kube.delete("pods", "vllm-a")
        await until(lambda: _eq(held(lookup, pa), {}), "vllm-a's entries gone from Redis")
        assert set(indexer.subscriber.sources) == {"vllm-b"}
        assert await held(lookup, pb) == {"vllm-b": BLOCKS}
        text = (await http.get(f"http://127.0.0.1:{indexer.metrics_port}/metrics")).text
        assert metric_value(text, "kvgate_kv_events_applied_total", {"replica": "vllm-a"}) == 0
        assert metric_value(text, "kvgate_kv_subscriptions") == 1
        assert metric_value(text, "kvgate_discovery_changes_total", {"change": "removed"}) == 1

        # back under the same name: a new replica, indexed from its events again
        kube.apply("pods", sim_pod("vllm-a", a))
        pa2 = tokens(3)
        await until(lambda: _true("vllm-a" in indexer.subscriber.sources), "vllm-a subscribed again")
        await complete(a, pa2)
        await until(lambda: _eq(held(lookup, pa2), {"vllm-a": BLOCKS}), "the new vllm-a indexed")
    finally:
        await http.aclose()
        await indexer.stop()
        await lookup.close()


async def _eq(got: Awaitable[dict[str, int]], want: dict[str, int]) -> bool:
    return await got == want


async def _true(value: bool) -> bool:
    return value


async def test_nothing_to_index_or_no_redis_is_an_error(redis_url, capsys):
    assert await run(parse_config({"index": {"backend": redis_url}}), None, 60) == 2
    assert "no replica has a kv_events endpoint, and there is no discovery: section" in capsys.readouterr().err
    static = {"replicas": [{"id": "r0", "url": "http://127.0.0.1:9", "kv_events": "tcp://127.0.0.1:9"}], "index": {"backend": redis_url}}
    assert await run(parse_config(static), None, 60) == 2
    assert "replica r0 has kv_events but no models listed" in capsys.readouterr().err
    assert await run(parse_config({"discovery": {}}), None, 60) == 2
    assert "needs a Redis index" in capsys.readouterr().err


def test_the_command_follows_discovery_and_serves_metrics_on_the_port_it_logs(sims, kube, tmp_path, redis_url):
    """``kvgate indexer --metrics-port 0`` with only a discovery section (it used to exit: no
    static replica with events): the port in its log line answers /health and /metrics."""
    a, _ = sims.handles
    kube.apply("pods", sim_pod("vllm-a", a))
    cfg = tmp_path / "indexer.json"
    cfg.write_text(json.dumps(indexer_config(kube, tmp_path, redis_url)))
    log = tmp_path / "indexer.log"
    argv = [sys.executable, "-m", "gateway.cli", "indexer", "--config", str(cfg), "--metrics-port", "0", "--metrics-host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and "metrics_port" in line:
                    port = json.loads(line)["metrics_port"]
            time.sleep(0.05)
        assert port, f"no metrics port logged; the log:\n{log.read_text(errors='replace')[-2000:]}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if metric_value(text, "kvgate_kv_subscriptions") == 1:
                break
            time.sleep(0.05)
        assert metric_value(text, "kvgate_kv_subscriptions") == 1 and metric_value(text, "kvgate_discovery_replicas", {"ready": "true"}) == 1
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
