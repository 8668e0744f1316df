"""bench_peers: one tiny real round (closed loop: kvgate and direct; instant replicas: one peer
router where one is installed, else kvgate), and the tables' medians, ranges, ratios and merge."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.bench_peers import (
    Record,
    RouterSpec,
    build_result,
    markdown,
    plan,
    run_all,
    summarize_records,
    tree_cpu_seconds,
    write_results,
)
from benchmarks.compare import Setup
from benchmarks.workloads import shared_prefix

#: one peer at most (the first installed), to keep the test short: each run starts a fresh fleet
PEERS = [s for s in (RouterSpec("sglang", "cache_aware"), RouterSpec("vllm", "cache_aware")) if s.available()][:1]


def test_tiny_round_kvgate_direct_and_installed_peers(tmp_path):
    setup = Setup(replicas=2, num_blocks=256, time_scale=0.05, concurrency=4)
    wl = shared_prefix(num_groups=2, num_prompts_per_group=5, system_prompt_len=120, question_len=10, output_len=8)
    closed = [RouterSpec("kvgate", "default"), RouterSpec("direct")]
    instant = [*PEERS, RouterSpec("kvgate", "round-robin", workers=2)]  # kvgate serve --workers 2
    records, commands = run_all(closed, [wl], setup, rounds=1, instant=instant, instant_setup=Setup(2, 256, 0.0, 4), instant_requests=30, instant_workload=wl)
    assert [(r.section, r.key) for r in records] == [("closed", s.key) for s in closed] + [("instant", s.key) for s in instant]
    for r in records:
        assert r.failed is None, (r.router, r.failed)
        assert r.requests > 0 and r.errors == 0, r
        assert r.req_s > 0 and r.wall_s > 0, r
        assert 0.0 <= r.hit_ratio <= 1.0, r
        if r.key == "direct":
            assert r.router_cpu_s == 0.0
        elif r.key.startswith("kvgate"):  # a router that relayed requests used CPU doing it
            assert r.router_cpu_s > 0 and r.router_cores > 0 and r.router_cpu_ms_per_req > 0, r
        else:  # a Rust router's ~0.3 ms per request over 30 requests can stay below one clock tick (10 ms)
            assert r.router_cpu_s >= 0 and r.router_cpu_ms_per_req >= 0, r
        assert r.replica_cpu_ms_per_req > 0, r
    kv_closed = records[0]
    assert kv_closed.ttft_p50_ms > 0 and kv_closed.ttft_p90_ms >= kv_closed.ttft_p50_ms and kv_closed.tok_s > 0
    assert kv_closed.hit_ratio > 0  # five questions per system prompt: the replicas hit
    assert set(commands) == {s.key for s in [*closed, *instant] if s.kind != "direct"}
    for spec in PEERS:
        assert "--policy" in commands[spec.key] and spec.policy in commands[spec.key]
    assert " --workers 2 " in " ".join(commands["kvgate:round-robin@2"])

    result = build_result(
        records, commands, {"command": "test", "description": "tiny", "machine": "-", "peers": "-", "render": "-", "concurrency": 4, "time_scale": 0.05}
    )
    rows = {(r["section"], r["key"]): r for r in result["summary"]}
    assert rows[("closed", "kvgate:default")]["req_s"]["median"] == records[0].req_s
    assert rows[("instant", instant[0].key)]["vs_direct"] is None  # no direct run in the instant section
    files = write_results(tmp_path, "peers", result)
    md = files[0].read_text()
    assert "kvgate default" in md and "instant replicas" in md and "## Command lines" in md
    assert json.loads(files[1].read_text())["summary"] == json.loads(json.dumps(result["summary"]))


def _rec(section: str, key: str, rnd: int, req_s: float, cpu: float = 1.0) -> Record:
    spec = RouterSpec.parse(key)
    return Record(section, "shared-prefix" if section == "closed" else "instant", spec.name, key, rnd, requests=10, req_s=req_s, router_cpu_ms_per_req=cpu)


def test_medians_ranges_ratios_and_merge(tmp_path):
    recs = [_rec("instant", "direct", r, d) for r, d in enumerate([100.0, 200.0, 150.0])]
    recs += [_rec("instant", "kvgate:default", r, x, c) for r, (x, c) in enumerate([(50.0, 3.0), (50.0, 1.0), (75.0, 2.0)])]
    recs.append(Record("instant", "instant", "vllm-router kv_aware", "vllm:kv_aware", 0, failed="RuntimeError: did not start"))
    calls = {
        "vllm_router_kv_routing_inputs_total{result=render,transport=http}": 36.0,
        "vllm_router_kv_routing_inputs_total{result=tokenize,transport=http}": 4.0,
    }
    recs.append(Record("instant", "instant", "vllm-router cache_aware", "vllm:cache_aware", 1, requests=8, sent=10, req_s=5.0, peer_counters=calls))
    rows = {r["key"]: r for r in summarize_records(recs)}
    assert rows["vllm:cache_aware"]["token_id_calls_per_req"] == {"render": 3.6, "tokenize": 0.4}
    kv = rows["kvgate:default"]
    assert kv["req_s"] == {"median": 50.0, "min": 50.0, "max": 75.0}
    assert kv["router_cpu_ms_per_req"]["median"] == 2.0
    assert kv["vs_direct"] == {"median": 0.5, "min": 0.25, "max": 0.5}  # each round against its own direct
    assert rows["vllm:kv_aware"]["rounds"] == 0 and rows["vllm:kv_aware"]["failed"]
    meta = {"command": "x", "description": "", "machine": "", "peers": "", "render": "", "concurrency": 32, "time_scale": 1.0}
    md = markdown(build_result(recs, {}, meta))
    assert "| kvgate default | 50 (50–75) | 0.50 (0.25–0.50) |" in md
    assert "failed: RuntimeError" in md
    assert (
        "vllm-router cache_aware (instant): calls to workers for token ids per request (`vllm_router_kv_routing_inputs_total`): 3.6 render, 0.4 tokenize" in md
    )
    # an instant-only run keeps the closed-loop section of an earlier result
    write_results(tmp_path, "peers", build_result([_rec("closed", "kvgate:default", 0, 20.0)], {"kvgate:default": ["a"]}, meta))
    write_results(tmp_path, "peers", build_result(recs, {}, meta))
    merged = json.loads((tmp_path / "peers.json").read_text())
    assert {r["section"] for r in merged["summary"]} == {"closed", "instant"}
    assert merged["commands"] == {"kvgate:default": ["a"]}
    assert "shared-prefix" in (tmp_path / "peers.md").read_text()


def test_plan_interleaves_rounds_and_rotates_order():
    a, b, c = (RouterSpec.parse(k) for k in ("kvgate:default", "sglang:cache_aware", "direct"))
    wl = shared_prefix(num_groups=1, num_prompts_per_group=1)
    steps = [(rnd, section, spec.key) for rnd, section, _, spec in plan([a, b], [wl], 2, [a, c])]
    assert steps == [
        (0, "closed", a.key),
        (0, "closed", b.key),
        (0, "instant", a.key),
        (0, "instant", c.key),
        (1, "closed", b.key),
        (1, "closed", a.key),
        (1, "instant", c.key),
        (1, "instant", a.key),
    ]
    with pytest.raises(ValueError):
        RouterSpec.parse("nginx")
    assert RouterSpec.parse("kvgate:default@4") == RouterSpec("kvgate", "default", 4)
    assert RouterSpec("kvgate", "default", 4).key == "kvgate:default@4" and RouterSpec("kvgate", "default").key == "kvgate:default"
    for bad in ("sglang:cache_aware@2", "kvgate:default@0", "kvgate:default@x"):
        with pytest.raises(ValueError):
            RouterSpec.parse(bad)


def test_tree_cpu_counts_this_process():
    import os

    t0 = tree_cpu_seconds(os.getpid())
    x = 0
    for i in range(2_000_000):
        x += i
    assert tree_cpu_seconds(os.getpid()) > t0
    assert math.isclose(tree_cpu_seconds(2**22 + 12345), 0.0)  # no such process
