"""What a request costs through kvgate and through the peer routers, on the same simulated fleet.

Users choose a gateway by what it costs per request: latency and throughput on the same replicas,
prefix-cache hits, and the CPU the gateway itself burns. This runs ``kvgate serve`` (``default``
profile, ``round-robin`` as the control) and, when installed (``pip install -e '.[peers]'``), the
two Rust routers, sglang-router (``cache_aware``) and vllm-router (``round_robin``, ``cache_aware``,
and ``kv_aware`` fed by the replicas' KV events), each in its own process in front of a **fresh**
fleet of simulated replicas (4 processes, 768 KV blocks each) per (router, workload, round), so no
router inherits warm caches.

Two sections:

* **closed loop**: the shared-prefix, multi-turn and long-doc-qa workloads (benchmarks/workloads.py)
  as streaming chat from 32 sessions at a time, replicas at time scale 1 (H100-like). Per run:
  TTFT p50/p90, ITL p50 and throughput after the warm-up (benchmarks/report.py), the prefix-hit
  ratio and load spread from the replicas' own counters (``vllm:prefix_cache_hits_total`` /
  ``queries_total``, ``vllm:request_success_total``, read before and after: the peers set no
  replica header), and each router's CPU time (utime + stime of its process tree from /proc, before
  and after the run): cores = CPU s / wall s, CPU ms per request.
* **instant**: replicas at time scale 0 (they answer as fast as Python can), 32 non-streaming chat
  requests in flight, the workload's first turns: requests/s through each router and straight to
  the replicas (the client round-robins them: "direct", the ratio's baseline), and router CPU per
  request over the measured requests.

Rounds are interleaved (round 1: every router, round 2: every router, ...) with the routers' order
rotated each round, so every router sees the same drift of a shared machine; tables give the median
over rounds and the range (min–max).

    python -m benchmarks.bench_peers              # both sections, 3 rounds -> benchmarks/results/peers.{md,json}
    python -m benchmarks.bench_peers --instant    # the instant section only (merged into peers.*)
    python -m benchmarks.bench_peers --quick      # a smoke run: small workloads, 1 round, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from simulator.fleet import SimFleet, SimHandle

from .compare import GatewayProcess, Setup, start_fleet, warmup_requests
from .cpucap import CpuCap, children
from .cpucap import available as cpucap_available
from .envoy_stack import free_port
from .procports import listening_ports
from .report import percentile, summarize
from .workloads import MODEL, WORKLOADS, RunResult, Workload, run_workload

RESULTS = Path(__file__).resolve().parent / "results"

#: routers compared by default, as ``kind:policy`` (``direct`` has no router)
DEFAULT_ROUTERS = ["kvgate:default", "kvgate:round-robin", "sglang:cache_aware", "vllm:round_robin", "vllm:cache_aware", "vllm:kv_aware"]
INSTANT_EXTRA = ["direct"]
#: GatewayProcess scrapes and probes the replicas twice as often as kvgate does by default and adds
#: debug headers; here kvgate runs with its defaults, as the peers do
KVGATE_DEFAULTS: dict[str, Any] = {"scrape": {}, "health": {}, "debug_headers": False}
PEER_MODULES = {"sglang": ("sglang_router", "sglang-router"), "vllm": ("vllm_router", "vllm-router")}


# -- routers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """One configuration under test: ``kind`` is kvgate, sglang, vllm or direct."""

    kind: str
    policy: str = ""
    #: kvgate only: ``kvgate serve --workers N`` (``kvgate:default@2``)
    workers: int = 1

    @property
    def name(self) -> str:
        if self.kind == "direct":
            return "direct"
        label = {"kvgate": "kvgate", "sglang": "sglang-router", "vllm": "vllm-router"}[self.kind]
        return f"{label} {self.policy}" + (f" ×{self.workers} workers" if self.workers > 1 else "")

    @property
    def key(self) -> str:
        return self.kind if self.kind == "direct" else f"{self.kind}:{self.policy}" + (f"@{self.workers}" if self.workers > 1 else "")

    def available(self) -> bool:
        if self.kind in PEER_MODULES:
            return importlib.util.find_spec(PEER_MODULES[self.kind][0]) is not None
        return True

    @classmethod
    def parse(cls, key: str) -> RouterSpec:
        kind, _, policy = key.partition(":")
        if kind == "direct" and not policy:
            return cls("direct")
        if kind not in ("kvgate", "sglang", "vllm") or not policy:
            raise ValueError(f"router {key!r}: expected direct or kvgate|sglang|vllm:POLICY")
        policy, at, workers = policy.partition("@")
        if at and (kind != "kvgate" or not workers.isdigit() or int(workers) < 1):
            raise ValueError(f"router {key!r}: @N (workers) is for kvgate only, N >= 1")
        return cls(kind, policy, int(workers) if at else 1)


def peer_command(spec: RouterSpec, handles: list[SimHandle], port: int, metrics_port: int) -> list[str]:
    """The peer's command line: its defaults, plus what this fleet needs (workers, policy, where
    to listen; for vllm-router's kv_aware, each replica's KV-event and replay endpoints)."""
    urls = [h.url for h in handles]
    listen = ["--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if spec.kind == "sglang":
        return [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--policy", spec.policy, *listen]
    cmd = [sys.executable, "-m", "vllm_router.launch_router", "--worker-urls", *urls, "--policy", spec.policy, *listen]
    if spec.policy == "kv_aware":
        for h in handles:
            cmd += ["--kv-event-source", f"{h.url}={h.events_endpoint}"]
            if h.replay_endpoint:
                cmd += ["--kv-event-replay-source", f"{h.url}={h.replay_endpoint}"]
        cmd += ["--kv-event-block-size", str(handles[0].config.block_size), "--kv-event-model", MODEL]
    return cmd


class PeerProcess:
    """A Rust router in its own process, ready once ``/readiness`` says so.

    Both peers refuse port 0 for ``--port`` and ``--prometheus-port`` ("Port must be > 0"), so
    here, and only here, the ports are probed free beforehand (bind-probe); the port can be lost
    to another process before the router binds it, so a router that exits while starting is
    started again on fresh ports (three tries), and the port it serves on is checked to be its own
    (from /proc) before it is used."""

    def __init__(self, spec: RouterSpec, handles: list[SimHandle], tmp: Path) -> None:
        self.spec = spec
        self.log = tmp / f"{spec.kind}-{spec.policy}.log"
        last = ""
        for _ in range(3):
            self.port, self.metrics_port = free_port(), free_port()
            self.command = peer_command(spec, handles, self.port, self.metrics_port)
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
            if self._wait_ready(30.0):
                return
            self.stop()
            last = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{spec.name} did not become ready; its log ends with:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.port in listening_ports(self.proc.pid):
                try:
                    if httpx.get(f"{self.url}/readiness", timeout=1).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Running:
    """A started router (or none, for direct): where to send requests, whose CPU to count."""

    url: str | None
    pid: int | None
    command: list[str]
    stop: Callable[[], None]
    metrics: Callable[[], str] = lambda: ""


def kvgate_command(gw: GatewayProcess) -> list[str]:
    """``kvgate serve``'s command line, its config file shown inline (the replicas summarized)."""
    args = [str(a) for a in gw.proc.args] if isinstance(gw.proc.args, list) else [str(gw.proc.args)]
    path = Path(args[-1])
    cfg = json.loads(path.read_text())
    cfg["replicas"] = f"<{len(cfg['replicas'])} replicas: id, url, role, models, kv_events, replay>"
    return [*args[:-1], path.name, "#", f"{path.name}:", json.dumps(cfg, separators=(",", ":"))]


