"""The shared index backend: Redis, so that several gateway processes see one index.

Key layout (``ns`` = namespace, default "kvg"; our keys are written as 16 hex digits):

* ``{ns}:{model}:b:{key}`` — hash, field = replica id, value = ``mask + 8 * epoch`` (the tier
  bitmask in the low 3 bits, as the memory backend). TTL ``ttl_s``, refreshed when the block
  is stored and (``refresh_on_hit``) when a lookup matches it, so a block that stays hot
  stays indexed while abandoned ones expire; together with ``maxmemory`` +
  ``volatile-lru`` this bounds memory.
* ``{ns}:epochs`` — hash, replica -> current trust epoch. No TTL (one small field per
  replica, and volatile-lru never evicts it). ``mark_untrusted``, ``drop_replica`` and
  AllBlocksCleared are one HINCRBY: entries written under an older epoch stop counting at
  once, in every gateway, because the lookup script compares epochs inside Redis.
* ``{ns}:m:{replica}`` — hash, engine block hash -> our key: resolves BlockRemoved inside the
  apply script and lets a restarted (or second) indexer chain BlockStored events whose parent
  it never saw. TTL ``ttl_s``, refreshed on every apply for that replica; entries leave it
  when their block left every tier; DEL on AllBlocksCleared / ``drop_replica``.
* ``{ns}:block_sizes`` — hash, model -> block size seen in events, so gateways that do not
  ingest events learn how to cut requests (``ping`` refreshes the local copy).

Round trips: ``lookup`` is one EVALSHA (a Lua script walking the key chain, carrying the
replicas still consecutive, stopping at the first key none of them holds). ``apply`` is one
EVALSHA per batch carrying every store/remove/clear in order; our keys are computed here in
Python (Redis has no xxh3), chaining from a bounded local engine-hash -> key cache, and only
when a parent hash is missing from that cache (e.g. after an indexer restart) does one extra
HMGET ask Redis's copy of the map first. NOSCRIPT (SCRIPT FLUSH, Redis restart) reloads the
script and retries. Redis errors propagate: the caller degrades to load-only routing.

Not supported: Redis Cluster (a batch's keys span slots; Sentinel works). The lookup must be
given the same ``model`` the events were applied under.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from .events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EventBatch
from .index import TIER_NAMES, ApplyStats, KVIndex, PrefixMatch, medium_tier
from .memory_index import evict_oldest, is_primary_group, stored_keys

_APPLY_LUA = """
-- KEYS[1] epochs hash, KEYS[2] this replica's engine-hash map, KEYS[3] block-size hash
-- ARGV[1] replica, ARGV[2] ttl s, ARGV[3] block key prefix, ARGV[4] model, ARGV[5] block size
-- ARGV[6..] ops in event order:
--   'S', tier, n, then n pairs (engine hash, our key)   blocks stored
--   'R', tier, n, then n engine hashes                  blocks removed from one tier
--   'C'                                                 all blocks cleared
local replica, ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local mapkey = KEYS[2]
local epoch = tonumber(redis.call('HGET', KEYS[1], replica) or 0)
local removed = 0
local i, last = 6, #ARGV
local map_written = false
while i <= last do
  local op = ARGV[i]
  if op == 'S' then
    local tier, n = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    i = i + 3
    local fresh = epoch * 8 + tier
    for j = i + 1, i + 2 * n - 1, 2 do
      local bkey = prefix .. ARGV[j]
      local val = fresh
      local cur = redis.call('HGET', bkey, replica)
      if cur then
        cur = tonumber(cur)
        local m = cur % 8
        if (cur - m) / 8 == epoch then val = epoch * 8 + bit.bor(m, tier) end
      end
      redis.call('HSET', bkey, replica, val)
      redis.call('EXPIRE', bkey, ttl)
    end
    for j = i, i + 2 * n - 1, 1000 do
      redis.call('HSET', mapkey, unpack(ARGV, j, math.min(j + 999, i + 2 * n - 1)))
    end
    map_written = map_written or n > 0
    i = i + 2 * n
  elseif op == 'R' then
    local keep, n = bit.bnot(tonumber(ARGV[i + 1])), tonumber(ARGV[i + 2])
    i = i + 3
    for j = i, i + n - 1 do
      local h = ARGV[j]
      local k = redis.call('HGET', mapkey, h)
      if k then
        removed = removed + 1
        local bkey = prefix .. k
        local cur = redis.call('HGET', bkey, replica)
        local m = 0
        if cur then
          cur = tonumber(cur)
          m = cur % 8
          local left = bit.band(m, keep)
          if left == 0 then
            redis.call('HDEL', bkey, replica)
          else
            redis.call('HSET', bkey, replica, cur - m + left)
          end
          m = left
        end
        if m == 0 then redis.call('HDEL', mapkey, h) end
      end
    end
    i = i + n
  elseif op == 'C' then
    epoch = redis.call('HINCRBY', KEYS[1], replica, 1)
    redis.call('DEL', mapkey)
    map_written = false
    i = i + 1
  else
    return redis.error_reply('kvgate apply: bad op at ARGV[' .. i .. ']')
  end
