"""Aggregated vs disaggregated serving on the simulated fleet: when does splitting pay?

Four replicas, either all ``both`` (aggregated: every replica prefills and decodes, a new
prompt's prefill runs in the same step as the running decodes and delays them) or two
``prefill`` + two ``decode`` (the gateway runs long uncached prompts as two hops; the KV moves
over NIXL and the decode replicas never prefill). Two workloads, each on both setups:

* ``doc-qa``: ~1500-word documents asked two questions each, 64-token answers. Half the
  requests hit a cached document and outputs are short: the case where P/D is expected to lose.
* ``long-unique``: unique ~3.5k-token prompts (no reuse at all), 256-token answers, Poisson
  arrivals at a rate that keeps every replica stepping (4/s: about 60% of the two prefill
  replicas' capacity): the case P/D is meant for, where long prefills keep interrupting
  decodes on aggregated replicas.

Each repeat starts a fresh fleet and gateway per setup (setups alternate order between
repeats), runs ``doc-qa`` on the cold fleet, then ``long-unique`` (unique prompts: what the
first workload cached cannot help it). Figures are medians over repeats. Prints Markdown
tables; ``--out DIR`` also writes ``pd.md`` and ``pd.json`` there.

    python -m benchmarks.bench_pd [--quick] [--repeats N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from simulator.fleet import SimConfig, SimFleet

from .compare import GatewayProcess
from .procports import wait_listening
from .report import percentile, summarize
from .workloads import MODEL, WORKLOADS, RunResult, Workload, run_workload

PD_ROLES = ["prefill", "prefill", "decode", "decode"]
SETUPS = [
    ("aggregated", "aggregated (4 × both)", ["both"] * 4),
    ("disaggregated", "disaggregated (2 prefill + 2 decode)", PD_ROLES),
    ("envoy-sidecar", "disaggregated via Envoy + picker + sidecars", PD_ROLES),
]
STALL_MS = 50.0  # an inter-token gap this long is a decode stalled behind someone's prefill


@dataclass
class WorkloadSpec:
    key: str
    title: str
    workload: Workload
    concurrency: int | None
    warmup: int
    rate: float | None = None  # open loop (Poisson arrivals per second) instead of closed


@dataclass
class Row:
    """One (workload, setup) run."""

    workload: str
    setup: str
    repeat: int
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    itl_p99_ms: float
    stall_share: float  # share of inter-token gaps >= STALL_MS
    tpot_p50_ms: float  # per request: (end - first token) / (output tokens - 1), stalls included
    tpot_p90_ms: float
    throughput_tok_s: float
    two_hop_share: float
    # means from the gateway's kvgate_pd_hop_seconds over the whole run, warm-up included (nan: no two-hop request)
    prefill_hop_ms: float
    decode_first_byte_ms: float
    wall_s: float


def workloads(docs: int, doc_concurrency: int, long_requests: int, long_rate: float) -> list[WorkloadSpec]:
    doc = WORKLOADS["long-doc-qa"](num_docs=docs, questions_per_doc=2, doc_len=1500, output_len=64, seed=11)
    # ~2300 words of the synthetic vocabulary ≈ 3.4–3.7k tokens with the demo tokenizer
    long = WORKLOADS["no-reuse"](num_requests=long_requests, prompt_len=2300, output_len=256, seed=12)
    warm = max(1, int(2 * long_rate))  # the first two seconds of arrivals find idle replicas
    return [
        WorkloadSpec(
            "doc-qa",
            f"doc-qa: {doc.requests} requests, ~1500-word documents (~2.3k tokens) asked 2 questions each, 64 output tokens, closed loop at {doc_concurrency} sessions",
            doc,
            doc_concurrency,
            0,
        ),
        # open loop: Poisson arrivals, as independent users send them (a closed loop of identical
        # requests synchronises: sessions that start together finish together and arrive together)
        WorkloadSpec(
            "long-unique",
            f"long-unique: {long.requests} requests, unique ~3.5k-token prompts, 256 output tokens, Poisson arrivals at {long_rate:g}/s (first {warm} requests are warm-up)",
            long,
            None,
            warm,
            long_rate,
        ),
    ]


def _row(spec: WorkloadSpec, setup: str, repeat: int, result: RunResult, hops: tuple[float, float]) -> Row:
    s = summarize(spec.key, setup, result)
    ok = [x for x in result.measured() if x.error is None]
    gaps = [g * 1000 for x in ok for g in x.itl]
    tpot = [(x.e2e - x.ttft) / (x.output_tokens - 1) * 1000 for x in ok if x.output_tokens > 1]
    return Row(
        workload=spec.key,
        setup=setup,
        repeat=repeat,
        requests=s.requests,
        errors=s.errors,
        ttft_p50_ms=s.ttft_p50_ms,
        ttft_p90_ms=s.ttft_p90_ms,
        ttft_p99_ms=s.ttft_p99_ms,
        itl_p50_ms=percentile(gaps, 50),
        itl_p90_ms=percentile(gaps, 90),
        itl_p99_ms=percentile(gaps, 99),
        stall_share=sum(1 for g in gaps if g >= STALL_MS) / len(gaps) if gaps else float("nan"),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p90_ms=percentile(tpot, 90),
        throughput_tok_s=s.throughput_tok_s,
        two_hop_share=sum(1 for x in ok if "," in x.replica) / len(ok) if ok else float("nan"),
        prefill_hop_ms=hops[0],
        decode_first_byte_ms=hops[1],
        wall_s=result.wall_s,
    )


def _hop_totals(url: str) -> dict[str, float]:
    """sum and count per hop, to difference between two workloads on one gateway."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "kvgate_pd_hop_seconds":
            for s in fam.samples:
                if s.name.endswith(("_sum", "_count")):
                    out[f"{s.labels.get('hop', '')}_{s.name.rsplit('_', 1)[1]}"] = s.value
    return out


