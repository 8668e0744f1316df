"""Several gateways on one Redis index against one gateway: routing quality, faults, cost.

Real processes on 127.0.0.1, started and stopped here: simulated replicas (one ``python -m
simulator.cli`` each, KV events and replay on), a ``redis-server`` in a temp dir, one ``kvgate
indexer`` feeding it, and ``kvgate serve`` gateways with ``index.backend: redis://``,
``index.ingest: false``: two with ``index.share_load`` on (A, B: the default) and two with it
off (C, D), all with the default routing profile.

* **Routing.** The same workload (shared-prefix, multi-turn; ``benchmarks.workloads``) through
  gateway A alone ("one gateway"), through A and B with the client round-robining over them
  ("two gateways, shared"), and through C and D ("two gateways, not shared"), in interleaved
  rounds (the arms' order rotates each round). Before each run every replica's prefix cache is
  reset (``POST /reset_prefix_cache``; its AllBlocksCleared event clears the index) and the
  speculative entries are let expire, so no run inherits another's warm cache. Per arm: the
  prefix-hit ratio the replicas report, the load spread (max/min requests per replica, every
  replica of the fleet counted: infinite when one served nothing), TTFT; medians over rounds.
  Targets: two shared gateways within 3 points of one gateway's hit ratio, spread <= 1.3.
* **Faults.** Load through A and B; Redis is SIGKILLed mid-run and restarted empty after a
  hold, then the indexer is SIGKILLed and restarted. Every request that is not a complete 200
  counts as lost: the target is 0.
* **Cost.** Microseconds the exchange adds to one index lookup (same keys, interleaved calls,
  in this process): ``RedisIndex.lookup`` against ``lookup_shared`` publishing the load, and not.

    python -m benchmarks.bench_multi_gateway [--quick] [--rounds N] [--json PATH]
    python -m benchmarks.bench_multi_gateway --workloads multi-turn --arms 1,2 --rounds 1 \
        --skip faults,cost --num-blocks 1024 --name NAME --out DIR   # one slice
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from kvindex.events import BlockStored, EventBatch
from kvindex.hashing import block_keys
from kvindex.redis_index import RedisIndex, Share
from simulator.fleet import SimConfig, SimFleet

from .compare import Setup, warmup_requests
from .procports import wait_listening
from .report import Summary, percentile, summarize
from .workloads import MODEL, WORKLOADS, RunResult, Workload, run_workload

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("one gateway", "two gateways, shared", "two gateways, not shared")

# -- processes ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProc:
    """redis-server on a loopback port it keeps across restarts (clients reconnect there), no
    persistence: a restart comes back empty, as after a crash of a cache without a disk."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary, self.workdir = binary, workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for _ in range(1 if self.port else 5):  # a fresh port if another process took it
            port = self.port or _free_port()
            argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
            argv += ["--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"]
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            self.port = port
                            return
                except OSError:
                    time.sleep(0.02)
            _stop(self.proc)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


