"""KV-event ingestion: ZMQ SUB sockets → decoded batches → the index, with gap repair.

Per publisher the sequence number (8 bytes, big-endian, +1 per batch, 0 after a restart) tells
what happened on the wire:

* the next expected seq: apply;
* a jump forward (the PUB dropped batches at its high-water mark, or we joined late): ask the
  replica's replay ROUTER for everything from the first missing seq (DEALER sends
  ``[b"", start_seq]``; replies ``[b"", topic, seq, payload]`` or the older ``[b"", seq,
  payload]``, ended by seq ``ff``×8); if the replay cannot cover the gap, the replica's
  current entries are marked untrusted (the index hides them) and ingestion resumes. The repair
  costs what the replay sends back (at most the replica's buffer: vLLM's ``buffer_steps``,
  10 000 by default), never the width of the gap, which is only subtracted: a jump of 3M seqs
  or of 2^63 is handled as fast as one of 3. ``batches_lost`` adds the width of an unrepaired
  gap, except that a jump wider than ``MAX_GAP`` (2^32: no publisher sends four billion
  batches between two that reach us; such jumps come from a corrupted or foreign counter)
  adds 1 and counts in ``seq_jumps``; the index is treated the same way either way (older
  entries untrusted, fresh events count);
* a seq back at 0 (or below what we had, or the last seq again with other bytes): the replica
  restarted with an empty cache: forget its blocks, replay what its new run published before
  this batch, then apply;
* a frame that is not three parts, a seq that is not 8 bytes: counted and skipped;
* a payload that does not decode, or malformed events in it: counted (``decode_errors``) and
  skipped (the rest of the batch is applied), and the replica's earlier entries are untrusted,
  since what was skipped may have removed some of them;
* the index failing (Redis down): the batch is counted lost (``index_errors``), the replica is
  marked untrusted as soon as the index answers again, and ingestion goes on: nothing here
  ever ends the receiving task. Nothing is logged per batch: the index logs one line when it
  becomes unreachable and one when it is back (``RedisIndex.outage``), and this subscriber one
  line, once it answers, with the batches it could not apply. Other per-batch trouble (an
  undecodable batch, a gap, an index that rejects a write) is logged at most once per replica
  and kind every 30 s, with the count of lines held back.

The index itself can lose everything (Redis restarted empty): the replicas never announce again
the blocks they already hold, so a watch task asks ``index.data_lost()`` every ``loss_check_s``,
at once when an index call fails and then every 0.1 s until it answers (the first answer after
an outage is checked, not one a period later), and on a loss rebuilds: per replica, under its
lock (live batches wait), the backend's local engine-hash map is forgotten and the replay buffer
is fetched from seq 0 (the buffer answers from the oldest seq it still holds) and applied in
order, up to the last batch already applied, as one index call per ``APPLY_CHUNK_EVENTS``
events (one per batch made a 10 000-batch buffer take ~5 s on Redis; a gap's replay is
applied the same way); batches older than the buffer are counted
``batches_unrecoverable``. Lookups keep working meanwhile and
just find less. Several subscribers sharing one Redis may rebuild at once, uncoordinated: every
one re-applies the same batches in the same order, and per block and tier the last write wins
with the same op in every interleaving (an AllBlocksCleared bumps the replica's epoch, after
which each re-applies the same tail), so they converge on what a single rebuild gives; a
subscriber still replaying old batches can briefly show an entry another has already removed.

Two modes: one connecting SUB per replica (``ReplicaSource.endpoint``), or one bound SUB that
replicas connect to (``bind=``), where the topic names the replica (``topic_map``). The bound
socket is bound by ``start()``; with port ``*`` (or 0) ZMQ picks a free one, and
``bound_endpoint`` says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import xxhash
import zmq
import zmq.asyncio

from .events import BlockRemoved, BlockStored, EventBatch, EventDecodeError, EventDecoder, KVEvent
from .index import ApplyStats, IndexUnavailableError, KVIndex
from .memory_index import MemoryIndex
from .outage import RateLimited

log = logging.getLogger("kvgate.subscriber")

END_SEQ = b"\xff" * 8


@dataclass
class ReplicaSource:
    """Where one replica publishes, and the id/model its events are indexed under."""

    replica: str
    model: str
    endpoint: str | None = None
    replay_endpoint: str | None = None
    topic: str = ""


@dataclass
class ReplicaStats:
    batches_applied: int = 0
    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    batches_lost: int = 0  # missed and not recovered by replay
    batches_replayed: int = 0
    decode_errors: int = 0
    restarts_detected: int = 0
    unknown_events: int = 0
    orphaned_blocks: int = 0
    index_errors: int = 0  # batches the index failed to apply (e.g. Redis down); also lost
    rebuilds: int = 0  # times this replica's entries were re-applied after the index lost its data
    rebuild_failures: int = 0  # rebuilds whose replay could not be fetched (nothing re-applied)
    batches_unrecoverable: int = 0  # at a rebuild: batches of the replica's run older than its buffer
    seq_jumps: int = 0  # gaps wider than EventSubscriber.MAX_GAP (counted 1 in batches_lost)
    last_seq: int | None = None
    last_event_time: float | None = None


@dataclass
class SubscriberStats:
    """Counters per replica and in total (names are stable: /metrics exports them)."""

    per_replica: dict[str, ReplicaStats] = field(default_factory=dict)
    malformed_frames: int = 0
    index_losses: int = 0  # times the index reported its whole contents lost (Redis restarted empty)

    def replica(self, rid: str) -> ReplicaStats:
        st = self.per_replica.get(rid)  # not setdefault: that builds a ReplicaStats per call (several per batch)
        if st is None:
            st = self.per_replica[rid] = ReplicaStats()
        return st

    def total(self, name: str) -> int:
        return sum(getattr(s, name) for s in self.per_replica.values())


class EventSubscriber:
    def __init__(
        self,
        index: KVIndex,
        sources: list[ReplicaSource],
        *,
        bind: str | None = None,
        topic_map: dict[str, str] | None = None,
        replay_timeout_s: float = 2.0,
        ctx: zmq.asyncio.Context | None = None,
        rcvhwm: int = 100_000,
        loss_check_s: float = 1.0,
    ) -> None:
        self.index = index
        self.sources: dict[str, ReplicaSource] = {s.replica: s for s in sources}
        self.bind = bind
        self.topic_map = dict(topic_map or {})
        self.replay_timeout_s = replay_timeout_s
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.rcvhwm = rcvhwm
        self.loss_check_s = loss_check_s
        self.bound_endpoint: str | None = None  # with bind=: the endpoint bound (port * resolved), once started
        self.stats = SubscriberStats()
        self._decoder = EventDecoder()
        self._tasks: dict[str, asyncio.Task] = {}
        self._expected: dict[str, int] = {}
        self._lock: dict[str, asyncio.Lock] = {}
        self._untrust_pending: set[str] = set()  # replicas whose untrust the index missed
        # xxh3 of the last payload taken per replica: seq expected-1 again is a duplicate only
        # if the bytes are the same, otherwise a restarted publisher whose first batches we missed
        self._last_digest: dict[str, int] = {}
        self._index_failing = False  # an index call failed since the last good loss check
        self._index_failed = asyncio.Event()  # wakes the loss check early
        self._rebuild_pending: set[str] = set()  # replicas whose rebuild the index interrupted
        # per replica, the seq its current run counts from: 0, or where an absurd jump landed
        # (so a rebuild counts the batches it cannot replay from there, not from 0)
        self._run_base: dict[str, int] = {}
        # per-batch trouble (a misbehaving replica, an index that rejects writes) is logged at
        # most once per replica and kind every 30 s; an unreachable index is logged by the index
        # itself (RedisIndex.outage: one line per change) and summed up here when it is back
        self._say = RateLimited(log)
        self._outage_lost: dict[str, int] = {}  # replica -> batches not applied while the index failed
        # per replica, the first batch the index failed to take, and the last seq seen since: once
        # the index answers, that range comes back from the replica's replay buffer, in order
        # (what a failed apply missed is not lost while the replica still buffers it)
        self._behind: dict[str, int] = {}
        self._seen_upto: dict[str, int] = {}
        # the memory index's calls never suspend (nothing in them awaits): the next expected
        # batch can then be applied in the socket's reader callback (``_take``). Its exact
        # class only: a subclass may await in them
        self._sync_index = type(index) is MemoryIndex

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.bind is not None:
            # bound here, not in the task: a port in use fails start(), and port * is known at once
            sock = self._sub_socket()
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                host, sep, port = self.bind.rpartition(":")
                sock.bind(f"{host}:*" if sep and port == "0" else self.bind)
                last = sock.getsockopt(zmq.LAST_ENDPOINT)
                self.bound_endpoint = last.decode() if isinstance(last, bytes) else str(last)
            except BaseException:
                sock.close(0)
                raise
            self._tasks["__bound__"] = asyncio.create_task(self._run_bound(sock))
        self._tasks["__loss_watch__"] = asyncio.create_task(self._watch_index())
        for src in self.sources.values():
            if src.endpoint:
                self._start_source(src, src.endpoint)

    def _start_source(self, src: ReplicaSource, endpoint: str) -> None:
        self.stats.replica(src.replica)
        self._tasks[src.replica] = asyncio.create_task(self._run_source(src, endpoint))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def add_source(self, src: ReplicaSource) -> None:
        """Start ingesting ``src`` while running (a replica joined: discovery). A source with
        the same replica id is replaced; its index entries stay (``remove_source`` first to
        drop them). The new socket joins late, so its first batch asks the replay buffer for
        what came before it."""
        await self.remove_source(src.replica, forget=False)
        self.sources[src.replica] = src
        if src.endpoint:
            self._start_source(src, src.endpoint)

    async def remove_source(self, replica: str, forget: bool = True) -> None:
        """Stop ingesting ``replica``. ``forget``: it left the fleet, so its index entries and
        counters go too (a replica coming back under the same id starts from nothing)."""
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.sources.pop(replica, None)
        self._expected.pop(replica, None)
        self._last_digest.pop(replica, None)
        self._run_base.pop(replica, None)
        self._behind.pop(replica, None)
        self._seen_upto.pop(replica, None)
        if forget:
            self._untrust_pending.discard(replica)
            self._rebuild_pending.discard(replica)
            self._outage_lost.pop(replica, None)
            self.stats.per_replica.pop(replica, None)
            # under its lock: a rebuild or gap repair under way finishes before the drop
            async with self._lock.setdefault(replica, asyncio.Lock()):
                # if the index is down this only logs: a removed replica is out of the fleet (no
                # request goes there) and its Redis entries expire with their TTL
                await self._index_call(replica, self.index.drop_replica(replica))
            self.stats.per_replica.pop(replica, None)  # _index_call may have counted a failure
            if replica not in self.sources:
                self._lock.pop(replica, None)

    # -- receiving ------------------------------------------------------------------------------

    def _sub_socket(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[fd00::5]:5557 (IPv6 pod IPs); IPv4 works as before
        return sock

    async def _run_source(self, src: ReplicaSource, endpoint: str) -> None:
        sock = self._sub_socket()
        sock.setsockopt(zmq.SUBSCRIBE, src.topic.encode())
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:  # a malformed endpoint: say so (a task's exception is silent)
            sock.close(0)
            log.error("replica %s: cannot subscribe to KV events at %s: %s", src.replica, endpoint, exc)
            return
        try:
            await _receive(sock, lambda frames: self._take(src, frames))
        finally:
            sock.close(0)

    def _take(self, src: ReplicaSource, frames: list[bytes]) -> Awaitable[None] | None:
        """A message from ``src``: applied now if it is the common case, else the coroutine
        that handles it (``_guarded``), which the receiving task awaits before the next message.

        The common case: the replica's next expected batch, nothing pending for it (an untrust,
        a catch-up after an index outage), its lock free with nobody waiting for it (no rebuild,
        gap repair or removal under way), and a synchronous index. For it ``_on_frames`` would
        take the lock at once and run ``_apply_run`` for the one batch without ever suspending,
        so doing the same here, with no lock, no coroutine chain and the decoded batch handed
        to the index as it is, changes nothing but the cost (order, counters, errors).
        """
        if self._sync_index and len(frames) == 3:
            rid = src.replica
            seq_b = frames[1]
            if len(seq_b) == 8 and rid not in self._untrust_pending and rid not in self._behind:
                seq = int.from_bytes(seq_b, "big")
                lock = self._lock.get(rid)
                if seq == self._expected.get(rid) and lock is not None and not lock.locked() and not getattr(lock, "_waiters", None):
                    try:
                        self._apply_now(src, seq, frames[2])
                    except Exception:  # as _guarded: the receive loop must outlive any bad message
                        self._unexpected(src)
                    return None
        return self._guarded(src, frames)

    def _apply_now(self, src: ReplicaSource, seq: int, payload: bytes) -> None:
        """``_apply_run`` for one batch, the next expected, on a synchronous index."""
        rid = src.replica
        st = self.stats.replica(rid)
        self._last_digest[rid] = xxhash.xxh3_64_intdigest(payload)
        batch = self._decode(rid, st, seq, payload)
        if batch is None or rid in self._untrust_pending:  # rare: the general code, run to its end here
            _now(self._apply_decoded(src, st, seq, batch))
            return
        try:
            applied = _now(self.index.apply(rid, batch, model=src.model))
        except Exception as exc:
            self._not_applied(rid, st, exc, [seq])
            return
        self._applied(rid, st, [seq], batch, applied)

    async def _guarded(self, src: ReplicaSource, frames: list[bytes]) -> None:
        """``_on_frames``, except that an unexpected error is logged and counted, never fatal."""
        try:
            await self._on_frames(src, frames)
        except asyncio.CancelledError:
            raise
        except Exception:  # the receive loop must outlive any bad message
            self._unexpected(src)

    def _unexpected(self, src: ReplicaSource) -> None:
        """Count and log (rate-limited) the exception being handled."""
        self.stats.replica(src.replica).decode_errors += 1
        self._say.log_at(logging.ERROR, (src.replica, "unexpected"), "replica %s: KV-event message not applied", src.replica, exc_info=True)

    async def _run_bound(self, sock: zmq.asyncio.Socket) -> None:

        def on_message(frames: list[bytes]) -> Awaitable[None] | None:
            if len(frames) != 3:
                self.stats.malformed_frames += 1
                return None
            topic = frames[0].decode(errors="replace")
            rid = self.topic_map.get(topic, topic)
            src = self.sources.get(rid)
            if src is None:
                self.stats.malformed_frames += 1
                return None
            return self._take(src, frames)

        try:
            await _receive(sock, on_message)
        finally:
            sock.close(0)

    async def _on_frames(self, src: ReplicaSource, frames: list[bytes]) -> None:
        st = self.stats.replica(src.replica)
        if len(frames) != 3 or len(frames[1]) != 8:
            self.stats.malformed_frames += 1
            st.decode_errors += 1
            return
        seq = int.from_bytes(frames[1], "big")
        lock = self._lock.setdefault(src.replica, asyncio.Lock())
        async with lock:
            await self._on_batch(src, seq, frames[2])

    async def _on_batch(self, src: ReplicaSource, seq: int, payload: bytes) -> None:
        rid = src.replica
        st = self.stats.replica(rid)
        expected = self._expected.get(rid)
        if expected is not None and seq < expected:
            if seq == 0 or seq < expected - 1 or xxhash.xxh3_64_intdigest(payload) != self._last_digest.get(rid):
                # the publisher started over: its cache is new and empty
                st.restarts_detected += 1
                log.info("replica %s restarted (seq %d after %d): forgetting its blocks", rid, seq, expected - 1)
                self._untrust_pending.discard(rid)
                self._run_base.pop(rid, None)
                if not await self._index_call(rid, self.index.drop_replica(rid)):
                    self._untrust_pending.add(rid)  # at least hide what it had, once we can
                if seq > 0 and src.replay_endpoint:
                    # batches 0 .. seq-1 of the new run went by unseen: fetch what is left
                    await self._repair_gap(src, 0, seq, first_contact=True)
            else:
                return  # the batch we applied last, delivered again
        elif expected is not None and seq > expected:
            if rid in self._behind and self._index_failing:
                # the index is still failing: keep the batch for the replay once it answers
                self._seen_upto[rid] = max(seq, self._seen_upto.get(rid, seq))
                self._last_digest[rid] = xxhash.xxh3_64_intdigest(payload)
                st.index_errors += 1
                self._outage_lost[rid] = self._outage_lost.get(rid, 0) + 1
                return
            await self._repair_gap(src, expected, seq)
        elif expected is None and seq > 0 and src.replay_endpoint:
            # joined late: try to catch up on what is still in the replay buffer
            await self._repair_gap(src, 0, seq, first_contact=True)
        await self._apply(src, seq, payload)

    async def _apply(self, src: ReplicaSource, seq: int, payload: bytes) -> None:
        await self._apply_run(src, [(seq, payload)])

    #: consecutive batches of a replay are applied as one index call per this many events
    #: (events apply in order within a batch, so the result is the same): a rebuild of 10 000
    #: buffered batches is a few round trips to Redis, not 10 000 (which took ~5 s a replica)
    APPLY_CHUNK_EVENTS = 2048

    async def _apply_run(self, src: ReplicaSource, items: list[tuple[int, bytes]]) -> None:
        """Apply consecutive batches ``(seq, payload)`` in order, in as few index calls as
        ``APPLY_CHUNK_EVENTS`` allows. A batch that does not decode, or has malformed events,
        first sends what came before it, then distrusts the replica as a single batch would."""
        rid = src.replica
        st = self.stats.replica(rid)
        events: list[KVEvent] = []
        seqs: list[int] = []
        for seq, payload in items:
            self._last_digest[rid] = xxhash.xxh3_64_intdigest(payload)
            batch = self._decode(rid, st, seq, payload)
            if batch is None or rid in self._untrust_pending:
                # what came before is applied before the untrust; this batch's events after it
                await self._send(src, events, seqs)
                events, seqs = [], []
                if batch is None:
                    self._expected[rid] = seq + 1
                await self._flush_untrust(rid, st)
                if batch is None:
                    continue
            events.extend(batch.events)
            seqs.append(seq)
            if len(events) >= self.APPLY_CHUNK_EVENTS:
                if not await self._send(src, events, seqs):
                    return  # the rest comes back from the replay buffer, after this chunk
                events, seqs = [], []
        await self._send(src, events, seqs)

    async def _apply_decoded(self, src: ReplicaSource, st: ReplicaStats, seq: int, batch: EventBatch | None) -> None:
        """What ``_apply_run`` does with one batch once decoded (``None``: undecodable)."""
        rid = src.replica
        if batch is None or rid in self._untrust_pending:
            if batch is None:
                self._expected[rid] = seq + 1
            await self._flush_untrust(rid, st)
            if batch is None:
                return
        await self._send(src, list(batch.events), [seq])

    def _decode(self, rid: str, st: ReplicaStats, seq: int, payload: bytes) -> EventBatch | None:
        """The batch (malformed events skipped and counted, the replica then marked for
        distrust), or None if nothing of it decodes (counted, replica marked)."""
        dec = self._decoder
        before, bad_before = dec.unknown_events, dec.bad_events
        try:
            batch = dec.decode(payload, skip_bad=True)
        except EventDecodeError as exc:
            # nothing of it is known, removals included: what the replica had may be stale
            st.decode_errors += 1
            self._say.warning((rid, "undecodable"), "replica %s batch %d undecodable (%s); its entries are untrusted", rid, seq, exc)
            self._untrust_pending.add(rid)
            return None
        st.unknown_events += dec.unknown_events - before
        if dec.bad_events != bad_before:  # malformed events skipped, the rest applied
            st.decode_errors += dec.bad_events - bad_before
            self._say.warning(
                (rid, "malformed"), "replica %s batch %d: %d malformed events skipped; its entries are untrusted", rid, seq, dec.bad_events - bad_before
            )
            self._untrust_pending.add(rid)
        return batch

    async def _send(self, src: ReplicaSource, events: list[KVEvent], seqs: list[int]) -> bool:
        """One index call for the events of batches ``seqs`` (consecutive, decoded), counted.

        False if the index failed: the batches are then not counted as applied and the
        replica's next expected seq stays at the first of them, so they come back from its
        replay buffer once the index answers (``catch_up``; the gap repair untrusts the replica
        only if the buffer no longer holds them)."""
        if not seqs:
            return True
        rid = src.replica
        st = self.stats.replica(rid)
        await self._flush_untrust(rid, st)
        batch = EventBatch(ts=time.time(), events=events, data_parallel_rank=None)
        try:
            applied = await self.index.apply(rid, batch, model=src.model)
        except Exception as exc:
            self._not_applied(rid, st, exc, seqs)
            return False
        self._applied(rid, st, seqs, batch, applied)
        return True

    def _not_applied(self, rid: str, st: ReplicaStats, exc: Exception, seqs: list[int]) -> None:
        """The index failed to apply batches ``seqs``: count them, and either keep them for the
        replay once it answers (unreachable) or distrust the replica (it answered an error)."""
        self._note_index_failure()
        st.index_errors += len(seqs)
        self._outage_lost[rid] = self._outage_lost.get(rid, 0) + len(seqs)
        if isinstance(exc, IndexUnavailableError):  # unreachable: replay once it answers
            self._index_trouble(exc, rid, "replica %s: KV-event batches %d..%d not applied (index error: %s); replayed once it answers", seqs[0], seqs[-1])
            first = min(seqs[0], self._behind.get(rid, seqs[0]))
            self._behind[rid] = first
            self._seen_upto[rid] = max(seqs[-1], self._seen_upto.get(rid, seqs[-1]))
            self._expected[rid] = first
            return
        # it answered with an error (a script error, a full Redis): replaying the same
        # batches would fail the same way, so they are lost and the replica distrusted
        st.batches_lost += len(seqs)
        self._untrust_pending.add(rid)
        self._behind.pop(rid, None)
        self._index_trouble(exc, rid, "replica %s: KV-event batches %d..%d not applied (index error: %s); its entries are untrusted", seqs[0], seqs[-1])
        self._expected[rid] = seqs[-1] + 1

    def _applied(self, rid: str, st: ReplicaStats, seqs: list[int], batch: EventBatch, applied: Any) -> None:
        """The index took batches ``seqs`` (their events in ``batch``): count them, move on."""
        if seqs[-1] >= self._behind.get(rid, seqs[-1] + 1):
            self._behind.pop(rid, None)  # what the index missed is in now
        self._count(st, len(seqs), batch, applied)
        st.last_seq = seqs[-1]
        st.last_event_time = time.time()
        self._expected[rid] = seqs[-1] + 1

    async def catch_up(self) -> None:
        """Replay, for every replica the index fell behind on, the batches it missed (from the
        replica's replay buffer, in order), now that the index answers. A replica that keeps
        publishing catches up on its next batch anyway (a gap); this is for the quiet ones."""
        for rid, first in list(self._behind.items()):
            src = self.sources.get(rid)
            if src is None:
                self._behind.pop(rid, None)
                continue
            async with self._lock.setdefault(rid, asyncio.Lock()):
                if self._behind.get(rid) != first or self._index_failing:
                    continue  # caught up meanwhile by a live batch, or failing again
                upto = self._seen_upto.get(rid, first) + 1
                await self._repair_gap(src, first, upto)
                if rid in self._behind and self._behind[rid] == first and not self._index_failing:
                    self._behind.pop(rid, None)  # not replayable: _repair_gap untrusted it
                    self._expected[rid] = upto

    def _index_trouble(self, exc: Exception, rid: str, msg: str, *args: object) -> None:
        """An index call failed: unreachable → debug (the index logs its own outage, once);
        anything else → a warning, at most one per replica every 30 s."""
        if isinstance(exc, IndexUnavailableError):
            log.debug(msg, rid, *args, exc)
        else:
            self._say.warning((rid, "index"), msg, rid, *args, exc)

    async def _flush_untrust(self, rid: str, st: ReplicaStats) -> None:
        """Carry out a pending ``mark_untrusted`` (kept pending while the index is down)."""
        if rid in self._untrust_pending and await self._index_call(rid, self.index.mark_untrusted(rid)):
            self._untrust_pending.discard(rid)

    @staticmethod
    def _count(st: ReplicaStats, batches: int, batch: EventBatch, applied) -> None:
        st.batches_applied += batches
        st.events_applied += len(batch.events)
        if isinstance(applied, ApplyStats):  # the index counted them (the fallback below walks the events)
            st.blocks_stored += applied.stored
            st.blocks_removed += applied.removed
            st.orphaned_blocks += applied.orphaned
            return
        st.blocks_stored += getattr(applied, "stored", sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockStored)))
        st.blocks_removed += getattr(applied, "removed", sum(len(e.block_hashes) for e in batch.events if isinstance(e, BlockRemoved)))
        st.orphaned_blocks += getattr(applied, "orphaned", 0)

    # -- replay ---------------------------------------------------------------------------------

    #: a gap wider than this is not a number of batches anyone published (2^32: 50 days at
    #: 1000 batches/s, vLLM's replay buffer holds 10 000): a corrupted or foreign counter. It
    #: counts 1 in ``batches_lost`` and 1 in ``seq_jumps`` instead of its width (2.8e19 was
    #: seen); the index is handled as for any gap the replay cannot fill
    MAX_GAP = 2**32

    async def _repair_gap(self, src: ReplicaSource, start: int, upto: int, first_contact: bool = False) -> None:
        """Fetch batches ``start .. upto-1`` from the replica's replay socket and apply them.

        Whatever the gap's width, the work is bounded by what the replay sends: it is asked
        from ``start`` and answers with what it buffers from there (vLLM: the last
        ``buffer_steps`` batches), and every test below looks at the seqs that came back, never
        walks the gap. If they cover it, they are applied in order; if not, nothing of the
        gap is applied and the replica's entries are untrusted (what is missing may have
        removed some), so the index never shows a block the replica may have dropped.
        """
        rid = src.replica
        st = self.stats.replica(rid)
        got: dict[int, bytes] = {}
        if src.replay_endpoint:
            try:
                # a long gap comes back with holes like a rebuild's fetch: fill them the same way
                got = await self._fetch_buffer(src.replay_endpoint, upto, start=start)
            except (TimeoutError, zmq.ZMQError) as exc:
                log.info("replay from %s failed: %s", rid, exc)
        gap = upto - start
        absurd = gap > self.MAX_GAP
        if absurd:
            st.seq_jumps += 1
            self._run_base[rid] = upto  # the run's earlier batches are not counted again at a rebuild
        if gap <= len(got) and all(s in got for s in range(start, upto)):
            await self._apply_run(src, [(s, got[s]) for s in range(start, upto)])
            st.batches_replayed += gap
            return
        if first_contact:
            # joined late and the buffer no longer reaches seq 0: apply the contiguous tail it
            # still has (what we learn is true; what we miss only costs hits)
            tail_start = upto
            while tail_start - 1 in got:
                tail_start -= 1
            await self._apply_run(src, [(s, got[s]) for s in range(tail_start, upto)])
            st.batches_replayed += upto - tail_start
            return
        if absurd:
            st.batches_lost += 1
            self._say.warning(
                (rid, "lost"),
                "replica %s: KV-event seq jumped from %d to %d (counted as 1 lost batch, not %d); its entries are untrusted until fresh events",
                rid,
                start - 1,
                upto,
                gap,
            )
        else:
            st.batches_lost += gap
            self._say.warning(
                (rid, "lost"), "replica %s: %d KV-event batches lost (seq %d..%d); its entries are untrusted until fresh events", rid, gap, start, upto - 1
            )
        self._untrust_pending.add(rid)
        await self._flush_untrust(rid, st)

    async def _index_call(self, rid: str, call) -> bool:
        """Await an index operation for ``rid``; False (counted in its ``index_errors``) if the
        index failed."""
        try:
            await call
            return True
        except Exception as exc:
            self._note_index_failure()
            self.stats.replica(rid).index_errors += 1
            self._index_trouble(exc, rid, "replica %s: KV index call failed: %s")
            return False

    # -- the index lost its data: rebuild ---------------------------------------------------------

    def _note_index_failure(self) -> None:
        """An index call failed: check for a loss at once and every 0.1 s until the index
        answers, so an empty restart is caught as soon as it is back (not a period later)."""
        self._index_failing = True
        self._index_failed.set()

    async def _watch_index(self) -> None:
        """Ask the index whether it lost its data, now and every ``loss_check_s``; rebuild if so."""
        while True:
            self._index_failed.clear()
            try:
                lost = await self.index.data_lost()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down: ask again soon, it may come back empty
                self._index_failing = True
                log.debug("index loss check failed: %s", exc)
            else:
                self._index_failing = False
                if self._outage_lost:
                    self._sum_up_outage(lost)
                try:
                    if lost:
                        await self.rebuild_index()
                    elif self._rebuild_pending:
                        await self.rebuild_index(sorted(self._rebuild_pending), retry=True)
                    if self._behind:  # after a rebuild: it replays up to the first batch missed
                        await self.catch_up()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the watch must outlive any failure
                    log.exception("KV index rebuild or catch-up failed")
            delay = min(self.loss_check_s, 0.1) if self._index_failing else self.loss_check_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._index_failed.wait(), delay)

    def _sum_up_outage(self, lost: bool) -> None:
        """The index answers again: one line for what its failure cost (the failures were
        logged at debug level; the index logs its own down/up lines)."""
        counts, self._outage_lost = self._outage_lost, {}
        log.warning(
            "KV index back: %d KV-event batches were not applied while it failed (%s); %s",
            sum(counts.values()),
            ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())),
            "rebuilding from the replay buffers" if lost else "replaying them from the replicas' buffers",
        )

    async def rebuild_index(self, replicas: list[str] | None = None, *, retry: bool = False) -> None:
        """Re-apply every replica's replay buffer to an index that lost its contents."""
        t0 = time.monotonic()
        if not retry:
            self.stats.index_losses += 1
        rids = [r for r in (replicas if replicas is not None else list(self.sources)) if r in self.sources]
        before = {r: (self.stats.replica(r).batches_replayed, self.stats.replica(r).batches_unrecoverable) for r in rids}
        done = await asyncio.gather(*(self._rebuild_replica(self.sources[r]) for r in rids), return_exceptions=True)
        failed = [r for r, ok in zip(rids, done, strict=True) if ok is not True]
        for r, ok in zip(rids, done, strict=True):
            if isinstance(ok, BaseException):
                log.error("replica %s: rebuild failed", r, exc_info=ok)
        replayed = sum(self.stats.replica(r).batches_replayed - before[r][0] for r in rids)
        lost = sum(self.stats.replica(r).batches_unrecoverable - before[r][1] for r in rids)
        log.warning(
            "KV index %s: re-applied %d batches from the replay buffers of %d replicas in %.2f s; "
            "%d older batches were no longer buffered (their blocks stay unknown until stored again)%s",
            "rebuild retried" if retry else "lost its contents (Redis restarted empty?)",
            replayed,
            len(rids) - len(failed),
            time.monotonic() - t0,
            lost,
            f"; not rebuilt: {', '.join(failed)}" if failed else "",
        )

    async def _rebuild_replica(self, src: ReplicaSource) -> bool:
        """Replay ``src``'s buffer from seq 0 and apply, in order, the contiguous run of batches
        ending at the last one applied (later ones arrive on the SUB socket as usual). False if
        nothing could be fetched or the index failed meanwhile (retried while Redis answers)."""
        rid = src.replica
        st = self.stats.replica(rid)
        async with self._lock.setdefault(rid, asyncio.Lock()):
            expected = self._expected.get(rid)
            self._rebuild_pending.discard(rid)
            if expected is None:  # nothing applied yet: its first batch replays from 0 anyway
                return True
            got: dict[int, bytes] = {}
            ok = src.replay_endpoint is not None
            if src.replay_endpoint:
                try:
                    got = await self._fetch_buffer(src.replay_endpoint, expected)
                except zmq.ZMQError as exc:
                    log.info("replica %s: replay for the rebuild failed: %s", rid, exc)
                ok = bool(got)  # an answering replica has at least the batch applied last
            start = expected
            while start - 1 in got:
                start -= 1
            self.index.forget_local(rid)
            errors = st.index_errors
            await self._apply_run(src, [(s, got[s]) for s in range(start, expected)])
            st.batches_replayed += expected - start
            st.batches_unrecoverable += max(0, start - self._run_base.get(rid, 0))
            if not ok:
                st.rebuild_failures += 1
                return False
            st.rebuilds += 1
            if st.index_errors != errors:  # down again mid-way: once it answers, do it again
                self._rebuild_pending.add(rid)
                return False
            return True

    async def _fetch_buffer(self, endpoint: str, upto: int, start: int = 0) -> dict[int, bytes]:
        """The replica's replay buffer from ``start`` to below ``upto``, as complete as it can be had.

        A replay ROUTER sends its buffer in one burst and silently drops what exceeds its send
        high-water mark (1000 messages by default, vLLM's included), so a long buffer comes back
        with holes (measured: 10 000 buffered batches, 200 to 800 lost per request) and often
        without its end marker. The first ~1000 replies from the requested seq always arrive,
        so holes are filled by asking again from the lowest one, until none is left below
        ``upto``, a round fills none (gone from the buffer meanwhile), or ``REPLAY_ROUNDS``.

        Every step works on the seqs received (sorted), never on the range ``start .. upto``:
        the cost is what the replay sends, however far apart ``start`` and ``upto`` are.
        """
        got = await self._replay(endpoint, start, partial=True)
        for _ in range(self.REPLAY_ROUNDS):
            hole = _first_hole(got, start, upto)
            if hole is None:
                break
            more = await self._replay(endpoint, hole, partial=True)
            if not any(hole <= s < upto and s not in got for s in more):
                break  # filled none: gone from the buffer meanwhile, or never published
            got.update(more)
        return got

    #: at most this many extra replay requests to fill the holes of one rebuild's fetch
    REPLAY_ROUNDS = 32
    #: a partial replay ends after this long without a reply once replies have started (the end
    #: marker may have been dropped); the whole request is still bounded by ``replay_timeout_s``
    REPLAY_IDLE_S = 0.25

    async def _replay(self, endpoint: str, start: int, *, partial: bool = False) -> dict[int, bytes]:
        """Batches from ``start`` on. ``partial``: return what came instead of raising a timeout."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        # a deep receive queue (filled by ZMQ's I/O thread whatever this loop is doing), so that
        # losses in a long replay are only the sender's own (see _fetch_buffer)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.connect(endpoint)
        out: dict[int, bytes] = {}
        try:
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + self.replay_timeout_s
            while True:
                left = deadline - time.monotonic()
                if partial and out:
                    left = min(left, self.REPLAY_IDLE_S)
                if left <= 0 or not await sock.poll(max(1, int(left * 1000))):
                    if partial:
                        return out
                    raise TimeoutError("replay did not finish")
                # drain what is queued without a wake-up per message (a buffer is thousands)
                while True:
                    try:
                        frames = await sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames and frames[0] == b"":
                        frames = frames[1:]
                    if len(frames) == 3:  # topic, seq, payload (vLLM 0.33)
                        seq_b, payload = frames[1], frames[2]
                    elif len(frames) == 2:  # seq, payload (older)
                        seq_b, payload = frames[0], frames[1]
                    else:
                        continue
                    if seq_b == END_SEQ:
                        return out
                    if len(seq_b) == 8:
                        out[int.from_bytes(seq_b, "big")] = payload
        finally:
            sock.close(0)


#: plain ints: the enum members cost a Python-level Flag operation per test
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

_T = TypeVar("_T")


def _now(coro: Coroutine[Any, Any, _T]) -> _T:
    """The result of a coroutine that never suspends (a memory index call), run to its end here."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a synchronous index call suspended")


