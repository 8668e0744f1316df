"""Several gateways on one Redis index route like one (``index.share_load``).

N ``kvgate serve`` processes behind one Service share the KV-block index in Redis, but each
knows only its own in-flight requests and its own "just routed here" entries: two gateways
herd onto the replica each believes idle, and sibling requests of a new prefix that arrive at
different gateways split across replicas before the replica's KV events reach the index.
Both are shared here, through the same Redis (no cluster layer of our own):

* **In-flight load.** Each gateway publishes its counts per replica (requests, uncached prompt
  tokens before the first byte, prompt + max tokens still generating, and how many of its
  latest new-prefix placements went there: the ``placement`` scorer's) as one small msgpack map
  under its own key, with a TTL of ``share_ttl_s``. Absolute counts, not increments: nothing
  drifts, and a gateway that crashes stops counting when its key expires (readers also drop it
  from the set of gateways). Every index lookup publishes them when they changed and reads the
  others' in the same script run (``RedisIndex.lookup_shared``: no extra round trip); between
  requests a flusher publishes a change at once, then at most every ``share_flush_ms``, and
  re-arms the TTL every third of it. The others' sums go to ``EndpointState.peer_inflight_*``;
  this gateway's own counters stay exact and separate.
* **Speculative entries.** After a decision the chosen replica is written as a claim on the
  prompt's block keys (hashes in time buckets, living ``share_speculative_s`` / 2 to
  ``share_speculative_s``), without holding the request; each lookup reads the claims on its
  keys into ``RequestContext.peer_prefix``, which precise-prefix counts like its own
  speculative memory. The lookup also marks the prompt's frontier, its first block that neither
  the index nor a claim covers, as being decided by this gateway (HSETNX, same script run). A
  sibling sharing that new part which reaches another gateway before the claim lands finds the
  mark and waits for the claim (a few ms, bounded by ``index.share_wait_ms``) before deciding: so
  siblings arriving at two gateways at the same instant still land together, and the request
  that decides first never waits (decision and dispatch stay one step, as with one gateway).
  Only blocks a replica holds under its current epoch count as known there: entries left from
  before a cache reset or a restart once pushed the frontier past every prompt the fleet had
  seen, so nothing was marked and siblings were decided apart.
* **Cold placements.** A prompt whose larger part nothing covers is placed by load alone, and
  two gateways placing such prompts at the same instant each pick the replica it believes idle
  (the load each publishes is a round trip old): measured, two of four new system prompts
  landed on one replica and one replica stayed idle for the whole run, as the prefix kept
  every later session where its system prompt was. So a lookup that marks the frontier of a
  cold prompt also asks for the placement (same script run: a ticket); a cold lookup at
  another gateway with a later ticket polls until the earlier placements' claims end them.
  A claim publishes its gateway's load in the same run, so the waiter decides with the placed
  requests counted. Turns go in ticket order (a gateway's stream of cold prompts cannot starve
  another's); one gateway never waits on its own placements; a placement whose claim never
  comes ends after ``PLACING_LEASE_MS``; a placement wait lasts ``WAIT_BUDGET_S`` at most. Warm
  requests (most of the prompt known) never wait.

Redis down: lookups fail as they did (load-only routing), peers' counts are dropped once no
read succeeded for ``share_ttl_s``, writes are dropped rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from kvindex.index import PrefixMatch
from kvindex.redis_index import RedisIndex, Share, Shared

from .config import IndexConfig
from .fleet import Fleet

log = logging.getLogger("kvgate.shared_load")

#: fire-and-forget claim writes in flight at once; beyond, new ones are dropped (Redis slow or down)
MAX_PENDING_WRITES = 64
#: longest wait for another gateway's cold placement (its decision takes well under a
#: millisecond and its claim one write): then the request is placed without it. (A sibling
#: waiting for the claim on its prompt waits ``index.share_wait_ms``: longer, since placing
#: it apart from its prompt costs a whole prefill and splits the prompt over two replicas.)
WAIT_BUDGET_S = 0.02
#: a cold placement whose claim never comes (the request failed before it) holds the other
#: gateways' cold placements this long at most
PLACING_LEASE_MS = 50
#: how often the replicas' epochs are read (a cache cleared or a replica restarted, as the
#: indexer applied it, ends what routing built on that cache: the placement counts)
EPOCH_CHECK_S = 1.0

_ENCODE = msgspec.msgpack.Encoder().encode
#: replica → (requests, prefill tokens, decode tokens, placements); read with any length, so
#: a gateway of the release before (three numbers, no placements) is still counted
_DECODE = msgspec.msgpack.Decoder(dict[str, tuple[int, ...]]).decode


@dataclass(slots=True)
class SharedStats:
    publishes: int = 0
    errors: int = 0
    claims: int = 0
    #: requests that found another gateway deciding their prompt's new part, and waited for its claim
    waits: int = 0
    #: ... of which the claim did not come within ``index.share_wait_ms``
    wait_timeouts: int = 0
    #: cold placements that found another gateway placing one, and waited for its claim
    placement_waits: int = 0
    #: ... of which that placement did not end within WAIT_BUDGET_S
    placement_timeouts: int = 0
    dropped_writes: int = 0


@dataclass(slots=True)
class _Deciding:
    """A request of this gateway deciding a new prompt part (it holds the part's mark)."""

    decided: asyncio.Future[str]  # the replica it chose
    keys: list[int]
    token: str
    since: float


def load_blob(fleet: Fleet, placed: Mapping[str, int]) -> bytes:
    """This gateway's in-flight counts per replica, as the others read them (``_DECODE``)."""
    load = {
        s.id: (s.inflight_requests, s.inflight_prefill_tokens, s.inflight_decode_tokens, placed.get(s.id, 0))
        for s in fleet.states.values()
        if s.inflight_requests or s.inflight_prefill_tokens or s.inflight_decode_tokens or s.id in placed
    }
    return _ENCODE(load)


def apply_loads(fleet: Fleet, blobs: list[bytes]) -> None:
    """The other gateways' counts, summed per replica, into ``EndpointState.peer_*`` (a replica
    no blob names gets zeros)."""
    totals: dict[str, list[int]] = {}
    for blob in blobs:
        try:
            load = _DECODE(blob)
        except msgspec.DecodeError:  # another version's format: not ours to read
            continue
        for rid, counts in load.items():
            if len(counts) < 3:
                continue
            t = totals.get(rid)
            if t is None:
                t = totals[rid] = [0, 0, 0, 0]
            for i, n in enumerate(counts[:4]):
                t[i] += n
    for s in fleet.states.values():
        t = totals.get(s.id)
        if t is None:
            s.peer_inflight_requests = s.peer_inflight_prefill_tokens = s.peer_inflight_decode_tokens = s.peer_placements = 0
        else:
            s.peer_inflight_requests, s.peer_inflight_prefill_tokens, s.peer_inflight_decode_tokens, s.peer_placements = t


def instance_name() -> str:
    """This gateway process's name in Redis: host, pid and a random part (a restarted process
    with the same pid is another instance)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SharedLoad:
    """This gateway's side of the exchange: publishes its load and claims, applies the others'."""

    def __init__(self, index: RedisIndex, fleet: Fleet, cfg: IndexConfig) -> None:
        self.index = index
        self.fleet = fleet
        self.instance = instance_name()
        self.ttl_s = cfg.share_ttl_s
        self.ttl_ms = max(1, int(cfg.share_ttl_s * 1000))
        self.refresh_s = cfg.share_ttl_s / 3
        self.flush_s = cfg.share_flush_ms / 1000
        #: claims are read in the current and previous bucket: they count one to two widths
        self.claim_width_ms = int(cfg.share_speculative_s * 500)
        self.timeout_s = cfg.lookup_timeout_ms / 1000
        self.claim_wait_s = cfg.share_wait_ms / 1000
        self.stats = SharedStats()
        #: this gateway's recent new-prefix placements per replica (the app wires the
        #: scheduler's ``placement_counts``); published with the load
        self.placements: Callable[[], Mapping[str, int]] = dict
        self.peers = 0  # other gateways whose load was read last
        self._version = 0  # bumped by every change of the fleet's in-flight counts
        self._published_version = -1
        self._published_at = float("-inf")
        self._sent = 0  # publishes sent, and how many are still awaiting their answer
        self._outstanding = 0
        self._peers_at = float("-inf")  # when the others' load was last read
        self._applied_issued = float("-inf")  # when the call whose read was applied last was sent
        self._peer_raw: list[bytes] | None = None
        self._epochs_at = float("-inf")  # when check_epochs ran last
        #: this gateway's requests deciding a new prompt part (keyed by its first block), and
        #: which part each request's placing token decides
        self._deciding: dict[int, _Deciding] = {}
        self._decider_of: dict[str, int] = {}
        self._applied_n = -1
        self._wake = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        fleet.load_changed = self._changed

    # -- this gateway's load --------------------------------------------------------------------

    def _changed(self) -> None:
        self._version += 1
        self._wake.set()

    def _load(self, now: float, force: bool = False) -> tuple[bytes | None, int]:
        """This gateway's counts to publish, or None when Redis has them and the TTL is fresh."""
        version = self._version
        if not force and version == self._published_version and now - self._published_at < self.refresh_s:
            return None, version
        return load_blob(self.fleet, self.placements()), version

    def _sending(self, blob: bytes | None) -> int:
        """A publish of ``blob`` starts: its sequence number (0 when nothing is published)."""
        if blob is None:
            return 0
        self._sent += 1
        self._outstanding += 1
        return self._sent

    def _sent_back(self, seq: int, version: int, now: float, ok: bool) -> None:
        """A publish started by ``_sending`` returned (``ok``: Redis has it)."""
        if seq == 0:
            return
        self._outstanding -= 1
        if ok:
            self.stats.publishes += 1
            # published for sure only if no other publish could have overtaken it in Redis
            if seq == self._sent and self._outstanding == 0:
                self._published_version, self._published_at = version, now

    @staticmethod
    def placing_token(keys: Sequence[int]) -> str:
        """Names a request's cold placement among this gateway's (the same prompt twice at once
        at one gateway shares it: the second follows the first anyway)."""
        return f"{len(keys)}:{keys[-1]:016x}" if keys else ""

    def _share(self, blob: bytes | None, keys: Sequence[int], version: int = 0) -> Share:
        token = self.placing_token(keys) if keys and self.claims_on else ""
        return Share(self.instance, blob, self.ttl_ms, self.claim_width_ms if keys else 0, token, PLACING_LEASE_MS if token else 0, version)

    async def _exchange(self, keys: Sequence[int], model: str) -> tuple[dict[str, PrefixMatch], Shared]:
        """One script run: the index lookup (if ``keys``), this gateway's load out, the others'
        load, the claims on ``keys``, the frontier's holder and the cold placement back."""
        now = time.monotonic()
        blob, version = self._load(now)
        seq = self._sending(blob)
        ok = False
        try:
            found, shared = await self.index.lookup_shared(keys, model=model, share=self._share(blob, keys, version))
            ok = True
        finally:
            self._sent_back(seq, version, now, ok)
        self._apply(shared.loads, time.monotonic(), issued=now)
        return found, shared

    async def lookup(self, keys: Sequence[int], model: str) -> tuple[dict[str, PrefixMatch], dict[str, int]]:
        """The index lookup for a request, with the exchange: (matches, claims per replica),
        within ``index.lookup_timeout_ms``. When another gateway is deciding this prompt's new
        part, its claim is then waited for; when this request is a cold placement and another
        gateway is placing one at this instant, that one's claim (and the load it publishes) is
        waited for, so the two do not both pick the replica each believes idle; when another
        request of this gateway is deciding the same new part, its decision is waited for. A
        sibling's wait lasts ``index.share_wait_ms`` at most, a placement's ``WAIT_BUDGET_S``
        or half the lookup timeout. Raises what the index raises, TimeoutError (the router
        routes on load)."""
        try:
            found, shared = await asyncio.wait_for(self._exchange(keys, model), self.timeout_s)
        except Exception:
            self.stats.errors += 1
            raise
        if shared.frontier is not None and shared.holder is not None and shared.holder != self.instance:
            return found, await self._await_claim(keys, model, shared.frontier, shared.claims)
        if shared.frontier is not None and shared.holder == self.instance and keys:
            # this gateway holds the mark: another of its requests may be deciding this very
            # prompt (waiting for another gateway's placement, say); follow its decision
            fkey = keys[shared.frontier]
            sibling = self._deciding.get(fkey)
            if sibling is not None:
                return found, await self._await_local(sibling, keys, shared.claims)
            self._decides(fkey, keys)
        if shared.placing is not None:
            return found, await self._await_placement(keys, model, shared.claims)
        return found, shared.claims

    def _decides(self, fkey: int, keys: Sequence[int]) -> None:
        """This request decides the prompt part starting at ``fkey`` for this gateway: its
        siblings arriving here meanwhile wait for its ``remember``. Entries whose request never
        decided (it failed first) are dropped once older than a second."""
        now = time.monotonic()
        if len(self._deciding) > 64:
            for k, d in list(self._deciding.items()):
                if now - d.since > 1.0:
                    del self._deciding[k]
                    self._decider_of.pop(d.token, None)
        token = self.placing_token(keys)
        self._deciding[fkey] = _Deciding(asyncio.get_running_loop().create_future(), list(keys), token, now)
        self._decider_of[token] = fkey

    async def _await_local(self, sibling: _Deciding, keys: Sequence[int], claims: dict[str, int]) -> dict[str, int]:
        """Wait for the decision of this gateway's request deciding the same new part, then
        count it as a claim on the prefix the two prompts share."""
        self.stats.waits += 1
        try:
            replica = await asyncio.wait_for(asyncio.shield(sibling.decided), self.claim_wait_s)
        except TimeoutError:
            self.stats.wait_timeouts += 1
            return claims
        depth = 0
        for a, b in zip(sibling.keys, keys, strict=False):
            if a != b:
                break
            depth += 1
        out = dict(claims)
        out[replica] = max(out.get(replica, 0), depth)
        return out

    async def _await_placement(self, keys: Sequence[int], model: str, claims: dict[str, int]) -> dict[str, int]:
        """Poll until no other gateway is placing a cold prompt (then this one takes the
        placement, the others' loads applied as they were at that instant), or the budget ends."""
        self.stats.placement_waits += 1
        deadline = time.monotonic() + min(WAIT_BUDGET_S, self.timeout_s / 2)
        share = self._share(None, keys)
        pause = 0.0005
        while time.monotonic() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.004)
            issued = time.monotonic()
            try:
                found, _, placing, loads = await self.index.poll_shared(keys, model=model, share=share)
            except Exception as exc:
                self.stats.errors += 1
                log.debug("placement poll failed: %s", exc)
                return claims
            self._apply(loads, time.monotonic(), issued=issued)
            claims = found
            if placing is None:
                return claims
        self.stats.placement_timeouts += 1
        return claims

    async def _await_claim(self, keys: Sequence[int], model: str, frontier: int, claims: dict[str, int]) -> dict[str, int]:
        """Poll the claims on ``keys`` until the frontier carries one (the other gateway decided)."""
        self.stats.waits += 1
        deadline = time.monotonic() + self.claim_wait_s
        pause = 0.0005
        while time.monotonic() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.004)
            try:  # the frontier's value alone: a burst's waiters poll one field each, not the prompt
                _, values = await self.index.claims(keys[frontier : frontier + 1], model=model, width_ms=self.claim_width_ms)
                mark = values[0]
                if mark is not None and mark[:1] != b"~":  # claimed: decide now, on every claim
                    found, _ = await self.index.claims(keys, model=model, width_ms=self.claim_width_ms)
                    return found
            except Exception as exc:
                self.stats.errors += 1
                log.debug("claims read failed: %s", exc)
                return claims
            # still marked; or no value: the mark's time bucket ended (the claim goes to the next
            # one too), or the request that marked it failed (then this waits out the budget)
        self.stats.wait_timeouts += 1
        with contextlib.suppress(Exception):  # whatever other claims came meanwhile
            claims, _ = await self.index.claims(keys, model=model, width_ms=self.claim_width_ms)
        return claims

    # -- the others' load -----------------------------------------------------------------------

    def _apply(self, blobs: list[bytes], now: float, issued: float | None = None) -> None:
        """The others' loads as read by a call sent at ``issued``: skipped when a call sent
        later was applied already (answers on different connections can arrive out of order,
        and an older read would stand until the next one)."""
        if issued is not None:
            if issued < self._applied_issued:
                return
            self._applied_issued = issued
        self._peers_at = now
        states = self.fleet.states
        if blobs == self._peer_raw and len(states) == self._applied_n:
            return
        apply_loads(self.fleet, blobs)
        self._peer_raw = blobs
        self._applied_n = len(states)
        self.peers = len(blobs)

    def _forget_peers(self) -> None:
        """No read for a TTL (Redis down): the others' last counts say nothing any more."""
        if self._peer_raw:
            self._apply([], self._peers_at)

    # -- speculative claims -----------------------------------------------------------------------

    @property
    def claims_on(self) -> bool:
        return self.claim_width_ms > 0

    def remember(self, keys: Sequence[int], model: str, replica: str, held: int = 0) -> None:
        """Claim ``keys`` for ``replica`` in the background (the request is not held for it);
        siblings waiting here for this request's decision follow it at once. (``held``, the
        blocks the replica was known to hold, is not used here: a claim also publishes this
        gateway's load and ends its placement.)"""
        if self._decider_of and keys:
            fkey = self._decider_of.pop(self.placing_token(keys), None)
            if fkey is not None:
                d = self._deciding.pop(fkey, None)
                if d is not None and not d.decided.done():
                    d.decided.set_result(replica)
        if not self.claims_on or not keys:
            return
        if len(self._pending) >= MAX_PENDING_WRITES:
            self.stats.dropped_writes += 1
            return
        task = asyncio.get_running_loop().create_task(self._write(list(keys), model, replica))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, keys: list[int], model: str, replica: str) -> None:
        """The claim, this gateway's load (the request is dispatched by now: it counts) and the
        end of the request's cold placement, if it was one, in one script run."""
        now = time.monotonic()
        blob, version = self._load(now, force=True)
        seq = self._sending(blob)
        ok = False
        try:
            share = self._share(blob, keys, version)
            await asyncio.wait_for(self.index.claim(keys, model=model, replica=replica, width_ms=self.claim_width_ms, share=share), self.ttl_s)
            ok = True
            self.stats.claims += 1
        except Exception as exc:  # Redis slow or down: a claim is only a hint
            self.stats.errors += 1
            log.debug("claim write failed: %s", exc)
        finally:
            self._sent_back(seq, version, now, ok)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        # the flag too: on Python 3.11 a wait_for finishing as the cancel arrives swallows it
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for t in list(self._pending):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.index.leave(self.instance), 1.0)  # peers stop counting us now

    async def _run(self) -> None:
        """Publish a change at once, then at most every ``flush_s``; re-arm the TTL meanwhile."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            self._wake.clear()
            if self._stopping:
                return
            now = time.monotonic()
            # requests' lookups may have done it all already (busy gateway): then nothing to do
            due = self._version != self._published_version or now - self._published_at >= self.refresh_s
            if due or now - self._peers_at >= self.refresh_s:
                try:
                    await asyncio.wait_for(self._exchange((), ""), max(self.timeout_s, self.refresh_s))
                except Exception as exc:  # Redis down: the lookups say so in the log (the index's outage log)
                    self.stats.errors += 1
                    log.debug("load exchange failed: %s", exc)
            if time.monotonic() - self._peers_at > self.ttl_s:
                self._forget_peers()
            if now - self._epochs_at >= EPOCH_CHECK_S:
                self._epochs_at = now
                try:  # a replica's cache cleared or restarted, as the indexer applied it
                    await asyncio.wait_for(self.index.check_epochs(), max(self.timeout_s, self.refresh_s))
                except Exception as exc:
                    log.debug("epoch check failed: %s", exc)
            await asyncio.sleep(self.flush_s)
