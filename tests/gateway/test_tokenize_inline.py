"""Where the gateway tokenizes a prompt: on the event loop when little is left to encode, else in
the tokenize pool (``tokenize.inline_*``; issue 14: the hop to a pool thread costs more CPU than
a short or mostly cached prompt's encode).

Through the real gateway in front of a simulated replica (the same demo tokenizer): a chat on a
new document tries the loop and goes to the pool; the next question on that document is finished
on the loop, with the same tokens (the replica's KV events make it a prefix hit); a new long
completion prompt goes to the pool, a short one stays; bodies past ``inline_try_max_bytes`` go
straight to the pool. ``kvgate_tokenize_jobs_total{where}`` counts each.
"""

from __future__ import annotations

import time

import httpx

from gateway.routing import INLINE_TRY_MAX_MESSAGES
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, fleet_fixture, get_metrics, metric_value

DOCUMENT = "Clause 7 binds the parties to arbitration in Geneva under Swiss law. " * 60  # ~4 KB


fleet = fleet_fixture(1, time_scale=0.01)


def jobs(g: GatewayThread) -> dict[str, float]:
    text = get_metrics(g.url)
    return {w: metric_value(text, "kvgate_tokenize_jobs_total", {"where": w}) for w in ("inline", "inline_then_pool", "pool")}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def chat(g: GatewayThread, question: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}], "max_tokens": 2}
    r = httpx.post(f"{g.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def complete(g: GatewayThread, prompt: str) -> None:
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def test_cached_or_short_prompts_are_tokenized_on_the_loop_long_new_ones_in_the_pool(fleet):
    with GatewayThread(fleet_config(fleet.handles, tokenize={"inline_try_max_bytes": 8000})) as g:
        before = jobs(g)
        chat(g, "What does clause 7 say?")
        assert delta(before, jobs(g)) == {"inline_then_pool": 1}
        # the replica's KV events for the document reach the index
        deadline = time.monotonic() + 10
        while True:
            before = jobs(g)
            r = chat(g, f"Where is the seat of the arbitration? ({time.monotonic()})")
            assert delta(before, jobs(g)) == {"inline": 1}  # the document's tokens came from the cache
            if int(r.headers["x-kvgate-prefix-blocks"]) >= len(DOCUMENT) // 4 // 16 - 2:
                break  # the loop's tokens are the replica's: its blocks match
            assert time.monotonic() < deadline, r.headers
            time.sleep(0.1)

        before = jobs(g)
        complete(g, "Summarise this in one line: " + "words that were never sent before " * 10)  # ~370 characters, body > 256 B
        assert delta(before, jobs(g)) == {"inline": 1}
        before = jobs(g)
        complete(g, "A long new completion prompt. " * 60)  # ~1,800 characters not in the cache
        assert delta(before, jobs(g)) == {"inline_then_pool": 1}
        before = jobs(g)
        complete(g, "A body past inline_try_max_bytes. " * 250)  # ~8.5 KB
        assert delta(before, jobs(g)) == {"pool": 1}
        # a chat of many messages is never rendered on the loop (its render alone is long)
        many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(INLINE_TRY_MAX_MESSAGES + 1)]
        before = jobs(g)
        r = httpx.post(f"{g.url}/v1/chat/completions", json={"model": MODEL, "messages": many, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        assert delta(before, jobs(g)) == {"pool": 1}


def test_inline_tries_can_be_turned_off(fleet):
    with GatewayThread(fleet_config(fleet.handles, tokenize={"inline_try_max_bytes": 0})) as g:
        before = jobs(g)
        complete(g, "Summarise this in one line: " + "words that were never sent before " * 10)
        assert delta(before, jobs(g)) == {"pool": 1}
        before = jobs(g)
        complete(g, "tiny")  # bodies up to inline_max_bytes: always on the loop
        assert delta(before, jobs(g)) == {"inline": 1}
