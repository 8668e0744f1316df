"""``kvgate demo``: the whole product on one machine in one command.

Starts simulated vLLM replicas (four by default; two prefill + two decode with ``--pd``), a
gateway in front of them with the embedded index fed by their real KV events, sends a short
realistic workload through the ``openai`` SDK (shared system prompts, multi-turn chats), and
prints what happened per replica. Then it keeps the stack up for your own client until
Ctrl-C (``--once``: exit after the table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

DEMO_MODEL = "kvgate/demo-8b"

SYSTEM_PROMPTS = [
    "You are the support assistant of a cloud storage company. Answer briefly and politely. "
    "Policies: refunds within 30 days; storage tiers are Basic (100 GB), Plus (2 TB) and Pro (10 TB); "
    "never reveal internal ticket numbers; escalate legal questions; always offer the status page. " * 3,
    "You are a senior Python reviewer. For every snippet, list bugs first, then style issues, then a "
    "corrected version. Prefer the standard library, type hints, small functions, and tests with pytest. " * 3,
    "You are a travel planner for a rail company. Suggest itineraries with departure times, changes, "
    "seat classes, luggage rules and the cheapest fare family; mention night trains when useful. " * 3,
    "You are a contracts analyst. Summarise clauses, flag unusual liability terms, compare against the "
    "standard template, and answer in a numbered list with clause references. " * 3,
    "You are a SQL tutor. Explain query plans, suggest indexes, rewrite correlated subqueries as joins, "
    "and always show the final query in a code block with a one-line explanation. " * 3,
]
QUESTIONS = [
    "How do I upgrade my plan?",
    "Why is this loop slow: for i in range(len(xs)): total += xs[i]",
    "Plan a trip from Paris to Vienna next Friday.",
    "Is an unlimited indemnity clause normal?",
    "Why is SELECT * FROM orders WHERE id IN (SELECT ...) slow?",
    "Can I get a refund after 40 days?",
    "Review: def add(a, b): return a+b",
    "What is the cheapest way to Milan?",
    "My upload fails at 99 percent, what should I do?",
    "Is mutable default argument a problem here: def f(x=[]): ...",
]


@dataclass
class Sample:
    replica: str
    prefix_blocks: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


@dataclass
class DemoResult:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


async def _one_chat(client, messages: list[dict], max_tokens: int, result: DemoResult) -> str:
    t0 = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage = None
    try:
        async with client.chat.completions.with_streaming_response.create(
            model=DEMO_MODEL, messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
        ) as response:
            replica = response.headers.get("x-kvgate-replica", "?")
            prefix_blocks = int(response.headers.get("x-kvgate-prefix-blocks", "0") or 0)
            async for chunk in await response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
    except Exception as exc:  # the demo reports errors instead of dying on one
        result.errors += 1
        print(f"  request failed: {exc}", file=sys.stderr)
        return ""
    cached = 0
    prompt = 0
    if usage is not None:
        prompt = usage.prompt_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    result.samples.append(Sample(replica, prefix_blocks, prompt, cached, ttft if ttft is not None else time.perf_counter() - t0))
    return "".join(text)


async def run_workload(base_url: str, *, sessions: int = 15, turns: int = 3, concurrency: int = 6, seed: int = 7) -> DemoResult:
    """Multi-turn chats over a few shared system prompts, several sessions at a time."""
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    result = DemoResult()
    client = AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0, timeout=60)
    sem = asyncio.Semaphore(concurrency)

    async def session(i: int) -> None:
        async with sem:
            messages = [{"role": "system", "content": SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]}]
            for _ in range(turns):
                messages.append({"role": "user", "content": rng.choice(QUESTIONS)})
                answer = await _one_chat(client, messages, 24, result)
                messages.append({"role": "assistant", "content": answer or "..."})

    await asyncio.gather(*(session(i) for i in range(sessions)))
    await client.close()
    return result


def routing_summary(metrics_text: str) -> str:
    """The gateway's own routing decisions, read from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    decisions: dict[str, float] = defaultdict(float)
    paths: dict[str, float] = defaultdict(float)
    retries = fallbacks = 0.0
    for fam in text_string_to_metric_families(metrics_text):
        for smp in fam.samples:
            if smp.name == "kvgate_requests_total":
                decisions[smp.labels.get("route", "?")] += smp.value
            elif smp.name == "kvgate_pd_requests_total":
                paths[smp.labels.get("path", "?")] += smp.value
            elif smp.name == "kvgate_retries_total":
                retries += smp.value
            elif smp.name == "kvgate_pd_fallbacks_total":
                fallbacks += smp.value
    names = {
        "prefix_hit": "to a replica holding the prefix",
        "cold": "cold (no replica held it)",
        "two_hop": "two hops (prefill → decode)",
        "fallback": "one hop after a failed prefill",
    }
    parts = [f"{int(v)} {names.get(k, k)}" for k, v in sorted(decisions.items(), key=lambda kv: -kv[1]) if v]
    line = "gateway routing decisions: " + (", ".join(parts) or "none")
    if paths.get("two_hop"):
        line += f"; P/D: {int(paths['two_hop'])} two-hop, {int(paths.get('one_hop', 0))} one-hop"
    return line + f"; retries {int(retries)}, P/D fallbacks {int(fallbacks)}"


