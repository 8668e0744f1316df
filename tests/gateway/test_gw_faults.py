"""Faults on the one-hop path, end to end (openai SDK → gateway → simulated replicas).

Each test provokes one failure for real — a replica process SIGKILLed while it holds the
request, a replica too slow for the configured timeouts, a client that hangs up — and checks
what the client sees and what the replica sees (its own /metrics), never just the gateway's
opinion of itself.
"""

from __future__ import annotations

import threading
import time

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


def _client(g, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=timeout)


def _block(url: str, max_tokens: int, stop: threading.Event) -> threading.Thread:
    """Occupy a replica's only batch slot with a direct stream until ``stop`` or the end."""

    def run() -> None:
        try:
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "blocker", "max_tokens": max_tokens, "stream": True}, timeout=30
            ) as r:
                for _ in r.iter_bytes():
                    if stop.is_set():
                        return
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_replica_dying_after_accepting_is_retried_before_the_first_byte():
    """The replica holds the request (queued, no byte sent) and dies: another one answers."""
    # one batch slot per replica, 7 ms * 4 per decode step: a 250-token blocker holds a slot ~7 s
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=4.0, max_num_seqs=1) for i in range(2)], mode="process")
    fleet.start()
    stop = threading.Event()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            c = _client(g)
            for mode in ("stream", "non-stream"):
                blockers = [_block(h.url, 250, stop) for h in fleet.handles]
                wait_for(lambda: all(replica_metric(h.url, "vllm:num_requests_running") == 1 for h in fleet.handles), message="both replicas busy")
                result: dict = {}

                def ask(mode=mode, result=result) -> None:
                    try:
                        if mode == "stream":
                            with c.completions.with_streaming_response.create(model=MODEL, prompt=f"survive {mode}", max_tokens=5, stream=True) as r:
                                result["replica"] = r.headers["x-kvgate-replica"]
                                result["text"] = "".join(ch.choices[0].text for ch in r.parse() if ch.choices)
                        else:
                            raw = c.completions.with_raw_response.create(model=MODEL, prompt=f"survive {mode}", max_tokens=5)
                            result["replica"] = raw.headers["x-kvgate-replica"]
                            result["text"] = raw.parse().choices[0].text
                    except Exception as exc:  # reported below
                        result["error"] = exc

                t = threading.Thread(target=ask)
                t.start()
                # our request waits in one replica's queue: that replica dies with it
                holder: list[int] = []

                def queued() -> bool:
                    holder[:] = [i for i, h in enumerate(fleet.handles) if replica_metric(h.url, "vllm:num_requests_waiting") >= 1]
                    return bool(holder)

                wait_for(queued, message="request queued on a replica")
                victim = holder[0]
                fleet.kill(victim)
                stop.set()  # free the survivor's slot (blocker streams end)
                t.join(30)
                assert "error" not in result, result.get("error")
                assert result["text"], result
                assert result["replica"] == f"r{1 - victim}"
                stop.clear()
                for b in blockers:
                    b.join(10)
                fleet.restart(victim)
                wait_for(lambda: g.gateway.fleet.get(f"r{victim}").healthy, message="victim healthy again")
            assert metric_value(get_metrics(g.url), "kvgate_retries_total") >= 2
    finally:
        stop.set()
        fleet.stop()


def test_client_disconnect_mid_stream_aborts_the_replica_request():
    # 7 ms per token: 3000 tokens would take 21 s; the abort must show within a second or two
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=1.0)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            url = fleet.handles[0].url
            with httpx.stream("POST", f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "go on", "max_tokens": 3000, "stream": True}, timeout=30) as r:
                n = 0
                for _ in r.iter_bytes():
                    n += 1
                    if n == 3:
                        break
            assert replica_metric(url, "vllm:num_requests_running") <= 1
            t0 = time.monotonic()
            wait_for(lambda: replica_metric(url, "vllm:num_requests_running") == 0, timeout=3, message="replica aborted the request")
            assert time.monotonic() - t0 < 3
            generated = replica_metric(url, "vllm:generation_tokens_total")
            assert generated < 1000, generated  # stopped early, did not run to 3000
            wait_for(
                lambda: g.gateway.admission.inflight == 0 and g.gateway.fleet.get("r0").inflight_requests == 0, timeout=3, message="gateway accounts closed"
            )
    finally:
        fleet.stop()


def test_client_disconnect_while_waiting_closes_the_upstream_request():
    """Not streaming: the client gives up before the answer; the gateway lets go at once."""
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=1.0)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "slow", "max_tokens": 1000}, timeout=0.5)
            # 1000 tokens take ~7 s on the replica; the gateway's accounts close right away
            wait_for(
                lambda: g.gateway.admission.inflight == 0 and g.gateway.fleet.get("r0").inflight_requests == 0,
                timeout=2,
                message="gateway released the request",
            )
            assert metric_value(get_metrics(g.url), "kvgate_errors_total", {"code": "client_disconnected"}) == 1
    finally:
        fleet.stop()


def test_first_byte_timeout_is_a_504_not_a_hang():
    # prefill of ~600 tokens at 12k tok/s * 100 = 5 s before the first token
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=100.0)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles, limits={"first_byte_timeout_s": 0.5})) as g:
            c = _client(g)
            prompt = " ".join(f"word{i}" for i in range(600))
            for stream in (True, False):
                t0 = time.monotonic()
                with pytest.raises(openai.APIStatusError) as e:
                    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=stream)
                    if stream:
                        list(r)
                assert e.value.status_code == 504
                assert e.value.body["code"] == "upstream_timeout"
                assert time.monotonic() - t0 < 3
            wait_for(lambda: g.gateway.admission.inflight == 0, message="slots back")
    finally:
        fleet.stop()


def test_stalled_stream_ends_with_an_error_event_after_the_read_timeout():
    # decode step 7 ms * 60 = 0.42 s > read_timeout 0.15 s; the first token comes in time
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=60.0)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles, limits={"first_byte_timeout_s": 10, "read_timeout_s": 0.15})) as g:
            stream = _client(g).completions.create(model=MODEL, prompt="hi", max_tokens=50, stream=True)
            got = 0
            with pytest.raises(openai.APIError) as e:
                for _ in stream:
                    got += 1
            assert "mid-stream" in str(e.value)
            assert got <= 2
            assert metric_value(get_metrics(g.url), "kvgate_midstream_failures_total") == 1
            wait_for(lambda: g.gateway.admission.inflight == 0, message="slot back")
    finally:
        fleet.stop()


def test_circuit_opens_on_a_dead_replica_and_closes_when_it_returns():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02) for i in range(2)], mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            c = _client(g)
            fleet.kill(0)
            for i in range(6):  # every request answered, by r1
                raw = c.completions.with_raw_response.create(model=MODEL, prompt=f"while down {i}", max_tokens=2)
                assert raw.headers["x-kvgate-replica"] == "r1"
            wait_for(lambda: not g.gateway.fleet.get("r0").healthy, message="r0 circuit open")
            assert metric_value(get_metrics(g.url), "kvgate_replica_healthy", {"replica": "r0"}) == 0
            fleet.restart(0)
            wait_for(lambda: g.gateway.fleet.get("r0").healthy, timeout=15, message="r0 circuit closed by a probe")
            served = set()
            for i in range(20):
                served.add(c.completions.with_raw_response.create(model=MODEL, prompt=f"back {i}", max_tokens=2).headers["x-kvgate-replica"])
                if "r0" in served:
                    break
            assert "r0" in served, "r0 is back in rotation"
    finally:
        fleet.stop()
