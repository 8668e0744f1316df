"""Gateway parts that need no network: config validation, admission, circuits, P/D bodies, metrics parsing."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import Admission
from gateway.config import ConfigError, load_config, parse_config
from gateway.errors import GatewayError
from gateway.fleet import Circuit, parse_vllm_metrics
from gateway.hops import decode_body, prefill_body


def test_defaults_everywhere():
    cfg = parse_config(None)
    assert cfg.listen.port == 8000
    assert cfg.index.backend == "memory"
    assert cfg.pd.threshold == 512
    assert cfg.limits.max_retries == 2
    assert cfg.debug_headers is False


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"listen": {"port": "eighty"}}, "$.listen.port"),
        ({"replicas": [{"id": "a", "url": "http://x", "role": "pre"}]}, "$.replicas[0].role"),
        ({"replicas": [{"url": "http://x"}]}, "id"),
        ({"replicas": [{"id": "a", "url": "x:1"}]}, "$.replicas[0].url"),
        ({"replicas": [{"id": "a", "url": "http://x"}, {"id": "a", "url": "http://y"}]}, "duplicate"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"index": {"backend": "mongo://"}}, "$.index.backend"),
        ({"pd": {"threshold": -1}}, "$.pd.threshold"),
        ({"models": {"m": {"block_size": 0}}}, "block_size"),
    ],
)
def test_invalid_config_names_the_path(data, fragment):
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert fragment in str(e.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("replicas:\n  - {id: r0, url: 'http://127.0.0.1:9'}\ndebug_headers: true\n")
    cfg = load_config(good)
    assert cfg.replicas[0].id == "r0" and cfg.debug_headers


async def test_admission_queues_then_refuses():
    adm = Admission(max_inflight=1, max_queue=1, queue_timeout_s=5)
    assert await adm.acquire() == 0.0
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    assert adm.waiting == 1
    with pytest.raises(GatewayError) as e:
        await adm.acquire()
    assert e.value.status == 429 and e.value.code == "queue_full"
    adm.release()  # hands the slot to the waiter
    await asyncio.wait_for(waiter, 1)
    assert adm.inflight == 1 and adm.waiting == 0
    adm.release()
    assert adm.inflight == 0


async def test_admission_timeout_and_cancel_do_not_leak():
    adm = Admission(max_inflight=1, max_queue=4, queue_timeout_s=0.05)
    await adm.acquire()
    with pytest.raises(GatewayError) as e:
        await adm.acquire()
    assert e.value.code == "queue_timeout"
    t = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert adm.waiting == 0
    adm.release()
    assert adm.inflight == 0
    assert await adm.acquire() == 0.0


def test_circuit_opens_and_closes():
    c = Circuit(threshold=2, cooldown_s=10)
    assert not c.failure(0.0)
    assert c.failure(1.0) and c.is_open
    assert not c.probe_allowed(5.0) and c.probe_allowed(11.0)
    assert c.success() and not c.is_open


def test_parse_vllm_metrics_current_and_old_names():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""
    assert parse_vllm_metrics(text) == (5.0, 7.0, 0.25)
    old = '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_vllm_metrics(old) == (0.0, 0.0, 0.5)


def test_pd_bodies_follow_vllm_protocol():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 100,
        "max_completion_tokens": 100,
        "min_tokens": 5,
    }
    p = prefill_body(body)
    assert p["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert p["stream"] is False and p["max_tokens"] == 1 and p["max_completion_tokens"] == 1
    assert "stream_options" not in p and "min_tokens" not in p
    assert body["stream"] is True and "min_tokens" in body  # the client's body is untouched
    handle = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1, 2]], "remote_host": "h", "remote_port": 1, "tp_size": 1}
    d = decode_body(body, handle)
    assert d["kv_transfer_params"] is handle
    assert d["stream"] is True and d["max_tokens"] == 100 and d["min_tokens"] == 5


def test_inflight_accounting_releases_prefill_tokens_once():
    import httpx

    from gateway.fleet import Fleet
    from gateway.forward import Forwarder
    from gateway.metrics import GatewayMetrics
    from scorers.base import RequestContext
    from scorers.scheduler import Scheduler

    cfg = parse_config({"replicas": [{"id": "r0", "url": "http://127.0.0.1:9", "models": ["m"]}]})
    fleet = Fleet(cfg.replicas, httpx.AsyncClient())
    fwd = Forwarder(cfg, fleet, Scheduler.from_config(None), GatewayMetrics())
    ep = fleet.get("r0")
    ctx = RequestContext(request_id="a", model="m", prompt_tokens=100, max_tokens=10)
    other = fwd.begin(ctx, ep, "default", prefill_tokens=300)  # another request, still prefilling
    att = fwd.begin(ctx, ep, "default", prefill_tokens=100)
    assert (ep.inflight_requests, ep.inflight_prefill_tokens) == (2, 400)
    fwd.end(ctx, att, "default", ok=False)  # failed before its first byte: its 100 go
    fwd.first_byte(att)  # a late first-byte signal for the same attempt changes nothing
    fwd.end(ctx, att, "default", ok=False)
    assert (ep.inflight_requests, ep.inflight_prefill_tokens) == (1, 300)
    fwd.first_byte(other)
    fwd.end(ctx, other, "default", ok=True)
    assert (ep.inflight_requests, ep.inflight_prefill_tokens, ep.inflight_decode_tokens) == (0, 0, 0)