end
if map_written then redis.call('EXPIRE', mapkey, ttl) end
local bs = tonumber(ARGV[5])
if bs > 0 then redis.call('HSET', KEYS[3], ARGV[4], bs) end
return removed
"""

_LOOKUP_LUA = """
-- KEYS[1] epochs hash, KEYS[2..] block keys in request order; ARGV[1] ttl to refresh on hits
-- (0: read only). Returns {replica, matched blocks, OR of each matched block's best tier, ...}.
local BEST = {[0] = 0, 1, 2, 1, 4, 1, 2, 1}
local first = redis.call('HGETALL', KEYS[2])
if #first == 0 then return {} end
local names = {}
for i = 1, #first, 2 do names[#names + 1] = first[i] end
local eps = redis.call('HMGET', KEYS[1], unpack(names))
local alive, expect, worst = {}, {}, {}
for i, r in ipairs(names) do
  local v = tonumber(first[2 * i])
  local m = v % 8
  local e = tonumber(eps[i] or 0)
  if m ~= 0 and (v - m) / 8 == e then
    alive[#alive + 1] = r; expect[#expect + 1] = e; worst[#worst + 1] = BEST[m]
  end
end
local ttl = tonumber(ARGV[1])
local out = {}
if #alive > 0 and ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
local depth, n = 1, #KEYS - 1
while #alive > 0 and depth < n do
  local key = KEYS[depth + 2]
  local got = redis.call('HMGET', key, unpack(alive))
  local na, ne, nw = {}, {}, {}
  for j, r in ipairs(alive) do
    local v = got[j]
    local held = false
    if v then
      v = tonumber(v)
      local m = v % 8
      if m ~= 0 and (v - m) / 8 == expect[j] then
        held = true
        na[#na + 1] = r; ne[#ne + 1] = expect[j]; nw[#nw + 1] = bit.bor(worst[j], BEST[m])
      end
    end
    if not held then
      out[#out + 1] = r; out[#out + 1] = depth; out[#out + 1] = worst[j]
    end
  end
  alive, expect, worst = na, ne, nw
  if #alive > 0 then
    depth = depth + 1
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
for j, r in ipairs(alive) do
  out[#out + 1] = r; out[#out + 1] = depth; out[#out + 1] = worst[j]
end
return out
"""

#: Name of the slowest tier in an OR of best-tier bits.
_SLOWEST_NAME = tuple(TIER_NAMES[1 << (v.bit_length() - 1)] if v else "GPU" for v in range(8))


def hash_field(h: BlockHash) -> bytes:
    """An engine block hash as a Redis hash field: ints in decimal, raw digests NUL-prefixed
    (a decimal string never starts with NUL, so the two forms cannot collide)."""
    if isinstance(h, int):
        return b"%d" % h
    return b"\x00" + bytes(h)


class _Script:
    """A Lua script run by EVALSHA, reloaded once on NOSCRIPT (SCRIPT FLUSH, Redis restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def __call__(self, client: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self.sha is None:
            self.sha = await client.script_load(self.source)
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.sha = await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class RedisIndex(KVIndex):
    """Index shared through Redis (``redis://`` URL); see the module docstring for the layout."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "kvg",
        ttl_s: int = 3600,
        local_cache_ms: float = 0,
        refresh_on_hit: bool = True,
        map_cache_blocks: int = 1_000_000,
        local_cache_entries: int = 4096,
        socket_timeout: float = 1.0,
        retries: int = 2,
        max_connections: int = 64,
    ) -> None:
        """``socket_timeout`` and ``retries`` are small on purpose: while Redis is down every
        call should fail within about a second so routing falls back to load-only scoring
        (redis-py's default would retry ten times with up to 1 s backoff)."""
        super().__init__()
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 second")
        self.url = url
        self.namespace = namespace
        self.ttl_s = int(ttl_s)
        self.local_cache_ms = float(local_cache_ms)
        self.refresh_on_hit = refresh_on_hit
        self.map_cache_blocks = map_cache_blocks
        self.local_cache_entries = local_cache_entries
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), retries),
            max_connections=max_connections,
        )
        self._apply_script = _Script(_APPLY_LUA)
        self._lookup_script = _Script(_LOOKUP_LUA)
        self._epochs_key = f"{namespace}:epochs"
        self._sizes_key = f"{namespace}:block_sizes"
        self._maps: dict[str, dict[BlockHash, int]] = {}  # local cache of each replica's map
        self._read_cache: dict[tuple[str, int, int], tuple[float, dict[str, PrefixMatch]]] = {}

    # ---------------------------------------------------------------- key names

    def _block_prefix(self, model: str) -> str:
        return f"{self.namespace}:{model}:b:"

    def _map_key(self, replica: str) -> str:
        return f"{self.namespace}:m:{replica}"

    # ---------------------------------------------------------------- writes

    async def apply(self, replica: str, batch: EventBatch, *, model: str) -> ApplyStats:
        """Apply a batch in one EVALSHA (plus one HMGET if a parent hash is not cached here)."""
        stats = ApplyStats()
        local = self._maps.setdefault(replica, {})
        events = [ev for ev in batch.events if isinstance(ev, AllBlocksCleared) or is_primary_group(ev.group_idx)]
        missing = _unresolved_parents(events, local)
        fetched = await self._fetch_map(replica, missing) if missing else {}
        ops: list[Any] = []
        block_size = 0
        for ev in events:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                pkey = None if parent is None else local.get(parent, fetched.get(parent))
                keys = stored_keys(ev, pkey, model)
                if keys is None:
                    stats.orphaned += len(ev.block_hashes)
                    continue
                pairs = list(zip(ev.block_hashes, keys))
                stats.orphaned += len(ev.block_hashes) - len(pairs)
                stats.stored += len(pairs)
                block_size = ev.block_size
                local.update(pairs)
                ops += ("S", medium_tier(ev.medium), len(pairs))
                for h, k in pairs:
                    ops += (hash_field(h), b"%016x" % k)
            elif isinstance(ev, BlockRemoved):
                ops += ("R", medium_tier(ev.medium), len(ev.block_hashes))
                ops += [hash_field(h) for h in ev.block_hashes]
                for h in ev.block_hashes:  # the block may still be in another tier: Redis knows
                    local.pop(h, None)
            else:
                ops.append("C")
                local.clear()
                fetched.clear()
                stats.cleared += 1
        if len(local) > self.map_cache_blocks:
            evict_oldest(local, self.map_cache_blocks)
        if block_size:
            self._note_block_size(model, block_size)
        if ops:
            stats.removed = int(
                await self._apply_script(
                    self._redis,
                    (self._epochs_key, self._map_key(replica), self._sizes_key),
                    (replica, self.ttl_s, self._block_prefix(model), model, block_size, *ops),
                )
            )
        if stats.cleared:
            self._read_cache.clear()
        return stats

    async def _fetch_map(self, replica: str, hashes: list[BlockHash]) -> dict[BlockHash, int]:
        """Our keys for engine hashes this process has not seen, from Redis's copy of the map."""
        values = await self._redis.hmget(self._map_key(replica), [hash_field(h) for h in hashes])
        return {h: int(v, 16) for h, v in zip(hashes, values) if v is not None}

    async def drop_replica(self, replica: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self._epochs_key, replica, 1)
            pipe.delete(self._map_key(replica))
            await pipe.execute()
        self._maps.pop(replica, None)
        self._read_cache.clear()

    async def mark_untrusted(self, replica: str) -> None:
        await self._redis.hincrby(self._epochs_key, replica, 1)
        self._read_cache.clear()

    # ---------------------------------------------------------------- reads

    async def lookup(self, keys: Sequence[int], *, model: str = "") -> dict[str, PrefixMatch]:
        """One EVALSHA; with ``local_cache_ms`` > 0 a recent identical lookup is reused.

        The read cache is keyed by (model, length, last key): chained keys make the last key
        stand for the whole prefix.
        """
        if not keys:
            return {}
        if self.local_cache_ms > 0:
            ck = (model, len(keys), keys[-1])
            hit = self._read_cache.get(ck)
            now = time.monotonic()
            if hit is not None and hit[0] > now:
                return dict(hit[1])
        prefix = self._block_prefix(model)
        names = [self._epochs_key]
        names += [f"{prefix}{k:016x}" for k in keys]
        flat = await self._lookup_script(self._redis, names, (self.ttl_s if self.refresh_on_hit else 0,))
        out = {
            flat[i].decode(): PrefixMatch(int(flat[i + 1]), _SLOWEST_NAME[int(flat[i + 2])])
            for i in range(0, len(flat), 3)
        }
        if self.local_cache_ms > 0:
            cache = self._read_cache
            cache[ck] = (now + self.local_cache_ms / 1000.0, dict(out))
            if len(cache) > self.local_cache_entries:
                evict_oldest(cache, self.local_cache_entries)
        return out

    async def block_count(self) -> int:
        """Distinct block keys in this namespace (a SCAN: O(keys), meant for an occasional gauge)."""
        n = 0
        async for _ in self._redis.scan_iter(match=f"{self.namespace}:*:b:*", count=10_000):
            n += 1
        return n

    async def ping(self) -> bool:
        """True if Redis answers; also refreshes block sizes learnt by other processes."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.hgetall(self._sizes_key)
                _, sizes = await pipe.execute()
        except (RedisError, OSError):
            return False
        for model, size in sizes.items():
            self._note_block_size(model.decode(), int(size))
        return True

    async def close(self) -> None:
        await self._redis.aclose()


def _unresolved_parents(events: Sequence[Any], local: dict[BlockHash, int]) -> list[BlockHash]:
    """Parent hashes of BlockStored events that neither the local map nor an earlier event of
    the batch resolves, replaying the batch's removals (which drop local entries) in order.
    Stops at the first AllBlocksCleared: after it, only the batch itself can resolve parents.

    (A parent removed from its last tier earlier in the *same* batch is still found in
    Redis's pre-batch map; vLLM never stores a child of an uncached block, so this is moot.)
    """
    seen: set[BlockHash] = set()
    gone: set[BlockHash] = set()
    need: list[BlockHash] = []
    for ev in events:
        if isinstance(ev, AllBlocksCleared):
            break
        if isinstance(ev, BlockRemoved):
            gone.update(ev.block_hashes)
            seen.difference_update(ev.block_hashes)
        elif isinstance(ev, BlockStored):
            p = ev.parent_block_hash
            if p is not None and p not in seen and (p not in local or p in gone):
                need.append(p)
                seen.add(p)
            seen.update(ev.block_hashes)
    return need
