"""Two gateways on one Redis index route like one (index.share_load).

First the exchange itself on a real redis-server: load published and read in the lookup's one
script run and expiring with its gateway, claims and marks, a sibling waiting for the claim of
the gateway deciding its prompt, the load plugins adding peers' counts. Then, as real processes
on loopback: a redis-server, one ``kvgate indexer`` (KV events of every simulator into Redis),
two ``kvgate serve`` gateways (port 0, ingest off) whose fleet comes from the loopback
Kubernetes API server (``discovery:``; each pod's annotations point at a simulator's ports),
and four simulated replicas. Pods are added and removed through the API while both gateways
take traffic; each gateway reads the other's in-flight load from Redis; a burst of siblings
sharing a new prefix, sent alternately to the two gateways at once, lands on one replica; and
a killed gateway's load stops counting when its key expires.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import msgspec
import pytest

from benchmarks.bench_multi_gateway import KvgateProc, gateway_config, replica_entries
from kvindex.hashing import block_keys
from kvindex.redis_index import RedisIndex, Share, claimed_prefix
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, metric_value, wait_for
from tests.helpers.kube_api import FakeKubeAPI, make_pod
from tests.helpers.redis import RedisServer

# -- the exchange, on a real redis-server (no gateway) ---------------------------------------------


async def test_load_is_exchanged_in_the_lookups_script_run_and_expires(redis_url):
    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    keys = block_keys(list(range(64)), 16, model=MODEL)
    try:
        calls = await _evalsha_calls(b)
        _, got = await b.lookup_shared(keys, model=MODEL, share=Share("B", b"load-b", 10_000, 1000))
        assert got.loads == [] and await _evalsha_calls(b) == calls + 1  # one round trip, lookup included
        await a.lookup_shared([], model=MODEL, share=Share("A", b"load-a", 300, 0))  # the load exchange alone
        _, got = await b.lookup_shared(keys, model=MODEL, share=Share("B", None, 10_000, 1000))
        assert got.loads == [b"load-a"]  # its own is never read back
        await asyncio.sleep(0.4)  # A died: its key expired, and it leaves the set of gateways
        _, got = await b.lookup_shared(keys, model=MODEL, share=Share("B", None, 10_000, 1000))
        assert got.loads == [] and await b._redis.smembers("kvg:gateways") == {b"B"}
        await a.lookup_shared([], model=MODEL, share=Share("A", b"load-a2", 10_000, 0))
        await a.leave("A")  # a clean stop withdraws it at once
        assert (await b.lookup_shared([], model=MODEL, share=Share("B", None, 10_000, 0)))[1].loads == []
    finally:
        await a.close()
        await b.close()


async def test_an_older_count_never_replaces_a_newer_one(redis_url):
    """Each publish carries the gateway's count number: one computed earlier but run later in
    Redis (its connection was slow to come, as in a burst on a fresh gateway) is dropped; read
    side, an answer to a call sent before one already applied is not applied."""
    from gateway.config import IndexConfig, ReplicaConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import SharedLoad

    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    try:
        await a.lookup_shared([], model=MODEL, share=Share("A", b"two in flight", 10_000, 0, load_version=7))
        await a.lookup_shared([], model=MODEL, share=Share("A", b"none in flight", 10_000, 0, load_version=6))  # late
        assert (await b.lookup_shared([], model=MODEL, share=Share("B", None, 10_000, 0)))[1].loads == [b"two in flight"]
        keys = block_keys(list(range(3000, 3000 + 4 * 16)), 16, model=MODEL)
        await a.claim(keys, model=MODEL, replica="r0", width_ms=200, share=Share("A", b"three in flight", 10_000, 200, load_version=8))
        await a.lookup_shared([], model=MODEL, share=Share("A", b"three in flight", 10_000, 0, load_version=8))  # a TTL refresh
        assert (await b.lookup_shared([], model=MODEL, share=Share("B", None, 10_000, 0)))[1].loads == [b"three in flight"]
    finally:
        await a.close()
        await b.close()
    async with httpx.AsyncClient() as http:
        fleet = Fleet([ReplicaConfig(id="r0", url="http://10.0.0.1:8000", models=[MODEL])], http)
        shared = SharedLoad(RedisIndex(redis_url), fleet, IndexConfig(backend=redis_url))
        try:
            r0 = fleet.get("r0")
            assert r0 is not None
            shared._apply([msgspec.msgpack.encode({"r0": (2, 0, 0)})], 10.0, issued=9.0)
            shared._apply([msgspec.msgpack.encode({"r0": (0, 0, 0)})], 10.1, issued=8.0)  # sent before: stale
            assert r0.peer_inflight_requests == 2
        finally:
            await shared.index.close()


async def _evalsha_calls(idx: RedisIndex) -> int:
    return int((await idx._redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def test_claims_marks_and_their_expiry(redis_url):
    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    shared_part = list(range(10 * 16))
    first = block_keys(shared_part + [1] * 32, 16, model=MODEL)  # two siblings: 10 blocks in common
    second = block_keys(shared_part + [2] * 32, 16, model=MODEL)
    try:
        # A's lookup finds nothing, marks its prompt's first block as being decided by A
        _, got = await a.lookup_shared(first, model=MODEL, share=Share("A", None, 10_000, 200))
        assert (got.claims, got.frontier, got.holder) == ({}, 0, "A")
        # B's sibling arrives before A's claim: the same frontier, A's mark (B waits for the claim)
        _, got = await b.lookup_shared(second, model=MODEL, share=Share("B", None, 10_000, 200))
        assert (got.claims, got.frontier, got.holder) == ({}, 0, "A")
        await a.claim(first, model=MODEL, replica="r2", width_ms=200)
        _, got = await b.lookup_shared(second, model=MODEL, share=Share("B", None, 10_000, 200))
        assert got.claims == {"r2": 10} and (got.frontier, got.holder) == (10, "B")  # B marks its own new part
        # every replica a block was just routed to counts, as in a gateway's own speculative memory
        await b.claim(second, model=MODEL, replica="r0", width_ms=200)
        assert (await a.lookup_shared(first, model=MODEL, share=Share("A", None, 10_000, 200)))[1].claims == {"r2": 12, "r0": 10}
        assert (await b.claims(second, model=MODEL, width_ms=200))[0] == {"r0": 12, "r2": 10}
        # a claim counts one to two bucket widths
        await asyncio.sleep(0.45)
        _, got = await b.lookup_shared(second, model=MODEL, share=Share("B", None, 10_000, 200))
        assert got.claims == {} and got.holder == "B"
    finally:
        await a.close()
        await b.close()


def test_claimed_prefix_walks_each_replica_along_the_keys():
    assert claimed_prefix([b"r1", b"r1", b"r2", None]) == {"r1": 2}
    assert claimed_prefix([b"r2\nr1", b"r2\nr1", b"r2", b"r2\nr3"]) == {"r1": 2, "r2": 4}
    assert claimed_prefix([b"~gw", b"r1"]) == {}  # a mark is no claim
    assert claimed_prefix([None, b"r1"]) == {} and claimed_prefix([]) == {}


async def test_a_sibling_waits_for_the_claim_of_the_gateway_deciding_it(redis_url):
    from gateway.config import IndexConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import SharedLoad

    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    keys = block_keys(list(range(8 * 16)), 16, model=MODEL)
    async with httpx.AsyncClient() as http:
        fleet = Fleet([], http)
        shared = SharedLoad(b, fleet, IndexConfig(backend=redis_url))
        try:
            await a.lookup_shared(keys, model=MODEL, share=Share("A", None, 10_000, shared.claim_width_ms))  # A marks it

            waiting = asyncio.create_task(shared.lookup(keys, MODEL))
            await until(lambda: shared.stats.waits == 1, timeout=1, every=0.0005)  # B found A's mark and waits
            await a.claim(keys, model=MODEL, replica="r3", width_ms=shared.claim_width_ms)  # A decided
            _, claims = await waiting
            assert claims == {"r3": 8} and shared.stats.wait_timeouts == 0
            # a mark whose claim never comes holds a sibling index.share_wait_ms at most
            other = block_keys(list(range(1000, 1000 + 8 * 16)), 16, model=MODEL)
            await a.lookup_shared(other, model=MODEL, share=Share("A", None, 10_000, shared.claim_width_ms))
            t0 = time.monotonic()
            _, claims = await shared.lookup(other, MODEL)
            assert claims == {} and shared.stats.wait_timeouts == 1 and time.monotonic() - t0 < shared.claim_wait_s + 0.05
        finally:
            await a.close()
            await b.close()


async def test_the_frontier_skips_only_blocks_a_replica_holds_now(redis_url):
    """Entries left from before a replica's cache was reset (an older epoch) cover nothing: the
    frontier, and the mark siblings wait on, stay at the first block no replica holds now. (They
    once counted: after a reset or a restart no prompt the fleet had seen was ever marked, so
    siblings at two gateways were decided apart.)"""
    from tests.helpers.index import MODEL as IMODEL
    from tests.helpers.index import Prompt, apply, make_tokens

    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    p = Prompt(make_tokens(12, 70))
    try:
        await apply(a, "r1", p.stored(0, 8))
        _, got = await a.lookup_shared(p.keys, model=IMODEL, share=Share("A", None, 10_000, 200))
        assert (got.frontier, got.holder) == (8, "A")  # r1 holds 8 blocks: the new part starts after them
        await a.mark_untrusted("r1")  # as a reset (AllBlocksCleared) or a restart: r1's entries are old now
        _, got = await b.lookup_shared(p.keys, model=IMODEL, share=Share("B", None, 10_000, 200))
        assert (got.frontier, got.holder) == (0, "B")  # nothing held now: B marks the first block
        _, got = await a.lookup_shared(p.keys, model=IMODEL, share=Share("A", None, 10_000, 200))
        assert (got.frontier, got.holder) == (0, "B")  # and A's sibling finds B deciding it
        await apply(a, "r2", p.stored(0, 4))  # another replica, current epoch
        await apply(a, "r1", p.stored(0, 12))  # r1 again, under its new epoch
        _, got = await b.lookup_shared(p.keys, model=IMODEL, share=Share("B", None, 10_000, 200))
        assert (got.frontier, got.holder) == (None, None)  # all held now
    finally:
        await a.close()
        await b.close()


async def test_cold_placements_are_taken_one_gateway_at_a_time(redis_url):
    """A prompt mostly new is placed by load: two gateways placing such prompts at the same
    instant would each pick the replica it believes idle. The lookup takes the placement (A),
    another gateway's cold lookup finds it taken (B waits), A's claim publishes A's load and
    ends it in one run, and B's poll then reads that load and takes the placement itself."""
    a, b = RedisIndex(redis_url), RedisIndex(redis_url)
    cold = [block_keys(list(range(i * 1000, i * 1000 + 8 * 16)), 16, model=MODEL) for i in range(5)]
    lease = 300

    def share(me: str, keys: list[int], load: bytes | None = None) -> Share:
        return Share(me, load, 10_000, 200, f"{len(keys)}:{keys[-1]:016x}", lease)

    try:
        _, got = await a.lookup_shared(cold[0], model=MODEL, share=share("A", cold[0]))
        assert (got.frontier, got.holder, got.placing) == (0, "A", None)  # A places it
        _, got = await a.lookup_shared(cold[1], model=MODEL, share=share("A", cold[1]))
        assert got.placing is None  # a gateway's own placements never wait on each other
        _, got = await b.lookup_shared(cold[2], model=MODEL, share=share("B", cold[2]))
        assert (got.holder, got.placing) == ("B", "A")  # B's is cold too: A is placing
        _, _, placing, _ = await b.poll_shared(cold[2], model=MODEL, share=share("B", cold[2]))
        assert placing == "A"
        await a.claim(cold[0], model=MODEL, replica="r0", width_ms=200, share=share("A", cold[0], b"A's load, r0 counted"))
        _, _, placing, _ = await b.poll_shared(cold[2], model=MODEL, share=share("B", cold[2]))
        assert placing == "A"  # A's second placement still runs
        # turns go in the order they were asked for: A's next one comes after B's (a busy
        # gateway's stream of cold prompts cannot starve another gateway's)
        _, got = await a.lookup_shared(cold[3], model=MODEL, share=share("A", cold[3]))
        assert got.placing == "B"
        await a.claim(cold[1], model=MODEL, replica="r1", width_ms=200, share=share("A", cold[1], b"A's load, r0 and r1 counted"))
        _, _, placing, loads = await b.poll_shared(cold[2], model=MODEL, share=share("B", cold[2]))
        assert placing is None and loads == [b"A's load, r0 and r1 counted"]  # B's turn, with A's load as of its claim
        _, _, placing, _ = await a.poll_shared(cold[3], model=MODEL, share=share("A", cold[3]))
        assert placing == "B"  # A waits for B
        await b.claim(cold[2], model=MODEL, replica="r2", width_ms=200, share=share("B", cold[2], b"B's load"))
        _, _, placing, loads = await a.poll_shared(cold[3], model=MODEL, share=share("A", cold[3]))
        assert placing is None and loads == [b"B's load"]
        # a prompt mostly cached (here: claimed) is no placement: it follows its prefix, never waits
        warm = cold[0] + block_keys(list(range(5000, 5000 + 2 * 16)), 16, model=MODEL)[:2]
        _, got = await a.lookup_shared(warm, model=MODEL, share=share("A", warm))
        assert got.claims == {"r0": 8} and got.frontier == 8 and got.placing is None
        # no claims (speculative entries off) or no token: nothing is serialised
        _, got = await a.lookup_shared(cold[3], model=MODEL, share=Share("A", None, 10_000, 200))
        assert got.placing is None
        # a placement whose claim never comes ends with its lease
        _, got = await b.lookup_shared(cold[4], model=MODEL, share=share("B", cold[4]))
        assert got.placing == "A"  # A's cold[3] is never claimed
        await asyncio.sleep(lease / 1000 + 0.05)
        _, _, placing, _ = await b.poll_shared(cold[4], model=MODEL, share=share("B", cold[4]))
        assert placing is None
    finally:
        await a.close()
        await b.close()


