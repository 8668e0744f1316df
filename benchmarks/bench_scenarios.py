"""Where precise routing beats approximate: scenarios an approximate router cannot see.

Four policies on the same fleet and workload, each run on a fresh fleet of simulated replicas
(one process each, time scale 1, KV events on) and fresh gateways:

* **precise**: kvgate's ``default`` profile, routing on the index built from the replicas'
  KV events (several gateways: a ``redis-server`` and one ``kvgate indexer`` feed the shared
  index, the gateways on ``ingest: false`` with ``index.share_load`` on, its default);
* **approx-prefix**: kvgate's ``approx-prefix`` profile (what this gateway routed where,
  with a TTL, plus in-flight load);
* **approx-tree**: sglang-router's ``cache_aware`` policy as the ``approx-tree`` plugin
  alone (a per-replica tree of routed prompts: longest match if it covers >= 0.3 of the
  prompt, else the least loaded);
* **round-robin**: the control.

The approximate and round-robin gateways are given no KV-event endpoints: they neither see
nor pay for the events. Scenarios:

* ``multi-gateway``: N gateways (``--gateways``, default 3), each a ``kvgate serve`` process,
  the client round-robining over them. Precise gateways share one index; approximate ones
  each see only their own third of the traffic, so each places a new prefix on its own.
* ``restart``: one gateway; a replica is SIGKILLed and restarted (cache empty, event sequence
  from 0) after each quarter of the run's requests, a different replica each time. The
  index forgets the replica's blocks as soon as its events restart; the approximate memories
  keep sending its prefixes there.
* ``eviction``: one gateway, caches small against the working set (each replica holds about
  four of the 32 system prompts, the fleet about half): prefixes are evicted all the time, and
  only the events say which.

Per run: TTFT p50/p90 and output tokens/s from the client after the warm-up (the first
2 x concurrency requests, at most a fifth), the prefix-hit ratio from the replicas' own
counters (``vllm:prefix_cache_hits_total`` / ``vllm:prefix_cache_queries_total`` over the whole
run, a killed replica's counts up to its death included), the load spread (max / min
``vllm:request_success_total`` per replica) and the failed requests (streams cut on a killed
replica). Rounds are interleaved (each round runs every scenario and policy, the policies'
order rotating); the tables give the median and the min–max over rounds.

    python -m benchmarks.bench_scenarios [--quick] [--scenarios multi-gateway,restart,eviction] [--rounds 3]
    kvgate bench --scenarios multi-gateway,restart,eviction [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from simulator.fleet import SimConfig, SimFleet, SimHandle

from .bench_multi_gateway import KvgateProc, RedisProc
from .report import summarize
from .workloads import MODEL, WORKLOADS, RunResult, Workload, run_workload

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("multi-gateway", "restart", "eviction")
#: policy → the gateway profile it runs
POLICIES: dict[str, str] = {"precise": "default", "approx-prefix": "approx-prefix", "approx-tree": "approx-tree", "round-robin": "round-robin"}
_FILTERS = [{"type": "healthy"}, {"type": "role"}, {"type": "model"}]
#: sglang-router's cache_aware as a kvgate profile: the approx-tree plugin alone, max picker
PROFILES = {"approx-tree": {"filters": _FILTERS, "scorers": [{"type": "approx-tree", "weight": 1}], "picker": {"type": "max"}}}
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:request_success_total")


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: Callable[[], Workload]
    replicas: int = 4
    num_blocks: int = 768
    gateways: int = 1
    concurrency: int = 32
    time_scale: float = 1.0
    #: after these fractions of the run's requests, a replica is killed and restarted (in turn)
    restarts: tuple[float, ...] = ()
    #: seconds a killed replica stays down
    hold_s: float = 1.0


def scenarios(quick: bool, gateways: int, tiny: bool = False) -> dict[str, Scenario]:
    """The three scenarios, full, ``--quick`` (about 2 minutes for all) or tiny (the smoke test)."""
    sp = WORKLOADS["shared-prefix"]
    if tiny:  # seconds per run: two replicas at a tenth of the time scale
        kw: dict[str, Any] = dict(replicas=2, concurrency=4, time_scale=0.1, num_blocks=256)
        wl = lambda: sp(num_groups=3, num_prompts_per_group=4, system_prompt_len=150, question_len=20, output_len=8)  # noqa: E731
        return {
            "multi-gateway": Scenario("multi-gateway", wl, gateways=gateways, **kw),
            "restart": Scenario("restart", wl, restarts=(0.4,), hold_s=0.3, **kw),
            "eviction": Scenario("eviction", wl, **{**kw, "num_blocks": 24}),
        }
    if quick:
        return {
            "multi-gateway": Scenario("multi-gateway", lambda: sp(num_groups=12, num_prompts_per_group=8, seed=21), gateways=gateways, concurrency=24),
            "restart": Scenario("restart", lambda: sp(num_groups=12, num_prompts_per_group=14, seed=22), restarts=(0.2, 0.5), hold_s=0.5, concurrency=24),
            "eviction": Scenario("eviction", lambda: sp(num_groups=24, num_prompts_per_group=5, seed=23), num_blocks=512, concurrency=16),
        }
    return {
        "multi-gateway": Scenario("multi-gateway", lambda: sp(seed=21), gateways=gateways),
        "restart": Scenario("restart", lambda: sp(seed=22), restarts=(0.25, 0.5, 0.75)),
        # 512 blocks: about 4 of the 32 system prompts (~114 blocks each) with the running requests, so the fleet caches about
        # half of them; 4 sessions per replica keep the running batch within the blocks (admission waits for blocks, as vLLM's)
        "eviction": Scenario("eviction", lambda: sp(num_groups=32, num_prompts_per_group=10, seed=23), num_blocks=512, concurrency=16),
    }


# -- the replicas' counters -----------------------------------------------------------------------


def read_counters(url: str) -> dict[str, float]:
    """One replica's prefix-cache and finished-request counters, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    row = dict.fromkeys(COUNTERS, 0.0)
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in row:
                row[s.name] += s.value
    return row


