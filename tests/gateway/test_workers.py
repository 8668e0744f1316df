"""``kvgate serve --workers N``: N processes on one listening socket, supervised.

Real processes on loopback: the supervisor binds port 0 (read back from /proc), the workers
accept on its socket, a worker killed is started again, SIGTERM stops them all, and a killed
supervisor takes its workers with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.procports import wait_listening
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, wait_for


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimFleet]:
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.0) for i in range(2)])
    f.start()
    yield f
    f.stop()


def _children(pid: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                    out.add(int(c))
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


class Served:
    def __init__(self, fleet: SimFleet, tmp: Path, workers: int) -> None:
        cfg = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "replicas": [
                {"id": f"r{i}", "url": h.url, "models": [MODEL], "kv_events": h.events_endpoint, "replay": h.replay_endpoint}
                for i, h in enumerate(fleet.handles)
            ],
            "models": {MODEL: {"tokenizer": "demo"}},
            "auth": {"admin_key": "admin"},
        }
        path = tmp / "gw.yaml"
        path.write_text(json.dumps(cfg))
        self.log = (tmp / "gw.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", str(workers)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{wait_listening(self.proc, 30)}"
        wait_for(lambda: len(_children(self.proc.pid)) >= workers, timeout=30, message="workers started")
        wait_for(self._ready, timeout=30, message="ready")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def worker_pids(self, tries: int = 60) -> set[int]:
        pids = set()
        for _ in range(tries):  # a new connection each time: the kernel hands it to any worker
            state = httpx.get(f"{self.url}/admin/state", headers={"authorization": "Bearer admin"}, timeout=5)
            assert state.status_code == 200, state.text
            pids.add(state.json()["worker"]["pid"])
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def test_workers_share_the_socket_and_are_restarted(fleet: SimFleet, tmp_path: Path) -> None:
    s = Served(fleet, tmp_path, 2)
    try:
        children = _children(s.proc.pid)
        pids = s.worker_pids()
        assert pids == children and len(pids) == 2, (pids, children)
        sdk = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        for i in range(10):
            assert sdk.completions.create(model=MODEL, prompt=f"hello {i}", max_tokens=2).choices[0].text is not None
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in _children(s.proc.pid) and len(_children(s.proc.pid)) == 2, timeout=15, message="the killed worker replaced")
        wait_for(s._ready, timeout=30, message="ready again")
        new = s.worker_pids()
        assert victim not in new and len(new) == 2
        assert sdk.completions.create(model=MODEL, prompt="after the restart", max_tokens=2).choices
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
        assert not any(_alive(p) for p in new)
    finally:
        s.stop()


def test_a_killed_supervisor_takes_its_workers_with_it(fleet: SimFleet, tmp_path: Path) -> None:
    s = Served(fleet, tmp_path, 2)
    try:
        pids = _children(s.proc.pid)
        s.proc.kill()
        s.proc.wait(10)
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=15, message="workers gone")
    finally:
        s.stop()


def test_a_config_the_workers_would_refuse_is_refused_before_they_start(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"listen": {"host": "127.0.0.1", "port": 0}, "scheduling": {"default_profile": "no-such-profile"}}))
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", "2"], capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"kvgate: config error:"), proc.stderr[-500:]
