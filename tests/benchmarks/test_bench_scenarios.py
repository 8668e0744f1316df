"""bench_scenarios: each scenario run tiny for real (fresh fleet, real gateways; several gateways
on redis-server + kvgate indexer; a replica SIGKILLed and restarted), the report's structure,
and the replicas' counters added up across a restart."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from benchmarks.bench_scenarios import POLICIES, CounterLedger, RunRecord, aggregate, main, markdown, run_once, scenarios
from benchmarks.compare import main as compare_main
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL


def _needs_redis() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make test installs it with apt)")
        pytest.skip("redis-server not installed")


def test_precise_tiny_on_several_gateways_and_small_caches_and_the_report(tmp_path, capsys):
    """``precise`` through two scenarios (2 gateways on redis-server + kvgate indexer; small
    caches): the files, the per-scenario tables, one row per run with figures in range."""
    _needs_redis()
    out = tmp_path / "results"
    assert main(["--tiny", "--scenarios", "multi-gateway,eviction", "--policies", "precise", "--gateways", "2", "--out", str(out)]) == 0
    data = json.loads((out / "scenarios_tiny.json").read_text())
    wanted = ["multi-gateway", "eviction"]
    assert [(r["scenario"], r["policy"]) for r in data["runs"]] == [(s, "precise") for s in wanted]
    assert [(r["scenario"], r["policy"], r["rounds"]) for r in data["summary"]] == [(s, "precise", 1) for s in wanted]
    for run in data["runs"]:
        assert run["requests"] == 12 and run["errors"] == 0 and run["events"] == [], run
        assert 0 < run["hit_ratio"] <= 1 and run["ttft_p50_ms"] > 0 and run["ttft_p90_ms"] >= run["ttft_p50_ms"], run
        assert run["throughput_tok_s"] > 0 and run["load_spread"] >= 1 and len(run["per_replica_requests"]) == 2, run
        assert sum(run["per_replica_requests"]) == run["requests"], run
    for row in data["summary"]:
        assert row["requests"] == 12 and row["errors"] == 0
        for m in ("ttft_p50_ms", "ttft_p90_ms", "throughput_tok_s", "hit_ratio", "load_spread"):
            assert row[m]["min"] <= row[m]["median"] <= row[m]["max"], (row, m)
    meta = data["meta"]
    assert meta["rounds"] == 1 and meta["policies"] == ["precise"] and list(meta["scenarios"]) == wanted
    assert meta["scenarios"]["multi-gateway"]["gateways"] == 2 and meta["scenarios"]["eviction"]["num_blocks"] == 24
    text = (out / "scenarios_tiny.md").read_text()
    assert "## multi-gateway: 2 gateways behind the client's round robin" in text and "## eviction: one gateway; 24 KV blocks" in text
    assert text.count("| precise | ") == 2 and "## restart" not in text
    assert "scenarios_tiny.md" in capsys.readouterr().out


def test_approx_tree_through_a_restart():
    """The sglang-style plugin as a gateway profile, a replica SIGKILLed and restarted under it:
    requests keep being served (at most the ones cut on the killed replica fail), the replicas'
    counters are added up across the restart, and the report lists the restart."""
    import tempfile
    from pathlib import Path

    sc = scenarios(False, 2, tiny=True)["restart"]
    assert sc.restarts == (0.4,)
    with tempfile.TemporaryDirectory() as tmp:
        rec = run_once(sc, "approx-tree", 0, Path(tmp))
    assert isinstance(rec, RunRecord) and (rec.scenario, rec.policy) == ("restart", "approx-tree")
    assert rec.requests == 12 and rec.errors <= 3 and set(rec.error_kinds) <= {"APIError", "InternalServerError", "APIConnectionError"}
    served = rec.requests - rec.errors
    assert served - 2 <= sum(rec.per_replica_requests) <= served  # one finishing between the last read and the kill is lost
    assert 0 < rec.hit_ratio <= 1 and rec.ttft_p50_ms > 0
    assert rec.events[0].split(" ", 2)[2].startswith("r0 SIGKILLed after") and rec.events[1].endswith("r0 restarted (empty cache)"), rec.events
    meta = {"name": "t", "description": "d", "scenarios": {"restart": {"what": "w"}}, "events": rec.events}
    text = markdown(aggregate([rec]), meta)
    assert "## restart: w" in text and "| approx-tree | " in text and "r0 restarted (empty cache)" in text


def test_counters_add_up_across_a_restart():
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.0, num_blocks=64)], mode="process")
    fleet.start()
    try:
        import httpx

        url = fleet.handles[0].url
        body = {"model": MODEL, "prompt": "ka ri to " * 40, "max_tokens": 2}
        ledger = CounterLedger([url])
        httpx.post(f"{url}/v1/completions", json=body, timeout=10).raise_for_status()
        ledger.before_kill(0)
        fleet.kill(0)
        fleet.restart(0)
        for _ in range(2):
            httpx.post(f"{url}/v1/completions", json=body, timeout=10).raise_for_status()
        (row,) = ledger.finish()
    finally:
        fleet.stop()
    assert row["vllm:request_success_total"] == 3
    # first run: a miss; restarted empty: a miss, then a hit
    assert 0 < row["vllm:prefix_cache_hits_total"] < row["vllm:prefix_cache_queries_total"]


def test_argument_errors():
    assert main(["--scenarios", "bogus"]) == 2
    assert main(["--policies", "precise,sglang"]) == 2
    assert main(["--gateways", "0"]) == 2
    assert compare_main(["--scenarios", "bogus"]) == 2  # `kvgate bench --scenarios ...` hands over to bench_scenarios
    assert set(POLICIES) == {"precise", "approx-prefix", "approx-tree", "round-robin"}
