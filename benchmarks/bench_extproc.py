"""Latency the Envoy + ext-proc path adds, against Envoy alone, our HTTP gateway, and direct.

One simulated replica at time-scale 0 in its own process; `kvgate extproc` and `kvgate serve`
in their own processes; Envoy 1.40 twice (with the ext_proc picker, and alone with a static
upstream). Requests at concurrency 1 rotate over the four paths so all see the same machine
state; figures are p50/p99 and the difference to direct.

    python -m benchmarks.bench_extproc [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .bench_overhead import MODEL, _wait_http, pct
from .envoy_stack import extproc_envoy, find_envoy, free_port, static_envoy, wait_port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    binary = find_envoy()
    if binary is None:
        print("envoy not installed: run `make envoy`", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    procs: list[subprocess.Popen] = []
    envoys = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        sim_port, gw_port, ep_port = free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", "--port", str(sim_port), "--time-scale", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        cfg = tmpd / "gw.yaml"
        cfg.write_text(json.dumps({"listen": {"port": gw_port}, "replicas": [{"id": "r0", "url": f"http://127.0.0.1:{sim_port}", "models": [MODEL]}], "models": {MODEL: {"tokenizer": "demo"}}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "extproc", "--config", str(cfg), "--port", str(ep_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            _wait_http(f"http://127.0.0.1:{sim_port}/health")
            _wait_http(f"http://127.0.0.1:{gw_port}/ready")
            wait_port(ep_port)
            time.sleep(1.0)  # the picker's first health probe
            envoys = [extproc_envoy(tmpd, ep_port, binary).start(), static_envoy(tmpd, "127.0.0.1", sim_port, binary).start()]
            paths = {
                "direct": f"http://127.0.0.1:{sim_port}",
                "envoy alone": envoys[1].url,
                "envoy + ext-proc": envoys[0].url,
                "kvgate HTTP gateway": f"http://127.0.0.1:{gw_port}",
            }
            body = {"model": MODEL, "prompt": "Benchmark request: say something short.", "max_tokens": 8}
            lat: dict[str, list[float]] = {k: [] for k in paths}
            with httpx.Client(timeout=30) as client:
                for i in range(args.requests + 20):
                    for name, base in paths.items():
                        t0 = time.perf_counter()
                        r = client.post(f"{base}/v1/completions", json=body)
                        dt = time.perf_counter() - t0
                        assert r.status_code == 200, (name, r.status_code, r.text[:200])
                        if i >= 20:
                            lat[name].append(dt)
        finally:
            for e in envoys:
                e.stop()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    d50 = statistics.median(lat["direct"])
    print("| path (c=1, non-stream) | p50 ms | p99 ms | added p50 vs direct ms |")
    print("|---|---|---|---|")
    for name, xs in lat.items():
        p50 = statistics.median(xs)
        print(f"| {name} | {p50 * 1e3:.2f} | {pct(xs, 99) * 1e3:.2f} | {(p50 - d50) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