def start_router(spec: RouterSpec, handles: list[SimHandle], tmp: Path, cpu_cap: float | None = None) -> Running:
    """``cpu_cap``: every process that serves (each kvgate worker; a peer router's one process)
    is held to that many cores, in a cgroup of its own (``benchmarks/cpucap.py``)."""
    if spec.kind == "direct":
        return Running(None, None, [], lambda: None)
    if spec.kind == "kvgate":
        gw = GatewayProcess(handles, spec.policy, tmp, extra=KVGATE_DEFAULTS, workers=spec.workers)
        running = Running(gw.url, gw.proc.pid, kvgate_command(gw), gw.stop)
    else:
        peer = PeerProcess(spec, handles, tmp)
        running = Running(peer.url, peer.proc.pid, peer.command, peer.stop, peer.metrics)
    if cpu_cap:
        try:
            cap = capped(running.pid, spec, cpu_cap)
        except BaseException:
            running.stop()
            raise
        stop = running.stop

        def stop_and_release() -> None:
            try:
                stop()
            finally:
                cap.release()

        running.stop = stop_and_release
    return running


def capped(pid: int | None, spec: RouterSpec, cores: float) -> CpuCap:
    """The cap on a started router's serving processes: kvgate ``--workers N``'s N workers (the
    supervisor only watches them), else the router's own process."""
    assert pid is not None
    if spec.kind == "kvgate" and spec.workers > 1:
        workers = [c for c in children(pid) if b"resource_tracker" not in _cmdline(c)]
        if len(workers) != spec.workers:
            raise RuntimeError(f"expected {spec.workers} kvgate workers under pid {pid}, found {workers}")
    else:
        workers = [pid]
    cap = CpuCap(cores)
    try:
        for w in workers:
            cap.add(w)
    except BaseException:
        cap.release()
        raise
    return cap


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# -- what is measured ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every process below it, from /proc: live
    processes' own time plus what their reaped children used (cutime/cstime)."""
    procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        procs[int(entry)] = (int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))
    if root not in procs:
        return 0.0
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += procs[pid][1]
        todo.extend(p for p, (ppid, _) in procs.items() if ppid == pid)
    return total / _TICK


