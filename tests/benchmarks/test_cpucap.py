"""benchmarks/cpucap.py: a real cgroup CPU quota on a real busy process (root only), and the
bench_peers runs that cap kvgate's workers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench_peers
from benchmarks.bench_peers import RouterSpec, run_all, tree_cpu_seconds
from benchmarks.compare import Setup
from benchmarks.cpucap import CpuCap, available, children
from benchmarks.workloads import shared_prefix

pytestmark = pytest.mark.skipif(not available(), reason="needs a writable cgroup CPU controller (root on Linux)")

BUSY = "import time\nt = time.monotonic() + 20\nwhile time.monotonic() < t: pass\n"


def test_a_capped_busy_loop_gets_its_quota_and_no_more():
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    cap = CpuCap(0.2)
    try:
        group = cap.add(proc.pid)
        assert str(proc.pid) in (group / "cgroup.procs").read_text().split()
        c0, t0 = tree_cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.5)
        used = (tree_cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        assert 0 < used <= 0.3, used  # 0.2 cores and a clock tick or two; a busy loop uncapped takes what a core gives
        # the quota held it back (unless a starved machine gave it less than its quota anyway)
        assert cap.throttled_s() > 0 or used < 0.15, used
    finally:
        proc.kill()
        proc.wait()
        cap.release()
    assert not group.exists()


def test_children_lists_direct_children_only():
    outer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); print(p.pid, flush=True); p.wait()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        inner = int(outer.stdout.readline())
        assert children(outer.pid) == [inner]
        assert inner not in children(os.getpid())
    finally:
        for pid in children(outer.pid):
            os.kill(pid, 9)
        outer.kill()
        outer.wait()


def test_bench_peers_caps_each_kvgate_worker(monkeypatch):
    """``--router-cpu-cap``: kvgate --workers 2 gets one capped cgroup per worker, and the run
    still serves every request (capped workers are slower, never failing)."""
    wl = shared_prefix(num_groups=2, num_prompts_per_group=5, system_prompt_len=120, question_len=10, output_len=8)
    seen: list[int] = []

    class Spy(CpuCap):
        def add(self, pid: int) -> Path:
            seen.append(pid)
            return super().add(pid)

    monkeypatch.setattr(bench_peers, "CpuCap", Spy)
    records, _ = run_all(
        [], [], Setup(2, 256, 0.0, 4), rounds=1, instant=[RouterSpec("kvgate", "default", workers=2)], instant_requests=20, instant_workload=wl, cpu_cap=0.5
    )
    (rec,) = records
    assert rec.failed is None, rec.failed
    assert rec.errors == 0 and rec.req_s > 0
    assert len(seen) == 2 and len(set(seen)) == 2  # the two workers, not the supervisor
