"""The fleet's replicas bind their own ports (port 0) and report them back, so a busy machine
cannot take a port between choosing and binding it; a replica that cannot start fails at once
and without a page of 'Event loop is closed' tracebacks.

The race is made certain, not left to chance: while ``squatting()`` is on, any port that code
in this process probed with a port-0 socket and let go is taken at once by another socket, as
another test run on a busy machine might.
"""

from __future__ import annotations

import gc
import json
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.sim import MODEL, Subscriber, replay, sdk
from tests.helpers.squat import squatting

# a coroutine or task left behind shows up as a warning at collection: fail on it
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"), pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


def _port(endpoint: str) -> int:
    port = urlparse(endpoint).port
    assert port is not None
    return port


def _check_replica(h) -> None:
    """The handle's HTTP, PUB and ROUTER endpoints are this replica's own (the squatters
    answer neither HTTP nor ZMQ)."""
    assert _port(h.url) == h.config.port != 0
    assert httpx.get(f"{h.url}/v1/models", timeout=5).json()["data"][0]["id"] == MODEL
    assert h.events_endpoint is not None and h.replay_endpoint is not None
    assert _port(h.events_endpoint) == h.config.kv_events_port != 0
    assert _port(h.replay_endpoint) == h.config.replay_port != 0
    sub = Subscriber(h.events_endpoint)
    try:
        sdk(h.url).completions.create(model=MODEL, prompt="ports " + " ".join(f"w{j}" for j in range(40)), max_tokens=1)
        assert sub.raw(), "no KV events on the handle's endpoint"
    finally:
        sub.close()
    frames = replay(h.replay_endpoint, 0)
    assert len(frames) >= 2 and frames[-1][-2] == b"\xff" * 8


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_fleet_binds_port_0_and_reports_the_ports(mode):
    configs = [SimConfig(model=MODEL, time_scale=0.0, kv_transfer="tcp") for _ in range(2)]
    fleet: SimFleet | None = None
    try:
        with squatting() as squat:
            t0 = time.monotonic()
            fleet = SimFleet(configs, mode=mode)
            fleet.start()
            took = time.monotonic() - t0
        assert took < 20, f"start took {took:.1f} s"
        taken = set(squat.ports)
        for h in fleet.handles:
            assert {_port(h.url), _port(h.events_endpoint), _port(h.replay_endpoint)}.isdisjoint(taken)
            _check_replica(h)
        # a restart binds the same ports again (the clients' endpoints stay valid)
        before = (fleet.handles[0].url, fleet.handles[0].events_endpoint, fleet.handles[0].replay_endpoint)
        fleet.restart(0)
        assert (fleet.handles[0].url, fleet.handles[0].events_endpoint, fleet.handles[0].replay_endpoint) == before
        _check_replica(fleet.handles[0])
    finally:
        if fleet is not None:
            fleet.stop()


@pytest.mark.parametrize(("which", "mode"), [("port", "thread"), ("kv_events_port", "thread"), ("replay_port", "process")])
def test_a_replica_that_cannot_bind_fails_at_once_and_quietly(capfd, which, mode):
    """A replica given a port someone else holds (its HTTP port, or a ZMQ port its start-up
    binds on the fleet's event loop): start() raises within seconds (not after a 30 s health
    wait) naming the cause, the other replica is stopped, and nothing is left behind to
    complain at collection ('Event loop is closed', 'Task was destroyed', 'never awaited')."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    bad = SimConfig(model=MODEL, time_scale=0.0, kv_transfer="tcp", **{which: held.getsockname()[1]})
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.0, kv_transfer="tcp"), bad], mode=mode)
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="in use"):
            fleet.start()
        assert time.monotonic() - t0 < 10
    finally:
        fleet.stop()
        held.close()
    gc.collect()
    err = capfd.readouterr().err
    for noise in ("Event loop is closed", "Task was destroyed", "never awaited", "Task exception was never retrieved"):
        assert noise not in err, err[-3000:]


def test_cli_ready_file_reports_every_replicas_ports(tmp_path):
    """``kvgate sim --port 0 --replicas 2`` with ZMQ endpoints on port 0: every replica binds its
    own ports, the ready file lists them, SIGTERM ends it cleanly; a port in use ends it at once
    with status 1 and the reason."""
    ready = tmp_path / "ready.json"
    argv = [sys.executable, "-m", "simulator.cli", "--port", "0", "--replicas", "2", "--time-scale", "0", "--no-nixl"]
    argv += ["--kv-events-endpoint", "tcp://127.0.0.1:0", "--replay-endpoint", "tcp://127.0.0.1:0", "--ready-file", str(ready)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no ready file"
            time.sleep(0.02)
        replicas = json.loads(ready.read_text())["replicas"]
        ports = [r[k] for r in replicas for k in ("port", "kv_events_port", "replay_port", "side_channel_port")]
        assert len(replicas) == 2 and all(ports) and len(set(ports)) == len(ports)
        for r in replicas:
            assert httpx.get(f"http://127.0.0.1:{r['port']}/health", timeout=5).status_code == 200
            frames = replay(f"tcp://127.0.0.1:{r['replay_port']}", 0)
            assert frames[-1][-2] == b"\xff" * 8
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")[-2000:]

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "simulator.cli", "--port", str(held.getsockname()[1]), "--time-scale", "0", "--no-nixl"], capture_output=True, timeout=30
        )
    finally:
        held.close()
    assert out.returncode == 1 and b"in use" in out.stderr and time.monotonic() - t0 < 20


def test_accepted_connections_have_tcp_nodelay():
    """A socket bound with proto 0 makes asyncio skip TCP_NODELAY on accepted connections: every
    kept-alive answer then waited ~40 ms for a delayed ACK (44 ms per request instead of 1)."""
    import socket as _socket

    import httpx

    from simulator.fleet import SimConfig, SimFleet

    fleet = SimFleet([SimConfig(model="kvgate/demo-8b", time_scale=0.0)], mode="thread")
    fleet.start()
    try:
        with httpx.Client() as c:
            assert c.get(fleet.handles[0].url + "/health").status_code == 200
            server = fleet._servers[0]
            assert server is not None
            conns = list(server.server_state.connections)
            assert conns
            for proto in conns:
                sock = proto.transport.get_extra_info("socket")
                assert sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY) == 1
    finally:
        fleet.stop()