def fleet_pids(fleet: SimFleet) -> list[int]:
    # SimFleet (process mode) keeps its replicas' Popen objects in _procs; it has no public accessor
    return [p.pid for p in getattr(fleet, "_procs", []) if p is not None]


def replica_counters(handles: list[SimHandle]) -> list[dict[str, float]]:
    """Each replica's prefix-cache and finished-request counters (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:request_success_total")
    out = []
    for h in handles:
        row = dict.fromkeys(wanted, 0.0)
        for fam in text_string_to_metric_families(httpx.get(f"{h.url}/metrics", timeout=10).text):
            for s in fam.samples:
                if s.name in row:
                    row[s.name] += s.value
        out.append(row)
    return out


def counter_deltas(before: list[dict[str, float]], after: list[dict[str, float]]) -> tuple[float, float]:
    """(prefix-hit ratio, load spread max/min finished requests per replica) over a run."""
    hits = sum(a["vllm:prefix_cache_hits_total"] - b["vllm:prefix_cache_hits_total"] for a, b in zip(after, before, strict=True))
    queries = sum(a["vllm:prefix_cache_queries_total"] - b["vllm:prefix_cache_queries_total"] for a, b in zip(after, before, strict=True))
    done = [a["vllm:request_success_total"] - b["vllm:request_success_total"] for a, b in zip(after, before, strict=True)]
    return (hits / queries if queries else 0.0), (max(done) / max(1.0, min(done)) if done else float("nan"))


#: peer router counters kept with each run (vllm-router: how it got token ids, routing outcomes)
PEER_COUNTERS = ("vllm_router_kv_routing_inputs_total", "vllm_router_prefix_routing_decisions_total", "smg_worker_selection_total")


def peer_counters(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in PEER_COUNTERS:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("worker", "model"))
                    key = f"{s.name}{{{labels}}}"
                    out[key] = out.get(key, 0.0) + s.value
    except ValueError:
        pass
    return out


@dataclass
class Record:
    """One run: one router, one workload, one round, on a fresh fleet."""

    section: str  # closed | instant
    workload: str
    router: str
    key: str
    round: int
    requests: int = 0  # measured (closed loop: every request, warm-up included)
    sent: int = 0  # every request the router saw, warm-up included
    errors: int = 0
    ttft_p50_ms: float = float("nan")
    ttft_p90_ms: float = float("nan")
    itl_p50_ms: float = float("nan")
    latency_p50_ms: float = float("nan")
    req_s: float = float("nan")
    tok_s: float = float("nan")
    hit_ratio: float = float("nan")
    hit_ratio_client: float = float("nan")
    load_spread: float = float("nan")
    wall_s: float = 0.0
    router_cpu_s: float = 0.0
    router_cores: float = 0.0
    router_cpu_ms_per_req: float = 0.0
    replica_cpu_ms_per_req: float = 0.0
    peer_counters: dict[str, float] = field(default_factory=dict)
    failed: str | None = None


def token_calls(rec: Record) -> dict[str, float]:
    """vllm-router's calls to a worker for token ids (render, or /tokenize without it) per request."""
    out: dict[str, float] = {}
    for key, value in rec.peer_counters.items():
        if key.startswith("vllm_router_kv_routing_inputs_total{") and "result=" in key:
            result = key.split("result=", 1)[1].split(",")[0].rstrip("}")
            out[result] = out.get(result, 0.0) + value / rec.sent
    return out


def _measured_rate(run: RunResult) -> float:
    """Successful requests per second over the measured window (first measured start to last end)."""
    measured = run.measured()
    ok = [s for s in measured if s.error is None]
    if not measured:
        return 0.0
    window = max(s.start + s.e2e for s in measured) - min(s.start for s in measured)
    return len(ok) / window if window > 0 else 0.0


# -- closed loop ---------------------------------------------------------------------------------