async def test_a_cold_placement_waits_for_the_other_gateways_and_sees_its_load(redis_url):
    """Through SharedLoad on both sides: A places a cold prompt and dispatches it; B's cold
    prompt, looked up meanwhile, waits for A's claim and decides with A's request counted."""
    from gateway.config import IndexConfig, ReplicaConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import WAIT_BUDGET_S, SharedLoad

    idx_a, idx_b = RedisIndex(redis_url), RedisIndex(redis_url)
    pa, pb = (block_keys(list(range(i * 1000, i * 1000 + 8 * 16)), 16, model=MODEL) for i in (1, 2))
    async with httpx.AsyncClient() as http:
        fleets = [Fleet([ReplicaConfig(id=r, url=f"http://10.0.0.{i}:8000", models=[MODEL]) for i, r in enumerate(("r0", "r1"))], http) for _ in "ab"]
        cfg = IndexConfig(backend=redis_url, lookup_timeout_ms=200)
        ga, gb = SharedLoad(idx_a, fleets[0], cfg), SharedLoad(idx_b, fleets[1], cfg)
        try:
            await ga.lookup(pa, MODEL)  # A's cold placement
            waiting = asyncio.create_task(gb.lookup(pb, MODEL))
            await until(lambda: gb.stats.placement_waits == 1, timeout=1, every=0.0005)
            fleets[0].dispatched("r0", 128, 144)  # A decided and dispatched (its flusher is not running here)
            ga.remember(pa, MODEL, "r0")  # the claim, with A's load, ends A's placement
            await waiting
            r0 = fleets[1].get("r0")
            assert r0 is not None and r0.peer_inflight_requests == 1 and gb.stats.placement_timeouts == 0
            gb.remember(pb, MODEL, "r1")  # B decided: its claim ends its placement
            await until(lambda: gb.stats.claims == 1, timeout=1, every=0.001)
            # a placement whose claim never comes holds the other gateway WAIT_BUDGET_S at most
            await ga.lookup(block_keys(list(range(7000, 7000 + 8 * 16)), 16, model=MODEL), MODEL)
            t0 = time.monotonic()
            await gb.lookup(block_keys(list(range(8000, 8000 + 8 * 16)), 16, model=MODEL), MODEL)
            assert gb.stats.placement_timeouts == 1 and time.monotonic() - t0 < WAIT_BUDGET_S + 0.05
        finally:
            await idx_a.close()
            await idx_b.close()


