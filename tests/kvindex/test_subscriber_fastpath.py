"""The subscriber's fast path (the next expected batch applied in the socket's reader callback)
changes nothing but the cost: same counters, same index, same order, over real ZMQ sockets.

A subclass of ``MemoryIndex`` that changes nothing turns the fast path off (only the exact
class is known never to suspend), so the same wire traffic read by two subscribers, one on
each, must leave both in the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvindex.events import AllBlocksCleared, BlockRemoved, EventBatch, encode_batch
from kvindex.hashing import event_hash, vllm_block_hashes
from kvindex.memory_index import MemoryIndex
from kvindex.subscriber import EventSubscriber, ReplicaSource
from tests.helpers.events import Publisher
from tests.kvindex.test_subscriber import BS, MODEL, matched, prompt_batch, until


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


class SlowPathIndex(MemoryIndex):
    """The memory index under another class: the subscriber takes its general path."""


def removed_batch(tokens: list[int]) -> bytes:
    hashes = [event_hash(d) for d in vllm_block_hashes(tokens, BS)]
    return encode_batch(EventBatch(ts=1.0, events=[BlockRemoved(block_hashes=hashes, medium="GPU")], data_parallel_rank=0))


def cleared_batch() -> bytes:
    return encode_batch(EventBatch(ts=1.0, events=[AllBlocksCleared()], data_parallel_rank=0))


def counters(sub: EventSubscriber) -> dict:
    out = dataclasses.asdict(sub.stats.replica("r0"))
    out.pop("last_event_time")
    return out


async def caught_up(subs: list[EventSubscriber], pub: Publisher) -> None:
    async def done() -> bool:
        return all(s._expected.get("r0") == pub.seq and not s._lock["r0"].locked() for s in subs)

    await until(done)


async def test_fast_and_general_paths_end_in_the_same_state(ctx):
    pub = Publisher(ctx)
    fast_index, slow_index = MemoryIndex(), SlowPathIndex()
    subs = [EventSubscriber(ix, [ReplicaSource("r0", MODEL, pub.endpoint, pub.replay_endpoint)], ctx=ctx) for ix in (fast_index, slow_index)]
    assert [s._sync_index for s in subs] == [True, False]
    for s in subs:
        await s.start()
    try:
        warm = list(range(1000, 1000 + BS))
        for _ in range(100):  # ZMQ's slow joiner: until both sockets receive
            await pub.publish(prompt_batch(warm))
            await asyncio.sleep(0.02)
            if all([await matched(ix, warm, "r0") for ix in (fast_index, slow_index)]):
                break
        await caught_up(subs, pub)
        applied_before = [s.stats.replica("r0").batches_applied for s in subs]
        prompts = [warm]
        a = list(range(64))
        prompts.append(a)
        await pub.publish(prompt_batch(a[:32]))
        await pub.publish(prompt_batch(a[32:], parent_tokens=a[:32]))
        b = list(range(9700, 9716))
        prompts.append(b)
        good_event = msgspec.msgpack.decode(prompt_batch(b))[1][0]
        broken = {"type": "BlockRemoved", "block_hashes": "not a list", "medium": "GPU"}
        await pub.publish(msgspec.msgpack.encode([1.0, [broken, good_event], 0]))  # one malformed event: distrusts
        c = list(range(3000, 3032))
        prompts.append(c)
        await pub.publish(prompt_batch(c))
        await pub.publish(b"\x93\xcb garbage")  # undecodable: distrusts
        await pub.pub.send_multipart([b"kv", (pub.seq - 1).to_bytes(8, "big"), pub.buffer[-1][1]])  # a duplicate
        await pub.pub.send_multipart([b"kv", b"short", b"x"])  # bad seq length
        d = list(range(4000, 4048))
        prompts.append(d)
        await pub.publish(prompt_batch(d[:16]), drop=True)  # a gap: replayed
        await pub.publish(prompt_batch(d[16:32], parent_tokens=d[:16]), drop=True)
        await pub.publish(prompt_batch(d[32:], parent_tokens=d[:32]))
        await pub.publish(removed_batch(a[:32]))
        await pub.publish(prompt_batch(a[:32]))
        await caught_up(subs, pub)
        mid = [counters(s) for s in subs]
        assert mid[0] == mid[1]
        await pub.publish(cleared_batch())
        e = list(range(5000, 5032))
        prompts.append(e)
        await pub.publish(prompt_batch(e))
        pub.seq, pub.buffer = 0, []  # the replica restarts
        f = list(range(6000, 6016))
        prompts.append(f)
        await pub.publish(prompt_batch(f))
        for i in range(20):  # a steady run
            toks = list(range(7000 + 16 * i, 7016 + 16 * i))
            prompts.append(toks)
            await pub.publish(prompt_batch(toks))
        await caught_up(subs, pub)
        fast, slow = (counters(s) for s in subs)
        assert fast == slow
        assert fast["restarts_detected"] == 1 and fast["decode_errors"] == 3 and fast["batches_replayed"] >= 2 and fast["batches_lost"] == 0
        assert subs[0].stats.replica("r0").batches_applied - applied_before[0] >= 25
        for toks in prompts:
            assert await matched(fast_index, toks, "r0") == await matched(slow_index, toks, "r0"), toks
        assert await matched(fast_index, f, "r0") == 1 and await matched(fast_index, e, "r0") == 0
    finally:
        for s in subs:
            await asyncio.wait_for(s.stop(), 2)
        await pub.close()


async def test_the_next_batch_is_applied_at_once_and_anything_else_is_awaited(ctx):
    """``_take`` applies the next expected batch itself and returns nothing to await; a gap,
    a batch while the replica's lock is held (a rebuild), or an index of another class goes
    to the general path, which the receiving task awaits."""
    pub = Publisher(ctx)
    index = MemoryIndex()
    src = ReplicaSource("r0", MODEL, None, pub.replay_endpoint)  # no SUB socket: frames handed in here
    sub = EventSubscriber(index, [src], ctx=ctx)
    try:
        first = list(range(100, 116))
        seq = await pub.publish(prompt_batch(first))
        pending = sub._take(src, [b"kv", seq.to_bytes(8, "big"), pub.buffer[-1][1]])
        assert pending is not None  # the first batch: general path (it may need a replay)
        await pending
        nxt = list(range(200, 216))
        seq = await pub.publish(prompt_batch(nxt))
        assert sub._take(src, [b"kv", seq.to_bytes(8, "big"), pub.buffer[-1][1]]) is None
        assert await matched(index, nxt, "r0") == 1 and sub._expected["r0"] == seq + 1
        assert sub.stats.replica("r0").batches_applied == 2

        # a rebuild holds the lock: the live batch waits for it, in order
        lock = sub._lock["r0"]
        await lock.acquire()
        held = list(range(300, 316))
        seq = await pub.publish(prompt_batch(held))
        pending = sub._take(src, [b"kv", seq.to_bytes(8, "big"), pub.buffer[-1][1]])
        assert pending is not None
        waiter = asyncio.ensure_future(pending)
        await asyncio.sleep(0.05)
        assert not waiter.done() and await matched(index, held, "r0") == 0
        lock.release()
        await asyncio.wait_for(waiter, 2)
        assert await matched(index, held, "r0") == 1

        # a gap: the general path (replay from the publisher's buffer)
        skipped = list(range(400, 416))
        await pub.publish(prompt_batch(skipped), drop=True)
        after = list(range(500, 516))
        seq = await pub.publish(prompt_batch(after))
        pending = sub._take(src, [b"kv", seq.to_bytes(8, "big"), pub.buffer[-1][1]])
        assert pending is not None
        await asyncio.wait_for(pending, 3)
        assert await matched(index, skipped, "r0") == 1 and await matched(index, after, "r0") == 1
        st = sub.stats.replica("r0")
        assert st.batches_replayed == 1 and st.batches_lost == 0 and st.batches_applied == 5

        # a payload that does not decode on the fast path: counted, distrusted, the loop goes on
        seq = await pub.publish(b"\x93\xcb garbage")
        assert sub._take(src, [b"kv", seq.to_bytes(8, "big"), pub.buffer[-1][1]]) is None
        assert st.decode_errors == 1 and sub._expected["r0"] == seq + 1
        assert await matched(index, after, "r0") == 0  # untrusted
    finally:
        await sub.stop()
        await pub.close()


async def test_a_subclassed_index_never_takes_the_fast_path(ctx):
    sub = EventSubscriber(SlowPathIndex(), [], ctx=ctx)
    src = ReplicaSource("r0", MODEL)
    sub._expected["r0"] = 5
    sub._lock["r0"] = asyncio.Lock()
    pending = sub._take(src, [b"kv", (5).to_bytes(8, "big"), prompt_batch(list(range(16)))])
    assert pending is not None
    await pending
    assert sub._expected["r0"] == 6 and sub.stats.replica("r0").batches_applied == 1


def test_zmq_frames_say_more_like_rcvmore():
    """The receive loop reads a message's parts as frames and stops at ``more`` False."""
    c = zmq.Context()
    try:
        push, pull = c.socket(zmq.PAIR), c.socket(zmq.PAIR)
        push.bind("inproc://fastpath")
        pull.connect("inproc://fastpath")
        push.send_multipart([b"a", b"bb", b"ccc"])
        push.send_multipart([b"d"])
        parts = []
        frame = pull.recv(copy=False)
        parts.append(frame.bytes)
        while frame.more:
            frame = pull.recv(copy=False)
            parts.append(frame.bytes)
        assert parts == [b"a", b"bb", b"ccc"]
        assert pull.recv_multipart() == [b"d"]
        push.close(0)
        pull.close(0)
    finally:
        c.term()


async def test_a_message_handed_over_as_the_task_stops_is_dropped_quietly(ctx):
    """The reader callback hands a message's handling to the receiving task, which is
    cancelled before it runs (a source removed at that moment): the handling never starts and
    nothing warns that a coroutine was never awaited; the reader is removed."""
    from kvindex.subscriber import _receive

    pub, sub_sock = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    pub.bind("inproc://handover")
    sub_sock.connect("inproc://handover")
    loop = asyncio.get_running_loop()
    started: list[list[bytes]] = []
    handed = []

    async def handle(frames: list[bytes]) -> None:
        started.append(frames)

    def on_message(frames: list[bytes]):
        loop.call_soon(task.cancel)  # runs before the task's wake-up
        handed.append(handle(frames))
        return handed[-1]

    task = asyncio.ensure_future(_receive(sub_sock, on_message))
    await asyncio.sleep(0.05)  # parked, waiting on the descriptor
    await pub.send_multipart([b"t", b"x"])
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert task.cancelled() and started == []
    assert len(handed) == 1 and handed[0].cr_frame is None  # closed (else: "never awaited" at its collection)
    pub.close(0)
    sub_sock.close(0)
