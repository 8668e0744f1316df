"""Two gateways on one Redis index route like one (index.share_load), as real processes.

On loopback: a redis-server, one ``kvgate indexer`` (KV events of every simulator into Redis),
two ``kvgate serve`` gateways (port 0, ingest off) whose fleet comes from the loopback
Kubernetes API server (``discovery:``; each pod's annotations point at a simulator's ports),
and four simulated replicas. Pods are added and removed through the API while both gateways
take traffic; each gateway reads the other's in-flight load from Redis; a burst of siblings
sharing a new prefix, sent alternately to the two gateways at once, lands on one replica; and
a killed gateway's load stops counting when its key expires.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from benchmarks.bench_multi_gateway import KvgateProc, gateway_config, replica_entries
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, metric_value, wait_for
from tests.helpers.kube_api import FakeKubeAPI, make_pod
from tests.helpers.redis import RedisServer

NAMES = [f"vllm-{i}" for i in range(4)]
ADMIN = {"authorization": "Bearer adm"}
#: the start every prompt here shares: after the first requests the index holds it
OPENING = "You are the assistant of the multi-gateway test. Answer briefly and precisely. "


def _port(endpoint: str | None) -> str:
    return str(urlparse(endpoint).port)


def sim_pod(name: str, h: Any) -> dict[str, Any]:
    ann = {
        "kvgate.io/port": _port(h.url),
        "kvgate.io/kv-events-port": _port(h.events_endpoint),
        "kvgate.io/replay-port": _port(h.replay_endpoint),
        "kvgate.io/models": MODEL,
    }
    return make_pod(name, labels={"llm-d.ai/inferenceServing": "true"}, annotations=ann)


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.kube = FakeKubeAPI()
        self.sims = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.5, num_blocks=2048) for i in range(4)])
        self.gateways: list[KvgateProc] = []
        self.indexer: KvgateProc | None = None

    def start(self) -> None:
        self.redis.start()
        self.kube.start()
        self.sims.start()
        h = self.sims.handles
        # the indexer reads a static list (it has no discovery): every simulator, by its pod's name
        indexer_cfg = {"replicas": replica_entries(h, NAMES), "index": {"backend": self.redis.url}}
        self.indexer = KvgateProc("indexer", indexer_cfg, self.tmp, "indexer", "--loss-check-every", "0.5").start()
        for i in (0, 1):
            self.kube.apply("pods", sim_pod(NAMES[i], h[i]))
        discovery = {"kubeconfig": str(self.kube.kubeconfig(self.tmp)), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5}
        cfg = gateway_config(
            self.redis.url,
            share=True,
            discovery=discovery,
            index={"share_ttl_s": 1.5},
            health={"interval_s": 0.3, "timeout_s": 0.5, "failure_threshold": 2, "cooldown_s": 1.0},
            scrape={"interval_s": 1.0},
            auth={"admin_key": "adm"},
        )
        self.gateways = [KvgateProc("serve", cfg, self.tmp, f"gw-{n}") for n in "AB"]
        with ThreadPoolExecutor(2) as pool:  # both start at once (each waits for its first pod list)
            list(pool.map(lambda g: g.start(), self.gateways))

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()
        if self.indexer is not None:
            self.indexer.stop()
        self.sims.stop()
        self.kube.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("multi_gateway"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def state(g: KvgateProc) -> dict[str, Any]:
    r = httpx.get(f"{g.url}/admin/state", headers=ADMIN, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def fleet_ids(g: KvgateProc, healthy: bool = True) -> set[str]:
    return {r["id"] for r in state(g)["replicas"] if r["healthy"] or not healthy}


def peer_inflight(g: KvgateProc) -> dict[str, int]:
    return {r["id"]: r["peer_inflight_requests"] for r in state(g)["replicas"]}


def ask(client: httpx.Client, g: KvgateProc, prompt: str, max_tokens: int = 4) -> str:
    r = client.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-kvgate-replica"]


def burst(stack: Stack, prompts: list[str], max_tokens: int = 4) -> list[tuple[int, str]]:
    """All at once, alternately to gateway A and B: (gateway index, replica) per prompt."""
    with httpx.Client() as client, ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, client, stack.gateways[i % 2], p, max_tokens) for i, p in enumerate(prompts)]
        return [(i % 2, f.result()) for i, f in enumerate(futures)]


def unique(n: int, tag: str) -> list[str]:
    return [OPENING + f"[{tag} {uuid.uuid4().hex}] " + " ".join(f"word{j} of request {i};" for j in range(30)) for i in range(n)]


def test_two_gateways_route_like_one(stack):
    a, b = stack.gateways
    # -- both gateways see only the pods that exist, and each other -----------------------------
    wait_for(lambda: all(fleet_ids(g) == set(NAMES[:2]) for g in (a, b)), message="both gateways' fleets from the API")
    wait_for(lambda: all(state(g)["shared"]["peers"] == 1 for g in (a, b)), message="each gateway reading the other's load")
    assert {r for _, r in burst(stack, unique(8, "two pods"))} <= set(NAMES[:2])

    # -- pods added through the API: traffic from both gateways follows within seconds -----------
    t0 = time.monotonic()
    for i in (2, 3):
        stack.kube.apply("pods", sim_pod(NAMES[i], stack.sims.handles[i]))
    seen: dict[int, set[str]] = {0: set(), 1: set()}

    def all_four() -> bool:
        for gi, rid in burst(stack, unique(8, "four pods")):
            seen[gi].add(rid)
        return seen[0] == seen[1] == set(NAMES)

    wait_for(all_four, timeout=15, message="traffic from both gateways on the added pods")
    assert time.monotonic() - t0 < 10

    # -- one gateway's in-flight requests count in the other's routing ---------------------------
    with httpx.Client() as client, ThreadPoolExecutor(3) as pool:
        long = [
            pool.submit(lambda p: client.post(f"{a.url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 300}, timeout=60), p)
            for p in unique(3, "long")
        ]
        wait_for(lambda: sum(peer_inflight(b).values()) == 3, timeout=5, message="B reading A's three requests in flight")
        held = Counter(peer_inflight(b))
        busy = {rid for rid, n in held.items() if n}
        assert sum(held.values()) == 3 and len(busy) == 3, held  # A spread them
        idle = (set(NAMES) - busy).pop()
        assert ask(client, b, unique(1, "beside")[0]) == idle  # B routes around A's load
        responses = [f.result() for f in long]
    assert all(r.status_code == 200 for r in responses)
    wait_for(lambda: sum(peer_inflight(b).values()) == 0, timeout=5, message="A's load back to zero in B's view")

    # -- siblings of a new prefix, half through each gateway, at once: one replica ---------------
    for round_ in range(2):
        shared = OPENING + f"[new shared document {round_} {uuid.uuid4().hex}] " + " ".join(f"clause {j} binds party {j % 7};" for j in range(80))
        landed = burst(stack, [shared + f" Question {k}: what does clause {k} say?" for k in range(6)])
        assert {gi for gi, _ in landed} == {0, 1}
        assert len({rid for _, rid in landed}) == 1, landed
    # the claims went through Redis (a sibling that found the other gateway deciding waited for its claim)
    assert sum(metric_value(httpx.get(f"{g.url}/metrics", timeout=5).text, "kvgate_shared_claims_total") for g in (a, b)) > 0

    # -- load spread over the four replicas, traffic split over the two gateways -----------------
    per_replica = Counter(rid for _, rid in burst(stack, unique(24, "spread"), max_tokens=24))
    assert set(per_replica) == set(NAMES), per_replica
    assert max(per_replica.values()) / min(per_replica.values()) <= 2.0, per_replica

    # -- pods removed through the API: both gateways stop routing there --------------------------
    for i in (1, 3):
        stack.kube.delete("pods", NAMES[i])
    wait_for(lambda: all(fleet_ids(g, healthy=False) == {NAMES[0], NAMES[2]} for g in (a, b)), timeout=10, message="the pods gone from both fleets")
    assert {r for _, r in burst(stack, unique(8, "after removal"))} <= {NAMES[0], NAMES[2]}


def test_a_killed_gateways_load_expires(stack):
    a, b = stack.gateways
    with httpx.Client() as client, ThreadPoolExecutor(2) as pool:
        streams = [
            pool.submit(lambda p: client.post(f"{a.url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 2000}, timeout=60), p)
            for p in unique(2, "cut")
        ]
        wait_for(lambda: sum(peer_inflight(b).values()) == 2, timeout=5, message="B reading A's two requests in flight")
        a.kill()  # no clean shutdown: its key in Redis is not withdrawn
        t0 = time.monotonic()
        wait_for(lambda: sum(peer_inflight(b).values()) == 0 and state(b)["shared"]["peers"] == 0, timeout=5, message="A's load expired")
        assert time.monotonic() - t0 < 1.5 + 1.5  # share_ttl_s, plus B's next read
        for f in streams:
            with pytest.raises(httpx.HTTPError):
                f.result()
    assert ask(httpx.Client(), b, unique(1, "after the kill")[0]) in {NAMES[0], NAMES[2]}
