"""Latency the Envoy + ext-proc path adds, against Envoy alone, our HTTP gateway, and direct.

One simulated replica at time-scale 0 in its own process; `kvgate extproc` and `kvgate serve`
in their own processes; Envoy 1.40 three times: with the ext_proc picker in BUFFERED mode and in
FULL_DUPLEX_STREAMED mode (both rendered from deploy/envoy/envoy.template.yaml), and alone with
a static upstream. Requests at concurrency 1 rotate over the paths so all see the same machine
state. Two measures: the whole non-streaming request, and the time to the first streamed
chunk. Figures are p50/p99 and the p50 difference to direct and to Envoy alone.

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
from .envoy_stack import extproc_envoy, find_envoy, static_envoy
from .procports import sim_ports, wait_listening


def _once(client: httpx.Client, base: str, body: dict, stream: bool) -> float:
    t0 = time.perf_counter()
    if not stream:
        r = client.post(f"{base}/v1/completions", json=body)
        assert r.status_code == 200, (base, r.status_code, r.text[:200])
        return time.perf_counter() - t0
    with client.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, (base, r.status_code)
        dt = None
        for line in r.iter_lines():  # read to the end: the connection goes back to the pool clean
            if dt is None and line.startswith("data:"):
                dt = time.perf_counter() - t0
    assert dt is not None, base
    return dt


def _table(title: str, lat: dict[str, list[float]]) -> None:
    d50 = statistics.median(lat["direct"])
    e50 = statistics.median(lat["envoy alone"])
    print(f"\n{title}\n")
    print("| path (c=1) | p50 ms | p99 ms | p50 added vs direct ms | p50 added vs Envoy alone ms |")
    print("|---|---|---|---|---|")
    for name, xs in lat.items():
        p50 = statistics.median(xs)
        vs_envoy = f"{(p50 - e50) * 1e3:.2f}" if name.startswith("envoy +") else ""
        print(f"| {name} | {p50 * 1e3:.2f} | {pct(xs, 99) * 1e3:.2f} | {(p50 - d50) * 1e3:.2f} | {vs_envoy} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per path and measure")
    args = ap.parse_args(argv)
    binary = find_envoy()
    if binary is None:
        print("envoy not installed: run `make envoy`", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    procs: list[subprocess.Popen] = []
    envoys = []
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        # every server binds port 0 itself; the sim reports its port, the others are read from /proc
        ready = tmpd / "sim.ready.json"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "sim", "--port", "0", "--time-scale", "0", "--ready-file", str(ready)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        sim_port = sim_ports(procs[-1], ready)[0]["port"]
        cfg = tmpd / "gw.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "listen": {"port": 0},
                    "replicas": [{"id": "r0", "url": f"http://127.0.0.1:{sim_port}", "models": [MODEL]}],
                    "models": {MODEL: {"tokenizer": "demo"}},
                }
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "extproc", "--config", str(cfg), "--port", "0"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        try:
            gw_port, ep_port = wait_listening(procs[1]), wait_listening(procs[2])
            _wait_http(f"http://127.0.0.1:{sim_port}/health")
            _wait_http(f"http://127.0.0.1:{gw_port}/ready")
            time.sleep(1.0)  # the picker's first health probe
            envoys = [
                extproc_envoy(tmpd, ep_port, binary, "buffered").start(),
                extproc_envoy(tmpd, ep_port, binary, "full-duplex").start(),
                static_envoy(tmpd, "127.0.0.1", sim_port, binary).start(),
            ]
            paths = {
                "direct": f"http://127.0.0.1:{sim_port}",
                "envoy alone": envoys[2].url,
                "envoy + ext-proc (BUFFERED)": envoys[0].url,
                "envoy + ext-proc (FULL_DUPLEX_STREAMED)": envoys[1].url,
                "kvgate HTTP gateway": f"http://127.0.0.1:{gw_port}",
            }
            body = {"model": MODEL, "prompt": "Benchmark request: say something short.", "max_tokens": 8}
            with httpx.Client(timeout=30) as client:
                for stream in (False, True):
                    lat: dict[str, list[float]] = {k: [] for k in paths}
                    for i in range(args.requests + 20):
                        for name, base in paths.items():
                            dt = _once(client, base, body, stream)
                            if i >= 20:
                                lat[name].append(dt)
                    results["time to first streamed chunk" if stream else "whole non-streaming request"] = lat
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
    print(f"python -m benchmarks.bench_extproc --requests {args.requests}  (one simulated replica, time-scale 0; {os.cpu_count()} cores)")
    for title, lat in results.items():
        _table(title, lat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
