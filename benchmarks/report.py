"""Turn benchmark samples into the figures users compare routers on: tables, JSON, plots."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from .workloads import RunResult


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Summary:
    """One (workload, policy) run. Latency, throughput, hit ratio and spread are measured after
    the run's warm-up; ``ttft_p90_all_ms`` and ``errors`` count every request."""

    workload: str
    policy: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    throughput_tok_s: float
    hit_ratio: float
    load_spread: float
    wall_s: float
    warmup: int = 0
    ttft_p90_all_ms: float = float("nan")


def summarize(workload: str, policy: str, run: RunResult) -> Summary:
    measured = run.measured()
    ok = [s for s in measured if s.error is None]
    ttft = [s.ttft * 1000 for s in ok]
    itl = [g * 1000 for s in ok for g in s.itl]
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached_tokens for s in ok)
    per_replica = Counter(s.replica.split(",")[-1] for s in ok)
    spread = max(per_replica.values()) / max(1, min(per_replica.values())) if per_replica else float("nan")
    # throughput over the measured window: from the first measured start to the last end
    window = (max(s.start + s.e2e for s in measured) - min(s.start for s in measured)) if measured and any(s.start for s in measured) else run.wall_s
    all_ok = [s.ttft * 1000 for s in run.samples if s.error is None]
    return Summary(
        workload=workload,
        policy=policy,
        requests=len(run.samples),
        errors=sum(1 for s in run.samples if s.error is not None),
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p90_ms=percentile(ttft, 90),
        ttft_p99_ms=percentile(ttft, 99),
        itl_p50_ms=percentile(itl, 50),
        throughput_tok_s=sum(s.output_tokens for s in ok) / window if window > 0 else 0.0,
        hit_ratio=cached / prompt if prompt else 0.0,
        load_spread=spread,
        wall_s=run.wall_s,
        warmup=run.warmup,
        ttft_p90_all_ms=percentile(all_ok, 90),
    )


COLUMNS = [
    ("policy", "policy", "{}"),
    ("requests", "requests", "{}"),
    ("errors", "errors", "{}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p90_ms", "TTFT p90 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("ttft_p90_all_ms", "TTFT p90 ms incl. warm-up", "{:.0f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("throughput_tok_s", "output tok/s", "{:.0f}"),
    ("hit_ratio", "prefix-hit ratio", "{:.0%}"),
    ("load_spread", "load spread max/min", "{:.2f}"),
]


def markdown(summaries: list[Summary], baseline: str = "round-robin") -> str:
    out = []
    for wl in dict.fromkeys(s.workload for s in summaries):
        rows = [s for s in summaries if s.workload == wl]
        base = next((s for s in rows if s.policy == baseline), None)
        out.append(f"### {wl}\n")
        header = [c[1] for c in COLUMNS] + [f"TTFT p90 vs {baseline}", f"throughput vs {baseline}"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for s in rows:
            cells = [fmt.format(getattr(s, key)) for key, _, fmt in COLUMNS]
            if base and s.ttft_p90_ms > 0 and base.throughput_tok_s > 0:
                cells += [f"{base.ttft_p90_ms / s.ttft_p90_ms:.2f}× faster", f"{s.throughput_tok_s / base.throughput_tok_s:.2f}×"]
            else:
                cells += ["-", "-"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_results(
    out_dir: Path, name: str, summaries: list[Summary], runs: dict[tuple[str, str], RunResult], sweep: list[dict] | None, meta: dict
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text(f"# kvgate routing benchmark ({name})\n\n{meta.get('description', '')}\n\n" + markdown(summaries))
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({"meta": meta, "summaries": [asdict(s) for s in summaries], "sweep": sweep or []}, indent=2))
    return [md, js, *plot(out_dir, name, summaries, runs, sweep)]


def plot(out_dir: Path, name: str, summaries: list[Summary], runs: dict[tuple[str, str], RunResult], sweep: list[dict] | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    for wl in dict.fromkeys(s.workload for s in summaries):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (w, policy), run in runs.items():
            if w != wl:
                continue
            xs = sorted(s.ttft * 1000 for s in run.measured() if s.error is None)  # as in the table
            if xs:
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF — {wl} (after warm-up)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        f = out_dir / f"{name}_ttft_cdf_{wl}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    wls = list(dict.fromkeys(s.workload for s in summaries))
    policies = list(dict.fromkeys(s.policy for s in summaries))
    width = 0.8 / max(1, len(wls))
    for j, wl in enumerate(wls):
        vals = [next((s.hit_ratio for s in summaries if s.workload == wl and s.policy == p), 0) for p in policies]
        ax.bar([i + j * width for i in range(len(policies))], vals, width=width, label=wl)
    ax.set_xticks([i + width * (len(wls) - 1) / 2 for i in range(len(policies))])
    ax.set_xticklabels(policies, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("prefix-hit ratio (replica-reported)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Prefix-cache hit ratio per policy")
    fig.tight_layout()
    f = out_dir / f"{name}_hit_ratio.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)
    if sweep:
        fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.5))
        for policy in dict.fromkeys(r["policy"] for r in sweep):
            pts = sorted((r["rate"], r["ttft_p90_ms"], r["throughput_tok_s"]) for r in sweep if r["policy"] == policy)
            lat.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
            thr.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=policy)
        lat.set_yscale("log")
        lat.set_ylabel("TTFT p90 (ms, log)")
        lat.set_title("Latency vs offered load (shared-prefix)")
        thr.set_ylabel("output tokens/s")
        thr.set_title("Throughput vs offered load (shared-prefix)")
        for ax in (lat, thr):
            ax.set_xlabel("offered load (requests/s, Poisson)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        f = out_dir / f"{name}_throughput_vs_rate.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files
