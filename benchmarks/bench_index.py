"""Index benchmark: ingest rate, lookup latency (memory and Redis), block_keys throughput.

    python -m benchmarks.bench_index [--redis-url redis://host:port/db] [--blocks N]

Without ``--redis-url`` a throw-away redis-server is started on a free loopback port in a temp
dir (skipped with a message if the binary is missing). Events are built as vLLM publishes
them in bulk (64 blocks of 16 tokens per BlockStored, 16 events per batch) and handed to the
index already decoded: decoding is the subscriber's cost, not the index's. Engine hashes are
random 64-bit ints (their value does not matter to the index). Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

from kvindex.events import BlockHash, BlockStored, EventBatch, KVEvent
from kvindex.hashing import block_keys, chain_keys
from kvindex.index import KVIndex
from kvindex.memory_index import MemoryIndex
from kvindex.redis_index import RedisIndex

MODEL = "bench-model"
BS = 16
BLOCKS_PER_EVENT = 64
EVENTS_PER_BATCH = 16
REPLICAS = 10


# ------------------------------------------------------------------------------------------
# workload
# ------------------------------------------------------------------------------------------


def make_batches(n_blocks: int, seed: int) -> list[EventBatch]:
    """Prompt-starting BlockStored events of 64 blocks each, 16 events per batch."""
    rng = random.Random(seed)
    events: list[KVEvent] = [
        BlockStored(
            block_hashes=[rng.getrandbits(64) for _ in range(BLOCKS_PER_EVENT)],
            parent_block_hash=None,
            token_ids=[rng.randrange(150_000) for _ in range(BLOCKS_PER_EVENT * BS)],
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[None] * BLOCKS_PER_EVENT,
            group_idx=0,
        )
        for _ in range(max(1, n_blocks // BLOCKS_PER_EVENT))
    ]
    return [EventBatch(ts=0.0, events=events[i : i + EVENTS_PER_BATCH]) for i in range(0, len(events), EVENTS_PER_BATCH)]


def chained_events(tokens: Sequence[int], depth: int, seed: int) -> list[EventBatch]:
    """One replica caching the first ``depth`` blocks of ``tokens``, 64 blocks per event."""
    rng = random.Random(seed)
    hashes: list[BlockHash] = [rng.getrandbits(64) for _ in range(depth)]
    out = []
    for a in range(0, depth, BLOCKS_PER_EVENT):
        b = min(depth, a + BLOCKS_PER_EVENT)
        ev = BlockStored(
            block_hashes=hashes[a:b],
            parent_block_hash=hashes[a - 1] if a else None,
            token_ids=list(tokens[a * BS : b * BS]),
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        out.append(EventBatch(ts=0.0, events=[ev]))
    return out


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


async def ingest_rate(idx: KVIndex, batches: Sequence[EventBatch]) -> float:
    """Stored blocks per second applying ``batches`` round-robin over the replicas."""
    n = sum(len(ev.block_hashes) for b in batches for ev in b.events if isinstance(ev, BlockStored))
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        await idx.apply(f"r{i % REPLICAS}", b, model=MODEL)
    return n / (time.perf_counter() - t0)


async def latency_us(call: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    """p50 and p99 of ``n`` sequential calls, in µs (after a short warm-up)."""
    for _ in range(min(50, n)):
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6


async def fill_for_lookup(idx: KVIndex, tokens: Sequence[int], depths: Sequence[int], background: list[EventBatch]) -> None:
    """``REPLICAS`` replicas holding a shared prompt to various depths, plus unrelated blocks."""
    for i, b in enumerate(background):
        await idx.apply(f"r{i % REPLICAS}", b, model=MODEL)
    for r, depth in enumerate(depths):
        for b in chained_events(tokens, depth, seed=1000 + r):
            await idx.apply(f"r{r}", b, model=MODEL)


async def lookup_table(idx: KVIndex, keys: list[int], rounds: int) -> list[str]:
    lines = []
    for n in (64, 512):
        q = keys[:n]
        calls = rounds if n == 64 else rounds // 4
        before = await _evalsha_calls(idx)
        p50, p99 = await latency_us(partial(idx.lookup, q, model=MODEL), calls)
        after = await _evalsha_calls(idx)
        trips = "" if before is None or after is None else f"   {(after - before) / (calls + min(50, calls)):.2f} EVALSHA per lookup"
        lines.append(f"{n:>4}-block lookup  p50 {p50:8.1f} µs   p99 {p99:8.1f} µs{trips}")
    return lines


async def _evalsha_calls(idx: KVIndex) -> int | None:
    """Server-side count of EVALSHA calls (INFO commandstats), None for the memory backend."""
    if not isinstance(idx, RedisIndex):
        return None
    stats = await idx._redis.info("commandstats")  # the benchmark owns this index
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def bytes_per_block(n_blocks: int) -> float:
    """Heap the memory index keeps per stored block (tracemalloc: blocks, values, hash map)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        idx = MemoryIndex()
        batches = make_batches(n_blocks, seed=11)
        for i, b in enumerate(batches):
            await idx.apply(f"r{i % REPLICAS}", b, model=MODEL)
        del batches
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        n = await idx.block_count()
    finally:
        tracemalloc.stop()
    return used / n


def block_keys_rate() -> str:
    rng = random.Random(7)
    tokens = [rng.randrange(150_000) for _ in range(8192)]
    n = 400
    block_keys(tokens, BS, model=MODEL)
    t0 = time.perf_counter()
    for _ in range(n):
        block_keys(tokens, BS, model=MODEL)
    per_call = (time.perf_counter() - t0) / n
    return f"block_keys, 8192-token prompt (512 blocks of {BS}): {per_call * 1e6:.0f} µs per call, {8192 / per_call / 1e6:.1f} M tokens/s"


