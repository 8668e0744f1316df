"""bench_cpu: a tiny real run (every scenario, one round) and the stage classification."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_cpu import SCENARIOS, STAGES, Classifier, Profile, parse_frame

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_reports_every_stage_with_sane_numbers(tmp_path):
    out = tmp_path / "cpu.json"
    argv = ["--requests", "30", "--rounds", "1", "--idle-s", "0.5", "--json", str(out)]
    # a child process: if it is killed on timeout, its own children die with it (pdeathsig)
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_cpu", *argv], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    header = next(line for line in p.stdout.splitlines() if line.startswith("| scenario | prompt tokens"))
    for stage in STAGES:
        assert f" {stage} |" in header, stage
    assert "load average at start" in p.stdout and "load average at end" in p.stdout
    rep = json.loads(out.read_text())
    assert [s["name"] for s in rep["scenarios"]] == [sc.name for sc in SCENARIOS]
    for s in rep["scenarios"]:
        name = s["name"]
        assert s["errors"] == 0, name
        assert s["cpu_ms_per_req"]["median"] > 0 and s["requests_per_s"]["median"] > 0, name
        assert set(s["share_pct"]) == set(STAGES), name
        assert math.isclose(sum(s["share_pct"].values()), 100.0, abs_tol=0.5), (name, s["share_pct"])
        assert all(v >= -0.01 for v in s["share_pct"].values()), (name, s["share_pct"])
        assert s["top_self"], name
        # the prompt sizes the scenarios promise, as the gateway counts them
        assert (30 <= s["prompt_tokens"] <= 80) if name.startswith("short") else (2000 <= s["prompt_tokens"] <= 2800), (name, s["prompt_tokens"])
        if name.endswith("stream"):
            assert s["sse_events_per_req"] > 1, name
    # a long prompt costs tokenization, wherever it runs: a long completion's (no chat template,
    # no piece cache: the whole 2.4k tokens each time) is most of its CPU. (A long chat's, ~5-15%
    # of ~15 profile samples in a run this small, came out 0 in some runs.)
    long_completions = next(s for s in rep["scenarios"] if s["name"] == "long completions")
    assert long_completions["share_pct"]["tokenize"] > 20, long_completions["share_pct"]


def _stack(*frames: str) -> tuple:
    return tuple(parse_frame(f) for f in frames)


def test_the_innermost_frame_with_a_stage_decides():
    clf = Classifier()
    app = ("run (asyncio/runners.py)", "RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py)", "GatewayApp.__call__ (gateway/app.py)")
    relay = (*app, "RelayResponse.__call__ (gateway/forward.py)")
    assert clf.stack_stage(_stack(*relay, "MetricWrapperBase.labels (prometheus_client/metrics.py)")) == "metrics"
    assert (
        clf.stack_stage(
            _stack(
                *relay, "GatewayApp.__call__.<locals>.tracking_send (gateway/app.py)", "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)"
            )
        )
        == "relay"
    )
    # a torn stack that shows only uvicorn's send still counts as the response write
    assert clf.stack_stage(_stack("RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py)")) == "relay"
    route = (*app, "proxy_request (gateway/app.py)", "FrontDoor.serve (gateway/intake.py)", "Router.route (gateway/routing.py)")
    assert clf.stack_stage(_stack(*route, "Router.plan (gateway/routing.py)")) == "other"
    assert clf.stack_stage(_stack(*route, "Router.plan (gateway/routing.py)", "chain_keys (kvindex/hashing.py)")) == "block_keys"
    assert clf.stack_stage(_stack(*route, "Router.decide (gateway/routing.py)", "Scheduler.schedule (scorers/scheduler.py)")) == "schedule"
    assert clf.stack_stage(_stack(*route, "wait_for (asyncio/tasks.py)", "MemoryIndex.lookup_now (kvindex/memory_index.py)")) == "index"
    ingest = ("run (asyncio/runners.py)", "EventSubscriber._run_source (kvindex/subscriber.py)")
    assert clf.stack_stage(_stack(*ingest, "MemoryIndex.apply (kvindex/memory_index.py)", "MemoryIndex._store (kvindex/memory_index.py)")) == "ingest"
    assert (
        clf.stack_stage(_stack("_worker (concurrent/futures/thread.py)", "render_chat (kvindex/tokenize.py)", "Template.render (jinja2/environment.py)"))
        == "template"
    )
    assert clf.stack_stage(_stack("_worker (concurrent/futures/thread.py)", "CachingTokenizer.chat_tokens (kvindex/tokenize.py)")) == "tokenize"
    assert clf.stack_stage(_stack("Runner.run (asyncio/runners.py)")) == "loop"
    assert (
        clf.stack_stage(_stack("Fleet._loop (gateway/fleet.py)", "Fleet.scrape (gateway/fleet.py)", "parse_labels (prometheus_client/parser.py)"))
        == "background"
    )


def test_raw_stacks_keep_their_thread():
    prof = Profile()
    prof.add_raw(
        "thread (42): MainThread;run (asyncio/runners.py:1);GatewayApp.__call__ (gateway/app.py:3) 7\nthread (43): kvgate-tokenize_0;_worker (x.py:1) 2\n"
    )
    assert prof.per_thread() == {42: 7, 43: 2}
    assert prof.names == {42: "MainThread", 43: "kvgate-tokenize_0"}
    assert prof.samples == 9