def _hop_delta(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    means = []
    for hop in ("prefill", "decode"):
        n = after.get(f"{hop}_count", 0.0) - before.get(f"{hop}_count", 0.0)
        t = after.get(f"{hop}_sum", 0.0) - before.get(f"{hop}_sum", 0.0)
        means.append(t / n * 1000 if n else float("nan"))
    return means[0], means[1]


def run_setup(key: str, roles: list[str], specs: list[WorkloadSpec], setup: str, repeat: int, tmp: Path, time_scale: float) -> list[Row]:
    fleet = SimFleet([SimConfig(model=MODEL, role=r, seed=i, time_scale=time_scale, num_blocks=2048) for i, r in enumerate(roles)], mode="process")
    fleet.start()
    rows = []
    try:
        with EnvoyPD(fleet.handles, tmp) if key == "envoy-sidecar" else _Gateway(fleet.handles, tmp) as front:
            for spec in specs:
                before = front.hop_totals()
                result = asyncio.run(run_workload(spec.workload, [front.url], concurrency=spec.concurrency, rate=spec.rate, warmup=spec.warmup, seed=7))
                row = _row(spec, setup, repeat, result, _hop_delta(before, front.hop_totals()))
                if isinstance(front, EnvoyPD):  # no debug headers through Envoy: the sidecars' own counts
                    row.two_hop_share = front.two_hop_share(before)
                rows.append(row)
    finally:
        fleet.stop()
    return rows


class _Gateway:
    """``kvgate serve`` doing P/D itself."""

    def __init__(self, handles, tmp: Path) -> None:
        self.gw = GatewayProcess(handles, "default", tmp, extra={"pd": {"enabled": True, "threshold": 512}})
        self.url = self.gw.url

    def hop_totals(self) -> dict[str, float]:
        return _hop_totals(self.gw.url)

    def __enter__(self) -> _Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.gw.stop()


class EnvoyPD:
    """llm-d's layout: Envoy → ``kvgate extproc`` (plans P/D, names the prefill endpoint) →
    the decode pod's ``kvgate sidecar`` (runs both hops) → prefill replica, then its own replica.
    Same fleet, same threshold as the gateway setup; everything a process on loopback."""

    def __init__(self, handles, tmp: Path) -> None:
        from .envoy_stack import extproc_envoy, find_envoy

        binary = find_envoy()
        if binary is None:
            raise RuntimeError("envoy is not installed (make envoy)")
        self.procs: list[subprocess.Popen] = []
        prefills = [h for h in handles if h.config.role == "prefill"]
        self.sidecars: dict[int, str] = {}
        try:
            for i, h in enumerate(handles):
                if h.config.role == "decode":
                    args = ["sidecar", "--vllm", h.url, "--host", "127.0.0.1"]
                    for p in prefills:
                        args += ["--prefill", f"127.0.0.1:{p.config.port}"]
                    self.sidecars[i] = self._start(args, tmp / f"sidecar-{i}.log", "/sidecar/health")
            replicas = []
            for i, h in enumerate(handles):
                url = self.sidecars.get(i, h.url)
                replicas.append(
                    {"id": f"r{i}", "url": url, "role": h.config.role, "models": [MODEL], "kv_events": h.events_endpoint, "replay": h.replay_endpoint}
                )
            cfg = {
                "replicas": replicas,
                "models": {MODEL: {"tokenizer": "demo"}},
                "pd": {"enabled": True, "threshold": 512},
                "scrape": {"interval_s": 0.5},
                "health": {"interval_s": 1.0},
            }
            path = tmp / "extproc.yaml"
            path.write_text(json.dumps(cfg))
            picker = _spawn(["extproc", "--config", str(path), "--port", "0"], tmp / "extproc.log")
            self.procs.append(picker)
            grpc_port = wait_listening(picker)
            self.envoy = extproc_envoy(tmp, grpc_port, binary, "buffered").start()
            self.url = self.envoy.url
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise

    def _start(self, args: list[str], log: Path, health: str) -> str:
        """Start on port 0 and read the port it got (from /proc): no port picked beforehand."""
        proc = _spawn([*args, "--port", "0"], log)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{wait_listening(proc)}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + health, timeout=0.5).status_code == 200:
                    return url
            time.sleep(0.1)
        raise RuntimeError(f"{args[0]} did not start: {log.read_text(errors='replace')[-1500:]}")

    def hop_totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for url in self.sidecars.values():
            for k, v in _hop_totals(url + "/sidecar").items():
                out[k] = out.get(k, 0.0) + v
        return out

    def two_hop_share(self, before: dict[str, float]) -> float:
        after = self.hop_totals()
        two = after.get("decode_count", 0.0) - before.get("decode_count", 0.0)
        total = 0.0
        for url in self.sidecars.values():
            total += _metric_sum(url + "/sidecar/metrics", "kvgate_requests_total")
        done = total - getattr(self, "_requests_before", 0.0)
        self._requests_before = total
        return two / done if done else float("nan")

    def __enter__(self) -> EnvoyPD:
        self._requests_before = sum(_metric_sum(u + "/sidecar/metrics", "kvgate_requests_total") for u in self.sidecars.values())
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "envoy", None) is not None:
            self.envoy.stop()
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stdout=out, stderr=subprocess.STDOUT)


