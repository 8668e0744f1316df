"""bench_faults and bench_soak at a tiny size (real processes), plus the math they report with."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_faults import Record, hit_share, hits_back_after, junk_messages, parse_metrics
from benchmarks.bench_soak import Sample, figures, slope_per_min
from kvindex.events import EventDecodeError, EventDecoder

ROOT = Path(__file__).resolve().parents[2]


def _bench(module: str, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    # a child process: if it is killed on timeout its own children die with it (pdeathsig)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_soak_tiny_run_samples_the_gateway_and_serves(tmp_path):
    out = tmp_path / "soak.json"
    p = _bench("benchmarks.bench_soak", "--seconds", "6", "--sample-every", "0.5", "--sessions", "4", "--json", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    q = res["requests"]
    assert q["served_ok"] > 0 and q["failed"] == 0, q
    assert q["bad_requests_unexpected"] == {}, q
    assert len(res["samples"]) >= 5
    assert all(s["rss_mb"] > 10 and s["fds"] > 0 for s in res["samples"])
    for fig in (res["rss_mb"], res["fds"]):
        assert fig["warmup_end"] is not None and fig["end"] is not None and fig["max"] >= fig["end"]
        assert fig["slope_per_min"] is not None
    assert res["index_blocks"]["max"] > 0  # the gateway's memory index, fed by the replicas' KV events
    # nothing is left counted in flight once the load is over
    assert res["after_load"]["gateway_inflight"] == 0 and res["after_load"]["replicas_running_or_waiting"] == 0
    assert "RSS MB" in p.stdout and "open fds" in p.stdout


def test_faults_replica_kill_counts_the_cut_streams_and_nothing_hangs(tmp_path):
    out = tmp_path / "faults.json"
    p = _bench("benchmarks.bench_faults", "--quick", "--faults", "replica-kill", "--json", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["fault"]: r for r in res["rows"]}  # a "(repair after ...)" row may follow on a busy machine
    warm, kill = rows["(warm-up, no fault)"], rows["replica-kill"]
    assert warm["sent"] > 0 and warm["ok"] == warm["sent"]
    assert all(r["lost"] == 0 and r["hung"] == 0 for r in res["rows"]), res["rows"]
    assert kill["fault"] == "replica-kill" and kill["victim"] in ("r0", "r1", "r2")
    assert kill["sent"] > 0 and kill["hung"] == 0 and kill["lost"] == 0, kill
    # the streams the killed replica was answering are counted apart, each ended by an SSE error event
    assert kill["cut_on_killed"] >= 1 and kill["cut_with_sse_error"] == kill["cut_on_killed"], kill
    assert kill["ok"] + kill["cut_on_killed"] == kill["sent"]
    assert res["after_load"]["gateway_inflight"] == 0
    assert "replica-kill" in p.stdout and "SIGKILLed" in p.stdout


def _rec(t0: float, blocks: int | None, cached: int | None = None) -> Record:
    return Record(t0=t0, kind="completions", stream=True, outcome="ok", prefix_blocks=blocks, cached_tokens=cached)


def test_hits_back_is_the_end_of_the_last_bucket_below_the_baseline():
    # baseline: all hits; from t=10, 1 s of misses (2 buckets), then hits again
    records = [_rec(5 + i * 0.1, 4, 32) for i in range(50)]
    records += [_rec(10 + i * 0.1, 0 if i < 10 else 4, 32) for i in range(50)]
    assert hit_share(records[:50], "index") == 1.0
    assert hits_back_after(records, 10.0, 15.0, 1.0, "index") == 1.0
    assert hits_back_after(records, 10.0, 15.0, 1.0, "cache") == 0.0  # the cache signal never dropped
    assert hits_back_after(records, 10.0, 15.0, None, "index") is None
    assert hits_back_after(records, 10.0, 15.0, 0.1, "index") is None  # no meaningful baseline


def test_slope_and_figures():
    assert slope_per_min([0, 60, 120], [1, 2, 3]) == 1.0
    assert slope_per_min([0, 1], [1, 2]) is None
    samples = [Sample(t=float(t), rss_mb=100 + (t if t >= 10 else 0) / 60, fds=40, threads=7) for t in range(0, 31, 2)]
    rss = figures(samples, 10.0, "rss_mb")
    assert rss["slope_per_min"] == 1.0 and rss["warmup_end"] == 100 + 10 / 60 and rss["max"] == rss["end"]
    assert figures(samples, 10.0, "fds")["slope_per_min"] == 0.0


def test_junk_is_junk_to_the_event_decoder():
    """Every payload the fake publisher sends is malformed somewhere (or not a batch at all)."""
    dec = EventDecoder()
    msgs = junk_messages(random.Random(3), 0)
    clean = 0
    for _ in range(18):
        frames = next(msgs)
        if len(frames) != 3 or len(frames[1]) != 8:
            continue
        bad = dec.bad_events + dec.unknown_events
        try:
            dec.decode(frames[2], skip_bad=True)
        except EventDecodeError:
            continue
        clean += dec.bad_events + dec.unknown_events == bad
    assert clean <= 5  # an empty batch, the absurd seqs (valid payloads) and block_size 0


def test_parse_metrics():
    m = parse_metrics('# HELP x y\nkvgate_replica_healthy{replica="r0"} 1.0\nkvgate_inflight_requests 0.0\n')
    assert m == {'kvgate_replica_healthy{replica="r0"}': 1.0, "kvgate_inflight_requests": 0.0}
