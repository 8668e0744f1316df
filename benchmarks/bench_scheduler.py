"""How long one scheduling decision takes, per built-in profile and fleet size.

The scheduler runs on every request (twice for two-hop P/D), on the event loop, so its cost
adds straight to the gateway's latency. This times ``Scheduler.schedule`` plus the
``on_dispatch`` bookkeeping for a 2k-token prompt (128 blocks) against fleets of 4, 16 and 64
replicas with mixed prefix matches and load, after the speculative and approx-prefix memories
have been filled by earlier dispatches.

    python -m benchmarks.bench_scheduler [--iterations N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from kvindex.index import PrefixMatch
from scorers.base import EndpointState, RequestContext
from scorers.scheduler import BUILTIN_PROFILES, Scheduler

BLOCKS = 128


def fleet(n: int, rng: random.Random) -> list[EndpointState]:
    return [
        EndpointState(
            id=f"r{i}",
            url=f"http://10.0.0.{i}:8000",
            models=frozenset({"m"}),
            inflight_requests=rng.randint(0, 16),
            inflight_prefill_tokens=rng.randint(0, 8000),
            inflight_decode_tokens=rng.randint(0, 40000),
            running=rng.randint(0, 16),
            waiting=rng.randint(0, 4),
            kv_usage=rng.random(),
        )
        for i in range(n)
    ]


def context(i: int, endpoints: list[EndpointState], rng: random.Random) -> RequestContext:
    group = i % 32  # 32 shared prefixes, each request with its own last blocks
    keys = [hash((group, b)) & (2**64 - 1) for b in range(BLOCKS - 8)] + [hash((i, b)) & (2**64 - 1) for b in range(8)]
    prefix = {e.id: PrefixMatch(rng.randint(1, BLOCKS - 8), "GPU" if rng.random() < 0.8 else "CPU") for e in rng.sample(endpoints, max(1, len(endpoints) // 4))}
    return RequestContext(request_id=f"q{i}", model="m", prompt_tokens=BLOCKS * 16, max_tokens=128, block_keys=keys, prefix=prefix, session_id=f"s{i % 100}")


def bench(profile: str, n: int, iterations: int) -> tuple[float, float]:
    rng = random.Random(n)
    sched = Scheduler.from_config(None)
    eps = fleet(n, rng)
    ctxs = [context(i, eps, rng) for i in range(iterations + 200)]
    for c in ctxs[:200]:  # warm the prefix memories
        d = sched.schedule(c, eps, profile)
        sched.on_dispatch(c, d.ranked[0], profile)
    times = []
    for c in ctxs[200:]:
        t0 = time.perf_counter()
        d = sched.schedule(c, eps, profile)
        sched.on_dispatch(c, d.ranked[0], profile)
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99)] * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    args = ap.parse_args(argv)
    sizes = (4, 16, 64)
    print(f"scheduling one request ({BLOCKS}-block prompt): p50 / p99 µs, decision + on_dispatch")
    print(f"{'profile':22s}" + "".join(f"{f'{n} replicas':>20s}" for n in sizes))
    for profile in BUILTIN_PROFILES:
        cells = []
        for n in sizes:
            p50, p99 = bench(profile, n, args.iterations)
            cells.append(f"{p50:8.1f} / {p99:7.1f}")
        print(f"{profile:22s}" + "".join(f"{c:>20s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