class CounterLedger:
    """Per replica, what its counters moved over a run, across restarts: a process's counts are
    added up when it is killed (read just before), and the restarted one counts from 0."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.base = [read_counters(u) for u in urls]
        self.acc = [dict.fromkeys(COUNTERS, 0.0) for _ in urls]

    def _close(self, i: int, now: dict[str, float]) -> None:
        for k in COUNTERS:
            self.acc[i][k] += now[k] - self.base[i][k]

    def before_kill(self, i: int) -> None:
        try:
            self._close(i, read_counters(self.urls[i]))
        except httpx.HTTPError:
            pass  # unreadable: what it counted since the last read is lost (said in the notes)
        self.base[i] = dict.fromkeys(COUNTERS, 0.0)

    def finish(self) -> list[dict[str, float]]:
        for i, u in enumerate(self.urls):
            self._close(i, read_counters(u))
        return self.acc


# -- one run --------------------------------------------------------------------------------------


def replica_entries(handles: list[SimHandle], events: bool) -> list[dict[str, Any]]:
    out = []
    for i, h in enumerate(handles):
        r: dict[str, Any] = {"id": f"r{i}", "url": h.url, "models": [MODEL]}
        if events:
            r |= {"kv_events": h.events_endpoint, "replay": h.replay_endpoint}
        out.append(r)
    return out


def gateway_config(profile: str, replicas: list[dict[str, Any]], index: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "replicas": replicas,
        "models": {MODEL: {"tokenizer": "demo"}},
        "index": index,
        "scheduling": {"default_profile": profile, "profiles": PROFILES},
        "debug_headers": True,
        "scrape": {"interval_s": 0.5},
        # a restarted replica is probed back within a second (the default 5 s cooldown would keep
        # it out for most of a quick run, for every policy alike)
        "health": {"interval_s": 0.5, "cooldown_s": 1.0},
    }


@dataclass
class RunRecord:
    scenario: str
    policy: str
    round: int
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    throughput_tok_s: float
    hit_ratio: float  # the replicas' counters, whole run
    load_spread: float  # max / min finished requests per replica
    hit_ratio_client: float  # cached / prompt tokens in the answers' usage, after the warm-up
    per_replica_requests: list[float]
    wall_s: float
    events: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)


class Stack:
    """A fresh fleet and the gateways of one (scenario, policy) run; Redis and an indexer for
    several precise gateways. Everything it started is stopped on exit."""

    def __init__(self, sc: Scenario, policy: str, tmp: Path) -> None:
        self.sc, self.policy, self.tmp = sc, policy, tmp
        self.fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=sc.time_scale, num_blocks=sc.num_blocks) for i in range(sc.replicas)], mode="process")
        self.redis: RedisProc | None = None
        self.indexer: KvgateProc | None = None
        self.gateways: list[KvgateProc] = []

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        sc, policy = self.sc, self.policy
        self.fleet.start()
        precise = policy == "precise"
        replicas = replica_entries(self.fleet.handles, events=precise)
        index: dict[str, Any] = {}
        if precise and sc.gateways > 1:
            self.redis = RedisProc(self.tmp)
            self.redis.start()
            self.indexer = KvgateProc("indexer", {"replicas": replicas, "index": {"backend": self.redis.url}}, self.tmp, "indexer", "--loss-check-every", "0.5")
            self.indexer.start()
            index = {"backend": self.redis.url, "ingest": False}
        cfg = gateway_config(POLICIES[policy], replicas, index)
        self.gateways = [KvgateProc("serve", cfg, self.tmp, f"gw-{sc.name}-{policy}-{g}") for g in range(sc.gateways)]
        with ThreadPoolExecutor(len(self.gateways)) as pool:  # start them side by side
            for f in [pool.submit(g.start) for g in self.gateways]:
                f.result()

    def __exit__(self, *exc: object) -> None:
        for g in self.gateways:
            g.stop()
        if self.indexer is not None:
            self.indexer.stop()
        if self.redis is not None:
            self.redis.stop()
        self.fleet.stop()

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]


class Restarter:
    """Kills and restarts replicas when the run has finished given shares of its requests
    (``done()`` is called per finished request, on the client's loop), on its own thread so
    the client keeps going meanwhile."""

    def __init__(self, stack: Stack, ledger: CounterLedger, total: int, t0: float) -> None:
        sc = stack.sc
        self.stack, self.ledger, self.t0 = stack, ledger, t0
        self.plan = [(max(1, int(f * total)), k % sc.replicas) for k, f in enumerate(sc.restarts)]
        self.count = 0
        self.finished = False
        self.cond = threading.Condition()
        self.events: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="restarter")
        self.thread.start()

    def done(self) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify()

    def _run(self) -> None:
        fleet, hold = self.stack.fleet, self.stack.sc.hold_s
        for at, i in self.plan:
            with self.cond:
                while self.count < at and not self.finished:
                    self.cond.wait(0.5)
                if self.count < at:
                    return
            self.ledger.before_kill(i)
            fleet.kill(i)
            self.events.append(f"{time.perf_counter() - self.t0:.1f} s r{i} SIGKILLed after {self.count} requests")
            time.sleep(hold)
            fleet.restart(i)
            self.events.append(f"{time.perf_counter() - self.t0:.1f} s r{i} restarted (empty cache)")

    def join(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify()
        self.thread.join(60)


def warmup(wl: Workload, concurrency: int) -> int:
    return min(2 * concurrency, wl.requests // 5)


def run_once(sc: Scenario, policy: str, rnd: int, tmp: Path) -> RunRecord:
    """One fresh stack, one workload, one policy (restarts injected if the scenario has any)."""
    wl = sc.workload()
    t0 = time.perf_counter()
    with Stack(sc, policy, tmp) as stack:
        ledger = CounterLedger([h.url for h in stack.fleet.handles])
        restarter = Restarter(stack, ledger, wl.requests, time.perf_counter()) if sc.restarts else None
        try:
            run: RunResult = asyncio.run(
                run_workload(wl, stack.urls, concurrency=sc.concurrency, warmup=warmup(wl, sc.concurrency), on_done=restarter.done if restarter else None)
            )
        finally:
            if restarter is not None:
                restarter.join()
        counters = ledger.finish()
    s = summarize(sc.name, policy, run)
    hits = sum(c["vllm:prefix_cache_hits_total"] for c in counters)
    queries = sum(c["vllm:prefix_cache_queries_total"] for c in counters)
    done = [c["vllm:request_success_total"] for c in counters]
    return RunRecord(
        scenario=sc.name,
        policy=policy,
        round=rnd,
        requests=s.requests,
        errors=s.errors,
        ttft_p50_ms=round(s.ttft_p50_ms, 1),
        ttft_p90_ms=round(s.ttft_p90_ms, 1),
        throughput_tok_s=round(s.throughput_tok_s, 1),
        hit_ratio=round(hits / queries, 4) if queries else 0.0,
        load_spread=round(max(done) / max(1.0, min(done)), 3) if done else float("nan"),
        hit_ratio_client=round(s.hit_ratio, 4),
        per_replica_requests=done,
        wall_s=round(time.perf_counter() - t0, 1),
        events=restarter.events if restarter else [],
        error_kinds=dict(Counter(x.error for x in run.samples if x.error is not None)),
    )


# -- aggregation and report -------------------------------------------------------------------------

METRICS = ("ttft_p50_ms", "ttft_p90_ms", "throughput_tok_s", "hit_ratio", "load_spread")


def aggregate(records: list[RunRecord]) -> list[dict[str, Any]]:
    """Per (scenario, policy): median and min–max over rounds of each metric, errors summed."""
    out = []
    keys = list(dict.fromkeys((r.scenario, r.policy) for r in records))
    for scenario, policy in keys:
        rs = [r for r in records if r.scenario == scenario and r.policy == policy]
        row: dict[str, Any] = {"scenario": scenario, "policy": policy, "rounds": len(rs)}
        for m in METRICS:
            xs = [getattr(r, m) for r in rs]
            row[m] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        row["errors"] = sum(r.errors for r in rs)
        row["requests"] = sum(r.requests for r in rs)
        out.append(row)
    return out


def _cell(v: dict[str, float], fmt: str, rounds: int) -> str:
    if rounds < 2:
        return fmt.format(v["median"])
    return f"{fmt.format(v['median'])} ({fmt.format(v['min'])}–{fmt.format(v['max'])})"


WHAT = {
    "multi-gateway": "{gateways} gateways behind the client's round robin",
    "restart": "one gateway; a replica SIGKILLed and restarted empty {n} times",
    "eviction": "one gateway; {blocks} KV blocks per replica against a working set of ~{ws} blocks",
}


def markdown(agg: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"# Precise vs approximate routing ({meta['name']})", "", meta["description"], ""]
    if "source" in meta:
        out += [
            f"Source {meta['source']}; load average {meta['load_at_start']} at the start, {meta['load_at_end']} at the end; {meta['wall_s']} s. `{meta['command']}`",
            "",
        ]
    cols = [("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_p90_ms", "TTFT p90 ms", "{:.0f}"), ("throughput_tok_s", "output tok/s", "{:.0f}")]
    cols += [("hit_ratio", "prefix hits (replicas)", "{:.0%}"), ("load_spread", "load spread", "{:.2f}")]
    for scenario in dict.fromkeys(r["scenario"] for r in agg):
        out += [f"## {scenario}: {meta['scenarios'][scenario]['what']}", ""]
        out.append("| policy | " + " | ".join(c[1] for c in cols) + " | failed / requests |")
        out.append("|---|" + "---|" * (len(cols) + 1))
        for r in (r for r in agg if r["scenario"] == scenario):
            cells = [_cell(r[k], fmt, r["rounds"]) for k, _, fmt in cols]
            out.append(f"| {r['policy']} | " + " | ".join(cells) + f" | {r['errors']} / {r['requests']} |")
        out.append("")
    if meta.get("events"):
        out += ["Restarts (first round):", ""] + [f"    {e}" for e in meta["events"]] + [""]
    return "\n".join(out)


def describe(scs: dict[str, Scenario]) -> dict[str, dict[str, Any]]:
    from kvindex.tokenize import load_tokenizer

    tok = load_tokenizer("demo")  # the gateways' and replicas' tokenizer
    out = {}
    for name, sc in scs.items():
        wl = sc.workload()
        systems = {s.system for s in wl.sessions}
        blocks = sum(len(tok.encode(s)) for s in systems) // 16  # the system prompts alone, without questions and answers
        what = WHAT[name].format(gateways=sc.gateways, n=len(sc.restarts), blocks=sc.num_blocks, ws=blocks)
        out[name] = {
            "what": what,
            "workload": f"shared-prefix, {len(systems)} system prompts ({blocks} blocks of 16 tokens), {wl.requests} requests",
            **{k: v for k, v in asdict(sc).items() if k not in ("name", "workload")},
        }
    return out


def source_version() -> str:
    """The measured tree: ``KVGATE_COMMIT`` if set (a snapshot without .git), else git's HEAD,
    flagged when the gateway's packages have uncommitted changes."""
    if os.environ.get("KVGATE_COMMIT"):
        return os.environ["KVGATE_COMMIT"]
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "gateway", "scorers", "kvindex", "simulator"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scenarios", description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of: " + ", ".join(SCENARIOS))
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of: " + ", ".join(POLICIES))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--gateways", type=int, default=3, help="gateways in the multi-gateway scenario (2-4)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads, one round: about 2 minutes")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's size
    ap.add_argument("--out", type=Path, default=RESULTS, help="where scenarios.md/.json go (--quick: scenarios_quick.*)")
    args = ap.parse_args(argv)
    wanted = [s for s in args.scenarios.split(",") if s]
    policies = [p for p in args.policies.split(",") if p]
    bad = [s for s in wanted if s not in SCENARIOS] + [p for p in policies if p not in POLICIES]
    if bad or not wanted or not policies:
        print(f"bench_scenarios: unknown or missing scenarios/policies {bad}; known: {', '.join(SCENARIOS)} / {', '.join(POLICIES)}", file=sys.stderr)
        return 2
    if not 1 <= args.gateways <= 8:
        print("bench_scenarios: --gateways must be between 1 and 8", file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick or args.tiny else 3)
    scs = {k: v for k, v in scenarios(args.quick, args.gateways, tiny=args.tiny).items() if k in wanted}
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="bench-scenarios-") as tmp:
        for rnd in range(rounds):
            for name, sc in scs.items():
                order = policies[rnd % len(policies) :] + policies[: rnd % len(policies)]
                for policy in order:
                    rec = run_once(sc, policy, rnd, Path(tmp))
                    records.append(rec)
                    print(
                        f"round {rnd + 1} {name:13} {policy:13} TTFT p50/p90 {rec.ttft_p50_ms:6.0f}/{rec.ttft_p90_ms:6.0f} ms  "
                        f"{rec.throughput_tok_s:6.0f} tok/s  hits {rec.hit_ratio:5.1%}  spread {rec.load_spread:5.2f}  "
                        f"failed {rec.errors}/{rec.requests}  ({rec.wall_s:.0f} s)",
                        flush=True,
                    )
    agg = aggregate(records)
    name = "scenarios_tiny" if args.tiny else ("scenarios_quick" if args.quick else "scenarios")
    meta: dict[str, Any] = {
        "name": name,
        "description": (
            "Simulated replicas (processes, time scale as listed, KV events on), fresh fleet and gateways per run; closed loop, "
            "streaming chat through the openai SDK. Policies: precise = kvgate `default` (KV-event index; several gateways: "
            "redis-server + kvgate indexer, index.share_load on), approx-prefix = kvgate `approx-prefix`, approx-tree = the "
            "`approx-tree` plugin alone (sglang-router's cache_aware), round-robin. Prefix hits and load spread from the replicas' "
            "counters over the whole run; TTFT and throughput from the client after the warm-up. "
            f"{rounds} interleaved round(s): median (min–max)."
        ),
        "command": "python -m benchmarks.bench_scenarios" + (" --quick" if args.quick else "") + (f" --rounds {args.rounds}" if args.rounds else ""),
        "source": source_version(),
        "rounds": rounds,
        "policies": policies,
        "scenarios": describe(scs),
        "load_at_start": round(load_start, 2),
        "load_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round(time.perf_counter() - t0, 1),
        "events": next((r.events for r in records if r.events), []),
    }
    text = markdown(agg, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": agg, "runs": [asdict(r) for r in records]}, indent=2))
    print(f"wrote {args.out / (name + '.md')}, {args.out / (name + '.json')} in {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
