"""Prefill→decode through the gateway: openai SDK → gateway → prefill replica → decode replica.

The simulated replicas speak vLLM's NixlConnector protocol and move the KV bytes over NIXL
(UCX, host memory) when it is installed, so these tests exercise the real two-hop path.
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
    with c.completions.with_streaming_response.create(
        model=MODEL, prompt=doc("stream"), max_tokens=8, stream=True, stream_options={"include_usage": True}
    ) as r:
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
    # decode at 7 ms per step: 3000 tokens would run ~21 s; the abort must show within seconds
    slow = SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=1.0) for i, r in enumerate(ROLES)])
    slow.start()
    try:
        cfg = fleet_config(slow.handles, pd={"threshold": 128})
        with GatewayThread(cfg) as g:
            with httpx.stream(
                "POST", f"{g.url}/v1/completions", json={"model": MODEL, "prompt": doc("cancel"), "max_tokens": 3000, "stream": True}, timeout=30
            ) as r:
                assert len(r.headers["x-kvgate-replica"].split(",")) == 2
                n = 0
                for _ in r.iter_bytes():
                    n += 1
                    if n == 3:
                        break
            decoders = [h.url for h in slow.handles[2:]]
            wait_for(
                lambda: sum(replica_metric(u, "vllm:num_requests_running") for u in decoders) == 0,
                timeout=3,
                message="decode request aborted after client disconnect",
            )
            assert sum(replica_metric(u, "vllm:generation_tokens_total") for u in decoders) < 1000
            wait_for(lambda: g.gateway.admission.inflight == 0, timeout=3, message="slot back")
    finally:
        slow.stop()


# -- the exact protocol on each hop ------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(fleet):
    """The module's P/D fleet behind recording proxies, with its own gateway."""
    from tests.helpers.gateway import recorded_gateway

    with recorded_gateway(fleet.handles, pd={"threshold": 128}) as stack:
        yield stack


def _hops(proxies, request_id: str):
    prefill = [e for p in proxies[:2] for e in p.posts() if e["headers"].get("x-request-id") == request_id]
    decode = [e for p in proxies[2:] for e in p.posts() if e["headers"].get("x-request-id") == request_id]
    return prefill, decode


@pytest.mark.parametrize("kind", ["chat-stream", "completions-nonstream"])
def test_hop_bodies_follow_vllm_protocol_exactly(recorded, kind):
    g, proxies = recorded
    c = _client(g)
    rid = f"pd-protocol-{kind}"
    if kind == "chat-stream":
        sent = {
            "model": MODEL,
            "messages": [{"role": "user", "content": doc(kind)}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 7,
            "max_completion_tokens": 7,
            "min_tokens": 2,
            "temperature": 0.5,
            "user": "u-1",
        }
        args = {k: v for k, v in sent.items() if k != "min_tokens"}
        stream = c.chat.completions.create(**args, extra_body={"min_tokens": 2}, extra_headers={"X-Request-Id": rid})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 7
    else:
        sent = {"model": MODEL, "prompt": doc(kind), "max_tokens": 5, "min_tokens": 1, "seed": 3}
        out = c.completions.create(model=MODEL, prompt=sent["prompt"], max_tokens=5, seed=3, extra_body={"min_tokens": 1}, extra_headers={"X-Request-Id": rid})  # type: ignore[call-overload]
        assert out.usage.completion_tokens == 5
    prefill, decode = _hops(proxies, rid)
    assert len(prefill) == 1 and len(decode) == 1, (prefill, decode)
    hop1, hop2 = prefill[0], decode[0]
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    assert hop1["path"] == hop2["path"] == path
    # hop 1: the client's body, one token, not streamed, with an empty KV request
    expected1 = {k: v for k, v in sent.items() if k not in ("stream_options", "min_tokens")}
    expected1.update(
        stream=False,
        max_tokens=1,
        kv_transfer_params={
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    )
    if "max_completion_tokens" in sent:
        expected1["max_completion_tokens"] = 1
    assert hop1["body"] == expected1
    # hop 2: the client's own body plus the prefill's kv_transfer_params, verbatim
    handle = hop1["response"]["kv_transfer_params"]
    assert handle["do_remote_prefill"] is True and handle["remote_block_ids"]
    assert hop2["body"] == {**sent, "kv_transfer_params": handle}
    # one request id on both hops
    assert hop1["headers"]["x-request-id"] == hop2["headers"]["x-request-id"] == rid


def test_usage_is_what_a_single_request_reports(gw, fleet):
    c = _client(gw)
    text = doc("usage")
    messages = [{"role": "user", "content": text}]
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=9)
    assert len(_replicas(raw.headers)) == 2
    usage = raw.parse().usage
    n_prompt = httpx.post(f"{fleet.handles[2].url}/tokenize", json={"model": MODEL, "messages": messages}).json()["count"]
    assert usage.prompt_tokens == n_prompt
    assert usage.completion_tokens == 9  # the decode replica's tokens only: hop 1's token is not counted
    assert usage.total_tokens == n_prompt + 9
    assert usage.prompt_tokens_details.cached_tokens == n_prompt  # pulled over NIXL, not recomputed


@pytest.mark.parametrize("kind,stream", [("chat", True), ("completions", False)])
def test_two_hops_for_the_other_kind_stream_combinations(gw, kind, stream):
    c = _client(gw)
    tag = f"combo-{kind}-{stream}"
    if kind == "chat":
        with c.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": doc(tag)}], max_tokens=6, stream=True, stream_options={"include_usage": True}
        ) as r:
            assert len(_replicas(r.headers)) == 2
            chunks = list(r.parse())
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-1].usage.completion_tokens == 6
    else:
        raw = c.completions.with_raw_response.create(model=MODEL, prompt=doc(tag), max_tokens=6)
        assert len(_replicas(raw.headers)) == 2
        assert raw.parse().choices[0].text and raw.parse().usage.completion_tokens == 6


