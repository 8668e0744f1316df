"""The event subscriber over real ZMQ sockets on loopback: flow, loss, replay, restarts, garbage."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvindex.events import BlockStored, EventBatch, encode_batch
from kvindex.hashing import block_keys, event_hash, vllm_block_hashes
from kvindex.memory_index import MemoryIndex
from kvindex.subscriber import EventSubscriber, ReplicaSource
from tests.helpers.events import Publisher
from tests.helpers.memory import rss_guard

MODEL = "m"
BS = 16


def prompt_batch(tokens: list[int], parent_tokens: list[int] | None = None) -> bytes:
    """A BlockStored batch for ``tokens`` (continuing ``parent_tokens`` if given), vLLM hashes."""
    full = (parent_tokens or []) + tokens
    digests = vllm_block_hashes(full, BS)
    start = len(parent_tokens or []) // BS
    ev = BlockStored(
        block_hashes=[event_hash(d) for d in digests[start:]],
        parent_block_hash=event_hash(digests[start - 1]) if start else None,
        token_ids=full[start * BS : len(digests) * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        extra_keys=[None] * (len(digests) - start),
        group_idx=0,
    )
    return encode_batch(EventBatch(ts=1.0, events=[ev], data_parallel_rank=0))


async def matched(index: MemoryIndex, tokens: list[int], replica: str) -> int:
    found = await index.lookup(block_keys(tokens, BS, model=MODEL), model=MODEL)
    return found[replica].blocks if replica in found else 0


async def until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def warm_up(pub: Publisher, sub: EventSubscriber, index: MemoryIndex, rid: str) -> list[int]:
    """Publish until the subscriber is connected (ZMQ slow joiner); returns the warm-up tokens."""
    toks = list(range(1000, 1000 + BS))
    for _ in range(100):
        await pub.publish(prompt_batch(toks))
        await asyncio.sleep(0.02)
        if await matched(index, toks, rid):
            return toks
    raise AssertionError("subscriber never connected")


@contextlib.asynccontextmanager
async def wired(ctx, *, pub_kw: dict | None = None, sub_kw: dict | None = None):
    """A publisher, a memory index and a subscriber connected to both, torn down afterwards."""
    pub = Publisher(ctx, **(pub_kw or {}))
    index = MemoryIndex()
    sub = EventSubscriber(index, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, **(sub_kw or {}))
    await sub.start()
    try:
        yield pub, index, sub
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


async def test_events_flow_into_index_and_restart_is_detected(ctx):
    async with wired(ctx) as (pub, index, sub):
        await warm_up(pub, sub, index, "r0")
        a = list(range(64))
        await pub.publish(prompt_batch(a[:32]))
        await pub.publish(prompt_batch(a[32:], parent_tokens=a[:32]))
        await until(lambda: _eq(matched(index, a, "r0"), 4))
        st = sub.stats.replica("r0")
        assert st.blocks_stored >= 4 and st.batches_lost == 0
        # the replica restarts: seq back to 0, its blocks are forgotten
        pub.seq = 0
        b = list(range(500, 516))
        await pub.publish(prompt_batch(b))
        await until(lambda: _eq(matched(index, b, "r0"), 1))
        assert await matched(index, a, "r0") == 0
        assert st.restarts_detected == 1


async def _eq(coro, value) -> bool:
    return (await coro) == value


@pytest.mark.parametrize(
    ("old_replay", "topic"),
    [(False, b"kv"), (True, b"kv"), (False, b""), (True, b"")],  # vLLM's default topic is ""
)
async def test_dropped_batches_are_replayed(ctx, old_replay, topic):
    async with wired(ctx, pub_kw={"old_replay": old_replay, "topic": topic}) as (pub, index, sub):
        await warm_up(pub, sub, index, "r0")
        replayed_at_join = sub.stats.replica("r0").batches_replayed  # late join: caught up from the buffer
        a = list(range(2000, 2048))
        await pub.publish(prompt_batch(a[:16]), drop=True)  # lost on the wire
        await pub.publish(prompt_batch(a[16:32], parent_tokens=a[:16]), drop=True)
        await pub.publish(prompt_batch(a[32:], parent_tokens=a[:32]))  # the gap shows here
        await until(lambda: _eq(matched(index, a, "r0"), 3))
        st = sub.stats.replica("r0")
        assert st.batches_replayed - replayed_at_join == 2 and st.batches_lost == 0


async def test_long_gap_is_repaired_through_a_lossy_replay(ctx):
    """A replay ROUTER drops replies past its send high-water mark (and the end marker): the gap
    repair asks again from the first hole, like a rebuild, instead of distrusting the replica."""
    from tests.helpers.events import LossyReplay

    pub = LossyReplay(ctx)
    index = MemoryIndex()
    sub = EventSubscriber(index, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, replay_timeout_s=2.0)
    await sub.start()
    try:
        await warm_up(pub, sub, index, "r0")
        st = sub.stats.replica("r0")
        replayed = st.batches_replayed
        lost = [list(range(10_000 + BS * i, 10_000 + BS * (i + 1))) for i in range(30)]
        for toks in lost:
            await pub.publish(prompt_batch(toks), drop=True)
        pub.lossy = True
        fresh = list(range(20_000, 20_000 + BS))
        await pub.publish(prompt_batch(fresh))
        await until(lambda: _eq(matched(index, fresh, "r0"), 1))
        assert [await matched(index, toks, "r0") for toks in lost] == [1] * 30
        assert st.batches_lost == 0 and st.batches_replayed - replayed == 30 and pub.requests >= 2
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()


async def test_unrecoverable_gap_marks_untrusted(ctx):
    # the replay buffer (one batch) cannot cover a gap
    async with wired(ctx, pub_kw={"buffer": 1}, sub_kw={"replay_timeout_s": 0.5}) as (pub, index, sub):
        warm = await warm_up(pub, sub, index, "r0")
        await pub.publish(prompt_batch(list(range(3000, 3016))), drop=True)
        await pub.publish(prompt_batch(list(range(3100, 3116))), drop=True)
        fresh = list(range(4000, 4016))
        await pub.publish(prompt_batch(fresh))
        await until(lambda: _eq(matched(index, fresh, "r0"), 1))
        assert sub.stats.replica("r0").batches_lost == 2
        assert await matched(index, warm, "r0") == 0  # entries from before the gap are hidden


async def test_garbage_is_counted_and_skipped(ctx):
    async with wired(ctx) as (pub, index, sub):
        await warm_up(pub, sub, index, "r0")
        await pub.pub.send_multipart([b"kv", b"short", b"x"])  # bad seq length
        await pub.pub.send_multipart([b"kv", b"only two"])  # wrong frame count
        await pub.publish(b"\xc1\xc1 not msgpack")
        await pub.publish(msgspec.msgpack.encode({"not": "a batch"}))
        good = list(range(5000, 5016))
        await pub.publish(prompt_batch(good))
        await until(lambda: _eq(matched(index, good, "r0"), 1))
        st = sub.stats.replica("r0")
        assert st.decode_errors >= 3


async def test_bound_mode_and_several_replicas(ctx):
    index = MemoryIndex()
    sub = EventSubscriber(
        index, [ReplicaSource("a", MODEL), ReplicaSource("b", MODEL)], bind="tcp://127.0.0.1:*", topic_map={"topic-a": "a", "topic-b": "b"}, ctx=ctx
    )
    await sub.start()  # binds a free port itself (no port chosen here and bound later)
    assert sub.bound_endpoint is not None and sub.bound_endpoint.rpartition(":")[2].isdigit()
    pubs = []
    try:
        for topic in (b"topic-a", b"topic-b"):
            s = ctx.socket(zmq.PUB)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(sub.bound_endpoint)
            pubs.append(s)
        toks_a, toks_b = list(range(16)), list(range(100, 132))
        for _ in range(100):
            await pubs[0].send_multipart([b"topic-a", (0).to_bytes(8, "big"), prompt_batch(toks_a)])
            await pubs[1].send_multipart([b"topic-b", (0).to_bytes(8, "big"), prompt_batch(toks_b)])
            await asyncio.sleep(0.02)
            if await matched(index, toks_a, "a") and await matched(index, toks_b, "b") == 2:
                break
        assert await matched(index, toks_a, "a") == 1
        assert await matched(index, toks_b, "b") == 2
        assert await matched(index, toks_a, "b") == 0
    finally:
        for s in pubs:
            s.close(0)
        await sub.stop()


async def test_stop_is_prompt_and_remove_source_forgets(ctx):
    async with wired(ctx) as (pub, index, sub):
        warm = await warm_up(pub, sub, index, "r0")
        await sub.remove_source("r0")
        assert await matched(index, warm, "r0") == 0


async def test_sources_added_and_removed_while_running(ctx):
    """Discovery's use: a started subscriber with no sources gains one (a pod joined late: what
    it published before is fetched from its replay buffer), loses it (index entries and counters
    go), and gains the same id again at another endpoint (a replaced pod), starting clean."""
    index = MemoryIndex()
    sub = EventSubscriber(index, [], ctx=ctx)
    await sub.start()
    pub, pub2 = Publisher(ctx), Publisher(ctx)
    try:
        early = list(range(8000, 8032))
        await pub.publish(prompt_batch(early[:16]))  # before anyone subscribed: only in the buffer
        await sub.add_source(ReplicaSource("pod-a", MODEL, pub.endpoint, pub.replay_endpoint))
        await warm_up(pub, sub, index, "pod-a")
        await until(lambda: _eq(matched(index, early[:16], "pod-a"), 1))
        assert sub.stats.replica("pod-a").batches_replayed >= 1
        await sub.remove_source("pod-a")
        assert await matched(index, early[:16], "pod-a") == 0
        assert "pod-a" not in sub.stats.per_replica and "pod-a" not in sub.sources
        await pub.publish(prompt_batch(early[16:], parent_tokens=early[:16]))  # no longer listened to
        await asyncio.sleep(0.1)
        assert "pod-a" not in sub.stats.per_replica
        # the same id at another endpoint: a fresh start, nothing of the old publisher
        await sub.add_source(ReplicaSource("pod-a", MODEL, pub2.endpoint, pub2.replay_endpoint))
        toks = await warm_up(pub2, sub, index, "pod-a")
        assert await matched(index, toks, "pod-a") == 1 and await matched(index, early, "pod-a") == 0
        assert sub.stats.replica("pod-a").restarts_detected == 0
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()
        await pub2.close()


async def test_ipv6_endpoints(ctx):
    """A replica at an IPv6 address (discovered pods can have one): events and replay both."""
    probe = ctx.socket(zmq.PUB)
    try:
        probe.bind("tcp://[::1]:0")  # without IPV6 set, this bind itself would fail
    except zmq.ZMQError:
        probe.setsockopt(zmq.IPV6, 1)
        try:
            probe.bind("tcp://[::1]:0")
        except zmq.ZMQError:
            pytest.skip("no IPv6 loopback here")
    finally:
        probe.close(0)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.IPV6, 1)
    port = pub.bind_to_random_port("tcp://[::1]")
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.IPV6, 1)
    replay_port = router.bind_to_random_port("tcp://[::1]")
    index = MemoryIndex()
    sub = EventSubscriber(index, [ReplicaSource("v6", MODEL, f"tcp://[::1]:{port}", f"tcp://[::1]:{replay_port}")], ctx=ctx)
    await sub.start()
    try:
        toks = list(range(9000, 9016))
        missed = prompt_batch(list(range(9100, 9116)))

        async def answer_replay() -> None:  # seq 0 was never received: the subscriber asks for it
            ident, _, start = await router.recv_multipart()
            assert int.from_bytes(start, "big") == 0
            await router.send_multipart([ident, b"", b"", (0).to_bytes(8, "big"), missed])
            await router.send_multipart([ident, b"", b"", b"\xff" * 8, b""])

        replay = asyncio.create_task(answer_replay())
        for _ in range(100):  # ZMQ slow joiner: publish seq 1 until it is in
            await pub.send_multipart([b"", (1).to_bytes(8, "big"), prompt_batch(toks)])
            await asyncio.sleep(0.02)
            if await matched(index, toks, "v6"):
                break
        assert await matched(index, toks, "v6") == 1
        await asyncio.wait_for(replay, 5)
        assert await matched(index, list(range(9100, 9116)), "v6") == 1
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        pub.close(0)
        router.close(0)


async def test_restart_with_lost_first_batches_replays_them(ctx):
    """The replica restarts and its first batches of the new run are dropped on the wire: the
    restart is detected from the lower seq, the old blocks forgotten, and the new run's missing
    batches fetched from its (fresh) replay buffer."""
    async with wired(ctx) as (pub, index, sub):
        await warm_up(pub, sub, index, "r0")
        old = list(range(6000, 6016))
        for _ in range(4):
            await pub.publish(prompt_batch(old))
        await until(lambda: _eq(matched(index, old, "r0"), 1))
        pub.seq, pub.buffer = 0, []  # a new process: seq from 0, empty buffer
        a = list(range(7000, 7048))
        await pub.publish(prompt_batch(a[:16]), drop=True)
        await pub.publish(prompt_batch(a[16:32], parent_tokens=a[:16]), drop=True)
        await pub.publish(prompt_batch(a[32:], parent_tokens=a[:32]))  # seq 2: below what we had
        await until(lambda: _eq(matched(index, a, "r0"), 3))
        st = sub.stats.replica("r0")
        assert st.restarts_detected == 1 and st.batches_lost == 0
        assert await matched(index, old, "r0") == 0
        assert st.events_applied >= 7 and st.blocks_stored >= 7 and st.decode_errors == 0


@pytest.mark.redis
async def test_index_outage_is_survived_and_the_missed_batches_replayed(ctx, redis_url):
    """Redis stops answering mid-stream (CLIENT PAUSE, longer than the client's timeout): the
    batch that cannot be applied is counted, the receive loop keeps running, and once Redis
    answers again the missed batch comes back from the replica's replay buffer, in order:
    older entries stay trusted, the missed prompt and later ones all match, nothing is lost."""
    import redis as redis_sync

    from kvindex.redis_index import RedisIndex

    index = RedisIndex(redis_url, socket_timeout=0.2, retries=0)
    pub = Publisher(ctx)
    sub = EventSubscriber(index, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=0.2)
    await sub.start()
    admin = redis_sync.Redis.from_url(redis_url)
    try:
        before = await warm_up(pub, sub, index, "r0")
        st = sub.stats.replica("r0")
        admin.execute_command("CLIENT", "PAUSE", 700, "ALL")
        missed = list(range(8000, 8016))
        await pub.publish(prompt_batch(missed))
        await until(lambda: _true(st.index_errors >= 1))
        await asyncio.sleep(0.8)  # pause over; the replica stays quiet: the loss check catches up
        await until(lambda: _eq(matched(index, missed, "r0"), 1))
        after = list(range(9000, 9016))
        await pub.publish(prompt_batch(after))
        await until(lambda: _eq(matched(index, after, "r0"), 1))
        assert await matched(index, before, "r0") == 1  # never untrusted: nothing was lost
        assert st.batches_lost == 0 and st.batches_replayed >= 1 and not sub._untrust_pending and not sub._behind
    finally:
        admin.close()
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()
        await index.close()


@pytest.mark.redis
async def test_index_outage_past_the_replay_buffer_distrusts_the_replica(ctx, redis_url):
    """The same outage, but the replica's buffer no longer holds the missed batch when Redis is
    back: the replica's older entries are hidden (the batch may have removed some)."""
    import redis as redis_sync

    from kvindex.redis_index import RedisIndex

    index = RedisIndex(redis_url, socket_timeout=0.2, retries=0)
    pub = Publisher(ctx, buffer=2)
    sub = EventSubscriber(index, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx, loss_check_s=5.0)
    await sub.start()
    admin = redis_sync.Redis.from_url(redis_url)
    try:
        before = await warm_up(pub, sub, index, "r0")
        st = sub.stats.replica("r0")
        admin.execute_command("CLIENT", "PAUSE", 700, "ALL")
        await pub.publish(prompt_batch(list(range(8000, 8016))))
        await until(lambda: _true(st.index_errors >= 1))
        for k in range(3):  # still paused: these push the missed batch out of the 2-batch buffer
            await pub.publish(prompt_batch(list(range(9000 + 100 * k, 9016 + 100 * k))))
        await asyncio.sleep(0.8)
        last = list(range(9300, 9316))
        await pub.publish(prompt_batch(last))
        await until(lambda: _eq(matched(index, last, "r0"), 1))
        assert await matched(index, before, "r0") == 0  # untrusted: the gap could not be replayed
        assert st.batches_lost >= 1 and not sub._behind
    finally:
        admin.close()
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()
        await index.close()


async def _true(value: bool) -> bool:
    return value


async def test_topic_filter(ctx):
    """A source subscribes to its replica's topic only: batches on another topic from the same
    PUB socket are never seen (not applied, not counted as gaps)."""
    pub = Publisher(ctx, topic=b"kv@r0")
    index = MemoryIndex()
    sub = EventSubscriber(index, [ReplicaSource("r0", MODEL, pub.endpoint, None, topic="kv@r0")], ctx=ctx)
    await sub.start()
    try:
        await warm_up(pub, sub, index, "r0")
        stranger = list(range(9500, 9516))
        seq_before = pub.seq
        await pub.pub.send_multipart([b"kv@r9", (seq_before + 5).to_bytes(8, "big"), prompt_batch(stranger)])
        mine = list(range(9600, 9616))
        await pub.publish(prompt_batch(mine))
        await until(lambda: _eq(matched(index, mine, "r0"), 1))
        assert await matched(index, stranger, "r0") == 0
        assert sub.stats.replica("r0").batches_lost == 0 and sub.stats.replica("r0").decode_errors == 0
    finally:
        await asyncio.wait_for(sub.stop(), 2)
        await pub.close()


async def test_malformed_event_is_skipped_and_distrusts(ctx):
    """One malformed event in a batch: the other events are applied, the bad one counted, and
    the replica's earlier entries hidden (the skipped event might have removed some). A batch
    that does not decode at all hides them too, without waiting for the next batch."""
    async with wired(ctx) as (pub, index, sub):
        warm = await warm_up(pub, sub, index, "r0")
        st = sub.stats.replica("r0")
        good = list(range(9700, 9716))
        good_event = msgspec.msgpack.decode(prompt_batch(good))[1][0]
        broken = {"type": "BlockRemoved", "block_hashes": "not a list", "medium": "GPU"}
        await pub.publish(msgspec.msgpack.encode([1.0, [broken, good_event], 0]))
        await until(lambda: _eq(matched(index, good, "r0"), 1))
        assert st.decode_errors == 1
        assert await matched(index, warm, "r0") == 0
        await pub.publish(prompt_batch(warm))  # re-stored after the fault: trusted again
        await until(lambda: _eq(matched(index, warm, "r0"), 1))
        await pub.publish(b"\x93\xcb garbage")
        await until(lambda: _eq(matched(index, warm, "r0"), 0))
        assert st.decode_errors == 2 and await matched(index, good, "r0") == 0


async def test_restart_seen_first_at_the_old_last_seq(ctx):
    """The new run's first delivered batch has exactly the seq we applied last: different bytes
    make it a restart (not a duplicate), and the new run's earlier batches are replayed; the
    same bytes again are a duplicate and change nothing."""
    async with wired(ctx) as (pub, index, sub):
        await warm_up(pub, sub, index, "r0")
        old = list(range(6100, 6116))
        await pub.publish(prompt_batch(old))
        await until(lambda: _eq(matched(index, old, "r0"), 1))
        st = sub.stats.replica("r0")
        last = pub.seq - 1
        await pub.pub.send_multipart([b"kv", last.to_bytes(8, "big"), pub.buffer[-1][1]])  # a duplicate
        pub.seq, pub.buffer = 0, []
        fresh = [list(range(7100 + 16 * i, 7116 + 16 * i)) for i in range(last + 1)]
        for i, toks in enumerate(fresh):
            await pub.publish(prompt_batch(toks), drop=i < last)
        await until(lambda: _eq(matched(index, fresh[-1], "r0"), 1))
        assert st.restarts_detected == 1 and st.batches_lost == 0
        assert await matched(index, old, "r0") == 0
        assert all([await matched(index, toks, "r0") == 1 for toks in fresh])


@pytest.mark.parametrize(
    ("jump_to", "lost"),
    [
        # a gap the publisher's counter says is 3M batches: counted as such, repaired at the cost
        # of what the replay buffer holds (not of the gap)
        (lambda seq: seq + 3_000_000, lambda gap: gap),
        # no publisher sends 2^63 batches: a corrupted counter, counted once (and in seq_jumps)
        (lambda seq: 2**63 - 1, lambda gap: 1),
    ],
    ids=["3M", "2^63-1"],
)
async def test_seq_jump_costs_what_the_replay_holds_not_the_jump(ctx, jump_to, lost):
    """A seq jump forward, with the replay buffer holding the batch right after the last one
    applied (so the replay covers part of the gap): the repair asks the replay for what it has,
    finds the rest gone, distrusts the replica's older entries and goes on at once. Memory and
    time do not grow with the jump (it was +196 MB for 3M, and 2^63 never finished), and the
    loss count stays readable."""
    async with wired(ctx, sub_kw={"replay_timeout_s": 0.5}) as (pub, index, sub):
        warm = await warm_up(pub, sub, index, "r0")
        st = sub.stats.replica("r0")
        await until(lambda: _true(sub._expected.get("r0") == pub.seq))
        first_missing = pub.seq
        await pub.publish(prompt_batch(list(range(3000, 3016))), drop=True)  # buffered, never delivered
        gc.collect()
        jumped, after = list(range(3100, 3116)), list(range(3200, 3216))
        with rss_guard(64 * 2**20) as rss:
            t0 = time.monotonic()
            pub.seq = jump_to(pub.seq)
            jump_seq = await pub.publish(prompt_batch(jumped))
            await pub.publish(prompt_batch(after))
            await until(lambda: _eq(matched(index, after, "r0"), 1), timeout=10)
            elapsed = time.monotonic() - t0
        assert rss.tripped == 0 and rss.growth < 8 * 2**20, f"RSS grew by {rss.growth / 2**20:.1f} MiB"
        assert elapsed < 2.0, f"the next batch took {elapsed:.2f} s"
        assert await matched(index, jumped, "r0") == 1
        assert await matched(index, warm, "r0") == 0  # from before the gap: hidden
        assert st.batches_lost == lost(jump_seq - first_missing)
        assert st.seq_jumps == (1 if lost(2) == 1 else 0)
        assert st.batches_applied >= 2 and st.decode_errors == 0
        # as after an empty Redis restart: the buffer's tail from the jump on is re-applied, and
        # what it cannot replay is counted from where the run's count is sane
        await sub.rebuild_index()
        assert await matched(index, after, "r0") == 1 and st.rebuilds == 1
        assert st.batches_unrecoverable == (jump_seq if lost(2) == 2 else 0)