async def test_a_sibling_at_the_same_gateway_follows_its_deciding_request(redis_url):
    """A's first request of a new prompt waits its turn behind B's cold placement; a sibling
    arriving at A meanwhile finds A's own mark. It must not decide alone (it would place the
    prompt elsewhere before the first one decides: measured, most long documents of a burst
    split over two replicas): it waits for the first one's decision and follows it."""
    from gateway.config import IndexConfig, ReplicaConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import SharedLoad

    idx_a, idx_b = RedisIndex(redis_url), RedisIndex(redis_url)
    doc = list(range(20_000, 20_000 + 8 * 16))
    first, sibling = (block_keys(doc + [q] * 32, 16, model=MODEL) for q in (1, 2))  # 8 blocks shared, 2 of their own
    other = block_keys(list(range(30_000, 30_000 + 8 * 16)), 16, model=MODEL)
    async with httpx.AsyncClient() as http:
        fleets = [Fleet([ReplicaConfig(id=r, url=f"http://10.0.0.{i}:8000", models=[MODEL]) for i, r in enumerate(("r0", "r1"))], http) for _ in "ab"]
        cfg = IndexConfig(backend=redis_url, lookup_timeout_ms=200)
        ga, gb = SharedLoad(idx_a, fleets[0], cfg), SharedLoad(idx_b, fleets[1], cfg)
        try:
            await gb.lookup(other, MODEL)  # B is placing a cold prompt
            deciding = asyncio.create_task(ga.lookup(first, MODEL))  # waits for B's placement
            await until(lambda: ga.stats.placement_waits == 1, timeout=1, every=0.0005)
            following = asyncio.create_task(ga.lookup(sibling, MODEL))
            await until(lambda: ga.stats.waits == 1, timeout=1, every=0.0005)  # waits for `first`, not B
            assert not following.done()
            gb.remember(other, MODEL, "r0")  # B's placement ends: A's first request decides
            await deciding
            ga.remember(first, MODEL, "r1")
            _, claims = await following
            assert claims == {"r1": 8} and ga.stats.wait_timeouts == 0  # the shared part, on r1
            # a decider that never decides (its request failed) holds a sibling a bounded time
            lone = block_keys(list(range(40_000, 40_000 + 8 * 16)) + [3] * 16, 16, model=MODEL)
            await ga.lookup(lone, MODEL)
            t0 = time.monotonic()
            _, claims = await ga.lookup(block_keys(list(range(40_000, 40_000 + 8 * 16)) + [4] * 16, 16, model=MODEL), MODEL)
            assert claims == {} and ga.stats.wait_timeouts == 1 and time.monotonic() - t0 < 0.2
        finally:
            await idx_a.close()
            await idx_b.close()


