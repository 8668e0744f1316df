"""A Redis outage, as the logs and the prefix hits see it: one line when the index goes away, one
when it is back (and a reminder while it stays away), from every component that uses it (the
gateway's subscriber, ``kvgate indexer``, a gateway that only looks up); and after an empty
restart the replicas' replay buffers are back in the index within two seconds.

Real redis-server (stopped, then a new empty one on the same port), real ZMQ publishers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import pytest
import zmq.asyncio

from kvindex.events import EventBatch, encode_batch
from kvindex.index import IndexUnavailableError, KVIndex, PrefixMatch
from kvindex.outage import StateLog
from kvindex.redis_index import RedisIndex
from kvindex.subscriber import EventSubscriber, ReplicaSource
from tests.helpers.events import Publisher
from tests.helpers.index import MODEL, Prompt, make_tokens
from tests.helpers.redis import RedisServer

CHECK_S = 1.0  # the default loss-check period: recovery must not depend on a short one
DEADLINE_S = 10.0


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


class Lines(logging.Handler):
    """Every record of the ``kvgate`` loggers at WARNING and above (whatever ``propagate`` says)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, since: int = 0) -> list[str]:
        return [r.getMessage() for r in self.records[since:]]

    def count(self, needle: str, since: int = 0) -> int:
        return sum(needle in m for m in self.messages(since))


@contextlib.contextmanager
def warnings_of_kvgate() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("kvgate")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def payload(*events) -> bytes:
    return encode_batch(EventBatch(ts=1.0, events=list(events), data_parallel_rank=0))


async def found(index: KVIndex, keys, model: str = MODEL) -> dict[str, PrefixMatch] | None:
    try:
        return await index.lookup(keys, model=model)
    except IndexUnavailableError:
        return None


async def poll(cond, what: str, timeout: float = DEADLINE_S) -> float:
    """Wait for ``cond`` (bounded); the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await cond():
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"not met within {timeout} s: {what}")


async def has(index: KVIndex, p: Prompt, replica: str) -> bool:
    return ((await found(index, p.keys)) or {}).get(replica) == PrefixMatch(len(p.keys), "GPU")


async def ticking(pub: Publisher, stop: asyncio.Event, every_s: float = 0.02) -> None:
    """A replica under load: a batch every ``every_s`` (50/s), as long as ``stop`` is not set."""
    i = 0
    while not stop.is_set():
        i += 1
        await pub.publish(payload(Prompt(make_tokens(2, 50_000 + i)).stored()))
        await asyncio.sleep(every_s)


# -- the state log itself ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_state_log_one_line_per_change_and_a_reminder(caplog) -> None:
    clock = Clock()
    logger = logging.getLogger("test_state_log")  # outside "kvgate", which may not propagate to caplog
    s = StateLog(logger, "thing", remind_s=30.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test_state_log"):
        s.up()  # up while up: nothing
        for _ in range(500):  # 65 failures a second for ~8 s: one line
            s.down("refused")
            clock.t += 1 / 65
        assert [r.getMessage() for r in caplog.records] == ["thing unavailable: refused"]
        clock.t += 25.0
        s.down("timeout")  # 30 s after the first line: a reminder
        assert len(caplog.records) == 2 and "still unavailable" in caplog.records[1].getMessage()
        assert "501 failed" in caplog.records[1].getMessage() and "timeout" in caplog.records[1].getMessage()
        s.down("timeout")
        assert len(caplog.records) == 2
        clock.t += 2.0
        s.up()
        s.up()
        assert len(caplog.records) == 3 and caplog.records[2].getMessage() == "thing answers again after 34.7 s (502 failed calls)"
        # flapping: a new outage right after the last line is held back, and so is its recovery
        for _ in range(10):
            clock.t += 0.5
            s.down("refused")
            clock.t += 0.5
            s.up()
        assert len(caplog.records) == 3
        clock.t += 30.0
        s.down("refused")  # a line again, saying what was held back
        assert len(caplog.records) == 4 and "10 short outages" in caplog.records[3].getMessage()
        s.up()
        assert len(caplog.records) == 5 and s.is_up


# -- a Redis outage under a live event stream ------------------------------------------------------


@pytest.mark.redis
async def test_outage_logs_one_line_per_change_and_recovers(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """A replica publishes 50 batches/s while Redis is down for 3 s, then comes back empty:
    the subscriber and the index together log one line for the outage and a few for the
    recovery (not two per batch), and the index is rebuilt."""
    pub = Publisher(ctx)
    idx = RedisIndex(redis_url, socket_timeout=0.3, retries=1)
    sub = EventSubscriber(idx, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=CHECK_S)
    await sub.start()
    stop = asyncio.Event()
    ticker: asyncio.Task | None = None
    try:
        p = Prompt(make_tokens(4, 7))
        await poll(lambda: _published_until(pub, p, idx), "subscriber connected")
        with warnings_of_kvgate() as lines:
            ticker = asyncio.create_task(ticking(pub, stop))
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(3.0)
            st = sub.stats.replica("r0")
            assert st.index_errors >= 50  # the batches did hit the outage
            during = lines.messages()
            assert lines.count("unavailable") == 1 and len(during) == 1, during
            await asyncio.to_thread(redis_server.start)
            await poll(lambda: has(idx, p, "r0"), "rebuilt after the empty restart")
            await poll(lambda: _true(lines.count("answers again") == 1), "the recovery line")
            await asyncio.sleep(0.5)  # nothing more trickles in
            after = lines.messages(len(during))
            assert len(after) <= 3, after
            assert sub.stats.index_losses == 1
    finally:
        stop.set()
        if ticker is not None:
            await ticker
        await asyncio.wait_for(sub.stop(), 2)
        await idx.close()
        await pub.close()
        ensure_running(redis_server)


def ensure_running(server: RedisServer) -> None:
    """Start the session's redis-server again if a failed test left it stopped."""
    if server.proc is None or server.proc.poll() is not None:
        server.start()


