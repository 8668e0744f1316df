"""Redis backend: one round trip per lookup, pipelined writes, and a clear error when Redis is gone.

Round trips are counted twice, independently: on the client, by a real redis-py connection
class that counts every write to the socket (each write is followed by a wait for the reply),
and on the server, by ``INFO commandstats`` deltas.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio.connection import Connection

from kvindex.index import IndexUnavailableError
from kvindex.redis_index import RedisIndex, RedisIndexUnavailable
from tests.helpers.index import MODEL, Prompt, apply, make_tokens, match
from tests.helpers.net import free_port
from tests.helpers.redis import RedisServer

pytestmark = pytest.mark.redis


class CountingConnection(Connection):
    """A plain redis-py connection that records the command name of every socket write."""

    writes: Counter[str]

    async def send_packed_command(self, command, check_health: bool = True) -> None:  # type: ignore[override]
        raw = command if isinstance(command, (bytes, str)) else b"".join(bytes(c) for c in command)
        if isinstance(raw, str):
            raw = raw.encode()
        names = re.findall(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n", raw)
        self.writes[b"+".join(n.upper() for n in names).decode()] += 1
        await super().send_packed_command(command, check_health)


def counted(idx: RedisIndex) -> Counter[str]:
    """Make ``idx``'s pool open counting connections; returns the shared counter."""
    writes: Counter[str] = Counter()
    cls = type("Counting", (CountingConnection,), {"writes": writes})
    idx._redis.connection_pool.connection_class = cls
    return writes