async def test_peers_load_lands_beside_the_gateways_own_counts(redis_url):
    from gateway.config import IndexConfig, ReplicaConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import SharedLoad

    idx_a, idx_b = RedisIndex(redis_url), RedisIndex(redis_url)
    async with httpx.AsyncClient() as http:
        fleets = [Fleet([ReplicaConfig(id=r, url=f"http://10.0.0.{i}:8000", models=[MODEL]) for i, r in enumerate(("r0", "r1"))], http) for _ in "ab"]
        cfg = IndexConfig(backend=redis_url, share_ttl_s=0.6, share_flush_ms=5)
        ga, gb = SharedLoad(idx_a, fleets[0], cfg), SharedLoad(idx_b, fleets[1], cfg)
        await ga.start()
        await gb.start()
        try:
            fleets[0].dispatched("r1", 300, 700)  # published at once by A's flusher
            fleets[0].dispatched("r1", 100, 200)
            fleets[1].dispatched("r1", 50, 60)
            r1 = fleets[1].get("r1")
            assert r1 is not None
            await until(lambda: r1.peer_inflight_requests == 2)
            assert (r1.inflight_requests, r1.total_inflight_requests, r1.total_inflight_prefill_tokens, r1.total_inflight_decode_tokens) == (1, 3, 450, 960)
            fleets[0].first_byte("r1", 300)
            fleets[0].finished("r1", 0, 700)
            await until(lambda: (r1.peer_inflight_requests, r1.peer_inflight_prefill_tokens) == (1, 100))
            await ga.stop()  # A leaves: its load is withdrawn
            await until(lambda: r1.peer_inflight_requests == 0 and gb.peers == 0)
        finally:
            await gb.stop()
            await idx_a.close()
            await idx_b.close()


