"""Aggregated vs disaggregated serving on the simulated fleet, for a long-prompt workload.

Four replicas either all ``both`` (aggregated: every replica prefills and decodes) or two
``prefill`` + two ``decode`` (the gateway runs long uncached prompts as two hops and the KV
moves over NIXL). Same workload, fresh fleet and gateway each; prints TTFT p50/p90,
inter-token latency and throughput.

    python -m benchmarks.bench_pd [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from simulator.fleet import SimConfig, SimFleet

from .compare import GatewayProcess
from .report import summarize
from .workloads import MODEL, WORKLOADS, run_workload


def run(roles: list[str], wl, tmp: Path, concurrency: int, time_scale: float):
    fleet = SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=time_scale, num_blocks=2048) for i, r in enumerate(roles)], mode="process")
    fleet.start()
    gw = None
    try:
        gw = GatewayProcess(fleet.handles, "default", tmp, extra={"pd": {"enabled": True, "threshold": 512}})
        return asyncio.run(run_workload(wl, [gw.url], concurrency=concurrency))
    finally:
        if gw is not None:
            gw.stop()
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--docs", type=int, default=36, help="documents in the workload (two questions each)")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--time-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    # long, mostly unique prompts with long answers: where decode batches suffer from prefill
    wl = WORKLOADS["long-doc-qa"](num_docs=12 if args.quick else args.docs, questions_per_doc=2, doc_len=1500, output_len=64, seed=11)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, roles in (("aggregated (4 × both)", ["both"] * 4), ("disaggregated (2 prefill + 2 decode)", ["prefill", "prefill", "decode", "decode"])):
            result = run(roles, wl, Path(tmp), args.concurrency, args.time_scale)
            ok = [x for x in result.measured() if x.error is None]
            gaps = sorted(g * 1000 for x in ok for g in x.itl)
            two_hop = sum(1 for x in ok if "," in x.replica)
            rows.append((summarize(wl.name, name, result), _pct(gaps, 90), _pct(gaps, 99), two_hop, len(ok)))
    print(f"workload: {wl.requests} requests, ~1500-word documents (2 questions each), 64 output tokens, concurrency {args.concurrency}, time scale {args.time_scale}")
    print("| setup | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms | output tok/s | two-hop | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, i90, i99, two, n in rows:
        print(f"| {s.policy} | {s.ttft_p50_ms:.0f} | {s.ttft_p90_ms:.0f} | {s.itl_p50_ms:.1f} | {i90:.1f} | {i99:.1f} | {s.throughput_tok_s:.0f} | {two}/{n} | {s.errors} |")
    return 0


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


if __name__ == "__main__":
    sys.exit(main())