def _metric_sum(url: str, name: str) -> float:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (workload, setup): the median of every figure over the repeats."""
    out = []
    for key in dict.fromkeys((r.workload, r.setup) for r in rows):
        group = [r for r in rows if (r.workload, r.setup) == key]
        vals: dict[str, Any] = {}  # Row's fields, of mixed types
        for f, v in asdict(group[0]).items():
            if isinstance(v, float):
                xs = [getattr(r, f) for r in group if getattr(r, f) == getattr(r, f)]  # nan-free
                vals[f] = statistics.median(xs) if xs else float("nan")
            else:
                vals[f] = v
        vals["repeat"] = -1
        vals["errors"] = sum(r.errors for r in group)
        out.append(Row(**vals))
    return out


HEADER = "| setup | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | ITL p50 ms | ITL p90 ms | ITL p99 ms | gaps ≥ 50 ms | TPOT p50 ms | TPOT p90 ms | output tok/s | two-hop | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"


def _fmt(x: float, spec: str) -> str:
    return "–" if x != x else format(x, spec)


def table(rows: list[Row]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(
            f"| {r.setup} | {_fmt(r.ttft_p50_ms, '.0f')} | {_fmt(r.ttft_p90_ms, '.0f')} | {_fmt(r.ttft_p99_ms, '.0f')} | {_fmt(r.itl_p50_ms, '.1f')} | "
            f"{_fmt(r.itl_p90_ms, '.1f')} | {_fmt(r.itl_p99_ms, '.1f')} | {_fmt(r.stall_share, '.1%')} | {_fmt(r.tpot_p50_ms, '.1f')} | {_fmt(r.tpot_p90_ms, '.1f')} | "
            f"{_fmt(r.throughput_tok_s, '.0f')} | {_fmt(r.two_hop_share, '.0%')} | {r.errors} |"
        )
    return "\n".join(lines)


def spread(rows: list[Row]) -> str:
    """Per repeat, the figures that decide the comparison, to show how noisy the medians are."""
    lines = ["| workload | setup | repeat | TTFT p50 ms | TTFT p90 ms | ITL p99 ms | TPOT p90 ms | output tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.workload, r.setup, r.repeat)):
        lines.append(
            f"| {r.workload} | {r.setup} | {r.repeat} | {_fmt(r.ttft_p50_ms, '.0f')} | {_fmt(r.ttft_p90_ms, '.0f')} | {_fmt(r.itl_p99_ms, '.1f')} | "
            f"{_fmt(r.tpot_p90_ms, '.1f')} | {_fmt(r.throughput_tok_s, '.0f')} |"
        )
    return "\n".join(lines)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller workloads, one repeat")
    ap.add_argument("--docs", type=int, default=None, help="documents in doc-qa, two questions each (default 36, quick 12)")
    ap.add_argument("--concurrency", type=int, default=12, help="doc-qa sessions in flight")
    ap.add_argument("--long-requests", type=int, default=None, help="requests in long-unique (default 48, quick 24)")
    ap.add_argument("--long-rate", type=float, default=4.0, help="long-unique arrivals per second (Poisson)")
    ap.add_argument("--repeats", type=int, default=None, help="fresh fleets per setup (default 3, quick 1)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=None, help="write pd.md and pd.json into this folder")
    ap.add_argument("--setups", default=",".join(k for k, _, _ in SETUPS), help="comma-separated: " + ", ".join(k for k, _, _ in SETUPS))
    args = ap.parse_args(argv)
    args.setups = set(args.setups.split(","))
    repeats = args.repeats or (1 if args.quick else 3)
    specs = workloads(args.docs or (12 if args.quick else 36), args.concurrency, args.long_requests or (24 if args.quick else 48), args.long_rate)
    load0 = _loadavg()
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            order = SETUPS if rep % 2 == 0 else SETUPS[::-1]  # interleaved: neither setup always runs first
            for key, name, roles in order:
                if key in args.setups:
                    rows.extend(run_setup(key, roles, specs, name, rep, Path(tmp), args.time_scale))
    wall = time.perf_counter() - t0
    load1 = _loadavg()
    setup_order = [name for _, name, _ in SETUPS]
    med = sorted(median_rows(rows), key=lambda r: ([s.key for s in specs].index(r.workload), setup_order.index(r.setup)))
    desc = (
        f"4 simulated replicas (time scale {args.time_scale}, 2048 KV blocks of 16 tokens; prefill 12k tokens/s, decode step 7 ms + 0.02 ms per 1k KV tokens), "
        f"gateway profile `default` with P/D threshold 512; streamed chat requests through the OpenAI SDK. "
        f"Medians over {repeats} repeat(s), each a fresh fleet and gateway per setup, setups alternating order. "
        f"ITL = gaps between streamed chunks at the client; 'gaps ≥ 50 ms' = share of those gaps that are stalls; "
        f"TPOT = a request's (end − first token) / (output tokens − 1), stalls included; two-hop = share of requests served prefill→decode. "
        f"Load average (1/5/15 min) {load0} at start, {load1} at the end; wall {wall:.0f} s."
    )
    parts = [f"# kvgate P/D benchmark: aggregated vs disaggregated\n\n{desc}\n"]
    for spec in specs:
        parts.append(f"### {spec.title}\n\n{table([r for r in med if r.workload == spec.key])}\n")
    parts.append(f"### per repeat\n\n{spread(rows)}\n")
    text = "\n".join(parts)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pd.md").write_text(text)
        meta = {
            "description": desc,
            "wall_s": round(wall, 1),
            "command": "python -m benchmarks.bench_pd " + " ".join(argv if argv is not None else sys.argv[1:]),
            "loadavg_start": load0,
            "loadavg_end": load1,
            "repeats": repeats,
            "workloads": {s.key: s.title for s in specs},
        }
        (args.out / "pd.json").write_text(json.dumps({"meta": meta, "summaries": [asdict(r) for r in med], "runs": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