async def test_new_prefix_placements_are_shared(redis_url):
    """Gateway A's placements of new prefixes reach B with its load: B's next new prefix goes to
    the replica neither placed one on (one gateway would do the same). A gateway of the release
    before publishes three numbers per replica: still read."""
    from gateway.config import IndexConfig, ReplicaConfig
    from gateway.fleet import Fleet
    from gateway.shared_load import SharedLoad
    from scorers.base import RequestContext
    from scorers.scheduler import Scheduler

    idx_a, idx_b = RedisIndex(redis_url), RedisIndex(redis_url)
    async with httpx.AsyncClient() as http:
        fleets = [Fleet([ReplicaConfig(id=r, url=f"http://10.0.0.{i}:8000", models=[MODEL]) for i, r in enumerate(("r0", "r1", "r2"))], http) for _ in "ab"]
        scheds = [Scheduler.from_config(None) for _ in "ab"]
        cfg = IndexConfig(backend=redis_url, share_ttl_s=0.6, share_flush_ms=5)
        ga, gb = SharedLoad(idx_a, fleets[0], cfg), SharedLoad(idx_b, fleets[1], cfg)
        ga.placements, gb.placements = scheds[0].placement_counts, scheds[1].placement_counts
        await ga.start()
        await gb.start()

        def new_prompt(n: int) -> RequestContext:
            keys = block_keys(list(range(n * 10_000, n * 10_000 + 8 * 16)), 16, model=MODEL)
            return RequestContext(request_id=str(n), model=MODEL, prompt_tokens=128, block_keys=keys)

        try:
            for n, rid in ((1, "r0"), (2, "r1")):  # A places two new prefixes
                r = fleets[0].get(rid)
                assert r is not None
                scheds[0].on_dispatch(new_prompt(n), r)
                fleets[0].dispatched(rid, 128, 144)  # (the dispatch that publishes)
            b_states = {s.id: s for s in fleets[1].all()}
            await until(lambda: (b_states["r0"].peer_placements, b_states["r1"].peer_placements) == (1, 1))
            for rid in ("r0", "r1"):  # A's requests end: no load left, the placements stay
                fleets[0].first_byte(rid, 128)
                fleets[0].finished(rid, 0, 144)
            await until(lambda: sum(s.peer_inflight_requests for s in b_states.values()) == 0)
            assert (b_states["r0"].peer_placements, b_states["r1"].peer_placements) == (1, 1)
            for _ in range(5):  # not a tie broken at random
                assert scheds[1].schedule(new_prompt(3), fleets[1].all()).chosen.id == "r2"
            # r0's cache is cleared, as an indexer applies it (its epoch moves in Redis): A's
            # placement there no longer counts, at A and, through A's next publish, at B
            ga.index.cache_lost = scheds[0].on_cache_lost
            await idx_b.mark_untrusted("r0")  # (any process moving it: A reads the epochs)
            await until(lambda: b_states["r0"].peer_placements == 0 and b_states["r1"].peer_placements == 1, timeout=5)
            assert scheds[0].placement_counts() == {"r1": 1}
            gb._apply([msgspec.msgpack.encode({"r2": (1, 2, 3)})], time.monotonic())  # three numbers
            assert (b_states["r2"].peer_inflight_requests, b_states["r2"].peer_placements) == (1, 0)
        finally:
            await ga.stop()
            await gb.stop()
            await idx_a.close()
            await idx_b.close()


