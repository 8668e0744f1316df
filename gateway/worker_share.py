"""``kvgate serve --workers N`` with the memory index: the workers route like one process.

Every worker ingests every replica's KV events, so their indexes agree, but without this each
worker knew only its own in-flight requests and its own "just routed here" entries. Measured
with two workers on the peer benchmark's closed loop: prefix hits 2-4 points lower, load spread
1.24-1.50 where one process keeps 1.00, long-doc-qa 15% less throughput. A new prompt part
that reached both workers before the replica's KV events reached the index was decided twice.

So the workers exchange what several gateways exchange through Redis (``gateway.shared_load``),
over local ZMQ sockets instead (one PUB per worker, bound on an ``ipc://`` path in a directory
the supervisor makes; every worker's SUB connects to the others'):

* **load**: the same msgpack map as SharedLoad's (per replica: requests, uncached prompt
  tokens before the first byte, tokens still generating, new-prefix placements), sent at once on
  a change, then at most every ``index.share_flush_ms``, and every third of ``share_ttl_s``
  while nothing changes. A worker whose map is older than ``share_ttl_s`` stops counting (it
  died); one that stops says so at once. The others' sums go to ``EndpointState.peer_*``.
* **claims**: after each decision the prompt's block keys and the replica, kept by the others
  for ``share_speculative_s`` and returned by each lookup as claims (``RequestContext.
  peer_prefix``): a sibling of a new prompt at another worker follows it, as at one process.

A message takes ~0.1 ms between workers, against a Redis round trip, so there are no marks and
waits here: siblings that reach two workers within that time are still decided apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import msgspec
import zmq

from kvindex.index import PrefixMatch
from kvindex.memory_index import MemoryIndex
from scorers.memory import RoutedPrefixMemory

from .config import IndexConfig
from .fleet import Fleet
from .shared_load import SharedStats, apply_loads, instance_name, load_blob

log = logging.getLogger("kvgate.worker_share")

#: keys remembered from the other workers' claims (a 2k-token prompt is ~128)
MAX_CLAIM_KEYS = 200_000
_LOAD, _CLAIM, _BYE = b"L", b"C", b"B"
_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE_CLAIM = msgspec.msgpack.Decoder(tuple[str, list[int]]).decode


def endpoint(directory: str | Path, slot: int) -> str:
    return f"ipc://{Path(directory) / f'w{slot}.ipc'}"


class WorkerShare:
    """One worker's side: publishes its load and claims, applies the other workers'."""

    def __init__(self, index: MemoryIndex, fleet: Fleet, cfg: IndexConfig, directory: str | Path, slot: int, workers: int) -> None:
        self.index = index
        self.fleet = fleet
        self.instance = instance_name()
        self.ttl_s = cfg.share_ttl_s
        self.refresh_s = cfg.share_ttl_s / 3
        self.flush_s = cfg.share_flush_ms / 1000
        self.stats = SharedStats()
        #: the scheduler's new-prefix placement counts (the app wires them), sent with the load
        self.placements: Callable[[], Mapping[str, int]] = dict
        self.peers = 0
        self.claims = RoutedPrefixMemory(cfg.share_speculative_s, MAX_CLAIM_KEYS) if cfg.share_speculative_s > 0 else None
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 10_000)
        self._sub = self._ctx.socket(zmq.SUB)  # read in place, not by a task: see _drain
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub_fd: int = self._sub.FD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bind = endpoint(directory, slot)
        self._peers_of = [endpoint(directory, s) for s in range(workers) if s != slot]
        self._loads: dict[bytes, tuple[bytes, float]] = {}  # other instance -> (its map, when received)
        self._applied: list[bytes] | None = None
        self._applied_n = -1
        self._version = 0
        self._sent_version = -1
        self._sent_at = float("-inf")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._me = self.instance.encode()
        fleet.load_changed = self._changed

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        path = self._bind.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead predecessor's (a restarted worker takes its slot's path)
        self._pub.bind(self._bind)
        for ep in self._peers_of:
            self._sub.connect(ep)  # ZMQ connects when the peer binds, and again after it restarts
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sub_fd, self._drain)
        self._tasks = [asyncio.create_task(self._run())]
        self._wake.set()  # say hello at once (the others' SUBs may miss it: re-sent every refresh_s)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sub_fd)
            self._loop = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        with contextlib.suppress(zmq.ZMQError):
            self._pub.send_multipart([_BYE, self._me, b""], zmq.NOBLOCK)  # the others stop counting this worker now
        await asyncio.sleep(0.01)  # let the IO thread hand it over before the socket goes
        self._pub.close(0)
        self._sub.close(0)
        self._ctx.term()

    # -- this worker's load and claims ------------------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        self._wake.set()

    def _send(self, kind: bytes, payload: bytes) -> None:
        try:
            self._pub.send_multipart([kind, self._me, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the high-water mark: a hint dropped, never a request held
            self.stats.errors += 1
            log.debug("worker share send failed: %s", exc)

    def _publish_load(self, now: float) -> None:
        self._send(_LOAD, load_blob(self.fleet, self.placements()))
        self._sent_version, self._sent_at = self._version, now
        self.stats.publishes += 1

    async def _run(self) -> None:
        """Publish a change at once, then at most every ``flush_s``; re-send every ``refresh_s``;
        drop the maps of workers silent for ``ttl_s``."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            self._wake.clear()
            now = time.monotonic()
            if self._version != self._sent_version or now - self._sent_at >= self.refresh_s:
                self._publish_load(now)
            stale = [k for k, (_, at) in self._loads.items() if now - at > self.ttl_s]
            if stale:
                for k in stale:
                    del self._loads[k]
                self._apply()
            await asyncio.sleep(self.flush_s)

    def remember(self, keys: Sequence[int], model: str, replica: str, held: int = 0) -> None:
        """Tell the other workers where this prompt went (the router calls it after deciding),
        when it is mostly new there: ``held``, the blocks the replica was known to hold (index or
        claims), is under half of them. Otherwise a sibling finds the replica in its own index
        and claims, and a message of ~100 keys per request would cost each other worker more
        than all the rest of this exchange (measured: 0.6 ms of CPU per request at 0.1 core)."""
        if self.claims is None or not keys or 2 * held >= len(keys):
            return
        self._send(_CLAIM, _ENCODE((replica, list(keys))))
        self.stats.claims += 1

    def cache_lost(self, replica: str) -> None:
        """``replica``'s cache was cleared or restarted: the others' claims on it say nothing now."""
        if self.claims is not None:
            self.claims.forget(replica)

    async def lookup(self, keys: Sequence[int], model: str) -> tuple[dict[str, PrefixMatch], dict[str, int]]:
        """The index lookup and the other workers' claims on ``keys`` (no wait: both are here)."""
        self._drain()
        found = self.index.lookup_now(keys)
        claims = self.claims.match(keys) if self.claims is not None else {}
        return found, claims

    # -- the other workers' ----------------------------------------------------------------------

    def _drain(self) -> None:
        """Apply every message queued from the other workers. Called when the socket signals and
        before each lookup: a worker busy with a burst of requests would otherwise decide them
        before reading the claim another worker sent for their prompt a moment earlier (reading
        ZMQ_EVENTS also re-arms the socket's edge-like descriptor)."""
        sub = self._sub
        while int(sub.get(zmq.EVENTS)) & zmq.POLLIN:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._take(frames)
            except Exception:  # a malformed message: counted, never fatal
                self.stats.errors += 1
                log.debug("worker share message not applied", exc_info=True)

    def _take(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[1] == self._me:
            return
        kind, who, payload = frames
        if kind == _LOAD:
            self._loads[who] = (payload, time.monotonic())
            self._apply()
        elif kind == _CLAIM and self.claims is not None:
            replica, keys = _DECODE_CLAIM(payload)
            self.claims.remember(keys, replica)
        elif kind == _BYE and self._loads.pop(who, None) is not None:
            self._apply()

    def _apply(self) -> None:
        blobs = [b for b, _ in self._loads.values()]
        if blobs == self._applied and len(self.fleet.states) == self._applied_n:
            return
        apply_loads(self.fleet, blobs)
        self._applied, self._applied_n = blobs, len(self.fleet.states)
        self.peers = len(blobs)