def test_threshold_decides_one_or_two_hops(fleet):
    def prompt(tag: str) -> tuple[str, int]:
        text = f"Threshold case {tag}: " + " ".join(f"m{i}" for i in range(150))  # unique first block
        return text, httpx.post(f"{fleet.handles[0].url}/tokenize", json={"model": MODEL, "prompt": text}).json()["count"]

    # nothing cached anywhere: n uncached tokens; two hops unless fewer than `threshold` are uncached
    for i, delta in enumerate((None, None, 0, 1)):
        text, n = prompt(f"t{i}")
        assert 128 < n < 1000
        threshold = (128, 1000)[i] if delta is None else n + delta
        with GatewayThread(fleet_config(fleet.handles, pd={"threshold": threshold})) as g:
            raw = _client(g).completions.with_raw_response.create(model=MODEL, prompt=text, max_tokens=2)
            got = _replicas(raw.headers)
            assert len(got) == (2 if n >= threshold else 1), (threshold, n, got)
            assert got[-1] in ("r2", "r3")


def test_pd_metrics_are_exported(gw):
    c = _client(gw)
    c.completions.create(model=MODEL, prompt=doc("metrics"), max_tokens=2)
    c.completions.create(model=MODEL, prompt="short metrics prompt", max_tokens=2)
    text = get_metrics(gw.url)
    assert metric_value(text, "kvgate_pd_requests_total", {"path": "two_hop"}) >= 1
    assert metric_value(text, "kvgate_pd_requests_total", {"path": "one_hop"}) >= 1
    assert metric_value(text, "kvgate_pd_hop_seconds_count", {"hop": "prefill"}) >= 1
    assert metric_value(text, "kvgate_pd_hop_seconds_count", {"hop": "decode"}) >= 1
    assert metric_value(text, "kvgate_pd_prefill_ttft_share_count") >= 1
    assert "kvgate_pd_fallbacks_total" in text or "# TYPE kvgate_pd_fallbacks counter" in text


# -- failures on each hop ----------------------------------------------------------------------------


