"""NIXL in the simulator must not eat the machine: no spinning progress thread.

NIXL's Python agent starts a UCX progress thread by default and gives it no pause between
polls; each NIXL-enabled simulated replica then burned about half a core while idle, so four
P/D replicas on a 2-core machine starved their own scheduler loops (decode ITL p90 16–28 ms for
a 7.5 ms step). The simulator now drives progress from its event loop. These tests pin that:
idle agents cost (almost) no CPU, and pulls still complete — including a late one, when the
prefill side holds no lease and only its slow idle poll drives progress.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time

import httpx
import pytest

from simulator.fleet import SimConfig, SimFleet
from simulator.kvtransfer import KVTransfer
from tests.helpers.sim import MODEL, metric, pd_prompt, two_hop

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="NIXL not installed")

IDLE_S = 1.5
MAX_IDLE_CPU_S = 0.15  # a spinning progress thread takes 0.3–0.75 s of CPU in 1.5 s, even on a loaded machine


def _cpu_s(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_nixl_agent_burns_no_cpu_in_other_threads():
    async def go() -> float:
        kv = KVTransfer("idle-cpu", 16, 4096)
        await kv.start()
        try:
            assert kv.backend == "nixl"
            p0, t0 = time.process_time(), time.thread_time()
            await asyncio.sleep(IDLE_S)
            # process CPU minus this (event-loop) thread's: what NIXL's own threads used
            return (time.process_time() - p0) - (time.thread_time() - t0)
        finally:
            await kv.close()

    assert asyncio.run(go()) < MAX_IDLE_CPU_S


def test_pull_completes_without_a_lease_on_the_serving_side():
    """A decode side reading after the prefill side dropped the lease (nothing polls fast):
    the idle poll still drives UCX, so the READ finishes instead of hanging to the timeout."""

    async def go() -> tuple[float, float]:
        src, dst = KVTransfer("late-src", 64, 4096), KVTransfer("late-dst", 64, 4096)
        await src.start()
        await dst.start()
        dst.timeout_s = 5.0
        try:
            src.buffer[:] = 7
            src.has_pending = lambda: True  # first pull: a lease is out (handshake + READ)
            src.wake()
            t = time.perf_counter()
            await dst.pull(
                remote_host="127.0.0.1",
                remote_port=src.side_channel_port,
                remote_engine_id="late-src",
                remote_request_id="a",
                remote_block_ids=[1, 2],
                local_block_ids=[1, 2],
            )
            leased = time.perf_counter() - t
            src.has_pending = lambda: False
            await asyncio.sleep(0.25)  # the poller has gone idle
            src.buffer[:] = 9
            t = time.perf_counter()
            await dst.pull(
                remote_host="127.0.0.1",
                remote_port=src.side_channel_port,
                remote_engine_id="late-src",
                remote_request_id="b",
                remote_block_ids=list(range(32)),
                local_block_ids=list(range(32)),
            )
            late = time.perf_counter() - t
            assert bytes(dst.buffer[: 32 * 4096]) == b"\x09" * (32 * 4096)
            return leased, late
        finally:
            await dst.close()
            await src.close()

    leased, late = asyncio.run(go())
    assert leased < 2.0
    assert late < 2.0  # was a 10 s timeout without the idle poll; 0.1 s poll period here


def test_pd_replica_processes_idle_cheaply_and_still_move_kv_over_nixl():
    f = SimFleet([SimConfig(model=MODEL, role="prefill", time_scale=0.02), SimConfig(model=MODEL, role="decode", time_scale=0.02)], mode="process")
    f.start()
    try:
        pre, dec = f.handles
        pids = [p.pid for p in f._procs if p is not None]
        assert len(pids) == 2
        # a two-hop request first, so both agents have connected and transferred
        bytes0 = metric(dec.url, "vllm:nixl_bytes_transferred_sum")
        first, kv, second = two_hop(pre, dec, pd_prompt("cpu"))
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"]
        assert metric(dec.url, "vllm:nixl_bytes_transferred_sum") > bytes0
        time.sleep(0.3)  # lease released, pollers back to idle
        c0 = [_cpu_s(p) for p in pids]
        time.sleep(IDLE_S)
        used = [_cpu_s(p) - c for p, c in zip(pids, c0)]
        assert all(u < MAX_IDLE_CPU_S for u in used), f"idle CPU per replica process over {IDLE_S} s: {used}"
        assert httpx.get(f"{dec.url}/health", timeout=5).status_code == 200
    finally:
        f.stop()