def closed_run(spec: RouterSpec, workload: Workload, setup: Setup, tmp: Path, rnd: int, commands: dict[str, list[str]], cpu_cap: float | None = None) -> Record:
    rec = Record("closed", workload.name, spec.name, spec.key, rnd)
    fleet = start_fleet(setup)
    router: Running | None = None
    try:
        router = start_router(spec, fleet.handles, tmp, cpu_cap)
        if router.command:
            commands.setdefault(spec.key, router.command)
        urls = [router.url] if router.url else [h.url for h in fleet.handles]
        sims = fleet_pids(fleet)
        before = replica_counters(fleet.handles)
        cpu0 = tree_cpu_seconds(router.pid) if router.pid else 0.0
        sim0 = sum(tree_cpu_seconds(p) for p in sims)
        run = asyncio.run(run_workload(workload, urls, concurrency=setup.concurrency, warmup=warmup_requests(workload, setup, None)))
        cpu1 = tree_cpu_seconds(router.pid) if router.pid else 0.0
        sim1 = sum(tree_cpu_seconds(p) for p in sims)
        after = replica_counters(fleet.handles)
        rec.peer_counters = peer_counters(router.metrics())
        s = summarize(workload.name, spec.name, run)
        rec.requests, rec.errors, rec.sent = s.requests, s.errors, len(run.samples)
        rec.ttft_p50_ms, rec.ttft_p90_ms, rec.itl_p50_ms, rec.tok_s = s.ttft_p50_ms, s.ttft_p90_ms, s.itl_p50_ms, s.throughput_tok_s
        rec.hit_ratio_client = s.hit_ratio
        rec.req_s = _measured_rate(run)
        rec.hit_ratio, rec.load_spread = counter_deltas(before, after)
        _cpu(rec, cpu1 - cpu0, sim1 - sim0, run.wall_s, len(run.samples))
    except Exception as exc:  # one router failing must not lose the others' results
        rec.failed = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        if router is not None:
            router.stop()
        fleet.stop()
    return rec


def _cpu(rec: Record, cpu_s: float, sim_s: float, wall_s: float, requests: int) -> None:
    rec.wall_s = wall_s
    rec.router_cpu_s = cpu_s
    rec.router_cores = cpu_s / wall_s if wall_s > 0 else 0.0
    rec.router_cpu_ms_per_req = 1000 * cpu_s / requests if requests else 0.0
    rec.replica_cpu_ms_per_req = 1000 * sim_s / requests if requests else 0.0


# -- instant replicas ----------------------------------------------------------------------------


def instant_bodies(workload: Workload) -> list[dict[str, Any]]:
    """Non-streaming chat bodies: each session's first turn (system prompt + first question)."""
    return [
        {"model": MODEL, "messages": [{"role": "system", "content": s.system}, {"role": "user", "content": s.questions[0]}], "max_tokens": s.max_tokens}
        for s in workload.sessions
    ]


