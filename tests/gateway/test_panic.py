"""Panic routing (``health.panic``): when every replica that could serve a request has its circuit
open, the gateway tries them anyway instead of answering 503 (probes time out on a saturated
fleet all at once); a replica not ready is never tried; ext-proc keeps its 503 (its own test).

Real gateway on loopback in front of simulated replicas; circuits are opened through the fleet's
own failure path (probes are slowed down so none closes them meanwhile).
"""

from __future__ import annotations

import httpx
import openai

from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, fleet_fixture, get_metrics, metric_value, wait_for

SLOW_PROBES = {"interval_s": 60.0, "timeout_s": 1.0, "failure_threshold": 1, "cooldown_s": 60.0}


fleet = fleet_fixture(2, time_scale=0.01)


async def _open_all(g: GatewayThread) -> None:
    for s in g.gateway.fleet.all():
        g.gateway.fleet.record_failure(s.id)


def panics(g: GatewayThread) -> float:
    return metric_value(get_metrics(g.url), "kvgate_panic_routes_total")


def test_every_circuit_open_still_serves_and_the_answer_closes_the_circuit(fleet):
    with GatewayThread(fleet_config(fleet.handles, health=SLOW_PROBES)) as g:
        wait_for(lambda: all(s.healthy for s in g.gateway.fleet.all()), message="replicas healthy")
        g.call(_open_all(g))
        assert not any(s.healthy for s in g.gateway.fleet.all())
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
        r = client.completions.with_raw_response.create(model=MODEL, prompt="the fleet answers its probes late", max_tokens=2)
        assert r.http_response.status_code == 200 and r.parse().choices
        assert panics(g) == 1
        served = r.headers["x-kvgate-replica"]
        assert g.gateway.fleet.get(served).healthy  # its answer closed its circuit
        # a healthy replica again: routed as usual, no panic
        assert client.completions.create(model=MODEL, prompt="next", max_tokens=2).choices
        assert panics(g) == 1


def test_panic_is_off_when_configured(fleet):
    cfg = fleet_config(fleet.handles, health={**SLOW_PROBES, "panic": False})
    with GatewayThread(cfg) as g:
        wait_for(lambda: all(s.healthy for s in g.gateway.fleet.all()), message="replicas healthy")
        g.call(_open_all(g))
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
        assert panics(g) == 0


def test_a_replica_not_ready_is_never_tried_in_panic(fleet):
    with GatewayThread(fleet_config(fleet.handles, health=SLOW_PROBES)) as g:
        wait_for(lambda: all(s.healthy for s in g.gateway.fleet.all()), message="replicas healthy")

        async def r0_unready_r1_open() -> None:
            g.gateway.fleet.set_ready("r0", False)
            g.gateway.fleet.record_failure("r1")

        g.call(r0_unready_r1_open())
        for _ in range(4):
            r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
            assert r.status_code == 200 and r.headers["x-kvgate-replica"] == "r1"

        async def both_unready() -> None:
            g.gateway.fleet.set_ready("r1", False)

        g.call(both_unready())
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"


def test_every_replica_down_is_a_prompt_503_not_a_hang(fleet):
    """Panic tries the open circuits; each refuses the connection: an OpenAI error, fast."""
    from tests.helpers.net import free_port

    cfg = fleet_config(fleet.handles, health=SLOW_PROBES)
    for rep in cfg.replicas:
        rep.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with GatewayThread(cfg) as g:
        g.call(_open_all(g))
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
        err = r.json()["error"]
        assert r.status_code == 503 and err["code"] == "upstream_unavailable" and err["type"] == "service_unavailable_error", r.text
        assert "r0" in err["message"] and "r1" in err["message"]  # both were tried
        assert panics(g) == 1
