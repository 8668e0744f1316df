"""The parts of vLLM's HTTP surface a client reaches through the gateway besides generation:
one model by id, /ping and /version, answered as vLLM answers them."""

from __future__ import annotations

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config


@pytest.fixture(scope="module")
def gw():
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0) for i in range(2)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            yield g, fleet
    finally:
        fleet.stop()


def test_one_model_by_id_through_the_sdk(gw):
    g, _ = gw
    c = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
    m = c.models.retrieve(MODEL)  # the id has a slash: kvgate/demo-8b
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("no/such-model")
    assert info.value.code == "model_not_found"


def test_ping_and_version_as_vllm_answers_them(gw):
    g, fleet = gw
    assert httpx.get(f"{g.url}/ping", timeout=5).status_code == 200
    assert httpx.post(f"{g.url}/ping", timeout=5).status_code == 200
    ours = httpx.get(f"{g.url}/version", timeout=5).json()
    assert ours == httpx.get(f"{fleet.handles[0].url}/version", timeout=5).json()
    assert isinstance(ours["version"], str)