async def closed_load(urls: list[str], bodies: list[dict[str, Any]], n: int, concurrency: int, start: int = 0) -> tuple[list[float], int, float]:
    """``n`` requests, ``concurrency`` at a time (aiohttp, so the client stays cheap); with several
    urls the client round-robins them. Returns (latencies of the good ones, errors, wall s)."""
    import aiohttp

    lat: list[float] = []
    errors = 0
    todo = iter(range(start, start + n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            nonlocal errors
            for i in todo:
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=bodies[i % len(bodies)]) as r:
                        await r.read()
                        ok = r.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, errors, time.perf_counter() - t0


def instant_run(
    spec: RouterSpec, bodies: list[dict[str, Any]], n: int, setup: Setup, tmp: Path, rnd: int, commands: dict[str, list[str]], cpu_cap: float | None = None
) -> Record:
    rec = Record("instant", "instant", spec.name, spec.key, rnd)
    fleet = start_fleet(setup)
    router: Running | None = None
    try:
        router = start_router(spec, fleet.handles, tmp, cpu_cap)
        if router.command:
            commands.setdefault(spec.key, router.command)
        urls = [router.url] if router.url else [h.url for h in fleet.handles]
        warm = min(2 * setup.concurrency, max(1, n // 5))
        _, werr, _ = asyncio.run(closed_load(urls, bodies, warm, setup.concurrency))
        if werr == warm:
            raise RuntimeError(f"every warm-up request failed through {spec.name}")
        sims = fleet_pids(fleet)
        before = replica_counters(fleet.handles)
        cpu0 = tree_cpu_seconds(router.pid) if router.pid else 0.0
        sim0 = sum(tree_cpu_seconds(p) for p in sims)
        lat, errors, wall = asyncio.run(closed_load(urls, bodies, n, setup.concurrency, start=warm))
        cpu1 = tree_cpu_seconds(router.pid) if router.pid else 0.0
        sim1 = sum(tree_cpu_seconds(p) for p in sims)
        after = replica_counters(fleet.handles)
        rec.peer_counters = peer_counters(router.metrics())
        rec.requests, rec.errors, rec.sent = n, errors, warm + n
        rec.req_s = len(lat) / wall if wall > 0 else 0.0
        rec.latency_p50_ms = percentile([x * 1000 for x in lat], 50)
        rec.hit_ratio, rec.load_spread = counter_deltas(before, after)
        _cpu(rec, cpu1 - cpu0, sim1 - sim0, wall, n)
    except Exception as exc:
        rec.failed = f"{type(exc).__name__}: {str(exc)[:500]}"
    finally:
        if router is not None:
            router.stop()
        fleet.stop()
    return rec


# -- rounds --------------------------------------------------------------------------------------


def rotated(items: list[RouterSpec], rnd: int) -> list[RouterSpec]:
    k = rnd % len(items) if items else 0
    return items[k:] + items[:k]


def plan(
    routers: list[RouterSpec], workloads: list[Workload], rounds: int, instant: list[RouterSpec]
) -> Iterator[tuple[int, str, Workload | None, RouterSpec]]:
    """Round by round: every (workload, router) of the closed loop, then every instant router;
    the routers' order rotates by one each round."""
    for rnd in range(rounds):
        for wl in workloads:
            for spec in rotated(routers, rnd):
                yield rnd, "closed", wl, spec
        for spec in rotated(instant, rnd):
            yield rnd, "instant", None, spec


def run_all(
    routers: list[RouterSpec],
    workloads: list[Workload],
    setup: Setup,
    *,
    rounds: int = 1,
    instant: list[RouterSpec] | None = None,
    instant_setup: Setup | None = None,
    instant_requests: int = 1000,
    instant_workload: Workload | None = None,
    on_run: Callable[[Record], None] | None = None,
    cpu_cap: float | None = None,
) -> tuple[list[Record], dict[str, list[str]]]:
    """Every run of the plan, in order; returns the records and each router's command line."""
    records: list[Record] = []
    commands: dict[str, list[str]] = {}
    bodies = instant_bodies(instant_workload or WORKLOADS["shared-prefix"]())
    isetup = instant_setup or Setup(setup.replicas, setup.num_blocks, 0.0, setup.concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for rnd, section, wl, spec in plan(routers, workloads, rounds, instant or []):
            if section == "closed":
                assert wl is not None
                rec = closed_run(spec, wl, setup, Path(tmp), rnd, commands, cpu_cap)
            else:
                rec = instant_run(spec, bodies, instant_requests, isetup, Path(tmp), rnd, commands, cpu_cap)
            records.append(rec)
            if on_run:
                on_run(rec)
    return records, commands


# -- summaries -----------------------------------------------------------------------------------

#: (field, header, format) per section, in table order
CLOSED_COLUMNS = [
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("req_s", "req/s", "{:.1f}"),
    ("tok_s", "output tok/s", "{:.0f}"),
    ("hit_ratio", "prefix-hit ratio", "{:.0%}"),
    ("load_spread", "load spread", "{:.2f}"),
    ("router_cores", "router cores", "{:.2f}"),
    ("router_cpu_ms_per_req", "router CPU ms/req", "{:.2f}"),
    ("replica_cpu_ms_per_req", "replica CPU ms/req", "{:.1f}"),
]
INSTANT_COLUMNS = [
    ("req_s", "req/s", "{:.0f}"),
    ("vs_direct", "req/s vs direct", "{:.2f}"),
    ("latency_p50_ms", "latency p50 ms", "{:.1f}"),
    ("router_cores", "router cores", "{:.2f}"),
    ("router_cpu_ms_per_req", "router CPU ms/req", "{:.2f}"),
    ("replica_cpu_ms_per_req", "replica CPU ms/req", "{:.2f}"),
]


def summarize_records(records: list[Record]) -> list[dict[str, Any]]:
    """Median and range over rounds per (section, workload, router), in first-seen order. The
    instant section's ``vs_direct`` is each round's req/s over direct's in the same round."""
    direct = {(r.section, r.workload, r.round): r.req_s for r in records if r.key == "direct" and r.failed is None}
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.section, r.workload, r.key), []).append(r)
    out = []
    for (section, workload, key), rs in groups.items():
        ok = [r for r in rs if r.failed is None]
        row: dict[str, Any] = {
            "section": section,
            "workload": workload,
            "router": rs[0].router,
            "key": key,
            "rounds": len(ok),
            "failed": [r.failed for r in rs if r.failed],
            "requests": sum(r.requests for r in ok),
            "errors": sum(r.errors for r in ok),
        }
        calls = [token_calls(r) for r in ok if r.sent]
        row["token_id_calls_per_req"] = {k: statistics.median(c.get(k, 0.0) for c in calls) for k in sorted({k for c in calls for k in c})}
        cols = CLOSED_COLUMNS if section == "closed" else INSTANT_COLUMNS
        for name, _, _ in cols:
            if name == "vs_direct":
                xs = [r.req_s / direct[(section, workload, r.round)] for r in ok if direct.get((section, workload, r.round))]
            else:
                xs = [getattr(r, name) for r in ok]
            xs = [x for x in xs if x == x]  # no NaN
            row[name] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None
        out.append(row)
    return out


def _cell(stat: dict[str, float] | None, fmt: str) -> str:
    if not stat:
        return "-"
    med = fmt.format(stat["median"])
    if stat["min"] == stat["max"]:
        return med
    return f"{med} ({fmt.format(stat['min'])}–{fmt.format(stat['max'])})"


def _sections(summary: list[dict[str, Any]]) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    for section in ("closed", "instant"):
        rows = [r for r in summary if r["section"] == section]
        for wl in dict.fromkeys(r["workload"] for r in rows):
            yield section, wl, [r for r in rows if r["workload"] == wl]


def _row_cells(row: dict[str, Any]) -> list[str]:
    cols = CLOSED_COLUMNS if row["section"] == "closed" else INSTANT_COLUMNS
    if row["failed"] and not row["rounds"]:
        return [row["router"], "failed: " + row["failed"][0][:80]] + [""] * (len(cols))
    return [row["router"], *(_cell(row[name], fmt) for name, _, fmt in cols), str(row["errors"])]


def _headers(section: str) -> list[str]:
    cols = CLOSED_COLUMNS if section == "closed" else INSTANT_COLUMNS
    return ["router", *(h for _, h, _ in cols), "errors"]


def _title(section: str, wl: str) -> str:
    return f"closed loop · {wl}" if section == "closed" else "instant replicas (time scale 0, non-streaming)"


def print_tables(summary: list[dict[str, Any]], console: Console) -> None:
    for section, wl, rows in _sections(summary):
        table = Table(title=_title(section, wl) + " — median (min–max) over rounds")
        for h in _headers(section):
            table.add_column(h, justify="left" if h == "router" else "right")
        for row in rows:
            table.add_row(*_row_cells(row))
        console.print(table)


READING = (
    "TTFT and ITL are measured by the client (one Python process reading every stream). An ITL p50 below ~1 ms means tokens reached "
    "the client in bursts: on 2 shared cores that happens in the fastest runs, when client, replicas and router together saturate the "
    "machine, whichever router runs (the decode step is ~7.5 ms). Router CPU ms/req is what to compare the routers' cost on."
)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        "# Peer benchmark: kvgate vs sglang-router vs vllm-router",
        "",
        f"Command: `{meta['command']}`. {meta['description']}",
        "",
        f"Machine: {meta['machine']}. Peers: {meta['peers']}. Replicas' render endpoints: {meta['render']}.",
        "",
    ]
    for section, wl, rows in _sections(result["summary"]):
        head = "### " + (
            wl if section == "closed" else "instant replicas (time scale 0, c=32, non-streaming chat; direct = client round-robin over the replicas)"
        )
        if section == "closed" and not any(line.startswith("## Closed") for line in out):
            out += [f"## Closed loop: streaming chat, {meta['concurrency']} sessions, replicas at time scale {meta['time_scale']}", "", READING, ""]
        if section == "instant":
            out += ["## Instant replicas", ""]
        out += [head, "", "| " + " | ".join(_headers(section)) + " |", "|" + "---|" * len(_headers(section))]
        out += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
        out.append("")
    notes = []
    for row in result["summary"]:
        calls = row.get("token_id_calls_per_req") or {}
        if calls:
            what = ", ".join(f"{v:.3g} {k}" for k, v in calls.items() if v >= 0.005)
            notes.append(f"- {row['router']} ({row['workload']}): calls to workers for token ids per request (`vllm_router_kv_routing_inputs_total`): {what}")
    if notes:
        out += ["## Notes", "", *notes, ""]
    out += ["## Command lines", ""]
    for key, cmd in result["commands"].items():
        out.append(f"- `{key}`: `{' '.join(cmd)}`")
    out.append("")
    return "\n".join(out)


def merge(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Keep the sections of an earlier ``peers.json`` that this run did not measure (``--instant``
    alone refreshes the instant table and leaves the closed-loop one)."""
    if not path.exists():
        return result
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return result
    ran = {r["section"] for r in result["summary"]}
    kept = [r for r in old.get("summary", []) if r["section"] not in ran]
    if not kept:
        return result
    return {
        **result,
        "summary": kept + result["summary"],
        "records": [r for r in old.get("records", []) if r["section"] not in ran] + result["records"],
        "commands": {**old.get("commands", {}), **result["commands"]},
        "meta": {**result["meta"], "earlier": old.get("meta")},
    }


def write_results(out_dir: Path, name: str, result: dict[str, Any]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    result = merge(js, result)
    js.write_text(json.dumps(result, indent=2))
    md.write_text(markdown(result))
    return [md, js]


def peer_versions() -> str:
    out = []
    for _module, dist in PEER_MODULES.values():
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)


def render_available(setup: Setup) -> str:
    """Whether the simulator serves vLLM's /v1/chat/completions/render (vllm-router's cache_aware
    and kv_aware ask a worker for token ids there, and fall back to /tokenize without it)."""
    fleet = start_fleet(Setup(1, setup.num_blocks, 0.0, 1))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        status = httpx.post(f"{fleet.handles[0].url}/v1/chat/completions/render", json=body, timeout=10).status_code
        return "yes" if status == 200 else f"no (HTTP {status}; vllm-router falls back to /tokenize)"
    finally:
        fleet.stop()


def build_result(records: list[Record], commands: dict[str, list[str]], meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "summary": summarize_records(records), "records": [asdict(r) for r in records], "commands": commands}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_peers", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and ranges over them)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: a small shared-prefix workload and 150 instant requests, 1 round; prints, writes only with --out"
    )
    ap.add_argument("--instant", action="store_true", help="only the instant-replica section (merged into an existing peers.json)")
    ap.add_argument("--closed", action="store_true", help="only the closed-loop section")
    ap.add_argument(
        "--routers",
        help="comma-separated kind:policy (kvgate|sglang|vllm:POLICY, direct; kvgate:POLICY@N runs kvgate serve --workers N); default: "
        + ",".join(DEFAULT_ROUTERS),
    )
    ap.add_argument("--workloads", help="closed-loop workloads, comma-separated (default shared-prefix,multi-turn,long-doc-qa; --quick: shared-prefix)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--instant-requests", type=int, default=1000, help="measured requests per instant run")
    ap.add_argument(
        "--instant-prompts",
        type=int,
        default=320,
        help="distinct instant bodies, sent in turn (default 320: shared-prefix's, 16 system prompts x 20 questions; each repeats ~3 times "
        "in a run). More than a run sends: every question new, as in live traffic, so no router's caches of whole bodies help",
    )
    ap.add_argument(
        "--router-cpu-cap",
        type=float,
        metavar="CORES",
        help="hold every serving router process (each kvgate worker, each peer router) to CORES of a core by a CFS quota in its own "
        "cgroup (root): the router is then the limit, as on a node with a core per worker (kvgate:POLICY@N scaling)",
    )
    ap.add_argument("--out", type=Path, help=f"where to write peers.md and peers.json (default {RESULTS}; a --quick run writes only if given)")
    args = ap.parse_args(argv)
    try:
        routers = [RouterSpec.parse(k) for k in (args.routers.split(",") if args.routers else DEFAULT_ROUTERS)]
    except ValueError as exc:
        print(f"bench_peers: {exc}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 200)
    missing = [r for r in routers if not r.available()]
    for r in missing:
        console.print(f"[yellow]skipping {r.name}: {PEER_MODULES[r.kind][1]} is not installed (pip install -e '.[peers]')")
    routers = [r for r in routers if r.available()]
    rounds = 1 if args.quick else args.rounds
    setup = Setup(replicas=4, num_blocks=768, time_scale=1.0, concurrency=args.concurrency)
    names = args.workloads.split(",") if args.workloads else (["shared-prefix"] if args.quick else ["shared-prefix", "multi-turn", "long-doc-qa"])
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        print(f"bench_peers: unknown workloads {unknown}", file=sys.stderr)
        return 2
    if args.quick:
        small = {
            "shared-prefix": dict(num_groups=8, num_prompts_per_group=6),
            "multi-turn": dict(num_sessions=16, turns=3),
            "long-doc-qa": dict(num_docs=6, questions_per_doc=8),
            "no-reuse": dict(num_requests=48),
        }
        workloads = [WORKLOADS[w](**small[w]) for w in names]
    else:
        workloads = [WORKLOADS[w]() for w in names]
    if args.instant:
        workloads = []
    instant = [] if args.closed else [*routers, *(RouterSpec.parse(k) for k in INSTANT_EXTRA if k not in [r.key for r in routers])]
    n_instant = 150 if args.quick else args.instant_requests
    load0 = os.getloadavg()
    if load0[0] >= 1.0 and not args.quick:
        console.print(f"[yellow]load average {load0[0]:.2f} ≥ 1.0: other work shares the machine; figures will be noisy")
    render = render_available(setup)
    console.print(f"peers: {peer_versions()}; replicas' render endpoint: {render}")
    total = rounds * (len(workloads) * len(routers) + len(instant))
    t0 = time.perf_counter()
    done = 0

    def progress(rec: Record) -> None:
        nonlocal done
        done += 1
        what = f"{rec.workload:<13} {rec.router:<26}"
        if rec.failed:
            console.print(f"[{done}/{total}] round {rec.round + 1} {what} [red]failed: {rec.failed[:300]}")
        else:
            lat = f"TTFT p90 {rec.ttft_p90_ms:6.0f} ms" if rec.section == "closed" else f"latency p50 {rec.latency_p50_ms:5.1f} ms"
            console.print(
                f"[{done}/{total}] round {rec.round + 1} {what} {rec.req_s:7.1f} req/s  {lat}  hits {rec.hit_ratio:4.0%}  "
                f"router CPU {rec.router_cpu_ms_per_req:5.2f} ms/req  ({time.perf_counter() - t0:.0f} s)"
            )

    if args.instant_prompts < 1:
        print("bench_peers: --instant-prompts must be >= 1", file=sys.stderr)
        return 2
    if args.router_cpu_cap is not None:
        if not 0 < args.router_cpu_cap <= 64:
            print("bench_peers: --router-cpu-cap must be in (0, 64]", file=sys.stderr)
            return 2
        if not cpucap_available():
            print("bench_peers: --router-cpu-cap needs a writable cgroup CPU controller (root on Linux)", file=sys.stderr)
            return 2
    records, commands = run_all(
        routers,
        workloads,
        setup,
        rounds=rounds,
        instant=instant,
        instant_requests=n_instant,
        instant_workload=WORKLOADS["shared-prefix"](num_prompts_per_group=-(-args.instant_prompts // 16)),
        on_run=progress,
        cpu_cap=args.router_cpu_cap,
    )
    meta = {
        "command": "python -m benchmarks.bench_peers" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "description": (
            f"{setup.replicas} simulated replicas (one process each, {setup.num_blocks} KV blocks of 16 tokens) per run, started fresh for every "
            f"(router, workload, round); {rounds} interleaved round(s), routers' order rotated each round; cells are median (min–max) over rounds. "
            "Latency and throughput after the warm-up; prefix-hit ratio and load spread (max/min finished requests per replica) from the replicas' "
            "counters over the whole run; router CPU = utime+stime of the router's process tree over the run (cores = CPU s / wall s; ms/req over all "
            "requests incl. warm-up); replica CPU likewise for the replica processes. Every router runs with its own defaults apart from the fleet, "
            "policy and listen address (command lines below; sglang-router logs two INFO lines per request at its default level). "
            "Load generator, routers and replicas share the machine."
            + (
                f" Every serving router process (each kvgate worker; a peer router's process) held to {args.router_cpu_cap:g} of a core by a CFS "
                "quota (10 ms period) in a cgroup of its own, so the router is the limit."
                if args.router_cpu_cap
                else ""
            )
        ),
        "machine": f"{os.cpu_count()} cores, load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after",
        "peers": peer_versions(),
        "render": render,
        "rounds": rounds,
        "concurrency": setup.concurrency,
        "time_scale": setup.time_scale,
        "instant_requests": n_instant if instant else 0,
        "instant_prompts": 16 * -(-args.instant_prompts // 16) if instant else 0,
        "router_cpu_cap": args.router_cpu_cap,
        "skipped": [r.key for r in missing],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result = build_result(records, commands, meta)
    print_tables(result["summary"], console)
    out = args.out if args.out else (None if args.quick else RESULTS)
    if out is not None:
        files = write_results(out, "peers", result)
        console.print(f"wrote {', '.join(str(f) for f in files)} in {meta['wall_s']} s")
    else:
        console.print(f"(quick run: nothing written; --out DIR to keep it) {meta['wall_s']} s")
    return 1 if any(r.failed for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