def render_table(result: DemoResult, title: str, summary: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    # a two-hop request is shown on its decode replica (which answered, and whose usage we
    # see); its prefill replica is counted in the "prefill hops" column
    by_replica: dict[str, list[Sample]] = defaultdict(list)
    prefill_hops: dict[str, int] = defaultdict(int)
    for s in result.samples:
        hops = s.replica.split(",")
        by_replica[hops[-1]].append(s)
        if len(hops) == 2:
            prefill_hops[hops[0]] += 1
    table = Table(
        title=title, caption="hit ratio: cached prompt tokens / prompt tokens, as the replicas report them; warm: routed where the index saw the prefix"
    )
    for col in ("replica", "requests", "prefill hops", "hit ratio", "TTFT p50 ms", "warm"):
        table.add_column(col, justify="right" if col != "replica" else "left", no_wrap=True)
    for rid in sorted(set(by_replica) | set(prefill_hops)):
        ss = by_replica.get(rid, [])
        prompt = sum(s.prompt_tokens for s in ss)
        cached = sum(s.cached_tokens for s in ss)
        warm = sum(1 for s in ss if s.prefix_blocks > 0)
        ttft = f"{statistics.median(s.ttft_s for s in ss) * 1000:.0f}" if ss else "-"
        table.add_row(rid, str(len(ss)), str(prefill_hops.get(rid, 0)), f"{cached / prompt:.0%}" if prompt else "-", ttft, f"{warm}/{len(ss)}" if ss else "-")
    prompt = sum(s.prompt_tokens for s in result.samples)
    cached = sum(s.cached_tokens for s in result.samples)
    ttfts = [s.ttft_s for s in result.samples]
    table.add_row(
        "[b]all[/b]",
        str(len(result.samples)),
        str(sum(prefill_hops.values())),
        f"{cached / prompt:.0%}" if prompt else "-",
        f"{statistics.median(ttfts) * 1000:.0f}" if ttfts else "-",
        f"{sum(1 for s in result.samples if s.prefix_blocks > 0)}/{len(result.samples)}",
    )
    console = Console(width=max(100, Console().width))
    console.print(table)
    if summary:
        console.print(summary, highlight=False, soft_wrap=True)
    if result.errors:
        console.print(f"[red]{result.errors} request(s) failed[/red]")


def demo_configs(pd: bool, time_scale: float):
    from simulator.fleet import SimConfig

    roles = ["prefill", "prefill", "decode", "decode"] if pd else ["both"] * 4
    return [SimConfig(model=DEMO_MODEL, tokenizer="demo", num_blocks=512, time_scale=time_scale, role=r, seed=i) for i, r in enumerate(roles)]


def gateway_config(handles, port: int, pd: bool):
    from gateway.config import parse_config

    replicas = []
    for i, h in enumerate(handles):
        role = h.config.role
        rid = f"{role}-{i}" if pd else f"replica-{i}"
        replicas.append({"id": rid, "url": h.url, "role": role, "models": [DEMO_MODEL], "kv_events": h.events_endpoint, "replay": h.replay_endpoint})
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "replicas": replicas,
            "models": {DEMO_MODEL: {"tokenizer": "demo"}},
            "debug_headers": True,
            "pd": {"enabled": pd, "threshold": 256},
            "health": {"interval_s": 1.0},
            "scrape": {"interval_s": 0.5},
        }
    )


async def _serve_and_run(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import build_app
    from gateway.server import uvicorn_config
    from simulator.fleet import SimFleet

    fleet = SimFleet(demo_configs(args.pd, args.time_scale))
    handles = fleet.start()
    port = _free_port(args.port)
    cfg = gateway_config(handles, port, args.pd)
    server = uvicorn.Server(uvicorn_config(build_app(cfg), "127.0.0.1", port, loop="none"))
    serve_task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serve_task.done():
                return 1
            await asyncio.sleep(0.02)
        base_url = f"http://127.0.0.1:{port}/v1"
        kind = "2 prefill + 2 decode" if args.pd else "4"
        print(f"kvgate demo: gateway on {base_url} in front of {kind} simulated vLLM replicas")
        result = await run_workload(base_url, sessions=args.sessions, turns=args.turns)
        import httpx

        async with httpx.AsyncClient() as http:
            summary = routing_summary((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
        render_table(result, f"kvgate demo — {len(result.samples)} chat requests through the gateway", summary)
        print(f"OpenAI base URL: {base_url}")
        if args.once:
            return 0 if result.samples and not result.errors else 1
        print(f"Stack running; point an OpenAI client at the URL above (model '{DEMO_MODEL}', any api_key). Ctrl-C to stop.")
        from gateway.server import shutdown_event

        await shutdown_event().wait()
        return 0
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serve_task, 10)
        fleet.stop()


def main(argv: list[str]) -> int:
    import os

    # NIXL configures its own stdout logger at INFO on import (one line per agent); keep the
    # demo's output to the table unless the user asked for NIXL's logs
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    p = argparse.ArgumentParser(prog="kvgate demo", description=__doc__.splitlines()[0])
    p.add_argument("--once", action="store_true", help="run the workload, print the table, exit")
    p.add_argument("--pd", action="store_true", help="two prefill + two decode replicas (NIXL transfer)")
    p.add_argument("--port", type=int, default=8000, help="gateway port (a free one if taken)")
    p.add_argument("--sessions", type=int, default=15, help="chat sessions in the workload")
    p.add_argument("--turns", type=int, default=3, help="turns per chat session")
    p.add_argument("--time-scale", type=float, default=0.2, help="simulated GPU time multiplier (1 = H100-like)")
    args = p.parse_args(argv)
    return asyncio.run(_serve_and_run(args))