async def until(cond, timeout: float = 3.0, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)


def test_load_plugins_read_every_gateways_inflight():
    from kvindex.index import PrefixMatch
    from scorers.base import EndpointState, RequestContext
    from scorers.filter.prefix_affinity import PrefixAffinityFilter
    from scorers.scorer.estimated_ttft import EstimatedTTFTScorer
    from scorers.scorer.inflight import InflightScorer
    from scorers.scorer.least_loaded import LeastLoadedScorer
    from scorers.scorer.precise_prefix import PrecisePrefixScorer
    from scorers.scorer.token_load import TokenLoadScorer

    # this gateway sends nothing to r0 and r1; its peers have 6 requests (4000 prefill tokens) on r0
    eps = [
        EndpointState(id="r0", url="u0", peer_inflight_requests=6, peer_inflight_prefill_tokens=4000, peer_inflight_decode_tokens=9000),
        EndpointState(id="r1", url="u1"),
    ]
    ctx = RequestContext(request_id="x", model=MODEL, prompt_tokens=512, block_keys=list(range(32)))
    for scorer in (InflightScorer(), LeastLoadedScorer(), TokenLoadScorer(), EstimatedTTFTScorer()):
        s = scorer.score(ctx, eps)
        assert s["r1"] > s["r0"], (scorer, s)
    warm = RequestContext(request_id="x", model=MODEL, prompt_tokens=512, block_keys=list(range(32)), prefix={"r0": PrefixMatch(32, "GPU")})
    assert [e.id for e in PrefixAffinityFilter(margin_s=0.1).filter(warm, eps)] == ["r0", "r1"]  # the peers' queue releases affinity
    # what another gateway just routed counts like this gateway's own speculative entries
    ctx.peer_prefix = {"r1": 24}
    assert PrecisePrefixScorer().score(ctx, eps) == {"r0": 0.0, "r1": 0.75}
    assert PrecisePrefixScorer(speculative_ttl_s=0).score(ctx, eps) == {"r0": 0.0, "r1": 0.0}


# -- two gateways as processes ----------------------------------------------------------------------

NAMES = [f"vllm-{i}" for i in range(4)]
ADMIN = {"authorization": "Bearer adm"}
#: the start every prompt here shares: after the first requests the index holds it
OPENING = "You are the assistant of the multi-gateway test. Answer briefly and precisely. "


