"""Prefill→decode through the gateway: openai SDK → gateway → prefill replica → decode replica.

The simulated replicas speak vLLM's NixlConnector protocol and move the KV bytes over NIXL
(UCX, host memory) when it is installed, so these tests exercise the real two-hop path.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.gateway_harness import MODEL, GatewayThread, fleet_config, get_metrics, metric_value, wait_for

def doc(tag: str) -> str:
    """A long prompt whose very first block is unique to ``tag`` (no prefix shared across tests)."""
    return f"Document {tag}: " + " ".join(f"clause {i} says the tenant {tag} shall keep item {i * 3} in good order;" for i in range(80))
ROLES = ["prefill", "prefill", "decode", "decode"]


def pd_fleet(mode: str = "thread", time_scale: float = 0.02) -> SimFleet:
    return SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=time_scale, num_blocks=1024) for i, r in enumerate(ROLES)], mode=mode)


@pytest.fixture(scope="module")
def fleet():
    f = pd_fleet()
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def gw(fleet):
    with GatewayThread(fleet_config(fleet.handles, pd={"threshold": 128})) as g:
        yield g


def _client(g) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=30)


def _replicas(headers) -> list[str]:
    return headers["x-kvgate-replica"].split(",")


def test_long_prompt_takes_two_hops_and_decode_reports_cached(gw):
    c = _client(gw)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": doc("q1")}], max_tokens=6)
    hops = _replicas(raw.headers)
    assert len(hops) == 2
    assert hops[0] in ("r0", "r1") and hops[1] in ("r2", "r3")
    resp = raw.parse()
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 6
    # the decode replica did not recompute the prompt: it reports it as cached
    assert resp.usage.prompt_tokens_details.cached_tokens >= resp.usage.prompt_tokens - 16
    assert metric_value(get_metrics(gw.url), "kvgate_pd_requests_total", {"path": "two_hop"}) >= 1


def test_two_hop_streaming_completions(gw):
    c = _client(gw)
    with c.completions.with_streaming_response.create(model=MODEL, prompt=doc("stream"), max_tokens=8, stream=True, stream_options={"include_usage": True}) as r:
        assert len(_replicas(r.headers)) == 2
        chunks = list(r.parse())
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8
    assert usage.prompt_tokens > 128


def test_short_prompt_takes_one_hop_on_a_decode_replica(gw):
    raw = _client(gw).chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "short one"}], max_tokens=3)
    hops = _replicas(raw.headers)
    assert len(hops) == 1 and hops[0] in ("r2", "r3")


def test_follow_up_turn_skips_prefill_once_decode_holds_the_prompt(gw):
    c = _client(gw)
    text = doc("follow-up")
    first = c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4)
    decode_id = _replicas(first.headers)[1]
    answer = first.parse().choices[0].message.content

    def next_turn():
        return c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}],
            max_tokens=4,
        )

    # the transferred blocks become cached on the decode replica and its KV events tell the index
    wait_for(lambda: len(_replicas(next_turn().headers)) == 1, timeout=10, message="one-hop follow-up")
    raw = next_turn()
    assert _replicas(raw.headers) == [decode_id]
    assert raw.parse().usage.prompt_tokens_details.cached_tokens > 0


def test_prefill_failures_retry_then_fall_back():
    fleet = pd_fleet(mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles, pd={"threshold": 128}, health={"interval_s": 30})) as g:
            c = _client(g)
            fleet.kill(0)
            # one prefill replica gone: the other one prefills
            for i in range(3):
                raw = c.completions.with_raw_response.create(model=MODEL, prompt=doc(f"p{i}"), max_tokens=3)
                assert _replicas(raw.headers)[0] == "r1"
            fleet.kill(1)
            # no prefill replica left: served in one hop on a decode replica, not lost
            raw = c.completions.with_raw_response.create(model=MODEL, prompt=doc("no-prefill"), max_tokens=3)
            assert len(_replicas(raw.headers)) == 1 and _replicas(raw.headers)[0] in ("r2", "r3")
            assert raw.parse().choices[0].text
            assert metric_value(get_metrics(g.url), "kvgate_pd_fallbacks_total", {"reason": "prefill_failed"}) >= 1
    finally:
        fleet.stop()


def test_decode_replica_down_uses_another():
    fleet = pd_fleet(mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles, pd={"threshold": 128}, health={"interval_s": 30})) as g:
            c = _client(g)
            fleet.kill(2)
            for i in range(4):
                raw = c.completions.with_raw_response.create(model=MODEL, prompt=doc(f"d{i}"), max_tokens=3)
                hops = _replicas(raw.headers)
                assert hops[-1] == "r3"
                assert raw.parse().choices[0].text
    finally:
        fleet.stop()


def test_client_disconnect_cancels_decode():
    slow = SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=0.3) for i, r in enumerate(ROLES)])
    slow.start()
    try:
        cfg = fleet_config(slow.handles, pd={"threshold": 128})
        with GatewayThread(cfg) as g:
            got = threading.Event()
            with httpx.stream("POST", f"{g.url}/v1/completions", json={"model": MODEL, "prompt": doc("cancel"), "max_tokens": 3000, "stream": True}, timeout=30) as r:
                for _ in r.iter_bytes():
                    got.set()
                    break
            assert got.is_set()

            def decode_idle() -> bool:
                total = 0.0
                for h in slow.handles[2:]:
                    total += metric_value(httpx.get(f"{h.url}/metrics").text, "vllm:num_requests_running")
                return total == 0

            wait_for(decode_idle, timeout=10, message="decode request aborted after client disconnect")
    finally:
        slow.stop()
