"""New prefixes spread over the fleet (the default profile's ``placement`` scorer), end to end.

A real gateway on loopback in front of four simulated replicas, the real ``openai`` SDK as the
client. New system prompts sent one after another find every replica idle: load alone cannot
tell the replicas apart, so where each lands is the placement term's decision; the follow-ups
of each prompt stay with it, the counts show on /metrics and /admin/state, and a replica
whose cache is reset loses its count.
"""

from __future__ import annotations

import random
from collections import Counter

import httpx
import openai

from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, fleet_fixture, get_metrics, metric_value, wait_for

fleet = fleet_fixture(4, time_scale=0.0)

ADMIN_KEY = "admin-secret"


def system_prompt(rng: random.Random, n: int) -> str:
    return f"[system {n}] " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa"]) for _ in range(400))


def test_new_system_prompts_spread_evenly_and_their_followups_stay(fleet):
    rng = random.Random(5)
    prompts = [system_prompt(rng, n) for n in range(8)]
    with GatewayThread(fleet_config(fleet.handles, auth={"admin_key": ADMIN_KEY})) as g:
        wait_for(lambda: all(s.healthy for s in g.gateway.fleet.all()), message="replicas healthy")
        client = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)

        def ask(system: str, question: str) -> str:
            r = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}], max_tokens=2
            )
            assert r.http_response.status_code == 200
            return r.headers["x-kvgate-replica"]

        placed = [ask(p, "first question") for p in prompts]
        assert sorted(Counter(placed).values()) == [2, 2, 2, 2], placed
        # each prompt's next questions follow it, once its replica's KV events are in
        for p, rid in zip(prompts, placed, strict=True):
            wait_for(lambda p=p, rid=rid: ask(p, "warming") == rid, timeout=10, message="follow-up on the prompt's replica")
            assert ask(p, "another question, somewhat longer than the first one") == rid
        metrics = get_metrics(g.url)
        for rid in set(placed):
            assert metric_value(metrics, "kvgate_replica_new_prefixes", {"replica": rid}) == 2
        state = httpx.get(f"{g.url}/admin/state", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=5).json()
        assert {r["id"]: r["new_prefixes"] for r in state["replicas"]} == Counter(placed)
        # a replica's cache is reset (its AllBlocksCleared event reaches the index): the prefixes
        # placed there are gone, so is its count, and the next new prefix goes there
        emptied = placed[0]
        url = next(s.url for s in g.gateway.fleet.all() if s.id == emptied)
        assert httpx.post(f"{url}/reset_prefix_cache", timeout=5).status_code == 200
        wait_for(lambda: metric_value(get_metrics(g.url), "kvgate_replica_new_prefixes", {"replica": emptied}) == 0, message="count dropped")
        assert ask(system_prompt(rng, 99), "first question") == emptied
