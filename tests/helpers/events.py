"""vLLM's KV-event publisher, wire for wire, on real ZMQ sockets (and a lossy variant)."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio


class Publisher:
    """vLLM's publisher, wire for wire: PUB [topic, seq, payload] + ROUTER replay."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv", *, old_replay: bool = False, buffer: int = 1000) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.topic = topic
        self.old_replay = old_replay
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.max_buffer = buffer
        self.task = asyncio.create_task(self._replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    async def publish(self, payload: bytes, *, drop: bool = False) -> int:
        seq = self.seq
        self.seq += 1
        self.buffer = (self.buffer + [(seq, payload)])[-self.max_buffer :]
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def _replay(self) -> None:
        while True:
            ident, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            # sent in one go, like vLLM's replay thread (a ROUTER never blocks: past its send
            # high-water mark it drops), not one event-loop turn per buffered batch
            for seq, payload in self.buffer:
                if seq >= start_seq:
                    frames = [seq.to_bytes(8, "big"), payload] if self.old_replay else [self.topic, seq.to_bytes(8, "big"), payload]
                    self.router.send_multipart([ident, b"", *frames], flags=zmq.NOBLOCK)
            end = [b"\xff" * 8, b""] if self.old_replay else [self.topic, b"\xff" * 8, b""]
            self.router.send_multipart([ident, b"", *end], flags=zmq.NOBLOCK)

    async def close(self) -> None:
        self.task.cancel()
        self.pub.close(0)
        self.router.close(0)


class LossyReplay(Publisher):
    """A replay ROUTER that, like a real one past its send high-water mark, silently drops part
    of a long reply: once ``lossy``, on the first two requests every third batch after the first
    few is lost, and on the first the end marker too."""

    lossy: bool = False
    requests: int = 0

    async def _replay(self) -> None:
        while True:
            ident, _, start = await self.router.recv_multipart()
            self.requests += self.lossy
            start_seq = int.from_bytes(start, "big")
            for seq, raw in self.buffer:
                if seq >= start_seq and not (self.lossy and self.requests <= 2 and seq - start_seq > 4 and seq % 3 == 0):
                    await self.router.send_multipart([ident, b"", self.topic, seq.to_bytes(8, "big"), raw])
            if not (self.lossy and self.requests == 1):
                await self.router.send_multipart([ident, b"", self.topic, b"\xff" * 8, b""])
