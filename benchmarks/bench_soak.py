"""Soak: the gateway under steady mixed load for minutes; its memory and open fds must stay flat.

Three simulated replicas (processes, time scale 0.05, small KV caches so blocks are evicted and
the index churns), ``kvgate serve`` (memory index fed by the replicas' KV events, client auth
on) and a closed-loop load on its own thread: completions and chat, streamed and not, over
shared-prefix prompts with a unique question each (so tokenizer caches, the index and the
replicas' caches all fill to their bounds and then turn over), some clients that leave
mid-stream or give up after a few milliseconds (queued, being routed, waiting for the first
byte), and some bad requests (invalid JSON, missing or unknown model, wrong or missing
key, out-of-range values, a prompt over the context length, unknown routes) that must get a
4xx. Every few seconds the gateway process's RSS (``VmRSS`` in /proc/<pid>/status) and open
fds (/proc/<pid>/fd) are sampled.

The report gives RSS and fds at the end of the warm-up (the first fifth of the run) and at the
end, their maxima, and the least-squares slope after warm-up (MB and fds per minute): flat is
the point. Then the requests: served, left on purpose (mid-stream or early), bad requests answered 4xx as
they should be (anything else is listed), and failed or hung good requests; and, once the load
has stopped, what the gateway and the replicas still count in flight (0 expected).

    python -m benchmarks.bench_soak [--minutes 10] [--quick] [--seconds S] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .bench_faults import (
    CLIENT_KEY,
    MODEL,
    Gateway,
    Load,
    Record,
    _log_line,
    free_port,
    gateway_config,
    make_replicas,
    metric_sum,
    parse_metrics,
    start_all,
    words,
)
from .bench_faults import (
    _raise_on_signals as raise_on_signals,
)

#: the share of each request kind in the mix
MIX = {
    "completions-stream": 0.28,
    "completions": 0.17,
    "chat-stream": 0.22,
    "chat": 0.15,
    "disconnect": 0.06,  # a stream the client leaves after 2 chunks
    "cancel": 0.05,  # a client that gives up after 1-50 ms: while queued, routed, waiting for the first byte
    "bad": 0.07,
}


def bad_requests(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """(kind, httpx request kwargs) of requests a gateway must refuse with a 4xx."""
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    ok_body = {"model": MODEL, "prompt": "hello " + words(rng, 5), "max_tokens": 4}
    long_prompt = "[long] " + words(rng, 6000)  # ~12k tokens with the demo tokenizer: past max_model_len 8192
    return [
        (
            "invalid-json",
            {"method": "POST", "url": "/v1/completions", "content": b'{"model": "x", "prompt": ', "headers": {**auth, "content-type": "application/json"}},
        ),
        ("not-an-object", {"method": "POST", "url": "/v1/chat/completions", "json": [1, 2, 3], "headers": auth}),
        ("missing-model", {"method": "POST", "url": "/v1/completions", "json": {"prompt": "hi", "max_tokens": 4}, "headers": auth}),
        ("unknown-model", {"method": "POST", "url": "/v1/completions", "json": {**ok_body, "model": "no/such-model"}, "headers": auth}),
        ("wrong-key", {"method": "POST", "url": "/v1/completions", "json": ok_body, "headers": {"authorization": "Bearer not-the-key"}}),
        ("no-key", {"method": "POST", "url": "/v1/chat/completions", "json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}),
        ("negative-max-tokens", {"method": "POST", "url": "/v1/completions", "json": {**ok_body, "max_tokens": -5}, "headers": auth}),
        ("messages-not-a-list", {"method": "POST", "url": "/v1/chat/completions", "json": {"model": MODEL, "messages": "hello"}, "headers": auth}),
        ("message-without-role", {"method": "POST", "url": "/v1/chat/completions", "json": {"model": MODEL, "messages": [{"content": "x"}]}, "headers": auth}),
        ("n-is-0", {"method": "POST", "url": "/v1/completions", "json": {**ok_body, "n": 0}, "headers": auth}),
        ("prompt-too-long", {"method": "POST", "url": "/v1/completions", "json": {**ok_body, "prompt": long_prompt}, "headers": auth}),
        ("stream-not-bool", {"method": "POST", "url": "/v1/completions", "json": {**ok_body, "stream": "yes"}, "headers": auth}),
        ("unknown-route", {"method": "POST", "url": "/v1/nothing-here", "json": ok_body, "headers": auth}),
        ("get-on-post-route", {"method": "GET", "url": "/v1/completions", "headers": auth}),
    ]


class SoakLoad(Load):
    """The fault benchmark's client with the soak's mix of requests."""

    def __init__(self, base: str, *, sessions: int, deadline_s: float, seed: int = 1, prompt_pool: int | None = None) -> None:
        super().__init__(base, sessions=sessions, deadline_s=deadline_s, seed=seed, think_s=0.01)
        # a fixed set of questions: every bounded cache (tokenizer, speculative prefixes) fills
        # during the warm-up, so any slope left after it is not a cache filling up
        pool_rng = random.Random(seed + 7)
        self.pool = [words(pool_rng, pool_rng.randint(8, 40)) for _ in range(prompt_pool)] if prompt_pool else None
        self.bad = bad_requests(random.Random(seed + 99))
        self.bad_results: list[tuple[str, int | None, str | None]] = []  # kind, status, error

    async def _session(self, client: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        kinds, weights = list(MIX), list(MIX.values())
        await asyncio.sleep(i * 0.05)
        while not self._stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            if kind == "bad":
                await self._bad(client, rng)
            else:
                await self._good(client, rng, kind)
            await asyncio.sleep(self.think_s * rng.random() * 2)

    async def _good(self, client: httpx.AsyncClient, rng: random.Random, kind: str) -> None:
        disconnect = kind == "disconnect"
        chat = kind.startswith("chat") or (kind in ("disconnect", "cancel") and rng.random() < 0.5)
        stream = kind.endswith("stream") or disconnect or (kind == "cancel" and rng.random() < 0.5)
        system = rng.choice(self.systems)
        question = rng.choice(self.pool) if self.pool else words(rng, rng.randint(8, 40))
        body: dict[str, Any]
        if chat:
            body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        else:
            body = {"model": MODEL, "prompt": f"{system}\n\nQuestion: {question}\nAnswer:"}
        body |= {"max_tokens": rng.choice([8, 16, 32, 64]), "user": f"user-{rng.randrange(50)}"}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        rec = Record(time.monotonic(), "chat" if chat else "completions", stream)
        self.records.append(rec)
        patience = rng.uniform(0.001, 0.05) if kind == "cancel" else self.deadline_s
        try:
            async with asyncio.timeout(patience):
                await self.send(client, rec, body, read_chunks=2 if disconnect else None)
        except TimeoutError:
            if kind == "cancel":
                rec.outcome = "disconnected"
            else:
                rec.outcome, rec.error = "hung", f"no complete answer within {self.deadline_s:g} s"
        rec.t1 = time.monotonic()

    async def _bad(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        name, kw = rng.choice(self.bad)
        kw = dict(kw)
        url = self.base + kw.pop("url")
        headers = kw.pop("headers", None) or {}
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.deadline_s):
                # a client without the default auth header for the "no-key" case
                if "authorization" not in headers:
                    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as bare:
                        r = await bare.request(kw.pop("method"), url, headers=headers, **kw)
                else:
                    r = await client.request(kw.pop("method"), url, headers=headers, **kw)
                status = r.status_code
                if not 400 <= status < 500:
                    error = r.text[:200]
        except TimeoutError:
            error = "hung"
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        self.bad_results.append((name, status, error))


# -- sampling ------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mb: float
    fds: int
    threads: int
    index_blocks: float | None = None  # the gateway's kvgate_index_blocks (None: not read)


def sample(pid: int, t: float) -> Sample:
    rss_kb, threads = 0, 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return Sample(t, rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")), threads)


def slope_per_min(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (seconds), per minute; None under 3 points."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


class Sampler:
    """/proc figures of the gateway process every ``every_s``, with its index size from /metrics."""

    def __init__(self, pid: int, every_s: float, metrics_url: str | None = None) -> None:
        self.pid = pid
        self.metrics_url = metrics_url
        self.every_s = every_s
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def take(self) -> Sample:
        s = sample(self.pid, time.monotonic() - self.t0)
        if self.metrics_url:
            with contextlib.suppress(Exception):
                s.index_blocks = parse_metrics(httpx.get(self.metrics_url, timeout=2).text).get("kvgate_index_blocks")
        return s

    def start(self) -> None:
        self.samples.append(self.take())
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError):
                self.samples.append(self.take())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class SoakResult:
    duration_s: float
    warmup_s: float
    samples: list[dict[str, float]]
    rss_mb: dict[str, float | None] = field(default_factory=dict)
    fds: dict[str, float | None] = field(default_factory=dict)
    threads: dict[str, float | None] = field(default_factory=dict)
    index_blocks: dict[str, float | None] = field(default_factory=dict)  # kvgate_index_blocks
    requests: dict[str, Any] = field(default_factory=dict)
    after_load: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def figures(samples: list[Sample], warmup_s: float, attr: str) -> dict[str, float | None]:
    after = [s for s in samples if s.t >= warmup_s]
    at_warm = after[0] if after else None
    vals = [float(getattr(s, attr)) for s in samples]
    slope = slope_per_min([s.t for s in after], [float(getattr(s, attr)) for s in after])
    return {
        "start": vals[0] if vals else None,
        "warmup_end": float(getattr(at_warm, attr)) if at_warm else None,
        "end": vals[-1] if vals else None,
        "max": max(vals) if vals else None,
        "slope_per_min": None if slope is None else round(slope, 3),
    }


def count_requests(load: SoakLoad) -> dict[str, Any]:
    recs = load.snapshot()
    by: dict[str, int] = {}
    for r in recs:
        by[r.outcome] = by.get(r.outcome, 0) + 1
    failed = {k: v for k, v in by.items() if k not in ("ok", "disconnected")}
    bad_ok = sum(1 for _, status, err in load.bad_results if err is None and status is not None and 400 <= status < 500)
    unexpected: dict[str, int] = {}
    for name, status, err in load.bad_results:
        if not (err is None and status is not None and 400 <= status < 500):
            key = f"{name}: {status} {err or ''}".strip()[:160]
            unexpected[key] = unexpected.get(key, 0) + 1
    examples = [
        {"kind": r.kind, "stream": r.stream, "status": r.status, "outcome": r.outcome, "error": r.error}
        for r in recs
        if r.outcome not in ("ok", "disconnected")
    ][:5]
    return {
        "sent": len(recs) + len(load.bad_results),
        "served_ok": by.get("ok", 0),
        "left_by_client": by.get("disconnected", 0),
        "failed": sum(failed.values()),
        "failed_by_outcome": failed,
        "failed_examples": examples,
        "bad_requests": len(load.bad_results),
        "bad_requests_4xx": bad_ok,
        "bad_requests_unexpected": unexpected,
    }


def run(
    duration_s: float, *, sessions: int, sample_every: float, warmup_s: float, logdir: Path, seed: int, console, prompt_pool: int | None = None
) -> SoakResult:
    replicas = make_replicas(3, logdir, time_scale=0.05, num_blocks=512)
    cfg = gateway_config(replicas, free_port(), index="memory", ingest=True)
    cfg["debug_headers"] = False
    gateway = Gateway(cfg, logdir)
    load: SoakLoad | None = None
    sampler: Sampler | None = None
    after: dict[str, Any] = {}
    t_begin = time.monotonic()
    try:
        start_all(replicas)
        gateway.start()
        gateway.wait_ready()
        console.print(f"stack up in {time.monotonic() - t_begin:.1f} s; gateway pid {gateway.pid}; soak of {duration_s:g} s (logs: {logdir})")
        load = SoakLoad(gateway.url, sessions=sessions, deadline_s=60.0, seed=seed, prompt_pool=prompt_pool)
        sampler = Sampler(gateway.pid, sample_every, gateway.url + "/metrics")
        sampler.start()
        load.start()
        t_end = time.monotonic() + duration_s
        next_note = time.monotonic() + 60
        while time.monotonic() < t_end:
            time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
            if time.monotonic() >= next_note and sampler.samples:
                s = sampler.samples[-1]
                console.print(f"  {s.t:5.0f} s: RSS {s.rss_mb:.1f} MB, {s.fds} fds, {len(load.records)} requests")
                next_note += 60
            if not gateway.alive():
                raise RuntimeError(f"the gateway exited during the soak:\n{gateway.tail()}")
        load.stop()
        sampler.stop()
        time.sleep(2.0)  # connections closed, a scrape or two
        end = sampler.take()
        after = {"rss_mb": round(end.rss_mb, 1), "fds": end.fds, "threads": end.threads, "index_blocks": end.index_blocks}
        with contextlib.suppress(Exception):
            m = gateway.metrics()
            after["gateway_inflight"] = m.get("kvgate_inflight_requests")
            after["gateway_replica_inflight"] = metric_sum(m, "kvgate_replica_inflight_requests")
            after["admission_waiting"] = m.get("kvgate_admission_waiting")
            after["gateway_5xx_answers"] = sum(v for k, v in m.items() if k.startswith("kvgate_requests_total{") and 'status="5' in k)
        running = 0.0
        for r in replicas:
            with contextlib.suppress(Exception):
                rm = parse_metrics(httpx.get(r.url + "/metrics", timeout=2).text)
                running += metric_sum(rm, "vllm:num_requests_running") + metric_sum(rm, "vllm:num_requests_waiting")
        after["replicas_running_or_waiting"] = running
    finally:
        if load is not None:
            load.stop()
        if sampler is not None:
            sampler.stop()
        after["exit_codes"] = {p.name: p.stop() for p in [gateway, *replicas]}
        after["logs"] = {p.name: p.log_summary() for p in [gateway, *replicas]}
    assert load is not None and sampler is not None
    samples = sampler.samples
    res = SoakResult(duration_s=duration_s, warmup_s=warmup_s, samples=[asdict(s) for s in samples])
    res.rss_mb = figures(samples, warmup_s, "rss_mb")
    res.fds = figures(samples, warmup_s, "fds")
    res.threads = figures(samples, warmup_s, "threads")
    res.index_blocks = figures([s for s in samples if s.index_blocks is not None], warmup_s, "index_blocks")
    res.requests = count_requests(load)
    res.requests["per_s"] = round(res.requests["sent"] / duration_s, 1) if duration_s else None
    res.after_load = after
    return res


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def print_report(res: SoakResult, console) -> None:
    from rich.table import Table

    t = Table(title=f"gateway process over {res.duration_s / 60:.1f} min (warm-up {res.warmup_s:.0f} s)")
    for c in ("", "start", "warm-up end", "end", "max", "slope after warm-up /min", "after the load"):
        t.add_column(c, justify="left" if not c else "right")
    a = res.after_load
    t.add_row("RSS MB", *(_f(res.rss_mb[k]) for k in ("start", "warmup_end", "end", "max")), _f(res.rss_mb["slope_per_min"], ".2f"), _f(a.get("rss_mb")))
    t.add_row("open fds", *(_f(res.fds[k], ".0f") for k in ("start", "warmup_end", "end", "max")), _f(res.fds["slope_per_min"], ".2f"), _f(a.get("fds"), ".0f"))
    t.add_row(
        "threads",
        *(_f(res.threads[k], ".0f") for k in ("start", "warmup_end", "end", "max")),
        _f(res.threads["slope_per_min"], ".2f"),
        _f(a.get("threads"), ".0f"),
    )
    ib = res.index_blocks
    if ib.get("end") is not None:
        t.add_row(
            "index blocks", *(_f(ib[k], ".0f") for k in ("start", "warmup_end", "end", "max")), _f(ib["slope_per_min"], ".0f"), _f(a.get("index_blocks"), ".0f")
        )
    console.print(t)
    q = res.requests
    console.print(
        f"requests: {q['sent']} sent ({q['per_s']}/s), {q['served_ok']} served OK, {q['left_by_client']} left by the client (mid-stream or early), "
        f"{q['failed']} good requests failed or hung {q['failed_by_outcome'] or ''}; "
        f"bad requests: {q['bad_requests']}, {q['bad_requests_4xx']} answered 4xx"
    )
    for k, v in q["bad_requests_unexpected"].items():
        console.print(f"  [red]bad request not answered 4xx ({v}×):[/] {k}")
    for ex in q["failed_examples"]:
        console.print(f"  [red]failed:[/] {ex}")
    console.print(
        f"after the load: gateway in flight {a.get('gateway_inflight')}, per-replica in flight (sum) {a.get('gateway_replica_inflight')}, "
        f"admission waiting {a.get('admission_waiting')}, replicas running or waiting {a.get('replicas_running_or_waiting')}; "
        f"5xx answers counted by the gateway {a.get('gateway_5xx_answers')}"
    )
    console.print(f"exit codes {a.get('exit_codes')}; log lines (error / warning / traceback): {_log_line(a.get('logs') or {})}")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    ap.add_argument("--quick", action="store_true", help="one minute")
    ap.add_argument("--seconds", type=float, help="length in seconds (overrides --minutes and --quick; for tests)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent client sessions")
    ap.add_argument("--sample-every", type=float, help="seconds between RSS/fd samples (default: 5, or a 30th of a short run)")
    ap.add_argument("--warmup", type=float, help="seconds left out of the slope (default: a fifth of the run)")
    ap.add_argument(
        "--prompt-pool",
        type=int,
        help="draw the questions from this many fixed ones (default: a new one per request); bounded caches then fill during the warm-up",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--logs", type=Path, help="keep the processes' logs and configs here (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    duration = args.seconds if args.seconds is not None else 60.0 if args.quick else args.minutes * 60
    if duration <= 0:
        ap.error("the soak needs a positive duration")
    every = args.sample_every or min(5.0, max(0.25, duration / 30))
    warmup = args.warmup if args.warmup is not None else duration / 5
    console = Console(width=None if sys.stdout.isatty() else 200)
    restore = raise_on_signals()
    try:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            res = run(
                duration,
                sessions=args.sessions,
                sample_every=every,
                warmup_s=warmup,
                logdir=args.logs,
                seed=args.seed,
                console=console,
                prompt_pool=args.prompt_pool,
            )
        else:
            with tempfile.TemporaryDirectory(prefix="kvgate-soak-") as tmp:
                res = run(
                    duration,
                    sessions=args.sessions,
                    sample_every=every,
                    warmup_s=warmup,
                    logdir=Path(tmp),
                    seed=args.seed,
                    console=console,
                    prompt_pool=args.prompt_pool,
                )
    finally:
        restore()
    res.meta = {
        "command": "python -m benchmarks.bench_soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.2f}",
        "stack": "3 simulated replicas (time scale 0.05, 512 KV blocks, processes), kvgate serve (memory index, ingest on, auth on)",
        "sessions": args.sessions,
        "prompt_pool": args.prompt_pool,
        "sample_every_s": every,
    }
    print_report(res, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(res), indent=1))
        console.print(f"wrote {args.json}")
    q = res.requests
    return 1 if q["failed"] or q["bad_requests_unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