def _port(endpoint: str | None) -> str:
    return str(urlparse(endpoint).port)


def sim_pod(name: str, h: Any) -> dict[str, Any]:
    ann = {
        "kvgate.io/port": _port(h.url),
        "kvgate.io/kv-events-port": _port(h.events_endpoint),
        "kvgate.io/replay-port": _port(h.replay_endpoint),
        "kvgate.io/models": MODEL,
    }
    return make_pod(name, labels={"llm-d.ai/inferenceServing": "true"}, annotations=ann)


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.kube = FakeKubeAPI()
        self.sims = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.5, num_blocks=2048) for i in range(4)])
        self.gateways: list[KvgateProc] = []
        self.indexer: KvgateProc | None = None

    def start(self) -> None:
        self.redis.start()
        self.kube.start()
        self.sims.start()
        h = self.sims.handles
        # the indexer reads a static list (it has no discovery): every simulator, by its pod's name
        indexer_cfg = {"replicas": replica_entries(h, NAMES), "index": {"backend": self.redis.url}}
        self.indexer = KvgateProc("indexer", indexer_cfg, self.tmp, "indexer", "--loss-check-every", "0.5").start()
        for i in (0, 1):
            self.kube.apply("pods", sim_pod(NAMES[i], h[i]))
        discovery = {"kubeconfig": str(self.kube.kubeconfig(self.tmp)), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5}
        cfg = gateway_config(
            self.redis.url,
            share=True,
            discovery=discovery,
            index={"share_ttl_s": 1.5},
            health={"interval_s": 0.3, "timeout_s": 0.5, "failure_threshold": 2, "cooldown_s": 1.0},
            scrape={"interval_s": 1.0},
            auth={"admin_key": "adm"},
        )
        self.gateways = [KvgateProc("serve", cfg, self.tmp, f"gw-{n}") for n in "AB"]
        with ThreadPoolExecutor(2) as pool:  # both start at once (each waits for its first pod list)
            list(pool.map(lambda g: g.start(), self.gateways))

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()
        if self.indexer is not None:
            self.indexer.stop()
        self.sims.stop()
        self.kube.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("multi_gateway"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def state(g: KvgateProc) -> dict[str, Any]:
    r = httpx.get(f"{g.url}/admin/state", headers=ADMIN, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def fleet_ids(g: KvgateProc, healthy: bool = True) -> set[str]:
    return {r["id"] for r in state(g)["replicas"] if r["healthy"] or not healthy}


def peer_inflight(g: KvgateProc) -> dict[str, int]:
    return {r["id"]: r["peer_inflight_requests"] for r in state(g)["replicas"]}


def ask(client: httpx.Client, g: KvgateProc, prompt: str, max_tokens: int = 4) -> str:
    r = client.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-kvgate-replica"]


def burst(stack: Stack, prompts: list[str], max_tokens: int = 4) -> list[tuple[int, str]]:
    """All at once, alternately to gateway A and B: (gateway index, replica) per prompt."""
    with httpx.Client() as client, ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, client, stack.gateways[i % 2], p, max_tokens) for i, p in enumerate(prompts)]
        return [(i % 2, f.result()) for i, f in enumerate(futures)]


def unique(n: int, tag: str) -> list[str]:
    return [OPENING + f"[{tag} {uuid.uuid4().hex}] " + " ".join(f"word{j} of request {i};" for j in range(30)) for i in range(n)]


