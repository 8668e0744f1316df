"""Redis restarts empty: the subscriber notices and rebuilds the index from the replicas' replay
buffers, with no new event from any replica. Real redis-server (stopped, then a new empty one on
the same port), real ZMQ publishers (the subscriber tests' vLLM-wire publisher, and the simulator).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import httpx
import pytest
import redis as redis_sync
import zmq.asyncio

from kvindex.events import AllBlocksCleared, EventBatch, decode_batch, encode_batch
from kvindex.hashing import block_keys
from kvindex.index import IndexUnavailableError, KVIndex, PrefixMatch
from kvindex.memory_index import MemoryIndex
from kvindex.redis_index import RedisIndex
from kvindex.subscriber import EventSubscriber, ReplicaSource
from tests.helpers.events import LossyReplay, Publisher
from tests.helpers.index import MODEL, Prompt, make_tokens
from tests.helpers.redis import RedisServer

pytestmark = pytest.mark.redis

CHECK_S = 0.1  # the subscribers' loss-check period in these tests
DEADLINE_S = 8.0  # every wait below is bounded by this


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


def payload(*events) -> bytes:
    return encode_batch(EventBatch(ts=1.0, events=list(events), data_parallel_rank=0))


async def found(index: KVIndex, keys: Sequence[int], model: str = MODEL) -> dict[str, PrefixMatch] | None:
    """The index's answer, or None while it cannot be asked (Redis down)."""
    try:
        return await index.lookup(keys, model=model)
    except IndexUnavailableError:
        return None


