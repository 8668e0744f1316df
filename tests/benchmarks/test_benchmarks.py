"""The benchmark harness itself: deterministic workloads, correct math, a tiny real run."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

from benchmarks.report import markdown, percentile, summarize
from benchmarks.workloads import WORKLOADS, RunResult, Sample, run_workload
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config


def test_workloads_are_seeded_and_bounded():
    for name, make in WORKLOADS.items():
        a, b = make(), make()
        assert [s.system for s in a.sessions] == [s.system for s in b.sessions], name
        assert 0 < a.requests <= 400
    sp = WORKLOADS["shared-prefix"](num_groups=3, num_prompts_per_group=5)
    assert sp.requests == 15 and len({s.system for s in sp.sessions}) == 3
    mt = WORKLOADS["multi-turn"](num_sessions=2, turns=3)
    assert all(s.grow and len(s.questions) == 3 for s in mt.sessions)


def test_report_math():
    samples = [
        Sample(ttft=t, itl=[0.01, 0.02], e2e=t + 0.1, output_tokens=10, prompt_tokens=100, cached_tokens=c, replica=r)
        for t, c, r in [(0.1, 0, "r0"), (0.2, 50, "r0"), (0.3, 100, "r1"), (0.4, 50, "r0")]
    ]
    samples.append(Sample(0, [], 1, 0, 0, 0, "r1", error="APIError"))
    s = summarize("w", "p", RunResult(samples, wall_s=2.0))
    assert s.requests == 5 and s.errors == 1
    assert math.isclose(s.ttft_p50_ms, 250.0) and math.isclose(s.hit_ratio, 0.5)
    assert s.throughput_tok_s == 20.0 and s.load_spread == 3.0
    assert percentile([1, 2, 3, 4, 5], 90) == 4.6
    base = summarize("w", "round-robin", RunResult(samples[:2], wall_s=2.0))
    table = markdown([base, s])
    assert "| p |" in table and "× faster" in table


def test_warmup_is_left_out_of_the_figures_but_not_out_of_the_counts():
    # two cold requests first (slow, uncached), then warm ones; one warm-up request failed
    samples = [
        Sample(ttft=2.0, itl=[], e2e=2.5, output_tokens=10, prompt_tokens=100, cached_tokens=0, replica="r0", start=10.0),
        Sample(ttft=0, itl=[], e2e=0.1, output_tokens=0, prompt_tokens=0, cached_tokens=0, replica="r1", start=10.1, error="APIError"),
    ] + [Sample(ttft=0.1, itl=[0.01], e2e=0.5, output_tokens=10, prompt_tokens=100, cached_tokens=90, replica=f"r{i % 2}", start=11.0 + i) for i in range(4)]
    s = summarize("w", "p", RunResult(list(reversed(samples)), wall_s=99.0, warmup=2))
    assert s.requests == 6 and s.errors == 1 and s.warmup == 2
    assert math.isclose(s.ttft_p90_ms, 100.0) and math.isclose(s.hit_ratio, 0.9)
    assert s.ttft_p90_all_ms > 1000  # the cold request still shows in the all-requests column
    assert math.isclose(s.throughput_tok_s, 40 / 3.5)  # measured window: 11.0 .. 14.5 s
    assert s.load_spread == 1.0


def test_tiny_end_to_end_run_through_gateway_and_direct():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.05, num_blocks=256) for i in range(2)])
    fleet.start()
    try:
        wl = WORKLOADS["shared-prefix"](num_groups=2, num_prompts_per_group=4, system_prompt_len=120)
        with GatewayThread(fleet_config(fleet.handles)) as g:
            via = asyncio.run(run_workload(wl, [g.url], concurrency=4))
        direct = asyncio.run(run_workload(wl, [h.url for h in fleet.handles], concurrency=4))
        for run in (via, direct):
            assert len(run.samples) == 8 and all(s.error is None for s in run.samples)
            assert all(s.output_tokens == wl.sessions[0].max_tokens and s.ttft > 0 for s in run.samples)
        assert {s.replica for s in direct.samples} == {"direct-0", "direct-1"}
        assert summarize("w", "gw", via).hit_ratio > 0.3  # repeated system prompts hit through the gateway
    finally:
        fleet.stop()


def test_locust_user_reports_ttft_through_the_gateway(tmp_path):
    """A real headless Locust run: its custom TTFT/ITL events reach Locust's stats, no failures."""
    import csv
    import os

    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, num_blocks=256) for i in range(2)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            env = {**os.environ, "KVGATE_WORKLOAD": "multi-turn"}
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    "benchmarks/locustfile.py",
                    "--headless",
                    "-u",
                    "3",
                    "-r",
                    "3",
                    "-t",
                    "4s",
                    "--host",
                    g.url,
                    "--csv",
                    str(tmp_path / "run"),
                    "--only-summary",
                ],
                capture_output=True,
                text=True,
                timeout=90,
                env=env,
            )
        assert out.returncode == 0, out.stderr[-2000:]
        rows = {r["Name"]: r for r in csv.DictReader((tmp_path / "run_stats.csv").open())}
        assert int(rows["TTFT"]["Request Count"]) >= 3 and float(rows["TTFT"]["Median Response Time"]) > 0
        assert int(rows["ITL"]["Request Count"]) > int(rows["TTFT"]["Request Count"])  # several chunks per answer
        assert int(rows["Aggregated"]["Failure Count"]) == 0
    finally:
        fleet.stop()