def commandstats(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


@pytest.fixture
async def ridx(redis_url: str) -> AsyncIterator[RedisIndex]:
    idx = RedisIndex(redis_url, ttl_s=600)
    yield idx
    await idx.close()


async def test_lookup_is_one_round_trip(ridx: RedisIndex, redis_url: str) -> None:
    writes = counted(ridx)
    p = Prompt(make_tokens(512, 40))
    for r in ("r1", "r2", "r3"):
        await apply(ridx, r, p.stored(0, 64 * (1 + int(r[1]))))
    other = Prompt(make_tokens(64, 41))
    await ridx.lookup(other.keys, model=MODEL)  # warm: connect handshake, SCRIPT LOAD of the lookup script
    client = redis.Redis.from_url(redis_url)
    try:
        writes.clear()
        before = commandstats(client)
        n = 20
        for i in range(n):
            keys = p.keys[:64] if i % 2 else p.keys  # 64- and 512-block lookups
            found = await ridx.lookup(keys, model=MODEL)
            assert found == {"r1": match(min(128, len(keys))), "r2": match(min(192, len(keys))), "r3": match(min(256, len(keys)))}
        assert await ridx.lookup(other.keys, model=MODEL) == {}  # a miss too
        after = commandstats(client)
        assert writes == Counter({"EVALSHA": n + 1}), writes  # one socket write each, nothing else
        assert after["evalsha"] - before["evalsha"] == n + 1
        # (commandstats also counts what the script runs inside Redis: MGET, HMGET, EXPIRE)
        assert after["mget"] - before["mget"] == n + 1  # the chain is read with one MGET per lookup
        # the hits re-armed TTLs inside those same scripts: still one write per lookup
        writes.clear()
        await ridx.lookup(p.keys, model=MODEL)
        assert writes == Counter({"EVALSHA": 1})
    finally:
        client.close()


async def test_apply_is_one_round_trip_per_batch(ridx: RedisIndex) -> None:
    writes = counted(ridx)
    await apply(ridx, "r0", Prompt(make_tokens(1, 42)).stored())  # warm: handshake + SCRIPT LOAD
    writes.clear()
    p, q = Prompt(make_tokens(40, 43)), Prompt(make_tokens(8, 44))
    stats = await apply(ridx, "r1", p.stored(0, 10), p.stored(10, 40), q.stored(), p.stored(0, 40, medium="CPU"), q.removed(4, 8))
    assert (stats.stored, stats.removed) == (88, 4)
    assert writes == Counter({"EVALSHA": 1}), writes  # five events, every block: one script call
    # a second process that never saw the parent asks Redis's map once, then applies once
    other = RedisIndex(ridx.url)
    w2 = counted(other)
    try:
        await apply(other, "r0", Prompt(make_tokens(1, 45)).stored())
        w2.clear()
        longer = Prompt(p.tokens + make_tokens(4, 46))
        assert (await apply(other, "r1", longer.stored(40, 44))).orphaned == 0
        assert w2 == Counter({"HMGET": 1, "EVALSHA": 1}), w2
        assert await other.lookup(longer.keys, model=MODEL) == {"r1": match(44)}
    finally:
        await other.close()


async def test_unreachable_redis_raises_a_clear_error() -> None:
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    idx = RedisIndex(url, socket_timeout=0.2, retries=0)
    try:
        for call in (
            lambda: idx.lookup([1, 2], model=MODEL),
            lambda: apply(idx, "r1", Prompt(make_tokens(1, 47)).stored()),
            lambda: idx.mark_untrusted("r1"),
            lambda: idx.drop_replica("r1"),
            lambda: idx.block_count(),
        ):
            with pytest.raises(IndexUnavailableError) as info:
                await call()
            assert isinstance(info.value, RedisIndexUnavailable) and isinstance(info.value, redis.RedisError)
            text = str(info.value)
            assert "unavailable" in text and f"127.0.0.1:{url.rsplit(':', 1)[1]}" in text and "secret" not in text
        assert await idx.ping() is False
    finally:
        await idx.close()


async def test_redis_outage_then_recovery(redis_server: RedisServer, redis_url: str) -> None:
    """Redis stops: calls fail fast with IndexUnavailableError; it comes back: the same index
    object works again without being rebuilt (pooled connections are replaced)."""
    idx = RedisIndex(redis_url, socket_timeout=0.3, retries=1)
    try:
        p = Prompt(make_tokens(4, 48))
        await apply(idx, "r1", p.stored())
        redis_server.stop()
        with pytest.raises(IndexUnavailableError):
            await idx.lookup(p.keys, model=MODEL)
        redis_server.start()
        assert await idx.lookup(p.keys, model=MODEL) == {}  # data went with the process
        await apply(idx, "r1", p.stored())
        assert await idx.lookup(p.keys, model=MODEL) == {"r1": match(4)}
    finally:
        await idx.close()


async def test_data_lost_reported_once_to_every_process(redis_server: RedisServer, redis_url: str) -> None:
    """The generation marker: two processes share Redis; FLUSHALL, then an empty restart, are each
    reported once to each of them (the first to look re-creates the marker, the other finds a
    token that is not its own); a steady Redis is never reported."""
    a, b = RedisIndex(redis_url, retries=1), RedisIndex(redis_url, retries=1)
    admin = redis.Redis.from_url(redis_url)
    try:
        p = Prompt(make_tokens(3, 60))
        await apply(a, "r1", p.stored())
        for _ in range(3):
            assert await a.data_lost() is False and await b.data_lost() is False
            await a.lookup(p.keys, model=MODEL)
        admin.flushall()
        assert await a.data_lost() is True
        assert await a.data_lost() is False
        assert await b.data_lost() is True
        assert await b.data_lost() is False
        # an empty restart, noticed first by a write: the apply script re-creates the marker and
        # the loss is known without another round trip
        redis_server.restart()
        await apply(a, "r1", p.stored())
        assert a._lost
        assert await a.data_lost() is True and await a.data_lost() is False
        assert await b.data_lost() is True
        # the engine-hash cache is forgotten per replica, on request (the rebuild does it)
        assert "r1" in a._maps
        a.forget_local("r1")
        assert "r1" not in a._maps
    finally:
        admin.close()
        await a.close()
        await b.close()


async def test_data_lost_raises_while_redis_is_down() -> None:
    idx = RedisIndex(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2, retries=0)
    try:
        with pytest.raises(IndexUnavailableError):
            await idx.data_lost()
    finally:
        await idx.close()
