"""The gateway in front of each vLLM release's replicas (the simulator's ``--vllm-version``).

Per release: the events are ingested and a repeated prefix is predicted and served from cache.
Then the cases where the gateway must key requests as that release hashes them: lookahead
block hashes (0.33 with an EAGLE drafter, learnt from the events), salted prompts on 0.14
(no extra keys in its events: the configured hash tells them apart), prompt embeddings (never
predicted).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from simulator.vllm_versions import RELEASES
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, wait_for

BS = 16


def _prompt(tag: str) -> str:
    return f"release check {tag}: " + " ".join(f"{tag}-{i}" for i in range(200))


def _stack(*, models: dict | None = None, **sim: object) -> tuple[SimFleet, GatewayThread]:
    fleet = SimFleet([SimConfig(model=MODEL, block_size=BS, time_scale=0.0, seed=i, **sim) for i in range(2)])  # type: ignore[arg-type]
    fleet.start()
    cfg = fleet_config(fleet.handles, models={MODEL: {"tokenizer": "demo", "block_size": BS, **(models or {})}})
    return fleet, GatewayThread(cfg).start()


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[SimFleet, GatewayThread]]:
    fleet, gw = _stack(**request.param)
    try:
        yield fleet, gw
    finally:
        gw.stop()
        fleet.stop()


def _send(gw: GatewayThread, prompt: str, **extra: object) -> httpx.Response:
    r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, **extra}, timeout=15)
    assert r.status_code == 200, r.text
    return r


def _repeat_is_predicted(gw: GatewayThread, prompt: str, **extra: object) -> tuple[str, int, int]:
    """Send ``prompt``, wait for its events, send it again: (replica, predicted blocks, cached tokens)."""
    first = _send(gw, prompt, **extra)
    replica = first.headers["x-kvgate-replica"]
    wait_for(lambda: gw.call(gw.gateway.index.block_count()) > 0, message="events indexed")
    stats = gw.gateway.subscriber.stats.per_replica
    wait_for(lambda: stats[replica].batches_applied > 0, message="the replica's batch applied")
    again = _send(gw, prompt + " and one more question", **extra)
    return again.headers["x-kvgate-replica"], int(again.headers["x-kvgate-prefix-blocks"]), again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("stack", [{"vllm_version": v, "hash_seed": "0"} for v in RELEASES], indirect=True, ids=RELEASES)
def test_each_release_is_ingested_and_its_prefix_predicted(stack: tuple[SimFleet, GatewayThread]) -> None:
    _, gw = stack
    first_replica = _send(gw, _prompt("warm")).headers["x-kvgate-replica"]
    replica, predicted, cached = _repeat_is_predicted(gw, _prompt("a"))
    assert predicted >= 10 and cached >= predicted * BS - BS, (predicted, cached)
    assert gw.gateway.subscriber.stats.total("batches_applied") > 0 and first_replica


@pytest.mark.parametrize("stack", [{"hash_lookahead_tokens": 1}], indirect=True)
def test_lookahead_hashes_are_learnt_and_requests_cut_with_them(stack: tuple[SimFleet, GatewayThread]) -> None:
    _, gw = stack
    replica, predicted, cached = _repeat_is_predicted(gw, _prompt("la"))
    assert gw.gateway.index.lookahead(MODEL) == 1
    assert predicted >= 10 and cached >= predicted * BS - BS, (predicted, cached)


@pytest.mark.parametrize(
    "stack", [{"vllm_version": "0.14", "hash_seed": "0", "models": {"prefix_hash_algo": "sha256", "prefix_hash_seed": "0"}}], indirect=True
)
def test_salted_prompts_on_0_14_match_only_with_their_salt(stack: tuple[SimFleet, GatewayThread]) -> None:
    _, gw = stack
    prompt = _prompt("salted")
    replica, predicted, cached = _repeat_is_predicted(gw, prompt, cache_salt="tenant-a")
    assert predicted >= 10 and cached > 0
    # the same tokens without the salt, or with another: vLLM would serve nothing from cache
    for extra in ({}, {"cache_salt": "tenant-b"}):
        r = _send(gw, prompt + " and one more question", **extra)
        assert int(r.headers["x-kvgate-prefix-blocks"]) == 0, extra
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_prompt_embeds_are_routed_on_load_without_a_prediction() -> None:
    fleet, gw = _stack()
    try:
        sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:  # vLLM's own rule, checked by the gateway
            sdk.completions.create(model=MODEL, prompt="", max_tokens=1)
        assert "prompt_embeds" in str(info.value)
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt_embeds": "AAAA", "max_tokens": 1}, timeout=10)
        assert r.headers.get("x-kvgate-replica"), r.text  # routed: the answer is the replica's
        assert r.headers.get("x-kvgate-prefix-blocks", "0") == "0"
    finally:
        gw.stop()
        fleet.stop()


@pytest.mark.parametrize("stack", [{"vllm_version": "0.14", "hash_seed": "0"}], indirect=True)
def test_without_the_hash_0_14_salted_prompt_starts_count_as_plain(stack: tuple[SimFleet, GatewayThread]) -> None:
    """The documented limit that ``models[].prefix_hash_algo`` lifts: 0.14's events do not say a
    prompt was salted, so without the hash a plain request is predicted a hit vLLM refuses."""
    _, gw = stack
    prompt = _prompt("unverified")
    _send(gw, prompt, cache_salt="tenant-a")
    wait_for(lambda: gw.call(gw.gateway.index.block_count()) > 0, message="events indexed")
    r = _send(gw, prompt + " and one more question")
    assert int(r.headers["x-kvgate-prefix-blocks"]) >= 10
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