async def poll(cond, what: str, timeout: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not met within {timeout} s: {what}")


async def connect(pub: Publisher, index: KVIndex) -> None:
    """Publish one small batch until the subscriber got it (ZMQ slow joiner)."""
    p = Prompt(make_tokens(1, 999))
    raw = payload(p.stored())
    for _ in range(200):
        await pub.publish(raw)
        await asyncio.sleep(0.02)
        if (await found(index, p.keys) or {}).get("r0"):
            return
    raise AssertionError("subscriber never connected")


@contextlib.asynccontextmanager
async def subscribers(ctx, pub: Publisher, url: str, n: int = 1):
    """``n`` gateways' worth of ingestion: each its own RedisIndex and subscriber on ``pub``."""
    pairs = []
    try:
        for _ in range(n):
            idx = RedisIndex(url, socket_timeout=0.3, retries=1, ttl_s=600)
            sub = EventSubscriber(idx, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=CHECK_S)
            await sub.start()
            pairs.append((idx, sub))
        yield pairs
    finally:
        for idx, sub in pairs:
            await asyncio.wait_for(sub.stop(), 2)
            await idx.close()


async def restart_empty(server: RedisServer) -> None:
    """Stop redis-server and start a new, empty one on the same port (off the event loop, so
    the subscribers keep running and see the outage)."""
    await asyncio.to_thread(server.restart)


async def test_rebuilt_after_redis_restarts_empty(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """Blocks stored before the restart are found again, removals and tiers included, without
    the replica publishing anything new; lookups keep answering meanwhile (finding less)."""
    pub = Publisher(ctx)
    try:
        async with subscribers(ctx, pub, redis_url) as [(idx, sub)]:
            await connect(pub, idx)
            a, b = Prompt(make_tokens(12, 1)), Prompt(make_tokens(6, 2))
            for raw in (
                payload(a.stored(0, 8)),
                payload(a.stored(8, 12), b.stored()),
                payload(b.removed(3, 6), a.stored(0, 4, medium="CPU")),
            ):
                await pub.publish(raw)
            want = {"r0": PrefixMatch(12, "GPU")}
            await poll(lambda: _eq(found(idx, a.keys), want), "events applied")
            assert await found(idx, b.keys) == {"r0": PrefixMatch(3, "GPU")}
            seq_before = pub.seq

            await restart_empty(redis_server)
            during = await found(idx, a.keys)  # Redis is back: lookups answer, perhaps finding less
            assert during == {} or (set(during) == {"r0"} and during["r0"].blocks <= 12), during
            await poll(lambda: _eq(found(idx, a.keys), want), "index rebuilt")
            assert await found(idx, b.keys) == {"r0": PrefixMatch(3, "GPU")}  # the removal replayed too
            assert pub.seq == seq_before  # nothing new was published
            st = sub.stats.replica("r0")
            assert sub.stats.index_losses == 1 and st.rebuilds == 1 and st.rebuild_failures == 0
            assert st.batches_unrecoverable == 0 and st.batches_replayed >= seq_before
            # the lookups above re-armed TTLs and block sizes came back with the applies
            assert idx.block_size(MODEL) == 16
    finally:
        await pub.close()


async def test_restart_between_two_calls_is_noticed_by_the_periodic_check(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """A restart no call of ours ever failed on (nothing published, no lookup) is still found by
    the loss check, and the rebuild happens before any lookup asks."""
    pub = Publisher(ctx)
    try:
        async with subscribers(ctx, pub, redis_url) as [(idx, sub)]:
            await connect(pub, idx)
            a = Prompt(make_tokens(5, 3))
            await pub.publish(payload(a.stored()))
            await poll(lambda: _eq(found(idx, a.keys), {"r0": PrefixMatch(5, "GPU")}), "events applied")
            sub._tasks["__loss_watch__"].cancel()
            await asyncio.sleep(0)
            redis_server.restart()  # blocking: nothing of ours runs meanwhile
            sub._tasks["__loss_watch__"] = asyncio.create_task(sub._watch_index())
            await poll(lambda: _true(sub.stats.replica("r0").rebuilds == 1), "rebuild done")
            assert sub.stats.replica("r0").index_errors == 0  # no call ever saw Redis down
            assert await found(idx, a.keys) == {"r0": PrefixMatch(5, "GPU")}
    finally:
        await pub.close()


async def test_outage_seen_by_a_write_is_checked_as_soon_as_redis_answers(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """With a 30 s loss-check period, a batch that fails on the stopped Redis wakes the check,
    which then polls until Redis is back (empty): the rebuild follows within a second, and the
    batch that failed is part of it."""
    pub = Publisher(ctx)
    idx = RedisIndex(redis_url, socket_timeout=0.3, retries=1)
    sub = EventSubscriber(idx, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=30)
    await sub.start()
    try:
        await connect(pub, idx)
        a, b = Prompt(make_tokens(4, 90)), Prompt(make_tokens(3, 91))
        await pub.publish(payload(a.stored()))
        await poll(lambda: _eq(found(idx, a.keys), {"r0": PrefixMatch(4, "GPU")}), "events applied")
        st = sub.stats.replica("r0")
        await asyncio.to_thread(redis_server.stop)
        await pub.publish(payload(b.stored()))
        await poll(lambda: _true(st.index_errors >= 1), "the batch failed on the stopped Redis")
        await asyncio.to_thread(redis_server.start)
        await poll(lambda: _true(st.rebuilds == 1), "rebuild done", timeout=3.0)
        assert await found(idx, a.keys) == {"r0": PrefixMatch(4, "GPU")}
        # the failed batch too: the rebuild re-applies up to the last batch applied, the catch-up
        # that follows it in the same check replays the one that failed (a moment later)
        await poll(lambda: _eq(found(idx, b.keys), {"r0": PrefixMatch(3, "GPU")}), "the failed batch replayed", timeout=3.0)
    finally:
        if redis_server.proc is None:  # failed while stopped: leave the session's server running
            redis_server.start()
        await asyncio.wait_for(sub.stop(), 2)
        await idx.close()
        await pub.close()


async def test_buffer_without_seq_0_rebuilds_what_it_has(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """The replay buffer holds only the last 4 batches: those are rebuilt; older ones are counted
    unrecoverable, and a buffered continuation of an unbuffered prompt stays unkeyed (the
    engine-hash map was forgotten before the replay, as in Redis)."""
    pub = Publisher(ctx, buffer=4)
    try:
        async with subscribers(ctx, pub, redis_url) as [(idx, sub)]:
            await connect(pub, idx)
            old = [Prompt(make_tokens(2, 10 + i)) for i in range(3)]
            tail = [Prompt(make_tokens(2, 20 + i)) for i in range(3)]
            longer = Prompt(old[0].tokens + make_tokens(2, 30))
            for p in old:
                await pub.publish(payload(p.stored()))
            await pub.publish(payload(longer.stored(2, 4)))  # continues old[0]: in the buffer
            for p in tail:
                await pub.publish(payload(p.stored()))
            for p in (*old, *tail):
                await poll(lambda p=p: _eq(found(idx, p.keys), {"r0": PrefixMatch(2, "GPU")}), "events applied")
            assert await found(idx, longer.keys) == {"r0": PrefixMatch(4, "GPU")}
            st = sub.stats.replica("r0")
            orphaned = st.orphaned_blocks

            await restart_empty(redis_server)
            await poll(lambda: _true(st.rebuilds == 1), "rebuild done")
            for p in tail:
                assert await found(idx, p.keys) == {"r0": PrefixMatch(2, "GPU")}
            for p in old:
                assert await found(idx, p.keys) == {}
            assert await found(idx, longer.keys) == {}
            assert st.orphaned_blocks - orphaned == 2  # the continuation's blocks: parent unknown
            assert st.batches_unrecoverable == pub.seq - 4
            assert sub.stats.index_losses == 1
    finally:
        await pub.close()


async def test_rebuild_fills_the_holes_of_a_lossy_replay(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """Replies dropped by the replica's ROUTER (and its end marker) do not cost the rebuild
    anything: the fetch stops waiting once replies stop, and asks again from the first hole."""
    pub = LossyReplay(ctx)
    try:
        async with subscribers(ctx, pub, redis_url) as [(idx, sub)]:
            await connect(pub, idx)
            prompts = [Prompt(make_tokens(1, 100 + i)) for i in range(30)]
            for p in prompts:
                await pub.publish(payload(p.stored()))
            await poll(lambda: _eq(found(idx, prompts[-1].keys), {"r0": PrefixMatch(1, "GPU")}), "events applied")
            st = sub.stats.replica("r0")
            pub.lossy = True
            await restart_empty(redis_server)
            await poll(lambda: _true(st.rebuilds == 1), "rebuild done")
            assert [p for p in prompts if await found(idx, p.keys) != {"r0": PrefixMatch(1, "GPU")}] == []
            assert st.batches_unrecoverable == 0 and pub.requests >= 3
    finally:
        await pub.close()


async def test_two_subscribers_sharing_redis_rebuild_at_once(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """Two gateways ingest the same replica into one Redis; both notice the restart and rebuild
    concurrently, uncoordinated. The result equals what the replica holds (an in-memory index fed
    the same batches), including an AllBlocksCleared and removals within the replayed buffer."""
    pub = Publisher(ctx)
    truth = MemoryIndex()
    try:
        async with subscribers(ctx, pub, redis_url, n=2) as pairs:
            for idx, _ in pairs:
                await connect(pub, idx)
            gone, a, b, c = (Prompt(make_tokens(n, 40 + n)) for n in (4, 10, 7, 9))
            script = [
                payload(gone.stored()),
                payload(a.stored(0, 6)),
                payload(AllBlocksCleared()),
                payload(a.stored(0, 10), b.stored()),
                payload(b.removed(4, 7), c.stored(0, 5)),
                payload(c.stored(5, 9), a.stored(0, 3, medium="CPU")),
                payload(a.removed(8, 10), a.removed(1, 2)),  # block 1 left in CPU only
            ]
            for raw in script:
                await pub.publish(raw)
            for _, raw in pub.buffer:  # the replica's own view: everything it published
                await truth.apply("r0", decode_batch(raw), model=MODEL)
            prompts = (gone, a, b, c, Prompt(a.tokens[: 5 * 16]))
            want = [await truth.lookup(p.keys, model=MODEL) for p in prompts]
            assert want[1] == {"r0": PrefixMatch(8, "CPU")} and want[0] == {}  # the script is not trivial

            async def all_match() -> bool:
                for idx, _ in pairs:
                    if [await found(idx, p.keys) for p in prompts] != want:
                        return False
                return True

            await poll(all_match, "both subscribers applied the events")
            await restart_empty(redis_server)
            await poll(lambda: _true(all(sub.stats.replica("r0").rebuilds == 1 for _, sub in pairs)), "both rebuilt")
            assert await all_match()
            assert all(sub.stats.index_losses == 1 for _, sub in pairs)
    finally:
        await pub.close()


async def test_memory_backend_never_rebuilds(ctx) -> None:
    """The same subscriber code over the memory backend: the loss check always says no."""
    pub = Publisher(ctx)
    idx = MemoryIndex()
    sub = EventSubscriber(idx, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=0.01)
    await sub.start()
    try:
        await connect(pub, idx)
        await asyncio.sleep(0.1)  # ten loss checks
        assert sub.stats.index_losses == 0 and sub.stats.replica("r0").rebuilds == 0
        assert not sub._tasks["__loss_watch__"].done()
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()


async def test_rebuild_from_a_simulated_vllm_replica(redis_server: RedisServer, redis_url: str) -> None:
    """A real simulated vLLM (engine, KV events, replay ROUTER) caches a prompt; Redis restarts
    empty; the prompt's prefix is found again from the replica's replay buffer alone."""
    from simulator.fleet import SimConfig, SimFleet

    model = "kvgate/demo-8b"
    fleet = SimFleet([SimConfig(model=model, time_scale=0.0)])
    handle = fleet.start()[0]
    idx = RedisIndex(redis_url, socket_timeout=0.3, retries=1)
    sub = EventSubscriber(idx, [ReplicaSource("sim", model, handle.events_endpoint, handle.replay_endpoint)], loss_check_s=CHECK_S)
    await sub.start()
    try:
        async with httpx.AsyncClient(base_url=handle.url, timeout=10) as http:
            prompt = "Rebuild check: " + " ".join(f"tok{j}" for j in range(120))
            tokens = (await http.post("/tokenize", json={"model": model, "prompt": prompt})).json()["tokens"]
            keys = block_keys(tokens, 16, model=model)
            assert len(keys) >= 4

            async def cached() -> bool:  # ask until the SUB has joined, then wait for the events
                r = await found(idx, keys, model)
                if r and r.get("sim", PrefixMatch(0, "")).blocks == len(keys):
                    return True
                await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})
                return False

            await poll(cached, "prompt cached and indexed")
            st = sub.stats.replica("sim")
            replayed = st.batches_replayed  # (joining late may have replayed some already)
            await restart_empty(redis_server)
            await poll(lambda: _eq(found(idx, keys, model), {"sim": PrefixMatch(len(keys), "GPU")}), "index rebuilt")
            # (a rebuild that an error of the restart's stale connections interrupted is redone)
            assert st.rebuilds >= 1 and st.rebuild_failures == 0 and st.batches_unrecoverable == 0
            assert st.batches_replayed > replayed and sub.stats.index_losses == 1
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await idx.close()
        fleet.stop()


async def _eq(coro, value) -> bool:
    return (await coro) == value


async def _true(value: bool) -> bool:
    return value


async def test_marker_key_has_no_ttl(redis_url: str) -> None:
    """The generation marker never expires (so key TTLs cannot fake a loss)."""
    idx = RedisIndex(redis_url)
    try:
        assert await idx.data_lost() is False
    finally:
        await idx.close()
    client = redis_sync.Redis.from_url(redis_url)
    try:
        assert client.ttl("kvg:generation") == -1
    finally:
        client.close()


async def test_separate_indexer_rebuilds_for_the_gateways(ctx, redis_server: RedisServer, redis_url: str) -> None:
    """``kvgate indexer`` feeds Redis for gateways that do not ingest: after an empty restart a
    gateway's lookup finds the old prefix again, from the indexer's rebuild."""
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
        await connect(pub, gw)
        a = Prompt(make_tokens(6, 80))
        await pub.publish(payload(a.stored()))
        want = {"r0": PrefixMatch(6, "GPU")}
        await poll(lambda: _eq(found(gw, a.keys), want), "indexed")
        await restart_empty(redis_server)
        await poll(lambda: _eq(found(gw, a.keys), want), "rebuilt by the indexer")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 3)
        await gw.close()
        await pub.close()
