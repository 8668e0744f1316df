"""KV events on the wire exactly as vLLM's ZMQ publisher sends them.

PUB socket: each message ``[topic, seq (8-byte big-endian, from 0), msgpack payload]``; a
ROUTER replay socket keeps the last ``replay_buffer`` batches and answers a DEALER's
``[b"", start_seq]`` with ``[b"", topic, seq, payload]`` for every buffered batch from
``start_seq`` on, then the end marker ``[b"", b"", ff×8, b""]`` (an empty topic frame, as
vLLM 0.27+ sends it); with ``legacy`` (vLLM up to 0.20, array-form events: the BlockStored
length, or True for 7) replies carry no topic: ``[b"", seq, payload]``, end ``[b"", ff×8, b""]``. Publishing never blocks
the engine: the PUB socket drops at its high-water mark like vLLM's does. An endpoint with port
0 (or ``*``) binds any free port: ``endpoint`` / ``replay_endpoint`` and ``port`` /
``replay_port`` say which, once constructed.

The replay ROUTER's send high-water mark is 2 × (buffer + 1) messages, as in vLLM 0.33, so a
whole buffer fits in one answer (older vLLM kept ZMQ's default 1000 and dropped the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import zmq
import zmq.asyncio

from kvindex.events import MAP_FORM_0_27, EventBatch, KVEvent, encode_batch

from .ports import zmq_bind

END_SEQ = b"\xff" * 8


class EventPublisher:
    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, replay_endpoint: str | None, topic: str = "", *, legacy: bool | int = False, buffer: int = 10_000
    ) -> None:
        self.topic = topic.encode()
        self.legacy = legacy
        #: replay replies carry the topic from vLLM 0.27 on (its map form, or 0.33's)
        self.replay_topic = legacy is False or legacy == MAP_FORM_0_27
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.router: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self.replay_port = 0
        try:
            self.endpoint, self.port = zmq_bind(self.pub, endpoint)
            if replay_endpoint:
                self.router = ctx.socket(zmq.ROUTER)
                self.router.setsockopt(zmq.LINGER, 0)
                self.router.setsockopt(zmq.SNDHWM, 2 * (buffer + 1))
                self.replay_endpoint, self.replay_port = zmq_bind(self.router, replay_endpoint)
        except zmq.ZMQError as exc:
            self.pub.close(0)
            if self.router is not None:
                self.router.close(0)
            raise OSError(exc.errno, f"{exc.strerror}: KV events {endpoint} / replay {replay_endpoint}") from exc
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer)
        self._task: asyncio.Task | None = None
        self.published = 0

    def start(self) -> None:
        if self.router is not None:
            self._task = asyncio.create_task(self._serve_replay())

    def publish(self, events: list[KVEvent]) -> None:
        payload = encode_batch(EventBatch(ts=time.time(), events=events, data_parallel_rank=0), legacy=self.legacy)
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        self.published += 1

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) < 3:
                continue
            ident, start = frames[0], frames[-1]
            if len(start) != 8:
                continue
            start_seq = int.from_bytes(start, "big")
            head = [ident, b"", self.topic] if self.replay_topic else [ident, b""]
            for seq, payload in list(self.buffer):
                if seq >= start_seq:
                    await self.router.send_multipart([*head, seq.to_bytes(8, "big"), payload])
            end = [ident, b"", b""] if self.replay_topic else [ident, b""]
            await self.router.send_multipart([*end, END_SEQ, b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)
