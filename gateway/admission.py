"""Admission control: a bounded number of requests in flight and a bounded wait queue.

Past ``max_inflight`` a request waits (FIFO) for a slot; past ``max_queue`` waiters, or after
``queue_timeout_s``, it is refused with 429 — a clear answer the client can back off on,
instead of piling load onto replicas that are already saturated.
"""

from __future__ import annotations

import asyncio
import collections
import time

from .errors import GatewayError


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Take a slot; returns seconds waited. Raises GatewayError(429) when full or timed out."""
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise GatewayError(429, "the gateway's admission queue is full; retry later", "queue_full", headers={"retry-after": "1"})
        start = time.monotonic()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # (the client leaving) that arrives as the slot does
            async with asyncio.timeout(self.queue_timeout_s):
                await asyncio.shield(fut)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return time.monotonic() - start  # the slot arrived just as we timed out: keep it
            fut.cancel()
            self._remove(fut)
            raise GatewayError(429, "timed out waiting for admission; retry later", "queue_timeout", headers={"retry-after": "1"}) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot but the client left: pass it on
            else:
                fut.cancel()
                self._remove(fut)
            raise
        return time.monotonic() - start

    def _remove(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def release(self) -> None:
        """Free a slot: hand it straight to the oldest live waiter, if any."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return  # the slot moves to the waiter: inflight unchanged
        self.inflight = max(0, self.inflight - 1)