class KvgateProc:
    """A ``kvgate`` subcommand (``serve``, ``indexer``) in its own process, logging to a file;
    ``serve`` listens on port 0, read back from /proc (``procports``)."""

    def __init__(self, command: str, config: dict[str, Any], tmp: Path, name: str, *extra: str) -> None:
        self.command, self.name, self.extra = command, name, extra
        self.config_path = tmp / f"{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 30.0) -> KvgateProc:
        with self.log.open("ab") as log:
            argv = [sys.executable, "-m", "gateway.cli", self.command, "--config", str(self.config_path), *self.extra]
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})
        if self.command != "serve":
            return self
        try:
            self.port = wait_listening(self.proc, timeout=ready_timeout)
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(f"{self.url}/ready", timeout=0.5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        except RuntimeError:
            pass
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready; its log ends with:\n{self.log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)


def gateway_config(redis_url: str, *, share: bool, replicas: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """A gateway on the shared Redis index (ingestion left to the indexer), debug headers on."""
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "replicas": replicas or [],
        "models": {MODEL: {"tokenizer": "demo"}},
        "index": {"backend": redis_url, "ingest": False, "share_load": share},
        "debug_headers": True,
        "scrape": {"interval_s": 0.5},
        "health": {"interval_s": 1.0},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def replica_entries(handles, ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": rid, "url": h.url, "models": [MODEL], "kv_events": h.events_endpoint, "replay": h.replay_endpoint} for rid, h in zip(ids, handles, strict=True)
    ]


# -- the stack ----------------------------------------------------------------------------------------


class Stack:
    """Fleet, Redis, indexer, gateways A and B (sharing) and C and D (not sharing)."""

    def __init__(self, tmp: Path, setup: Setup, index_extra: dict[str, Any] | None = None) -> None:
        self.tmp, self.setup, self.index_extra = tmp, setup, index_extra or {}
        self.fleet = SimFleet(
            [SimConfig(model=MODEL, seed=i, time_scale=setup.time_scale, num_blocks=setup.num_blocks) for i in range(setup.replicas)], mode="process"
        )
        self.redis = RedisProc(tmp)
        self.gateways: dict[str, KvgateProc] = {}
        self.indexer: KvgateProc | None = None

    def __enter__(self) -> Stack:
        try:
            self.fleet.start()
            self.redis.start()
            self.ids = [f"r{i}" for i in range(len(self.fleet.handles))]
            replicas = replica_entries(self.fleet.handles, self.ids)
            self.indexer = KvgateProc(
                "indexer", {"replicas": replicas, "index": {"backend": self.redis.url}}, self.tmp, "indexer", "--loss-check-every", "0.5"
            ).start()
            for name, share in (("A", True), ("B", True), ("C", False), ("D", False)):
                cfg = gateway_config(self.redis.url, share=share, replicas=replicas, index=self.index_extra)
                self.gateways[name] = KvgateProc("serve", cfg, self.tmp, f"gw-{name}")
            for g in self.gateways.values():
                g.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for g in self.gateways.values():
            g.stop()
        if self.indexer is not None:
            self.indexer.stop()
        self.redis.stop()
        self.fleet.stop()

    def urls(self, arm: str) -> list[str]:
        g = self.gateways
        return {ARMS[0]: [g["A"].url], ARMS[1]: [g["A"].url, g["B"].url], ARMS[2]: [g["C"].url, g["D"].url]}[arm]

    def reset_caches(self, settle_s: float) -> None:
        """Every replica's prefix cache emptied (its events clear the index), then time for the
        indexer to apply that and for the speculative entries to expire."""
        for h in self.fleet.handles:
            httpx.post(f"{h.url}/reset_prefix_cache", params={"reset_running_requests": "true"}, timeout=5)
        time.sleep(settle_s)


# -- routing quality ----------------------------------------------------------------------------------


def workloads(quick: bool, names: list[str] | None = None) -> list[Workload]:
    """shared-prefix and multi-turn by default; ``names`` picks among every workload (no-reuse:
    every prompt a cold placement, what serialising cold placements costs)."""
    if quick:
        chosen = [WORKLOADS["shared-prefix"](num_prompts_per_group=10), WORKLOADS["multi-turn"](num_sessions=32, turns=4)]
    else:
        chosen = [WORKLOADS["shared-prefix"](), WORKLOADS["multi-turn"]()]
    if not names:
        return chosen
    extra = [WORKLOADS[n]() for n in names if n in WORKLOADS and n not in {w.name for w in chosen}]
    return [w for w in chosen if w.name in names] + extra


def run_arm(stack: Stack, wl: Workload, arm: str) -> RunResult:
    return asyncio.run(run_workload(wl, stack.urls(arm), concurrency=stack.setup.concurrency, warmup=warmup_requests(wl, stack.setup, None)))


def load_spread(run: RunResult, replicas: list[str]) -> float:
    """Max/min requests per replica after the warm-up, over EVERY replica of the fleet: one
    that served nothing makes it infinite (``report.summarize`` counts only the replicas that
    served something, which hid an idle replica beside an overloaded one)."""
    per = Counter(s.replica.split(",")[-1] for s in run.measured() if s.error is None)
    counts = [per.get(r, 0) for r in replicas]
    if not counts or max(counts) == 0:
        return float("nan")
    return max(counts) / min(counts) if min(counts) else float("inf")


def families_per_replica(run: RunResult, replicas: list[str]) -> list[int]:
    """How many prefix families (system prompts, documents) have most of their requests on
    each replica: where a new prefix lands decides the run's balance."""
    fam: dict[str, Counter[str]] = {}
    for s in run.samples:
        if s.error is None and s.family:
            fam.setdefault(s.family, Counter())[s.replica.split(",")[-1]] += 1
    owners = Counter(c.most_common(1)[0][0] for c in fam.values())
    return [owners.get(r, 0) for r in replicas]


@dataclass
class ArmFigures:
    workload: str
    arm: str
    rounds: int
    hit_ratio: float  # median over rounds
    hit_ratio_rounds: list[float]
    load_spread: float  # median over rounds (every replica counted: inf when one served nothing)
    load_spread_rounds: list[float]
    ttft_p50_ms: float
    ttft_p90_ms: float
    errors: int
    requests: int


def routing(stack: Stack, wls: list[Workload], rounds: int, settle_s: float, arms_run: tuple[str, ...] = ARMS) -> tuple[list[ArmFigures], list[Summary]]:
    runs: dict[tuple[str, str], list[Summary]] = {}
    for r in range(rounds):
        arms = arms_run[r % len(arms_run) :] + arms_run[: r % len(arms_run)]  # rotate the order each round
        for wl in wls:
            for arm in arms:
                stack.reset_caches(settle_s)
                t0 = time.perf_counter()
                run = run_arm(stack, wl, arm)
                s = summarize(wl.name, arm, run)
                s.load_spread = load_spread(run, stack.ids)
                runs.setdefault((wl.name, arm), []).append(s)
                fams = families_per_replica(run, stack.ids)
                print(
                    f"  round {r + 1} {wl.name:13} {arm:26} hit {s.hit_ratio:6.1%}  spread {s.load_spread:5.2f}  families per replica {fams}  ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    out = []
    for (wl_name, arm), ss in runs.items():
        out.append(
            ArmFigures(
                wl_name,
                arm,
                len(ss),
                statistics.median(s.hit_ratio for s in ss),
                [round(s.hit_ratio, 4) for s in ss],
                statistics.median(s.load_spread for s in ss),
                [round(s.load_spread, 3) for s in ss],
                statistics.median(s.ttft_p50_ms for s in ss),
                statistics.median(s.ttft_p90_ms for s in ss),
                sum(s.errors for s in ss),
                sum(s.requests for s in ss),
            )
        )
    return out, [s for ss in runs.values() for s in ss]


# -- faults -------------------------------------------------------------------------------------------


@dataclass
class FaultRun:
    requests: int
    ok: int
    lost: int
    errors: dict[str, int]
    events: list[str]
    wall_s: float


def faults(stack: Stack, hold_s: float, quick: bool) -> FaultRun:
    """Load through A and B; Redis killed and restarted empty, then the indexer, mid-run."""
    wl = WORKLOADS["shared-prefix"](num_groups=8, num_prompts_per_group=20 if quick else 40, seed=11)
    events: list[str] = []
    t0 = time.monotonic()
    indexer = stack.indexer
    assert indexer is not None

    def inject() -> None:
        def at(t: float) -> None:
            time.sleep(max(0.0, t0 + t - time.monotonic()))

        at(3)
        stack.redis.kill()
        events.append(f"{time.monotonic() - t0:5.1f} s  redis-server SIGKILLed")
        at(3 + hold_s)
        stack.redis.start()
        events.append(f"{time.monotonic() - t0:5.1f} s  redis-server restarted (empty)")
        at(6 + 2 * hold_s)
        indexer.kill()
        events.append(f"{time.monotonic() - t0:5.1f} s  kvgate indexer SIGKILLed")
        at(6 + 3 * hold_s)
        indexer.start()
        events.append(f"{time.monotonic() - t0:5.1f} s  kvgate indexer restarted")

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    urls = stack.urls(ARMS[1])
    # long enough to outlast the faults: the closed loop goes round the workload until they are over
    results: list[RunResult] = []
    while True:
        results.append(asyncio.run(run_workload(wl, urls, concurrency=16)))
        if not injector.is_alive():
            break
    injector.join()
    samples = [s for r in results for s in r.samples]
    # a failure is an exception (a non-200, an SSE error event, a cut connection) or a 200 stream
    # that ended without its usage chunk (incomplete)
    errors = Counter(s.error if s.error is not None else "incomplete" for s in samples if s.error is not None or s.prompt_tokens == 0)
    return FaultRun(len(samples), len(samples) - sum(errors.values()), sum(errors.values()), dict(errors), events, round(time.monotonic() - t0, 1))


# -- cost of the exchange -------------------------------------------------------------------------


async def lookup_cost(redis_url: str, rounds: int = 3000) -> dict[str, float]:
    """Added µs per lookup (p50 of interleaved calls on the same 64-block prompt, cached on four
    replicas, with one peer's load published): publishing this gateway's load, and not."""
    ns = f"bench-mg-{random.randrange(1 << 30)}"
    me, peer = RedisIndex(redis_url, namespace=ns), RedisIndex(redis_url, namespace=ns)
    rng = random.Random(5)
    tokens = [rng.randrange(50_000) for _ in range(64 * 16)]
    keys = block_keys(tokens, 16, model=MODEL)
    for r in range(4):
        ev = BlockStored(
            block_hashes=[rng.getrandbits(64) for _ in range(64)],
            parent_block_hash=None,
            token_ids=tokens,
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        await me.apply(f"r{r}", EventBatch(ts=0.0, events=[ev]), model=MODEL)
    load = json.dumps({f"r{i}": [3, 1200, 5000] for i in range(4)}).encode()
    await peer.lookup_shared([], model=MODEL, share=Share("peer", load, 60_000, 0))
    calls = {
        "lookup": lambda: me.lookup(keys, model=MODEL),
        "shared, load published": lambda: me.lookup_shared(keys, model=MODEL, share=Share("me", load, 60_000, 1000)),
        "shared, load unchanged": lambda: me.lookup_shared(keys, model=MODEL, share=Share("me", None, 60_000, 1000)),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        for i in range(rounds + 200):
            for name, call in calls.items():
                t = time.perf_counter()
                await call()
                if i >= 200:
                    times[name].append(time.perf_counter() - t)
        out = {f"{k} p50 µs": round(percentile([x * 1e6 for x in v], 50), 1) for k, v in times.items()}
        base = out["lookup p50 µs"]
        out["added p50 µs (published)"] = round(out["shared, load published p50 µs"] - base, 1)
        out["added p50 µs (unchanged)"] = round(out["shared, load unchanged p50 µs"] - base, 1)
        return out
    finally:
        async for key in me._redis.scan_iter(match=f"{ns}:*", count=1000):  # the benchmark owns this namespace
            await me._redis.unlink(key)
        await me.close()
        await peer.close()


# -- report -------------------------------------------------------------------------------------------


def markdown(figs: list[ArmFigures], fault: FaultRun | None, cost: dict[str, float], meta: dict[str, Any]) -> str:
    out = [f"# Several gateways on one Redis index ({meta['name']})", "", meta["description"], ""]
    out += [
        "| workload | arm | rounds | prefix-hit ratio, median (min-max) | per round | load spread max/min, median (min-max) | per round | TTFT p50 ms | TTFT p90 ms | errors |"
    ]
    out += ["|---|---|---|---|---|---|---|---|---|---|"]
    for f in figs:
        hr, ls = f.hit_ratio_rounds, f.load_spread_rounds
        out.append(
            f"| {f.workload} | {f.arm} | {f.rounds} | {f.hit_ratio:.1%} ({min(hr):.1%}-{max(hr):.1%}) | {', '.join(f'{x:.1%}' for x in hr)} | "
            f"{f.load_spread:.2f} ({min(ls):.2f}-{max(ls):.2f}) | {', '.join(f'{x:.2f}' for x in ls)} | {f.ttft_p50_ms:.0f} | {f.ttft_p90_ms:.0f} | {f.errors}/{f.requests} |"
        )
    out.append("")
    for wl in dict.fromkeys(f.workload for f in figs):
        one = next((f for f in figs if f.workload == wl and f.arm == ARMS[0]), None)
        two = next((f for f in figs if f.workload == wl and f.arm == ARMS[1]), None)
        if one and two:
            gap = (one.hit_ratio - two.hit_ratio) * 100
            ok = "meets" if gap <= 3 and two.load_spread <= 1.3 else "misses"
            out.append(
                f"- {wl}: two shared gateways are {gap:+.1f} points of hit ratio below one gateway, spread {two.load_spread:.2f} ({ok} the targets: ≤ 3 points, ≤ 1.3)"
            )
    if fault is not None:
        out += ["", "Faults under load (two shared gateways):", ""]
        out += [f"    {e}" for e in fault.events]
        out += ["", f"requests {fault.requests}, served OK {fault.ok}, lost {fault.lost} {fault.errors or ''} over {fault.wall_s} s"]
    if cost:
        out += ["", "Cost of the exchange per lookup (64-block prompt, in-process, p50 of interleaved calls):", ""]
        out += [f"- {k}: {v}" for k, v in cost.items()]
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_multi_gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workloads, two rounds, short fault holds")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 2)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=768)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: routing, faults, cost")
    ap.add_argument("--workloads", default="", help="comma-separated: shared-prefix, multi-turn (the default), no-reuse, long-doc-qa")
    ap.add_argument("--arms", default="", help="comma-separated subset of the arms by number: 1 one gateway, 2 two shared, 3 two not shared")
    ap.add_argument("--share-flush-ms", type=float, default=None, help="the gateways' index.share_flush_ms (default: the gateway's)")
    ap.add_argument("--name", default="", help="the report's file name under --out (default multi_gateway, or multi_gateway_quick)")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the Markdown report goes")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    rounds = args.rounds or (2 if args.quick else 3)
    setup = Setup(replicas=args.replicas, num_blocks=args.num_blocks, concurrency=args.concurrency)
    name = args.name or ("multi_gateway_quick" if args.quick else "multi_gateway")
    t0 = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    figs: list[ArmFigures] = []
    fault: FaultRun | None = None
    cost: dict[str, float] = {}
    if {"routing", "faults"} <= skip:  # the cost alone needs Redis only
        with tempfile.TemporaryDirectory() as tmp:
            redis = RedisProc(Path(tmp))
            redis.start()
            try:
                cost = asyncio.run(lookup_cost(redis.url, 1000 if args.quick else 3000))
            finally:
                redis.stop()
        print(markdown([], None, cost, {"name": "cost", "description": "the exchange's cost per lookup"}))
        return 0
    index_extra = {} if args.share_flush_ms is None else {"share_flush_ms": args.share_flush_ms}
    arms = tuple(ARMS[int(i) - 1] for i in args.arms.split(",")) if args.arms else ARMS
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), setup, index_extra) as stack:
        print(f"stack up: {setup.replicas} replicas, redis {stack.redis.url}, indexer, gateways {', '.join(f'{k} {g.url}' for k, g in stack.gateways.items())}")
        if "cost" not in skip:
            cost = asyncio.run(lookup_cost(stack.redis.url, 1000 if args.quick else 3000))
            print("exchange cost:", cost)
        if "routing" not in skip:
            wls = workloads(args.quick, [n for n in args.workloads.split(",") if n])
            figs, _ = routing(stack, wls, rounds, settle_s=2.5, arms_run=arms)
        if "faults" not in skip:
            fault = faults(stack, hold_s=2.0 if args.quick else 4.0, quick=args.quick)
            print(f"faults: {fault.requests} requests, lost {fault.lost} {fault.errors}")
    meta = {
        "name": name,
        "description": (
            f"{setup.replicas} simulated replicas (processes; {setup.num_blocks} KV blocks of 16 tokens), one redis-server, one kvgate indexer, "
            f"kvgate serve gateways on the Redis index (ingest off, default profile); closed loop at {setup.concurrency} sessions, the client "
            f"round-robining over the arm's gateways; {rounds} interleaved rounds, caches reset before each run. Hit ratio = cached / prompt "
            "tokens as the replicas report them; spread = max/min requests per replica after warm-up, every replica counted (inf: one "
            f"served nothing); medians over rounds. Load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end."
        ),
        "command": "python -m benchmarks.bench_multi_gateway" + (" --quick" if args.quick else ""),
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_at_start": load_at_start,
    }
    text = markdown(figs, fault, cost, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    data = {"meta": meta, "routing": [asdict(f) for f in figs], "faults": asdict(fault) if fault else None, "cost": cost}
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=2))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    lost = fault.lost if fault else 0
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