def test_decode_replica_dying_after_the_pull_redoes_the_prefill():
    """The decode replica pulled the KV (freeing it on the prefill side), then died before
    answering: reusing the handle would make the next decode replica recompute the prompt;
    the gateway redoes hop 1 and the survivor pulls fresh blocks."""
    cfgs = [SimConfig(model=MODEL, role=r, seed=i, time_scale=0.02 if r == "prefill" else 3.0, num_blocks=1024) for i, r in enumerate(ROLES)]
    fleet = SimFleet(cfgs, mode="process")
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles, pd={"threshold": 128}, health={"interval_s": 30})) as g:
            result: dict = {}

            def ask() -> None:
                try:
                    raw = _client(g).completions.with_raw_response.create(model=MODEL, prompt=doc("redo"), max_tokens=100)
                    result["hops"] = _replicas(raw.headers)
                    result["resp"] = raw.parse()
                except Exception as exc:
                    result["error"] = exc

            t = threading.Thread(target=ask)
            t.start()
            busy: list[int] = []

            def decoding() -> bool:
                busy[:] = [i for i in (2, 3) if replica_metric(fleet.handles[i].url, "vllm:num_requests_running") >= 1]
                return bool(busy)

            wait_for(decoding, message="a decode replica generating")
            fleet.kill(busy[0])
            t.join(30)
            assert "error" not in result, result.get("error")
            resp = result["resp"]
            assert result["hops"][1] == f"r{5 - busy[0]}"
            assert resp.usage.completion_tokens == 100
            assert resp.usage.prompt_tokens_details.cached_tokens == resp.usage.prompt_tokens  # fresh KV pulled
            text = get_metrics(g.url)
            assert metric_value(text, "kvgate_pd_fallbacks_total", {"reason": "redo_prefill"}) == 1
            assert metric_value(text, "kvgate_pd_fallbacks_total", {"reason": "decode_retry"}) == 1
    finally:
        fleet.stop()


def test_per_hop_timeouts():
    # r0 a slow prefill replica (prefill of ~1k tokens: ~8 s), r1 a fast one; r2 fast decode, r3 slow decode
    cfgs = [
        SimConfig(model=MODEL, role="prefill", seed=0, time_scale=100.0),
        SimConfig(model=MODEL, role="prefill", seed=1, time_scale=0.02),
        SimConfig(model=MODEL, role="decode", seed=2, time_scale=0.02),
        SimConfig(model=MODEL, role="decode", seed=3, time_scale=5.0),
    ]
    fleet = SimFleet(cfgs)
    fleet.start()
    try:
        h = fleet.handles
        # slow prefill: hop 1 times out, the request is served in one hop on the decode replica
        with GatewayThread(fleet_config([h[0], h[2]], pd={"threshold": 128, "prefill_timeout_s": 0.5})) as g:
            t0 = time.monotonic()
            raw = _client(g).completions.with_raw_response.create(model=MODEL, prompt=doc("slow-prefill"), max_tokens=3)
            assert time.monotonic() - t0 < 3
            assert _replicas(raw.headers) == ["r1"]
            assert raw.parse().usage.completion_tokens == 3
            text = get_metrics(g.url)
            assert metric_value(text, "kvgate_pd_fallbacks_total", {"reason": "prefill_timeout"}) == 1
            assert metric_value(text, "kvgate_pd_fallbacks_total", {"reason": "prefill_failed"}) == 1
        # slow decode: hop 2 has its own first-byte timeout, answered with a 504
        with GatewayThread(fleet_config([h[1], h[3]], pd={"threshold": 128, "decode_timeout_s": 0.5})) as g:
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                _client(g).completions.create(model=MODEL, prompt=doc("slow-decode"), max_tokens=200)
            assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"
            assert time.monotonic() - t0 < 3
            wait_for(lambda: g.gateway.admission.inflight == 0, message="slot back")
    finally:
        fleet.stop()


def test_prefill_failure_policy_error_gives_503(fleet):
    from tests.helpers.net import free_port

    cfg = fleet_config(fleet.handles, pd={"threshold": 128, "on_prefill_failure": "error"}, health={"interval_s": 30})
    for r in cfg.replicas[:2]:
        r.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with GatewayThread(cfg) as g:
        with pytest.raises(openai.APIStatusError) as e:
            _client(g).completions.create(model=MODEL, prompt=doc("policy-error"), max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "prefill_unavailable"