async def _published_until(pub: Publisher, p: Prompt, idx: KVIndex) -> bool:
    await pub.publish(payload(p.stored()))
    return await has(idx, p, "r0")


async def _true(v: bool) -> bool:
    return v


@pytest.mark.redis
async def test_indexer_and_lookup_only_gateway_log_the_outage(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """``kvgate indexer`` with idle replicas (no batch to fail) and a gateway that only looks up
    (``ingest: false``) each say that Redis went away and came back, once."""
    from gateway import indexer
    from gateway.config import GatewayConfig, IndexConfig, ReplicaConfig

    pub = Publisher(ctx)
    cfg = GatewayConfig(
        replicas=[ReplicaConfig(id="r0", url="http://127.0.0.1:9", models=[MODEL], kv_events=pub.endpoint, replay=pub.replay_endpoint)],
        index=IndexConfig(backend=redis_url, ingest=False),
    )
    task = asyncio.create_task(indexer.run(cfg, None, stats_every_s=60, loss_check_s=CHECK_S))
    gw = RedisIndex(redis_url, socket_timeout=0.3, retries=1)
    try:
        p = Prompt(make_tokens(4, 8))
        await poll(lambda: _published_until(pub, p, gw), "indexer connected")
        with warnings_of_kvgate() as lines:
            await asyncio.to_thread(redis_server.stop)
            for _ in range(20):  # the gateway keeps routing: lookups fail
                assert await found(gw, p.keys) is None
                await asyncio.sleep(0.05)
            await poll(lambda: _true(lines.count("unavailable") == 2), "both processes' down lines", timeout=3)
            await asyncio.to_thread(redis_server.start)
            await poll(lambda: has(gw, p, "r0"), "rebuilt by the indexer")
            await poll(lambda: _true(lines.count("answers again") == 2), "both processes' up lines", timeout=3)
            assert lines.count("unavailable") == 2, lines.messages()
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)
        await gw.close()
        await pub.close()
        ensure_running(redis_server)


# -- recovery time ------------------------------------------------------------------------------


@pytest.mark.redis
async def test_prefix_hits_back_within_2s_of_an_empty_restart(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """Two replicas with 5000 batches each in their replay buffers (vLLM keeps 10 000): after
    Redis restarts empty, the newest prefix of each is found again within 2 s of Redis
    answering, with the default 1 s loss check. (It took ~5 s here, one round trip per batch.)"""
    pubs = [Publisher(ctx, buffer=10_000) for _ in range(2)]
    for n, pub in enumerate(pubs):
        for i in range(5000):
            await pub.publish(payload(Prompt(make_tokens(2, 100_000 * (n + 1) + i)).stored()))
    idx = RedisIndex(redis_url)
    sources = [ReplicaSource(f"r{n}", MODEL, pub.endpoint, pub.replay_endpoint) for n, pub in enumerate(pubs)]
    sub = EventSubscriber(idx, sources, ctx=ctx, loss_check_s=CHECK_S)
    await sub.start()
    try:
        newest = [Prompt(make_tokens(4, 900 + n)) for n in range(2)]
        for n, pub in enumerate(pubs):  # joins late: catches up on the buffer, then this one
            await poll(lambda pub=pub, n=n: _published_until_r(pub, newest[n], idx, f"r{n}"), "caught up", timeout=30)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis_server.start)
        took = await poll(lambda: _all_back(idx, newest), "newest prefixes back")
        assert took <= 2.0, f"{took:.2f} s"
        oldest = Prompt(make_tokens(2, 100_000))
        assert await has(idx, oldest, "r0")  # and the rest of the buffer with them
        assert sub.stats.index_losses == 1
        for n in range(2):
            st = sub.stats.replica(f"r{n}")
            assert st.rebuilds == 1 and st.batches_unrecoverable == 0 and st.batches_replayed >= 2 * 5000
    finally:
        await asyncio.wait_for(sub.stop(), 5)
        await idx.close()
        for pub in pubs:
            await pub.close()
        ensure_running(redis_server)


async def _published_until_r(pub: Publisher, p: Prompt, idx: KVIndex, rid: str) -> bool:
    if not await has(idx, p, rid):
        await pub.publish(payload(p.stored()))
        await asyncio.sleep(0.05)
    return await has(idx, p, rid)


async def _all_back(idx: KVIndex, prompts: list[Prompt]) -> bool:
    return all([await has(idx, p, f"r{n}") for n, p in enumerate(prompts)])
