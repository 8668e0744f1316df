"""``kvgate bench``: the same workloads through the gateway under each routing policy, and direct.

For every (workload, policy) pair a fresh fleet of simulated replicas (each in its own process,
caches small enough to feel pressure) and a fresh gateway process with that policy as its
default profile are started, so no policy inherits another's warm caches. "direct" is the
client round-robining straight over the replicas with no gateway at all. Results go to
``benchmarks/results/`` as Markdown, JSON and PNG plots.

    kvgate bench            # the full comparison (a few minutes on 2 cores)
    kvgate bench --quick    # a reduced one (under two minutes)
    kvgate bench --scenarios multi-gateway,restart,eviction [--quick]   # precise vs approximate (bench_scenarios)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulator.fleet import SimConfig, SimFleet

from .envoy_stack import free_port as free_port  # (bench_pd imports it from here)
from .procports import wait_listening
from .report import Summary, summarize, write_results
from .workloads import MODEL, WORKLOADS, RunResult, Workload, run_workload

ALL_POLICIES = [
    "direct",
    "round-robin",
    "random",
    "least-loaded",
    "approx-prefix",
    "precise-prefix",
    "precise-prefix+load",
    "estimated-ttft",
    "llm-d",
    "default",
]
QUICK_POLICIES = ["direct", "round-robin", "precise-prefix", "default"]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    replicas: int = 4
    num_blocks: int = 768
    time_scale: float = 1.0
    concurrency: int = 32
    extra: dict | None = None  # extra gateway config (e.g. custom scheduling profiles)


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            WORKLOADS["shared-prefix"](num_prompts_per_group=10),
            WORKLOADS["multi-turn"](num_sessions=24, turns=6),
        ]
    return [
        WORKLOADS["shared-prefix"](),
        WORKLOADS["multi-turn"](),
        WORKLOADS["long-doc-qa"](),
        WORKLOADS["no-reuse"](),
    ]


class GatewayProcess:
    """`kvgate serve` in its own process, in front of a fleet, with one default profile. It
    listens on port 0 (a free port it binds itself), read back from /proc once it listens."""

    def __init__(self, handles, policy: str, tmp: Path, extra: dict | None = None, workers: int = 1) -> None:
        self.policy = policy
        self.workers = workers
        self.log = tmp / f"gw-{policy}.log"
        cfg = {
            "replicas": [
                {"id": f"r{i}", "url": h.url, "role": h.config.role, "models": [MODEL], "kv_events": h.events_endpoint, "replay": h.replay_endpoint}
                for i, h in enumerate(handles)
            ],
            "models": {MODEL: {"tokenizer": "demo"}},
            "scheduling": {"default_profile": policy},
            "debug_headers": True,
            "scrape": {"interval_s": 0.5},
            "health": {"interval_s": 1.0},
            **(extra or {}),
        }
        if extra and "scheduling" in extra:
            cfg["scheduling"] = {**extra["scheduling"], "default_profile": policy}
        self.port = 0
        path = tmp / f"gw-{policy}.yaml"
        path.write_text(json.dumps({**cfg, "listen": {"host": "127.0.0.1", "port": 0}}))
        if not self._start(path):
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gateway ({policy}) did not become ready; its log ends with:\n{tail}")

    def _start(self, config: Path) -> bool:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", *(["--workers", str(self.workers)] if self.workers > 1 else []), "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ},
            )
        deadline = time.monotonic() + 30
        try:
            self.port = wait_listening(self.proc, timeout=30)
        except RuntimeError:
            self.stop()
            return False
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/ready", timeout=0.5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def warmup_requests(workload: Workload, setup: Setup, rate: float | None) -> int:
    """Requests left out of the figures while caches fill: two rounds of the closed loop's
    sessions (or two seconds of open-loop arrivals), at most a fifth of the run."""
    wanted = int(2 * rate) if rate else 2 * setup.concurrency
    return min(wanted, workload.requests // 5)


def start_fleet(setup: Setup) -> SimFleet:
    """Fresh simulated replicas, one process each, on ports they bind themselves (port 0)."""
    fleet = SimFleet(
        [SimConfig(model=MODEL, seed=i, time_scale=setup.time_scale, num_blocks=setup.num_blocks) for i in range(setup.replicas)],
        mode="process",
    )
    fleet.start()  # (stops what it started if one replica fails)
    return fleet


def run_one(setup: Setup, workload: Workload, policy: str, tmp: Path, on_done, rate: float | None = None) -> RunResult:
    """One fresh fleet and gateway, one workload, one policy."""
    fleet = start_fleet(setup)
    gw = None
    try:
        if policy == "direct":
            urls = [h.url for h in fleet.handles]
        else:
            gw = GatewayProcess(fleet.handles, policy, tmp, extra=setup.extra)
            urls = [gw.url]
        return asyncio.run(
            run_workload(
                workload, urls, concurrency=None if rate else setup.concurrency, rate=rate, on_done=on_done, warmup=warmup_requests(workload, setup, rate)
            )
        )
    finally:
        if gw is not None:
            gw.stop()
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if any(a == "--scenarios" or a.startswith("--scenarios=") for a in args_in):  # precise vs approximate: its own harness
        from .bench_scenarios import main as scenarios_main

        return scenarios_main(args_in)
    ap = argparse.ArgumentParser(prog="kvgate bench", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scenarios",
        metavar="multi-gateway,restart,eviction",
        help="instead of the policy comparison: precise vs approximate routing where approximate cannot see (benchmarks.bench_scenarios; its own options)",
    )
    ap.add_argument("--quick", action="store_true", help="reduced comparison, under two minutes")
    ap.add_argument("--policies", help="comma-separated subset of: " + ", ".join(ALL_POLICIES))
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(WORKLOADS))
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=768, help="KV blocks per simulated replica: about a third of each workload's working set")
    ap.add_argument("--time-scale", type=float, default=1.0, help="simulated GPU time multiplier (1 = H100-like)")
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop sessions in flight")
    ap.add_argument("--no-sweep", action="store_true", help="skip the throughput-vs-rate sweep")
    ap.add_argument("--scheduling", type=Path, help="YAML with a `scheduling:` section (custom profiles to compare by name)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(args_in)
    extra = None
    custom: list[str] = []
    if args.scheduling:
        import yaml

        sched = (yaml.safe_load(args.scheduling.read_text()) or {}).get("scheduling", {})
        extra = {"scheduling": sched}
        custom = list((sched.get("profiles") or {}).keys())
    setup = Setup(args.replicas, args.num_blocks, args.time_scale, args.concurrency, extra)
    policies = args.policies.split(",") if args.policies else (QUICK_POLICIES if args.quick else ALL_POLICIES)
    unknown = [p for p in policies if p not in ALL_POLICIES + custom]
    if unknown:
        print(f"kvgate bench: unknown policies {unknown}", file=sys.stderr)
        return 2
    wls = workloads(args.quick)
    if args.workloads:
        wanted = args.workloads.split(",")
        wls = [w for w in wls if w.name in wanted]
    # round-robin saturates near 22 requests/s on the default fleet; cache-aware routing does not
    sweep_rates = [] if args.no_sweep else ([20.0, 40.0] if args.quick else [10.0, 20.0, 30.0, 45.0])
    sweep_policies = [p for p in ("round-robin", "precise-prefix", "default") if p in policies]
    sweep_wl = WORKLOADS["shared-prefix"](num_prompts_per_group=6 if args.quick else 10, seed=9)
    total = sum(w.requests for w in wls) * len(policies) + sweep_wl.requests * len(sweep_rates) * len(sweep_policies)
    summaries: list[Summary] = []
    runs: dict[tuple[str, str], RunResult] = {}
    sweep: list[dict] = []
    t0 = time.perf_counter()
    console = Console()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress,
    ):
        task = progress.add_task("benchmark", total=total)
        for wl in wls:
            for policy in policies:
                progress.update(task, description=f"{wl.name} · {policy}")
                run = run_one(setup, wl, policy, Path(tmp), lambda: progress.advance(task))
                runs[(wl.name, policy)] = run
                summaries.append(summarize(wl.name, policy, run))
        for rate in sweep_rates:
            for policy in sweep_policies:
                progress.update(task, description=f"sweep {rate:g}/s · {policy}")
                run = run_one(setup, sweep_wl, policy, Path(tmp), lambda: progress.advance(task), rate=rate)
                s = summarize("sweep", policy, run)
                sweep.append({"policy": policy, "rate": rate, "throughput_tok_s": s.throughput_tok_s, "ttft_p90_ms": s.ttft_p90_ms, "hit_ratio": s.hit_ratio})
    name = "quick" if args.quick else "full"
    meta = {
        "description": (
            f"{setup.replicas} simulated replicas (time scale {setup.time_scale}, {setup.num_blocks} KV blocks of 16 tokens each), "
            f"closed loop at {setup.concurrency} sessions; fresh fleet and gateway per run; "
            "hit ratio = cached / prompt tokens as reported by the replicas; load spread = max/min requests per replica."
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": "kvgate bench" + (" --quick" if args.quick else ""),
    }
    files = write_results(args.out, name, summaries, runs, sweep, meta)
    console.print((args.out / f"{name}.md").read_text())
    console.print(f"wrote {', '.join(str(f) for f in files)} in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