def _drop(handed: Awaitable[None]) -> None:
    """A message's handling that will never be awaited (the receiving task was stopped)."""
    if asyncio.iscoroutine(handed):
        handed.close()


async def _receive(sock: zmq.asyncio.Socket, on_message: Callable[[list[bytes]], Awaitable[None] | None]) -> None:
    """Every message of ``sock``, in order, to ``on_message``; never returns.

    ``on_message`` handles a message at once (returns None) or returns what to await before
    the next message is taken. Waits on the socket's file descriptor and takes every message
    already queued at each wake-up (a replica publishes one batch per engine step; several
    often wait together), in the descriptor's reader callback itself while nothing is being
    awaited: a message handled at once costs no future and no task wake-up. Whatever must be
    awaited is handed to this task, which takes the next messages itself once it is done.

    zmq.asyncio's ``recv_multipart`` costs a future, an io-state update and several EVENTS
    reads per message; pyzmq's plain ``recv_multipart`` reads RCVMORE through an enum
    conversion per part, so parts are received as frames, whose ``more`` says the same.
    ZMQ's descriptor is edge-like: it signals that the socket's state may have changed, and
    reading ZMQ_EVENTS re-arms it (each read processes ZMQ's pending commands: a ``poll`` and
    a ``getpid``), so EVENTS is read before each message and in the reader callback (which
    would otherwise fire on every loop pass while this task awaits).
    """
    sync: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
    loop = asyncio.get_running_loop()
    fd = sync.FD
    get, recv = sync.get, sync.recv
    waiting: list[asyncio.Future[Awaitable[None]]] = []  # the task's future while it is idle

    def take() -> list[bytes] | None:
        """The next queued message, or None (the descriptor re-armed)."""
        if not get(_EVENTS) & _POLLIN:  # type: ignore[operator]
            return None
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        parts = [frame.bytes]
        while frame.more:  # the parts of a message arrive together
            frame = recv(_NOBLOCK, copy=False)
            parts.append(frame.bytes)
        return parts

    def readable() -> None:
        fut = waiting[0] if waiting else None
        if fut is None or fut.done():  # the task is busy (or cancelled): it drains when done
            get(_EVENTS)  # re-arms the descriptor
            return
        try:
            while (frames := take()) is not None:
                pending = on_message(frames)
                if pending is not None:
                    waiting.clear()
                    if fut.done():  # the task was cancelled meanwhile
                        _drop(pending)
                    else:
                        fut.set_result(pending)
                    return
        except Exception as exc:  # raised in the task, as it would have been there
            waiting.clear()
            if not fut.done():
                fut.set_exception(exc)

    loop.add_reader(fd, readable)
    try:
        while True:
            while (frames := take()) is not None:
                pending = on_message(frames)
                if pending is not None:
                    await pending
            fut = loop.create_future()
            waiting.append(fut)
            try:
                pending = await fut
            except asyncio.CancelledError:
                # stopped with a message handed over but not started: drop it quietly
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    _drop(fut.result())
                raise
            finally:
                waiting.clear()
            await pending
    finally:
        loop.remove_reader(fd)


def _first_hole(got: dict[int, bytes], start: int, upto: int) -> int | None:
    """The lowest seq missing from ``got`` between the lowest one it holds in ``start ..
    upto-1`` and ``upto`` (None: no hole, or nothing held there). O(n log n) in the seqs
    held, whatever the width of the range."""
    have = sorted(s for s in got if start <= s < upto)
    if not have:
        return None
    want = have[0]
    for s in have:
        if s != want:
            return want
        want += 1
    return want if want < upto else None
