"""Data-parallel ranks: one vLLM API server with ``--data-parallel-size N`` holds N KV caches.

vLLM publishes each rank's KV events on its own socket (the configured port plus the rank,
``offset_endpoint_port`` in vllm/distributed/kv_events.py), stamps ``data_parallel_rank`` on
each batch, labels its metrics with ``engine=<rank>``, and lets a router choose the rank with the
``X-data-parallel-rank`` request header (vllm/entrypoints/.../serving.py
``_get_data_parallel_rank``). The gateway indexes and routes per rank.

The end-to-end test stands one "server" up as vLLM's internal load balancer does: an HTTP front
that hands each request to the engine (here: a simulator) its rank header names, and serves the
engines' metrics under ``engine`` labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from gateway.config import ConfigError, expand_data_parallel, offset_endpoint, parse_config
from gateway.fleet import parse_vllm_metrics
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.dp import DPFront
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, wait_for


def test_a_server_expands_into_one_target_per_rank() -> None:
    cfg = parse_config(
        {
            "replicas": [
                {"id": "big", "url": "http://10.0.0.5:8000", "kv_events": "tcp://10.0.0.5:5557", "replay": "tcp://10.0.0.5:5558", "data_parallel_size": 3},
                {"id": "small", "url": "http://10.0.0.6:8000", "kv_events": "tcp://10.0.0.6:5557"},
            ]
        }
    )
    got = [(r.id, r.kv_events, r.replay, r.data_parallel_rank) for r in cfg.replicas]
    assert got == [
        ("big-dp0", "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", 0),
        ("big-dp1", "tcp://10.0.0.5:5558", "tcp://10.0.0.5:5559", 1),
        ("big-dp2", "tcp://10.0.0.5:5559", "tcp://10.0.0.5:5560", 2),
        ("small", "tcp://10.0.0.6:5557", None, None),
    ]
    assert {r.url for r in cfg.replicas[:3]} == {"http://10.0.0.5:8000"}


def test_offsets_follow_vllms_rule() -> None:
    assert offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint("tcp://[::1]:5557", 2) == "tcp://[::1]:5559"
    assert offset_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv_dp1"
    assert offset_endpoint(None, 3) is None
    with pytest.raises(ConfigError):
        offset_endpoint("tcp://host", 1)


def test_bad_data_parallel_settings_are_refused() -> None:
    base = {"id": "a", "url": "http://h:1"}
    for bad in ({"data_parallel_size": 0}, {"data_parallel_rank": -1}, {"data_parallel_size": 2, "data_parallel_rank": 1}):
        with pytest.raises(ConfigError):
            parse_config({"replicas": [{**base, **bad}]})
    with pytest.raises(ConfigError):  # an expanded id colliding with another entry's
        parse_config({"replicas": [{**base, "data_parallel_size": 2}, {"id": "a-dp1", "url": "http://h:2"}]})
    one = parse_config({"replicas": [{**base, "data_parallel_size": 1}]}).replicas[0]
    assert expand_data_parallel(one) == [one] and one.data_parallel_rank is None


def test_metrics_are_read_per_engine_label() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 5\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 3\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7\n'
    )
    assert parse_vllm_metrics(text) == (7.0, 4.0, 0.7)
    assert parse_vllm_metrics(text, 0) == (2.0, 1.0, 0.1)
    assert parse_vllm_metrics(text, 1) == (5.0, 3.0, 0.7)


# -- one DP server: a front dispatching on the rank header to one engine per rank ------------------


@pytest.fixture(scope="module")
def dp_server() -> Iterator[tuple[SimFleet, DPFront]]:
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0) for i in range(2)])
    fleet.start()
    try:
        with DPFront([h.url for h in fleet.handles]) as front:
            yield fleet, front
    finally:
        fleet.stop()


def test_requests_follow_their_prefix_to_its_rank(dp_server: tuple[SimFleet, DPFront]) -> None:
    fleet, front = dp_server
    cfg = fleet_config(fleet.handles)
    for rank, r in enumerate(cfg.replicas):  # one server: same URL, each rank's own event socket
        r.id, r.url, r.data_parallel_rank = f"srv-dp{rank}", front.url, rank
    with GatewayThread(cfg) as g:
        wait_for(lambda: g.gateway.fleet.get("srv-dp1").scraped_at > 0, message="ranks scraped")
        sdk = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
        landed: dict[str, str] = {}
        for doc in ("alpha", "beta", "gamma", "delta"):
            prompt = f"document {doc}: " + " ".join(f"{doc}{i}" for i in range(300))
            first = sdk.completions.with_raw_response.create(model=MODEL, prompt=prompt + " question one", max_tokens=2)
            landed[doc] = first.headers["x-kvgate-replica"]
            rank = landed[doc].removeprefix("srv-dp")
            assert front.ranks_seen[-1] == rank  # the gateway named the rank it picked
            idx = g.gateway.index
            keys_seen = lambda: g.call(idx.block_count()) > 0  # noqa: E731
            wait_for(keys_seen, message="events indexed")
            time.sleep(0.3)  # this prompt's events from its rank's socket
            again = sdk.completions.with_raw_response.create(
                model=MODEL, prompt=prompt + " question two", max_tokens=2, extra_headers={"x-data-parallel-rank": "1" if rank == "0" else "0"}
            )
            assert again.headers["x-kvgate-replica"] == landed[doc], doc  # same rank: its cache holds the prefix
            assert front.ranks_seen[-1] == rank  # a client's own rank header never reaches the server
            assert again.parse().usage.prompt_tokens_details is None or again.parse().usage.prompt_tokens_details.cached_tokens > 0
        # two caches, not one: each rank's index entries came from its own socket
        per_rank = g.gateway.subscriber.stats.per_replica
        assert {rid for rid, st in per_rank.items() if st.batches_applied} == set(landed.values()), per_rank
        states = {s.id: s for s in g.gateway.fleet.all()}
        assert set(states) == {"srv-dp0", "srv-dp1"}


def test_ext_proc_names_the_rank_or_removes_a_clients() -> None:
    """Through Envoy the picker's header mutation carries the rank; without one, a rank header
    the client sent is removed (a client must not pick a rank past the picker)."""
    from gateway.extproc import _route_response

    ranked = _route_response("request_headers", ["10.0.0.5:8000"], dp_rank=1)
    mutation = ranked.request_headers.response.header_mutation
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers}["x-data-parallel-rank"] == b"1"
    assert "x-data-parallel-rank" not in mutation.remove_headers
    whole = _route_response("request_headers", ["10.0.0.6:8000"]).request_headers.response.header_mutation
    assert "x-data-parallel-rank" in whole.remove_headers
    assert "x-data-parallel-rank" not in {h.header.key for h in whole.set_headers}
