"""How much latency the gateway adds over calling a replica directly.

One simulated replica at time-scale 0 (answers as fast as Python can) in its own process, the
gateway (``kvgate serve``) in its own process, and the load generator here. The same requests
go direct and through the gateway, interleaved in rounds so both see the same machine state;
the figures are the differences (and ratios) between the two in this run, never absolute
targets. Concurrency 1 shows the per-request cost; concurrency 32 shows throughput.

``--compare LABEL=DIR`` (repeatable) runs another gateway from another source tree (e.g. a
``git archive`` of an older commit) in front of the same replica, interleaved with the others,
so a change to the hot path is measured before and after in the same run.

    python -m benchmarks.bench_overhead [--requests 400] [--quick] [--compare before=/tmp/old]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .procports import sim_ports, wait_listening

MODEL = "kvgate/demo-8b"


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _start_gateway(root: Path, sim_port: int, tmp: Path, label: str) -> tuple[subprocess.Popen, str]:
    """A gateway on port 0 (it binds a free port itself; read back from /proc)."""
    cfg = tmp / f"gw-{label}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "replicas": [{"id": "r0", "url": f"http://127.0.0.1:{sim_port}", "models": [MODEL]}],
                "models": {MODEL: {"tokenizer": "demo"}},
            }
        )
    )
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root)}
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        port = wait_listening(gw)
    except RuntimeError:
        gw.kill()
        raise
    return gw, f"http://127.0.0.1:{port}"


def start_stack(tmp: Path, compare: dict[str, Path] | None = None) -> tuple[list[subprocess.Popen], str, dict[str, str]]:
    """The replica, this tree's gateway ("gateway") and one gateway per ``compare`` entry, each
    on a port it bound itself."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ready = tmp / "sim.ready.json"
    sim = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "sim", "--port", "0", "--model", MODEL, "--time-scale", "0", "--tokenizer", "demo", "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [sim]
    sim_port = sim_ports(sim, ready)[0]["port"]
    gateways: dict[str, str] = {}
    for label, root in {"gateway": Path(__file__).resolve().parents[1], **(compare or {})}.items():
        proc, url = _start_gateway(root, sim_port, tmp, label)
        procs.append(proc)
        gateways[label] = url
    direct = f"http://127.0.0.1:{sim_port}"
    _wait_http(f"{direct}/health")
    for url in gateways.values():
        _wait_http(f"{url}/ready")
    return procs, direct, gateways


def _body(i: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": f"Benchmark request {i % 50}: say something short.", "max_tokens": 8, "stream": stream}


def _one_sync(client: httpx.Client, base: str, i: int, stream: bool) -> float:
    t0 = time.perf_counter()
    if stream:
        with client.stream("POST", f"{base}/v1/completions", json=_body(i, True)) as r:
            for _ in r.iter_raw():
                pass
            assert r.status_code == 200
    else:
        r = client.post(f"{base}/v1/completions", json=_body(i, False))
        assert r.status_code == 200
    return time.perf_counter() - t0


def concurrency_1(targets: dict[str, str], n: int, stream: bool) -> dict[str, list[float]]:
    """Sequential requests, round-robin over the targets so all see the same machine state."""
    out: dict[str, list[float]] = {k: [] for k in targets}
    with httpx.Client(timeout=30) as client:
        for i in range(20):  # warm every path (connections, caches)
            for base in targets.values():
                _one_sync(client, base, i, stream)
        for i in range(n):
            for name, base in targets.items():
                out[name].append(_one_sync(client, base, i, stream))
    return out


async def _concurrent(base: str, n: int, conc: int, stream: bool) -> tuple[list[float], float]:
    """Closed-loop load at ``conc``; aiohttp so the load generator is not the bottleneck."""
    import aiohttp

    lat: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as session:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                t0 = time.perf_counter()
                async with session.post(f"{base}/v1/completions", json=_body(i, stream)) as r:
                    async for _ in r.content.iter_any():
                        pass
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat, n / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per path and mode at concurrency 1")
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR", help="also measure the gateway of another source tree")
    args = ap.parse_args(argv)
    n = 100 if args.quick else args.requests
    compare = {}
    for item in args.compare:
        label, _, root = item.partition("=")
        compare[label] = Path(root)
    # mode, gateway, direct p50, gateway p50, added p50, added p99 (ms), direct and gateway req/s (c=32 only)
    rows: list[tuple[str, str, float, float, float, float, float | None, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs, direct, gateways = start_stack(Path(tmp), compare)
        try:
            targets = {"direct": direct, **gateways}
            for stream in (False, True):
                mode = "stream" if stream else "non-stream"
                c1 = concurrency_1(targets, n, stream)
                d50, d99 = statistics.median(c1["direct"]), pct(c1["direct"], 99)
                for name in gateways:
                    lat = c1[name]
                    rows.append(
                        (
                            f"c=1 {mode}",
                            name,
                            d50 * 1e3,
                            statistics.median(lat) * 1e3,
                            (statistics.median(lat) - d50) * 1e3,
                            (pct(lat, 99) - d99) * 1e3,
                            None,
                            None,
                        )
                    )
                nd, rps_d = asyncio.run(_concurrent(direct, n * 5, 32, stream))
                for name, url in gateways.items():
                    ng, rps_g = asyncio.run(_concurrent(url, n * 5, 32, stream))
                    rows.append(
                        (
                            f"c=32 {mode}",
                            name,
                            statistics.median(nd) * 1e3,
                            statistics.median(ng) * 1e3,
                            (statistics.median(ng) - statistics.median(nd)) * 1e3,
                            (pct(ng, 99) - pct(nd, 99)) * 1e3,
                            rps_d,
                            rps_g,
                        )
                    )
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print("| mode | gateway | direct p50 ms | gateway p50 ms | added p50 ms | added p99 ms | direct req/s | gateway req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, name, d, g, a50, a99, rd, rg in rows:
        rs = f"{rd:.0f} | {rg:.0f}" if rd else "- | -"
        print(f"| {mode} | {name} | {d:.2f} | {g:.2f} | {a50:.2f} | {a99:.2f} | {rs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