def test_two_gateways_route_like_one(stack):
    a, b = stack.gateways
    # -- both gateways see only the pods that exist, and each other -----------------------------
    wait_for(lambda: all(fleet_ids(g) == set(NAMES[:2]) for g in (a, b)), message="both gateways' fleets from the API")
    wait_for(lambda: all(state(g)["shared"]["peers"] == 1 for g in (a, b)), message="each gateway reading the other's load")
    assert {r for _, r in burst(stack, unique(8, "two pods"))} <= set(NAMES[:2])

    # -- pods added through the API: traffic from both gateways follows within seconds -----------
    t0 = time.monotonic()
    for i in (2, 3):
        stack.kube.apply("pods", sim_pod(NAMES[i], stack.sims.handles[i]))
    seen: dict[int, set[str]] = {0: set(), 1: set()}

    def all_four() -> bool:
        for gi, rid in burst(stack, unique(8, "four pods")):
            seen[gi].add(rid)
        return seen[0] == seen[1] == set(NAMES)

    wait_for(all_four, timeout=15, message="traffic from both gateways on the added pods")
    assert time.monotonic() - t0 < 10

    # -- one gateway's in-flight requests count in the other's routing ---------------------------
    with httpx.Client() as client, ThreadPoolExecutor(3) as pool:
        long = [
            pool.submit(lambda p: client.post(f"{a.url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 800}, timeout=60), p)
            for p in unique(3, "long")
        ]
        wait_for(lambda: sum(peer_inflight(b).values()) == 3, timeout=5, message="B reading A's three requests in flight")
        held = Counter(peer_inflight(b))
        assert sum(held.values()) == 3 and sum(1 for n in held.values() if n) < len(NAMES), held  # a replica left idle
        picked = ask(client, b, unique(1, "beside")[0])
        # B routes around A's load: to the replica A left idle, or to one whose long request
        # had already ended (a busy machine can be that slow); never to one A still held
        still = {rid for rid, n in peer_inflight(b).items() if n}
        assert still and picked not in still, (picked, held, state(b)["replicas"])
        responses = [f.result() for f in long]
    assert all(r.status_code == 200 for r in responses)
    wait_for(lambda: sum(peer_inflight(b).values()) == 0, timeout=5, message="A's load back to zero in B's view")

    # -- siblings of a new prefix, half through each gateway, at once: one replica ---------------
    for round_ in range(2):
        shared = OPENING + f"[new shared document {round_} {uuid.uuid4().hex}] " + " ".join(f"clause {j} binds party {j % 7};" for j in range(80))
        landed = burst(stack, [shared + f" Question {k}: what does clause {k} say?" for k in range(6)])
        assert {gi for gi, _ in landed} == {0, 1}
        assert len({rid for _, rid in landed}) == 1, landed
    # the claims went through Redis (a sibling that found the other gateway deciding waited for its claim)
    assert sum(metric_value(httpx.get(f"{g.url}/metrics", timeout=5).text, "kvgate_shared_claims_total") for g in (a, b)) > 0
    # the waits are exported (counts depend on timing: present, and timeouts never above waits)
    for g in (a, b):
        text = httpx.get(f"{g.url}/metrics", timeout=5).text
        for name in ("waits", "placement_waits"):
            assert f"kvgate_shared_{name}_total " in text
        assert metric_value(text, "kvgate_shared_wait_timeouts_total") <= metric_value(text, "kvgate_shared_waits_total")
        assert metric_value(text, "kvgate_shared_placement_timeouts_total") <= metric_value(text, "kvgate_shared_placement_waits_total")
        assert "kvgate_shared_wait_timeouts_total " in text and "kvgate_shared_placement_timeouts_total " in text

    # -- load spread over the four replicas, traffic split over the two gateways -----------------
    per_replica = Counter(rid for _, rid in burst(stack, unique(24, "spread"), max_tokens=24))
    assert set(per_replica) == set(NAMES), per_replica
    assert max(per_replica.values()) / min(per_replica.values()) <= 2.0, per_replica

    # -- pods removed through the API: both gateways stop routing there --------------------------
    for i in (1, 3):
        stack.kube.delete("pods", NAMES[i])
    wait_for(lambda: all(fleet_ids(g, healthy=False) == {NAMES[0], NAMES[2]} for g in (a, b)), timeout=10, message="the pods gone from both fleets")
    assert {r for _, r in burst(stack, unique(8, "after removal"))} <= {NAMES[0], NAMES[2]}


def test_a_killed_gateways_load_expires(stack):
    a, b = stack.gateways
    with httpx.Client() as client, ThreadPoolExecutor(2) as pool:
        streams = [
            pool.submit(lambda p: client.post(f"{a.url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 2000}, timeout=60), p)
            for p in unique(2, "cut")
        ]
        wait_for(lambda: sum(peer_inflight(b).values()) == 2, timeout=5, message="B reading A's two requests in flight")
        a.kill()  # no clean shutdown: its key in Redis is not withdrawn
        t0 = time.monotonic()
        wait_for(lambda: sum(peer_inflight(b).values()) == 0 and state(b)["shared"]["peers"] == 0, timeout=5, message="A's load expired")
        assert time.monotonic() - t0 < 1.5 + 1.5  # share_ttl_s, plus B's next read
        for f in streams:
            with pytest.raises(httpx.HTTPError):
                f.result()
    with httpx.Client() as client:
        assert ask(client, b, unique(1, "after the kill")[0]) in set(fleet_ids(b))
    a.start()  # the stack whole again for whatever runs next
    wait_for(lambda: state(b)["shared"]["peers"] == 1, message="B reading the restarted A")
