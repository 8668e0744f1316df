"""Prefill→decode between two simulated replicas, driven by the test itself (no gateway).

The NixlConnector contract (pull mode): the prefill hop returns ``kv_transfer_params`` and keeps
its blocks pinned; the decode hop pulls the KV bytes over NIXL (UCX, host memory) — or the TCP
side channel when NIXL is absent — verifies them against its own block hashes, caches them,
and decodes without recomputing the prompt; the prefill side frees the blocks after the read,
or when the lease expires. All observed from outside: HTTP bodies and /metrics.
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.sim import (
    MODEL,
    PREFILL_PARAMS,
    metric,
    pd_prompt,
    two_hop,
    wait_for,
)

NIXL = importlib.util.find_spec("nixl") is not None
KV_BYTES = 4096


@pytest.fixture(scope="module", params=[True, False], ids=["nixl", "tcp"])
def pd(request):
    prefer = request.param
    f = SimFleet(
        [
            SimConfig(model=MODEL, role="prefill", time_scale=0.02, prefer_nixl=prefer),
            SimConfig(model=MODEL, role="decode", time_scale=0.02, prefer_nixl=prefer),
        ]
    )
    f.start()
    yield prefer, f.handles[0], f.handles[1]
    f.stop()


def test_two_hop_moves_kv_and_decode_reports_prompt_cached(pd):
    prefer, pre, dec = pd
    prompt = pd_prompt("two-hop")
    bytes0 = metric(dec.url, "vllm:nixl_bytes_transferred_sum")
    first, kv, second = two_hop(pre, dec, prompt)
    n_tokens = first["usage"]["prompt_tokens"]
    n_blocks = -(-n_tokens // 16)
    # the prefill hop: one token, the NixlConnector's params
    assert first["usage"]["completion_tokens"] == 1 and first["choices"][0]["finish_reason"] == "length"
    assert list(kv) == [
        "do_remote_prefill",
        "do_remote_decode",
        "remote_block_ids",
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
        "tp_size",
    ]
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False and kv["remote_engine_id"] == pre.engine_id
    assert isinstance(kv["remote_block_ids"], list) and len(kv["remote_block_ids"]) == 1 and len(kv["remote_block_ids"][0]) == n_blocks
    assert kv["remote_request_id"].startswith(first["id"] + "-0-") and kv["remote_host"] == "127.0.0.1" and kv["tp_size"] == 1
    # the decode hop: the whole prompt came from the prefill replica, nothing recomputed
    usage = second["usage"]
    assert usage["prompt_tokens"] == n_tokens and usage["prompt_tokens_details"]["cached_tokens"] == n_tokens
    assert usage["completion_tokens"] == 5 and second["kv_transfer_params"] is None
    assert metric(dec.url, "vllm:prompt_tokens_total") >= n_tokens
    moved = metric(dec.url, "vllm:nixl_bytes_transferred_sum") - bytes0
    if prefer and NIXL:
        assert moved == n_blocks * KV_BYTES, "the KV bytes went over NIXL"
        assert metric(dec.url, "vllm:nixl_num_descriptors_sum") > 0
    else:
        assert moved == 0, "TCP side channel: no NIXL transfer recorded"
    assert metric(dec.url, "vllm:nixl_num_failed_transfers_total") == 0 and metric(dec.url, "kvgate_sim:kv_verify_failures_total") == 0
    # the pulled blocks are now cached on the decode replica: a plain repeat hits them
    again = httpx.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (n_tokens - 1) // 16 * 16


def test_prefill_frees_blocks_after_the_read(pd):
    _, pre, dec = pd
    prompt = pd_prompt("free")
    wait_for(lambda: metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0, message="prefill idle")
    r1 = httpx.post(f"{pre.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}).json()
    kv = r1["kv_transfer_params"]
    assert metric(pre.url, "vllm:kv_cache_usage_perc") == pytest.approx(len(kv["remote_block_ids"][0]) / 2048)  # pinned for the decode side
    httpx.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "kv_transfer_params": kv}).raise_for_status()
    wait_for(lambda: metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0, message="prefill blocks freed after the read")
    assert metric(pre.url, "vllm:nixl_num_kv_expired_reqs_total") == 0


def test_shared_request_id_and_partial_local_hit(pd):
    """Two P/D requests with one X-Request-Id don't collide; a decode replica that already holds
    part of the prompt pulls only the blocks it misses, as vLLM's connector does."""
    prefer, pre, dec = pd
    head = pd_prompt("partial")
    httpx.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": head, "max_tokens": 1}).raise_for_status()
    local = httpx.post(f"{dec.url}/tokenize", json={"model": MODEL, "prompt": head}).json()["count"] // 16
    prompt = head + " and then some more words that only the prefill replica has seen " * 3
    bytes0 = metric(dec.url, "vllm:nixl_bytes_transferred_sum")
    _, kv, second = two_hop(pre, dec, prompt, rid="same-id")
    _, kv2, _ = two_hop(pre, dec, pd_prompt("other"), rid="same-id")
    assert kv["remote_request_id"] != kv2["remote_request_id"]
    n_blocks = len(kv["remote_block_ids"][0])
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"]
    if prefer and NIXL:
        moved = metric(dec.url, "vllm:nixl_bytes_transferred_sum") - bytes0
        other_blocks = len(kv2["remote_block_ids"][0])
        assert moved == (n_blocks - local + other_blocks) * KV_BYTES
    wait_for(lambda: metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0, message="both leases released")


