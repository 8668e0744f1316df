"""What an operator relies on: unbuffered streaming, socket options, the model list, auth,
metrics, logs, debug headers, and the demo command — end to end on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import (
    MODEL,
    GatewayThread,
    fleet_config,
    get_metrics,
    metric_value,
    replica_metric,
    wait_for,
)
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
OTHER = "kvgate/other-1b"


@pytest.fixture(scope="module")
def fleet():
    # r0, r2 serve MODEL; r1 serves OTHER. 7 ms * 0.5 per decode step.
    f = SimFleet([SimConfig(model=m, seed=i, time_scale=0.5) for i, m in enumerate([MODEL, OTHER, MODEL])])
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def gw(fleet):
    with GatewayThread(fleet_config(fleet.handles, auth={"api_keys": ["client-key"], "admin_key": "admin-key"})) as g:
        yield g


def _client(g, key: str = "client-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=30)


def test_sse_is_relayed_as_the_replica_produces_it(gw, fleet):
    """Chunks reach the client while the replica is still generating: no buffering anywhere."""
    c = _client(gw)
    t0 = time.perf_counter()
    arrivals: list[float] = []
    running_at_first = None
    with c.completions.with_streaming_response.create(model=OTHER, prompt="stream me", max_tokens=80, stream=True) as r:
        for ch in r.parse():
            if ch.choices and ch.choices[0].text:
                arrivals.append(time.perf_counter() - t0)
                if running_at_first is None:
                    running_at_first = replica_metric(fleet.handles[1].url, "vllm:num_requests_running")
    total = time.perf_counter() - t0
    assert running_at_first == 1, "the first chunk arrived while the replica was still generating"
    assert len(arrivals) >= 60
    # 80 steps of ~3.5 ms: arrivals spread over the run instead of landing together at the end
    assert arrivals[0] < 0.5 * total
    assert arrivals[-1] - arrivals[0] > 0.4 * total


def test_tcp_nodelay_on_server_and_upstream_sockets(gw):
    c = _client(gw)
    with c.completions.with_streaming_response.create(model=MODEL, prompt="nodelay", max_tokens=40, stream=True) as r:
        it = r.iter_bytes()
        next(it)

        async def server_sockets():
            return [conn.transport.get_extra_info("socket") for conn in gw.server.server_state.connections]

        socks = gw.call(server_sockets())
        assert socks, "no live client connection on the gateway"
        for s in socks:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        for _ in it:
            pass

    async def upstream_sockets():
        conns = gw.gateway.forwarder.session.connector._conns  # idle pooled connections
        return [proto.transport.get_extra_info("socket") for items in conns.values() for proto, _ in items if proto.transport is not None]

    socks = gw.call(upstream_sockets())
    assert socks, "no pooled upstream connection"
    for s in socks:
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_models_are_the_union_and_routing_is_per_model(gw):
    c = _client(gw)
    assert {m.id for m in c.models.list().data} == {MODEL, OTHER}
    for i in range(6):
        assert c.completions.with_raw_response.create(model=OTHER, prompt=f"o{i}", max_tokens=1).headers["x-kvgate-replica"] == "r1"
        assert c.completions.with_raw_response.create(model=MODEL, prompt=f"m{i}", max_tokens=1).headers["x-kvgate-replica"] in ("r0", "r2")


def test_request_id_reaches_the_replica(gw):
    out = _client(gw).completions.with_raw_response.create(model=MODEL, prompt="rid", max_tokens=1, extra_headers={"X-Request-Id": "trace-42"})
    assert out.headers["x-request-id"] == "trace-42"
    assert out.parse().id.endswith("trace-42")  # the replica built its id from the header it got
    fresh = _client(gw).completions.with_raw_response.create(model=MODEL, prompt="rid", max_tokens=1)
    rid = fresh.headers["x-request-id"]
    assert rid.startswith("kvg-") and fresh.parse().id.endswith(rid)


def test_auth_client_and_admin_keys_are_separate(gw):
    url = gw.url
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer admin-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/admin/state", headers={"Authorization": "Bearer client-key"}).status_code == 401
    assert httpx.get(f"{url}/admin/state", headers={"Authorization": "Bearer admin-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(gw, "wrong").embeddings.create(model=MODEL, input="x")
    # probes and scrapes stay open
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200


def test_413_for_a_chunked_body_without_content_length(fleet):
    with GatewayThread(fleet_config(fleet.handles, limits={"max_body_bytes": 1000})) as g:

        def chunks():
            yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        r = httpx.post(f"{g.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"] == {"message": "request body larger than 1000 bytes", "type": "invalid_request_error", "param": None, "code": "body_too_large"}


def test_debug_headers_are_off_by_default(fleet):
    cfg = fleet_config(fleet.handles, debug_headers=False)
    with GatewayThread(cfg) as g:
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        assert "x-kvgate-replica" not in r.headers and "x-kvgate-prefix-blocks" not in r.headers


def test_every_named_metric_is_exported(gw):
    c = _client(gw)
    system = "Metrics system prompt: " + " ".join(f"rule {i};" for i in range(60))
    for i in range(3):
        c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}], max_tokens=2)
        time.sleep(0.1)
    list(c.completions.create(model=MODEL, prompt="s", max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")

    def hit() -> bool:  # the replicas' KV events reach the index, then a repeat is a hit
        c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": "again"}], max_tokens=1)
        return metric_value(get_metrics(gw.url), "kvgate_prefix_hit_blocks_total") > 0

    wait_for(hit, interval=0.1, message="a prefix hit")
    text = get_metrics(gw.url)
    for name, labels in [
        ("kvgate_requests_total", {"route": "cold"}),
        ("kvgate_errors_total", {"code": "model_not_found"}),
        ("kvgate_ttft_seconds_count", {"decision": "cold"}),
        ("kvgate_e2e_seconds_count", {"decision": "prefix_hit"}),
        ("kvgate_scheduler_seconds_count", {"stage": "tokenize"}),
        ("kvgate_scheduler_seconds_count", {"stage": "index"}),
        ("kvgate_scheduler_seconds_count", {"stage": "schedule"}),
        ("kvgate_prompt_blocks_total", {}),
        ("kvgate_prefix_hit_blocks_total", {}),
        ("kvgate_prefix_hit_ratio", {}),
        ("kvgate_index_blocks", {}),
        ("kvgate_kv_events_applied_total", {}),  # summed over replicas: which one took the traffic is chance
        ("kvgate_pd_requests_total", {"path": "one_hop"}),
    ]:
        assert metric_value(text, name, labels) > 0, (name, labels)
    # present even at zero
    for name in (
        "kvgate_kv_batches_lost_total",
        "kvgate_index_rebuilds_total",
        "kvgate_index_losses_total",
        "kvgate_kv_index_apply_errors_total",
        "kvgate_retries_total",
        "kvgate_midstream_failures_total",
        "kvgate_admission_rejected_total",
        "kvgate_replica_healthy",
        "kvgate_inflight_requests",
        "kvgate_replica_inflight_requests",
    ):
        assert re.search(rf"^{name}\b", text, re.M) or f"# TYPE {name.removesuffix('_total')}" in text, name
    # per replica and per routing decision
    assert re.search(r'kvgate_ttft_seconds_bucket\{decision="\w+",le="[^"]+",replica="r\d"\}', text)
    assert 0 < metric_value(text, "kvgate_prefix_hit_ratio") <= 1


# -- processes: `kvgate serve` logs, `kvgate demo` --------------------------------------------------------


def _serve(tmp_path: Path, fleet, log_level: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "replicas": [{"id": f"r{i}", "url": h.url, "models": [h.config.model], "kv_events": h.events_endpoint} for i, h in enumerate(fleet.handles)],
        "models": {MODEL: {"tokenizer": "demo"}},
        "log_level": log_level,
    }
    path = tmp_path / f"gw-{log_level}.yaml"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    wait_for(up, timeout=20, message="kvgate serve up")
    assert proc.poll() is None
    return proc, url


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return err


@pytest.mark.parametrize("level", ["debug", "warning"])
def test_one_structured_log_line_per_request_at_debug_quiet_by_default(tmp_path, fleet, level):
    proc, url = _serve(tmp_path, fleet, level)
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for i in range(3):
            c.completions.create(model=MODEL, prompt=f"log line {i} " + "words " * 40, max_tokens=2, extra_headers={"X-Request-Id": f"log-{i}"})
        list(c.completions.create(model=MODEL, prompt="streamed", max_tokens=2, stream=True, extra_headers={"X-Request-Id": "log-s"}))
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="x", max_tokens=0, extra_headers={"X-Request-Id": "log-bad"})
    finally:
        err = _stop(proc)
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    per_request = [x for x in lines if x.get("logger") == "kvgate.request"]
    if level == "warning":
        assert per_request == [] and not [x for x in lines if x["level"] in ("debug", "info")], err[-2000:]
        return
    by_id = {x["request_id"]: x for x in per_request}
    assert len(per_request) == 5 and set(by_id) == {"log-0", "log-1", "log-2", "log-s", "log-bad"}, per_request
    for rid in ("log-0", "log-1", "log-2", "log-s"):
        rec = by_id[rid]
        assert rec["replica"] in ("r0", "r1", "r2") and rec["status"] == 200 and rec["ok"] is True
        assert isinstance(rec["prefix_blocks"], int) and rec["prompt_tokens"] > 0
        assert set(rec["scores"]["any"]) >= {"r0", "r2"}  # every candidate's combined score
        assert rec["e2e_ms"] >= rec["ttft_ms"] > 0
    assert by_id["log-s"]["stream"] is True
    assert by_id["log-bad"]["status"] == 400 and by_id["log-bad"]["ok"] is False


def _demo(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("pd", [False, True])
def test_demo_once_prints_the_table_and_the_url(pd):
    args = ["--once", "--port", str(free_port()), "--sessions", "4", "--turns", "2", "--time-scale", "0.05"] + (["--pd"] if pd else [])
    out = _demo(args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^OpenAI base URL: http://127\.0\.0\.1:\d+/v1$", out.stdout, re.M), out.stdout
    assert "hit ratio" in out.stdout and "TTFT p50 ms" in out.stdout and "gateway routing decisions:" in out.stdout
    assert "NIXL" not in out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if re.match(r"^(replica|prefill|decode)-\d$", cells[0]):
            rows[cells[0]] = (int(cells[1]), int(cells[2]))  # requests answered, prefill hops
    assert sum(r for r, _ in rows.values()) == 8, out.stdout  # 4 sessions x 2 turns, all answered
    if pd:
        # answers come from decode replicas; prefill replicas only run hop 1
        assert all(r == 0 for name, (r, _) in rows.items() if name.startswith("prefill")), out.stdout
        assert sum(h for _, h in rows.values()) >= 1, out.stdout
    else:
        assert all(name.startswith("replica") and h == 0 for name, (_, h) in rows.items()), out.stdout


def test_demo_stays_up_for_an_openai_client_until_ctrl_c():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port), "--sessions", "2", "--turns", "1", "--time-scale", "0.05"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.match(r"^OpenAI base URL: (http://127\.0\.0\.1:\d+/v1)$", line.rstrip("\n"))
            if m:
                url = m.group(1)
        assert url == f"http://127.0.0.1:{port}/v1"
        c = openai.OpenAI(base_url=url, api_key="anything", max_retries=0, timeout=30)
        assert c.chat.completions.create(model="kvgate/demo-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices[0].message.content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
