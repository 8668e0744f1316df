"""Hold a process to a fraction of a core with a CFS quota, each in a cgroup of its own.

Why: ``kvgate serve --workers N`` is meant to serve about N times one worker's requests on a
node with a core per worker. On a 2-core machine the replicas and the load generator take most
of the CPU, so adding a worker cannot show that: what limits the run is not the gateway. Giving
every worker the same small CPU budget (``cores`` of a core each, say 0.1) makes the gateway the
limit again, as it is on a node whose cores are all the gateway's, while the rest of the
machine has room: one capped worker serves what 0.1 core allows, N of them what N × 0.1 allow,
minus what they duplicate (each reads every replica's KV events, probes and scrapes them).

cgroup v1 (``/sys/fs/cgroup/cpu``) and v2 (``cpu.max``); needs root. The quota period is 10 ms,
not the kernel's 100 ms: with 100 ms a capped worker ran 10 ms and then stood still for 90, and
a closed-loop client's requests piled up behind whichever worker was waiting (two workers used
0.13 cores of their 0.20 in 4 of 5 rounds). The kernel notices a group past its quota only at
its next scheduling event or tick, so each short period can overrun a little: measured, a
worker capped at 0.1 core used 0.10-0.16. So compare CPU per request as well as throughput
(bench_peers prints both).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

PERIOD_US = 10_000
_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


class CpuCapError(RuntimeError):
    """No cgroup CPU controller this process may use (not root, or none mounted)."""


def _root() -> tuple[Path, int]:
    """(the directory new cgroups go in, cgroup version)."""
    if (_V1 / "cpu.cfs_quota_us").exists() and os.access(_V1, os.W_OK):
        return _V1, 1
    controllers = _V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split() and os.access(_V2, os.W_OK):
        with contextlib.suppress(OSError):  # may already be on; needed for children to get cpu.max
            (_V2 / "cgroup.subtree_control").write_text("+cpu")
        return _V2, 2
    raise CpuCapError("no writable cgroup CPU controller (run as root on Linux)")


class CpuCap:
    """Every pid given to ``add`` gets ``cores`` of a core, in a cgroup of its own; ``release``
    removes the cgroups (their processes are moved back to the root group first)."""

    def __init__(self, cores: float, tag: str = "kvgate-bench") -> None:
        if not 0 < cores <= 64:
            raise ValueError(f"cores must be in (0, 64], got {cores}")
        self.cores = cores
        self.root, self.version = _root()
        self.tag = f"{tag}-{os.getpid()}-{time.monotonic_ns()}"
        self.groups: list[Path] = []

    def add(self, pid: int) -> Path:
        group = self.root / f"{self.tag}-{len(self.groups)}"
        group.mkdir()
        self.groups.append(group)
        quota = max(1000, int(self.cores * PERIOD_US))  # the kernel's floor: 1 ms
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        (group / "cgroup.procs").write_text(str(pid))  # the whole process: every thread, and threads started later
        return group

    def throttled_s(self) -> float:
        """Seconds the capped processes spent throttled (waiting for their next quota)."""
        total = 0.0
        for g in self.groups:
            with contextlib.suppress(OSError):
                for line in (g / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "throttled_time":  # v1, ns
                        total += int(value) / 1e9
                    elif key == "throttled_usec":  # v2
                        total += int(value) / 1e6
        return total

    def release(self) -> None:
        for g in self.groups:
            with contextlib.suppress(OSError):
                for pid in (g / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid)
            for _ in range(50):  # rmdir fails while the kernel still counts an exiting task
                try:
                    g.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.groups.clear()


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux ``/proc/PID/task/*/children``)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return sorted(set(out))


def available() -> bool:
    try:
        _root()
    except CpuCapError:
        return False
    return True