def test_lease_expires_when_nobody_pulls():
    f = SimFleet([SimConfig(model=MODEL, role="prefill", time_scale=0.0, lease_s=0.3)])
    f.start()
    try:
        pre = f.handles[0]
        r = httpx.post(
            f"{pre.url}/v1/completions", json={"model": MODEL, "prompt": pd_prompt("lease"), "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}
        ).json()
        assert r["kv_transfer_params"]["remote_block_ids"][0]
        assert metric(pre.url, "vllm:kv_cache_usage_perc") > 0
        wait_for(lambda: metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0, timeout=3, message="lease expiry frees the blocks")
        assert metric(pre.url, "vllm:nixl_num_kv_expired_reqs_total") == 1
        # a stop before the length cap frees at once and returns no params (vLLM: not FINISHED_LENGTH_CAPPED)
        word = httpx.post(f"{pre.url}/v1/completions", json={"model": MODEL, "prompt": "stop probe", "max_tokens": 1}).json()["choices"][0]["text"]
        stopped = httpx.post(
            f"{pre.url}/v1/completions",
            json={"model": MODEL, "prompt": "stop probe", "stop": [word.strip()], "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS},
        ).json()
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["kv_transfer_params"] is None
        assert metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0
    finally:
        f.stop()


def test_checksums_are_verified():
    """A decode replica whose block hashes disagree (another PYTHONHASHSEED) rejects the pulled
    bytes and recomputes the prompt itself — the answer is still right, nothing is cached from P."""
    f = SimFleet(
        [
            SimConfig(model=MODEL, role="prefill", time_scale=0.0, hash_seed="seed-a"),
            SimConfig(model=MODEL, role="decode", time_scale=0.0, hash_seed="seed-b"),
            SimConfig(model=MODEL, role="decode", time_scale=0.0, hash_seed="seed-a"),
        ]
    )
    f.start()
    try:
        pre, bad, good = f.handles
        prompt = pd_prompt("checksum")
        _, _, out = two_hop(pre, bad, prompt)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(bad.url, "kvgate_sim:kv_verify_failures_total") == 1
        _, _, ok = two_hop(pre, good, prompt)
        assert ok["usage"]["prompt_tokens_details"]["cached_tokens"] == ok["usage"]["prompt_tokens"]
        assert ok["choices"][0]["text"] == out["choices"][0]["text"]
        assert metric(good.url, "kvgate_sim:kv_verify_failures_total") == 0
    finally:
        f.stop()


def test_unreachable_prefill_and_aborted_decode():
    """Bad params never hang the decode replica (it recomputes); a decode request aborted
    before its pull frees the prefill's blocks at once instead of at lease expiry."""
    f = SimFleet([SimConfig(model=MODEL, role="prefill", time_scale=0.0), SimConfig(model=MODEL, role="decode", time_scale=1.0, max_num_seqs=1)])
    f.start()
    try:
        pre, dec = f.handles
        prompt = pd_prompt("unreachable")
        bogus = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [[0, 1, 2]],
            "remote_engine_id": "nobody",
            "remote_request_id": "r",
            "remote_host": "127.0.0.1",
            "remote_port": 9,
            "tp_size": 1,
        }
        out = httpx.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": bogus}, timeout=30).json()
        assert out["choices"][0]["text"] and out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # occupy the decode replica, then queue a P/D request behind it and give up on it
        kv = httpx.post(f"{pre.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}).json()[
            "kv_transfer_params"
        ]
        assert metric(pre.url, "vllm:kv_cache_usage_perc") > 0
        import asyncio

        async def go():
            async with httpx.AsyncClient() as c:
                busy = asyncio.create_task(c.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": "busy", "max_tokens": 500}, timeout=30))
                await asyncio.sleep(0.2)
                queued = asyncio.create_task(
                    c.post(f"{dec.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 5, "kv_transfer_params": kv}, timeout=30)
                )
                await asyncio.sleep(0.3)
                queued.cancel()
                await asyncio.gather(queued, return_exceptions=True)
                await asyncio.sleep(0.3)
                busy.cancel()
                await asyncio.gather(busy, return_exceptions=True)

        asyncio.run(go())
        wait_for(lambda: metric(pre.url, "vllm:kv_cache_usage_perc") == 0.0, timeout=3, message="prefill freed on the decode's abort")
        assert metric(pre.url, "vllm:nixl_num_kv_expired_reqs_total") == 0
    finally:
        f.stop()


def test_side_channel_and_lease_follow_vllm_env_vars(monkeypatch):
    from simulator.cli import build_parser, configs_from_args
    from tests.helpers.net import free_port

    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600")
    monkeypatch.setenv("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "480")
    cfgs = configs_from_args(build_parser().parse_args(["--replicas", "2", "--role", "prefill"]))
    assert [(c.side_channel_host, c.side_channel_port, c.lease_s) for c in cfgs] == [("localhost", 5600, 480.0), ("localhost", 5601, 480.0)]
    port = free_port()
    f = SimFleet(
        [
            SimConfig(model=MODEL, role="prefill", time_scale=0.0, side_channel_host="localhost", side_channel_port=port),
            SimConfig(model=MODEL, role="decode", time_scale=0.0),
        ]
    )
    f.start()
    try:
        _, kv, out = two_hop(*f.handles, pd_prompt("env"))
        assert (kv["remote_host"], kv["remote_port"]) == ("localhost", port)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"]
    finally:
        f.stop()


@pytest.mark.parametrize("mode", ["auto", "nixl"])
def test_role_both_uses_tcp_unless_nixl_is_asked_for(mode):
    """kv_transfer auto keeps NIXL's start-up off role-both replicas; nixl forces it on them."""
    f = SimFleet([SimConfig(model=MODEL, role="both", time_scale=0.02, kv_transfer=mode) for _ in range(2)])
    f.start()
    try:
        pre, dec = f.handles
        bytes0 = metric(dec.url, "vllm:nixl_bytes_transferred_sum")
        first, kv, second = two_hop(pre, dec, pd_prompt(f"both-{mode}"))
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"]
        moved = metric(dec.url, "vllm:nixl_bytes_transferred_sum") - bytes0
        if mode == "nixl" and NIXL:
            assert moved == len(kv["remote_block_ids"][0]) * KV_BYTES
        else:
            assert moved == 0
    finally:
        f.stop()
