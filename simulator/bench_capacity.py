"""How many requests/s one simulated replica sustains at time-scale 0 (no simulated GPU time).

    python -m simulator.bench_capacity [--requests 2000] [--concurrency 32]

The replica runs in its own process; the load comes from this one over loopback, so on a
2-core machine the figure is a floor shared with the client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp

from .fleet import SimConfig, SimFleet


async def _load(url: str, n: int, conc: int, stream: bool) -> float:
    body = {"model": "kvgate/demo-8b", "prompt": "capacity probe: a short prompt", "max_tokens": 8, "stream": stream}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as s:
        it = iter(range(n))

        async def worker() -> None:
            for _ in it:
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    data = await r.read()
                    # count only real answers: an error body is not capacity
                    if r.status != 200 or (stream and not data.endswith(b"data: [DONE]\n\n")) or (not stream and b'"finish_reason":"length"' not in data):
                        raise RuntimeError(f"bad answer {r.status}: {data[:200]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    fleet = SimFleet([SimConfig(time_scale=0.0, kv_events=True)], mode="process")
    fleet.start()
    try:
        url = fleet.handles[0].url
        asyncio.run(_load(url, 200, args.concurrency, False))  # warm-up
        for stream in (False, True):
            rps = asyncio.run(_load(url, args.requests, args.concurrency, stream))
            print(f"{'stream' if stream else 'non-stream'}: {rps:.0f} requests/s (8 output tokens, concurrency {args.concurrency})")
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
