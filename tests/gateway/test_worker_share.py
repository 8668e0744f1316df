"""``gateway.worker_share``: the workers of ``kvgate serve --workers N`` exchange in-flight load
and claims over real local ZMQ sockets, and a real two-worker gateway routes a new prompt's
siblings together whichever worker takes them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from benchmarks.procports import wait_listening
from gateway.config import IndexConfig, ReplicaConfig
from gateway.fleet import Fleet
from gateway.worker_share import WorkerShare
from kvindex.memory_index import MemoryIndex
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, metric_value, wait_for

REPLICAS = [ReplicaConfig(id=f"r{i}", url=f"http://127.0.0.1:{9 + i}") for i in range(3)]


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def _pair(tmp: Path, **cfg: float) -> tuple[list[Fleet], list[WorkerShare]]:
    index_cfg = IndexConfig(share_flush_ms=1, **cfg)
    fleets = [Fleet(REPLICAS, httpx.AsyncClient()) for _ in range(2)]
    shares = [WorkerShare(MemoryIndex(), fleets[i], index_cfg, tmp, i, 2) for i in range(2)]
    return fleets, shares


async def test_load_and_claims_reach_the_other_worker(tmp_path: Path) -> None:
    (fa, fb), (a, b) = _pair(tmp_path)
    await a.start()
    await b.start()
    try:
        a.placements = lambda: {"r2": 3}
        fa.dispatched("r1", 100, 20)
        fa.dispatched("r1", 50, 20)
        await _until(lambda: fb.states["r1"].peer_inflight_requests == 2)
        assert fb.states["r1"].peer_inflight_prefill_tokens == 150
        assert fb.states["r2"].peer_placements == 3
        assert fb.states["r0"].peer_inflight_requests == 0
        assert fa.states["r1"].peer_inflight_requests == 0  # its own counts are not peers'
        assert b.peers == 1

        keys = [11, 12, 13, 14]
        a.remember(keys, MODEL, "r2")
        await _until(lambda: b.claims is not None and len(b.claims) == 4)
        found, claims = await b.lookup([11, 12, 13, 99], MODEL)
        assert found == {} and claims == {"r2": 3}  # the shared prefix of the two prompts
        assert (await a.lookup(keys, MODEL))[1] == {}  # a worker's own claims are its scorers' business
        b.cache_lost("r2")  # r2's cache cleared: a claim on it says nothing now
        assert (await b.lookup(keys, MODEL))[1] == {}
        # a prompt the replica already held half of is not sent (a sibling finds it in the index)
        a.remember([21, 22, 23, 24], MODEL, "r1", held=2)
        a.remember([31, 32, 33], MODEL, "r0", held=1)
        await _until(lambda: b.claims is not None and b.claims.match([31, 32, 33]) == {"r0": 3})
        assert b.claims.match([21, 22, 23, 24]) == {}  # sent before the other, on the same socket

        fa.finished("r1", 0, 20)
        await _until(lambda: fb.states["r1"].peer_inflight_requests == 1)
    finally:
        await a.stop()
    # a stopping worker says so: the other stops counting its load at once, not after the TTL
    await _until(lambda: fb.states["r1"].peer_inflight_requests == 0 and b.peers == 0, timeout=1.0)
    await b.stop()


async def test_a_silent_worker_stops_counting_after_the_ttl(tmp_path: Path) -> None:
    (fa, fb), (a, b) = _pair(tmp_path, share_ttl_s=0.3)
    await a.start()
    await b.start()
    try:
        fa.dispatched("r0", 10, 10)
        await _until(lambda: fb.states["r0"].peer_inflight_requests == 1)
        for t in a._tasks:  # as if the worker died: no more messages, no goodbye
            t.cancel()
        t0 = time.monotonic()
        await _until(lambda: fb.states["r0"].peer_inflight_requests == 0, timeout=3.0)
        assert time.monotonic() - t0 >= 0.15  # it counted until its map went stale
    finally:
        await a.stop()
        await b.stop()


async def test_malformed_messages_are_counted_and_skipped(tmp_path: Path) -> None:
    (_, fb), (a, b) = _pair(tmp_path)
    await a.start()
    await b.start()
    try:
        await _until(lambda: b.peers == 1)  # connected (a PUB drops what it sends before that)
        a._pub.send_multipart([b"C", b"someone", b"\xc1 not msgpack"])
        a._pub.send_multipart([b"L", b"someone", b"\xc1"])  # not a map: skipped when summed
        a._pub.send_multipart([b"C", b"someone", b"\x92\xa2r1\x91\x07"])  # a good claim after them
        await _until(lambda: b.claims is not None and len(b.claims) == 1)
        assert b.stats.errors >= 1
        assert fb.states["r1"].peer_inflight_requests == 0
    finally:
        await a.stop()
        await b.stop()


@pytest.fixture()
def eventless_fleet():
    """Replicas that publish no KV events: only claims can tell one worker where the other sent
    a prompt (with events, both would learn it from the index a few ms later)."""
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0) for i in range(4)])
    f.start()
    yield f
    f.stop()


def _serve(fleet: SimFleet, tmp: Path, workers: int) -> tuple[subprocess.Popen, str]:
    cfg = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "replicas": [{"id": f"r{i}", "url": h.url, "models": [MODEL]} for i, h in enumerate(fleet.handles)],
        "models": {MODEL: {"tokenizer": "demo"}},
        "debug_headers": True,
        "auth": {"admin_key": "admin"},
    }
    path = tmp / "gw.yaml"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{wait_listening(proc, 30)}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, message="ready")
    return proc, url


def test_two_workers_send_a_new_prompts_siblings_together(eventless_fleet: SimFleet, tmp_path: Path) -> None:
    proc, url = _serve(eventless_fleet, tmp_path, 2)
    try:
        # both workers up and sharing (each sees the other as a peer)
        def both_share() -> bool:
            seen = {}
            for _ in range(20):  # a new connection each time: the kernel hands it to either worker
                st = httpx.get(f"{url}/admin/state", headers={"authorization": "Bearer admin"}, timeout=5).json()
                seen[st["worker"]["pid"]] = (st["shared"] or {}).get("peers")
            return len(seen) == 2 and all(p == 1 for p in seen.values())

        wait_for(both_share, timeout=20, message="both workers see each other")
        splits = 0
        for doc in range(6):
            prompt = f"[doc {doc}] " + " ".join(f"w{doc}x{i}" for i in range(400))
            served: set[str] = set()
            for q in range(6):
                with httpx.Client(timeout=10) as c:  # a fresh connection: either worker
                    r = c.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": f"{prompt} question {q}", "max_tokens": 2})
                assert r.status_code == 200, r.text
                served.add(r.headers["x-kvgate-replica"])
                time.sleep(0.02)  # a loaded machine's ZMQ I/O threads get time to pass the claim on
            splits += len(served) > 1
        assert splits == 0, f"{splits} of 6 prompts split over replicas"
        # each worker's /metrics shows the exchange: one peer, claims sent for the new prompts
        claims = {}
        for _ in range(30):  # a new connection each time: either worker answers
            text = httpx.get(f"{url}/metrics", timeout=5).text
            assert metric_value(text, "kvgate_shared_peers") == 1
            pid = re.search(r'kvgate_worker_info\{[^}]*pid="(\d+)"', text)
            assert pid is not None
            claims[pid.group(1)] = metric_value(text, "kvgate_shared_claims_total")
        assert sum(claims.values()) >= 6, claims
    finally:
        proc.terminate()
        proc.wait(20)