# ------------------------------------------------------------------------------------------
# a throw-away redis-server
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def temporary_redis() -> Iterator[str | None]:
    """A redis-server on a free port in a temp dir, or None if the binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                workdir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory",
                "1gb",
                "--maxmemory-policy",
                "volatile-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=5)


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


SCENARIOS = {
    "all 10 replicas hold all 512 blocks": [512] * REPLICAS,
    "staggered depths 8..512": [8, 24, 40, 56, 64, 128, 256, 384, 448, 512],
}


async def run(redis_url: str | None, n_blocks: int) -> None:
    rng = random.Random(3)
    prompt = [rng.randrange(150_000) for _ in range(512 * BS)]
    background = make_batches(20_000, seed=5)
    print(f"kvgate index benchmark  ({BLOCKS_PER_EVENT} blocks/event, {EVENTS_PER_BATCH} events/batch, block size {BS}, {REPLICAS} replicas)")
    print(block_keys_rate())
    print(chain_keys_rate())
    print("\n== memory ==")
    await memory_section(n_blocks, prompt, background)
    print("\n== redis ==")
    with temporary_redis() if redis_url is None else _given(redis_url) as url:
        if url is None:
            print("redis-server not installed: Redis figures skipped (apt-get install redis-server)")
            return
        await redis_section(url, n_blocks, prompt, background)


def chain_keys_rate() -> str:
    sample = make_batches(20 * EVENTS_PER_BATCH * BLOCKS_PER_EVENT, seed=2)
    events = [ev for b in sample for ev in b.events if isinstance(ev, BlockStored)]
    n = sum(len(ev.block_hashes) for ev in events)
    t0 = time.perf_counter()
    for ev in events:
        chain_keys(1, ev.token_ids, BS)
    return f"chain_keys over events ({BLOCKS_PER_EVENT} blocks each, part of every ingest below): {n / (time.perf_counter() - t0) / 1e6:.2f} M blocks/s"


async def memory_section(n_blocks: int, prompt: list[int], background: list[EventBatch]) -> None:
    batches = make_batches(n_blocks, seed=2)
    # Three fresh indexes: the first run also pays the process's first-touch page faults.
    cold = [await ingest_rate(MemoryIndex(), batches) for _ in range(3)]
    bounded = MemoryIndex(max_blocks=n_blocks // 2)
    await ingest_rate(bounded, make_batches(n_blocks // 2, seed=9))  # fill to the bound
    steady = [await ingest_rate(bounded, batches) for _ in range(3)]  # every store now evicts
    total = len(batches) * EVENTS_PER_BATCH * BLOCKS_PER_EVENT
    print(f"ingest, empty index growing ({total} blocks): first run {cold[0] / 1e6:.2f}, best of 3 {max(cold) / 1e6:.2f} M stored blocks/s")
    print(f"ingest, at its bound, LRU evicting: median {statistics.median(steady) / 1e6:.2f}, best of 3 {max(steady) / 1e6:.2f} M stored blocks/s")
    per_block = await bytes_per_block(32_768)
    print(f"footprint: {per_block:.0f} B per block (one replica each) -> {per_block * 2_000_000 / 2**20:.0f} MiB at the default bound of 2M blocks")
    keys = block_keys(prompt, BS, model=MODEL)
    for title, depths in SCENARIOS.items():
        mem = MemoryIndex()
        await fill_for_lookup(mem, prompt, depths, background)
        print(f"-- {title} (+{await mem.block_count() - 512} other blocks)")
        for line in await lookup_table(mem, keys, 4000):
            print("  " + line)


async def redis_section(url: str, n_blocks: int, prompt: list[int], background: list[EventBatch]) -> None:
    ns = f"bench{random.randrange(1 << 30)}"
    idx = RedisIndex(url, namespace=ns)
    try:
        floor = await latency_us(lambda: idx._redis.ping(), 1000)
        print(f"round-trip floor (PING through redis-py asyncio): p50 {floor[0]:.1f} µs")
        rbatches = make_batches(min(n_blocks, 65_536), seed=4)
        rate = await ingest_rate(idx, rbatches)
        print(f"ingest ({len(rbatches)} batches of {EVENTS_PER_BATCH * BLOCKS_PER_EVENT} blocks, one EVALSHA each): {rate / 1e3:6.0f} k stored blocks/s")
    finally:
        await _cleanup(idx, ns)
    keys = block_keys(prompt, BS, model=MODEL)
    for i, (title, depths) in enumerate(SCENARIOS.items()):
        r = RedisIndex(url, namespace=f"{ns}-{i}")
        try:
            await fill_for_lookup(r, prompt, depths, background[:4])
            print(f"-- {title} (one EVALSHA per lookup)")
            for line in await lookup_table(r, keys, 1000):
                print("  " + line)
        finally:
            await _cleanup(r, f"{ns}-{i}")


async def _cleanup(idx: RedisIndex, ns: str) -> None:
    """Delete a benchmark namespace (matters only with --redis-url pointing at a live Redis)."""
    client = idx._redis  # the benchmark owns this index
    chunk: list[bytes] = []
    async for key in client.scan_iter(match=f"{ns}:*", count=10_000):
        chunk.append(key)
        if len(chunk) >= 5000:
            await client.unlink(*chunk)
            chunk.clear()
    if chunk:
        await client.unlink(*chunk)
    await idx.close()


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="use this Redis instead of starting a temporary redis-server")
    parser.add_argument("--blocks", type=int, default=262_144, help="stored blocks for the memory ingest run")
    args = parser.parse_args(argv)
    asyncio.run(run(args.redis_url, args.blocks))


if __name__ == "__main__":
    main()
