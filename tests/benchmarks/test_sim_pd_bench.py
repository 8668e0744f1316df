"""bench_pd end to end at a small size: both workloads on every setup (the gateway's own P/D and
Envoy + picker + sidecars), tables and result files."""

from __future__ import annotations

import json

from benchmarks import bench_pd


def test_bench_pd_small_run_writes_both_workloads_for_both_setups(tmp_path, capsys):
    assert bench_pd.main(["--docs", "2", "--long-requests", "3", "--long-rate", "20", "--repeats", "1", "--time-scale", "0.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "pd.md").read_text()
    assert md.strip() == out.strip()
    assert "### doc-qa" in md and "### long-unique" in md and "Load average" in md
    data = json.loads((tmp_path / "pd.json").read_text())
    assert data["meta"]["repeats"] == 1 and set(data["meta"]["workloads"]) == {"doc-qa", "long-unique"}
    got = {(r["workload"], r["setup"]): r for r in data["summaries"]}
    assert len(got) == 6 and len(data["runs"]) == 6
    for (workload, setup), r in got.items():
        assert r["errors"] == 0, (workload, setup)
        assert r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0 and r["throughput_tok_s"] > 0
        for f in ("ttft_p90_ms", "ttft_p99_ms", "itl_p90_ms", "itl_p99_ms", "tpot_p90_ms", "stall_share", "two_hop_share"):
            assert r[f] == r[f], (workload, setup, f)  # not nan
        if setup.startswith("aggregated"):
            assert r["two_hop_share"] == 0.0
    # unique ~3.5k-token prompts are far above the 512-token threshold: every one takes two hops
    assert got[("long-unique", "disaggregated (2 prefill + 2 decode)")]["two_hop_share"] == 1.0
    assert got[("long-unique", "disaggregated via Envoy + picker + sidecars")]["two_hop_share"] == 1.0
