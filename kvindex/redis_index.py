"""The shared index backend: Redis, so that several gateway processes see one index.

Key layout (``ns`` = namespace, default "kvg"; our 64-bit keys are written as 16 hex digits,
engine hashes as hex too: 16 digits for the usual ints, the digest's hex for raw bytes):

* ``{ns}:{model}:b:{key}`` — string: a msgpack map ``{replica: mask + 8 * epoch}`` (the tier
  bitmask in the low 3 bits, as in the memory backend), SET with ``EX ttl_s``. A string and
  not a hash per block because a lookup then reads the whole chain with ONE ``MGET``: Lua's
  per-``redis.call`` cost (~4 µs on the 2-core test machines) made a hash-per-block walk
  (one HMGET per key) cost ~0.5 ms for 64 blocks. Writes read each touched block once
  (MGET), change it in a Lua table and SET it once, inside the script, so concurrent
  indexers never lose each other's replicas. Entries of other replicas are kept as they are
  (stale epochs included), exactly as the memory backend keeps them.
* ``{ns}:epochs`` — hash, replica -> current trust epoch. No TTL (one small field per
  replica, and ``volatile-lru`` never evicts it). ``mark_untrusted``, ``drop_replica`` and
  AllBlocksCleared are one HINCRBY: entries written under an older epoch stop counting at
  once, in every gateway, because each lookup reads the current epochs in the same script.
* ``{ns}:m:{replica}`` — hash, engine block hash -> our key: resolves BlockRemoved inside the
  apply script and lets a restarted (or second) indexer chain BlockStored events whose parent
  it never saw. TTL ``ttl_s``, refreshed on every apply for that replica; an entry leaves it
  when its block left every tier; DEL on AllBlocksCleared / ``drop_replica``.
* ``{ns}:block_sizes`` — hash, model -> block size seen in events (``pack_geometry``: with
  vLLM 0.33's lookahead hashes, ``block_size | lookahead << 20``), so gateways that do not
  ingest events learn how to cut requests (every lookup returns its model's entry; ``ping``
  refreshes them all).
* ``{ns}:generation`` — string, a random token written by whichever process first finds it
  missing (an apply script, or ``data_lost``'s ``SET NX``). No TTL. Each process remembers the
  token it first saw; the key missing, or holding another token, means Redis lost our data
  (restarted empty, FLUSHDB, failover to an empty replica): ``data_lost`` reports it once and
  the subscriber rebuilds from the replicas' replay buffers. Every apply script reads it too, so
  a write that lands on an empty Redis notices at once; ``data_lost`` (one MULTI round trip)
  covers the case where nothing is written. Several processes sharing one Redis each see the
  change: the first re-creates the key with its own token, the others find a token that is not
  theirs. With ``maxmemory-policy`` ``allkeys-*`` the key could be evicted: a false alarm, which
  costs one replay (re-applying a buffer is harmless), never a wrong answer.

* ``{ns}:gateways``, ``{ns}:load:{instance}``, ``{ns}:{model}:s:{bucket}`` — several gateways
  sharing this Redis (``gateway.shared_load``): the set of gateway instances; each one's
  in-flight load per replica (an opaque blob the gateway encodes, SET with a TTL of a few
  seconds and re-published while the gateway lives, so a crashed gateway's load expires and
  readers drop it from the set); and speculative claims, what some gateway just routed where:
  hashes of our key -> the replicas it was routed to (newline-separated, the latest first, at
  most ``MAX_CLAIMS``) in time buckets (Redis's clock) of ``width`` ms, written in the current
  bucket and the next, read in the current one (a claim counts one to two widths), where a
  lookup also marks the first key of its prompt that nothing covers yet (``~instance``: being
  decided there). Each lookup publishes and reads all this in its own script run
  (``lookup_shared``): no extra round trip. ``{ns}:{model}:placing`` — hash,
  ``instance|token`` -> ``ticket:lease end`` (ms, Redis's clock; tickets numbered by
  ``{ns}:{model}:placing:n``): cold placements asked for or in progress, taken one gateway at
  a time in ticket order (asked by a lookup, waited for by polls, ended by that request's
  claim, which publishes the gateway's load in the same run).

Bounded memory: every block key has a TTL (``ttl_s``) and the server should run with
``maxmemory`` + ``volatile-lru``. vLLM publishes nothing while a block merely stays cached,
so a hot block would expire although still cached; with ``refresh_on_hit`` the lookups
re-arm the TTL of blocks that matched, at most once per ``ttl_s / 4`` per key and process,
inside the next lookup's script (no extra round trip, at most ``REFRESH_PER_LOOKUP`` keys).

Round trips: ``lookup`` is one EVALSHA returning the epochs of the first block's replicas and
the MGET of the chain; the longest-prefix walk then runs here, as in the memory backend.
``apply`` is one EVALSHA per batch carrying every store/remove/clear in event order as one
msgpack argument (redis-py packs each argument in Python, which cost more than Redis itself
when every block was its own argument). Our keys are computed in Python (Redis has no xxh3),
chaining from a bounded local engine-hash -> key cache; only when a parent hash is missing
from it (e.g. after an indexer restart) does one HMGET ask Redis's copy of the map first.
NOSCRIPT (SCRIPT FLUSH, Redis restart) reloads the script and retries. An unreachable Redis
raises ``RedisIndexUnavailable`` (an ``IndexUnavailableError`` and a ``redis.RedisError``)
naming the server, within about ``socket_timeout``: the caller degrades to load-only routing.

Not supported: Redis Cluster (the scripts build block key names themselves, and a batch's
keys span slots; Sentinel works). Lookups must be given the ``model`` the events were
applied under.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .event_rules import BEST_TIER, SLOWEST_TIER_NAME, evict_oldest, is_primary_group, lookahead_of, needs_known_first, stored_keys
from .events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, EventBatch
from .index import ApplyStats, IndexUnavailableError, KVIndex, PrefixMatch, medium_tier, pack_geometry
from .outage import StateLog

_APPLY_LUA = """
-- KEYS[1] epochs hash, KEYS[2] this replica's engine-hash map, KEYS[3] block-size hash,
-- KEYS[4] generation marker
-- ARGV[1] replica, ARGV[2] ttl s, ARGV[3] block key prefix, ARGV[4] model, ARGV[5] block
-- size and lookahead as pack_geometry gives them (0: none), ARGV[7] a fresh generation token, set if the marker is missing,
-- ARGV[6] msgpack array of ops in event order:
--   {'S', tier, keys hex (16 per block), engine hashes hex, hex width per hash}  stored
--   {'R', tier, engine hashes hex, hex width per hash}                         removed
--   {'C'}                                                                     all cleared
-- Each touched block value is read once (MGET), changed in a Lua table, written once (SET EX).
-- Returns {blocks removed, the generation marker}.
local gen = redis.call('GET', KEYS[4])
if not gen then gen = ARGV[7]; redis.call('SET', KEYS[4], gen) end
local replica, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]
local mapkey = KEYS[2]
local epoch = tonumber(redis.call('HGET', KEYS[1], replica) or 0)
local blocks, dirty = {}, {}
local sub = string.sub

local function split(blob, width)
  local out = {}
  for j = 1, #blob / width do out[j] = sub(blob, width * j - width + 1, width * j) end
  return out
end

local function load(names)
  local need = {}
  for _, name in ipairs(names) do
    if blocks[name] == nil then blocks[name] = {}; need[#need + 1] = name end
  end
  for j = 1, #need, 1000 do
    local last = math.min(j + 999, #need)
    local got = redis.call('MGET', unpack(need, j, last))
    for x = j, last do
      local v = got[x - j + 1]
      if v then blocks[need[x]] = cmsgpack.unpack(v) end
    end
  end
end

local function map_get(fields)
  local out = {}
  for j = 1, #fields, 1000 do
    local last = math.min(j + 999, #fields)
    local got = redis.call('HMGET', mapkey, unpack(fields, j, last))
    for x = j, last do out[x] = got[x - j + 1] end
  end
  return out
end

local function chunked(cmd, args)
  for j = 1, #args, 1000 do redis.call(cmd, mapkey, unpack(args, j, math.min(j + 999, #args))) end
end

local removed = 0
local map_written = false
for _, op in ipairs(cmsgpack.unpack(ARGV[6])) do
  local kind = op[1]
  if kind == 'S' then
    local tier, keys, fields = op[2], split(op[3], 16), split(op[4], op[5])
    local names, pairs_ = {}, {}
    for j, k in ipairs(keys) do
      names[j] = prefix .. k
      pairs_[2 * j - 1] = fields[j]; pairs_[2 * j] = k
    end
    load(names)
    local fresh = epoch * 8 + tier
    for _, name in ipairs(names) do
      local t = blocks[name]
      local cur = t[replica]
      local m = cur and cur % 8 or 0
      if cur and (cur - m) / 8 == epoch then t[replica] = epoch * 8 + bit.bor(m, tier) else t[replica] = fresh end
      dirty[name] = true
    end
    chunked('HSET', pairs_)
    map_written = map_written or #keys > 0
  elseif kind == 'R' then
    local keep, fields = bit.bnot(op[2]), split(op[3], op[4])
    local keys = map_get(fields)
    local names, found, forget = {}, {}, {}
    for j = 1, #fields do
      if keys[j] then names[#names + 1] = prefix .. keys[j]; found[#found + 1] = fields[j] end
    end
    load(names)
    for j, name in ipairs(names) do
      removed = removed + 1
      local t = blocks[name]
      local cur = t[replica]
      local left = 0
      if cur then
        local m = cur % 8
        left = bit.band(m, keep)
        if left == 0 then t[replica] = nil else t[replica] = cur - m + left end
        dirty[name] = true
      end
      if left == 0 then forget[#forget + 1] = found[j] end
    end
    chunked('HDEL', forget)
  elseif kind == 'C' then
    epoch = redis.call('HINCRBY', KEYS[1], replica, 1)
    redis.call('DEL', mapkey)
    map_written = false
  else
    return redis.error_reply('kvgate apply: unknown op ' .. tostring(kind))
  end
end
for name, _ in pairs(dirty) do
  local t = blocks[name]
  if next(t) == nil then
    redis.call('DEL', name)
  else
    redis.call('SET', name, cmsgpack.pack(t), 'EX', ttl)
  end
end
if map_written then redis.call('EXPIRE', mapkey, ttl) end
local bs = tonumber(ARGV[5])
if bs > 0 then redis.call('HSET', KEYS[3], ARGV[4], bs) end
return {removed, gen}
"""

_LOOKUP_BODY = """
-- KEYS[1] epochs hash, KEYS[2] block-size hash, KEYS[3 ..] block keys whose TTL to re-arm.
-- ARGV[1] block key prefix, ARGV[2] the request's keys as hex (16 per block), ARGV[3] ttl s,
-- ARGV[4] model. Returns {block size or false} if the first block is unknown, else
-- {block size, replicas of block 1, their epochs, the values of every block (false: absent)}.
for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
local bs = redis.call('HGET', KEYS[2], ARGV[4])
local prefix, blob = ARGV[1], ARGV[2]
local sub = string.sub
local n = #blob / 16
local vals = {}
for j = 1, n, 1000 do
  local names = {}
  for x = j, math.min(j + 999, n) do names[#names + 1] = prefix .. sub(blob, 16 * x - 15, 16 * x) end
  local got = redis.call('MGET', unpack(names))
  if j == 1 and not got[1] then return {bs} end
  for x = 1, #names do vals[#vals + 1] = got[x] end
end
local names = {}
for r, _ in pairs(cmsgpack.unpack(vals[1])) do names[#names + 1] = r end
if #names == 0 then return {bs} end
return {bs, names, redis.call('HMGET', KEYS[1], unpack(names)), vals}
"""
_LOOKUP_LUA = _LOOKUP_BODY

#: Several gateways sharing this Redis (``gateway.shared_load``): what one gateway sends along
#: with a lookup, so that routing sees the others in the same round trip.
_EXCHANGE_FN = """
-- ARGV[5] set of gateway instances, ARGV[6] load key prefix, ARGV[7] this instance, ARGV[8] its
-- in-flight load to publish ('' = unchanged), ARGV[9] that key's TTL ms, ARGV[10] claims
-- bucket prefix, ARGV[11] bucket width ms (0 = no claims). Claims: hashes per time bucket
-- (Redis's clock), our key as 16 hex digits -> the replicas gateways just routed a prompt with
-- that block to (newline-separated, the latest first), or '~' .. instance: a gateway is deciding
-- a prompt whose new part starts there.
local function bucket_now(width)
  local t = redis.call('TIME')
  return math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / width)
end

local function split16(blob)
  local out = {}
  for x = 1, #blob / 16 do out[x] = string.sub(blob, 16 * x - 15, 16 * x) end
  return out
end

-- a claim is written in the current bucket and the next, so a read needs the current one only
local function read_claims(bucket_prefix, b, fields)
  local cur, n = {}, #fields
  for j = 1, n, 1000 do
    local last = math.min(j + 999, n)
    local c = redis.call('HMGET', bucket_prefix .. b, unpack(fields, j, last))
    for x = 1, last - j + 1 do cur[#cur + 1] = c[x] end
  end
  return cur
end

-- publish this instance's load, numbered ``ver`` by its gateway: a count computed before the
-- one Redis holds (its script ran later: a connection was slow to come) is dropped, or it would
-- stand until the next change. The number is kept beside the load, with the same TTL.
local function publish(set, lp, me, blob, ttl, ver)
  local vk = lp .. me .. '#v'
  local cur = tonumber(redis.call('GET', vk))
  if cur and cur > ver then return end
  redis.call('SET', lp .. me, blob, 'PX', ttl)
  redis.call('SET', vk, ver, 'PX', ttl)
  redis.call('SADD', set, me)
end

-- publish this instance's load (blob '' = unchanged) and read the others'
local function loads_exchange(set, lp, me, blob, ttl, ver)
  if blob ~= '' then publish(set, lp, me, blob, ttl, ver) end
  local names, who, loads, gone = {}, {}, {}, {}
  for _, m in ipairs(redis.call('SMEMBERS', set)) do
    if m ~= me then names[#names + 1] = lp .. m; who[#who + 1] = m end
  end
  if #names > 0 then
    local got = redis.call('MGET', unpack(names))
    for i = 1, #names do
      if got[i] then loads[#loads + 1] = got[i] else gone[#gone + 1] = who[i] end
    end
    if #gone > 0 then redis.call('SREM', set, unpack(gone)) end
  end
  return loads
end

-- Cold placements (most of a prompt new: where it lands is the load's decision) are taken one
-- gateway at a time, in the order they were asked for (a ticket lock: a busy gateway's stream
-- of placements cannot starve another's). A hash of 'instance|token' -> 'ticket:lease end'
-- (ms, Redis's clock): a gateway's placement asked for or in progress, deleted by its claim
-- (which publishes its load in the same run); key .. ':n' numbers the tickets. Returns another
-- instance holding an earlier ticket (the caller waits for it: a waiter's poll keeps its own
-- ticket), else false: this placement's turn. Expired leases (no claim came) are dropped.
local function take_placement(key, me, token, lease)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local all = redis.call('HGETALL', key)
  local mine, field = me .. '|', me .. '|' .. token
  local ticket, others = nil, {}
  for i = 1, #all, 2 do
    local f = all[i]
    local n, ends = string.match(all[i + 1], '^(%d+):(%d+)$')
    if not n or tonumber(ends) < now then
      redis.call('HDEL', key, f)
    elseif f == field then
      ticket = tonumber(n)
    elseif string.sub(f, 1, #mine) ~= mine then
      others[#others + 1] = f; others[#others + 1] = tonumber(n)
    end
  end
  if not ticket then
    ticket = redis.call('INCR', key .. ':n')
    redis.call('HSET', key, field, ticket .. ':' .. (now + lease))
    redis.call('PEXPIRE', key, lease + 1000)
  end
  local first = false
  for i = 1, #others, 2 do
    if others[i + 1] < ticket then first = string.match(others[i], '^(.*)|') or others[i] end
  end
  return first
end
"""

#: The lookup with the exchange. Returns {{loads}, lookup reply} or, with claims on,
#: {{loads, {replica, claimed depth, ..}, frontier, its holder, placing}, lookup reply}:
#: the frontier is the first of the request's keys neither the index (a replica's entry of its
#: current epoch: entries left from before a cache reset or restart do not count) nor a claim
#: covers (0-based; false when all are covered); unless a gateway's mark is already there, this
#: gateway marks it ('~' .. instance, HSETNX) and is its holder. A sibling arriving at another
#: gateway meanwhile finds that mark and waits for the claim that replaces it. When this gateway
#: holds the frontier and less than half the prompt is covered, the request is a cold placement
#: (ARGV[12] placements hash, ARGV[13] token, '' = none asked, ARGV[14] lease ms; ARGV[15] the
#: published load's number): ``placing`` is
#: another gateway placing one at this instant (the caller waits for its claim and load), or
#: false. No keys (ARGV[2] ''): loads only.
_SHARED_LOOKUP_LUA = (
    _EXCHANGE_FN
    + "local function index_lookup()\n"
    + _LOOKUP_BODY
    + """end
local loads = loads_exchange(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[15]) or 0)
local blob = ARGV[2]
if blob == '' then return {{loads}} end
local idx = index_lookup()
local width = tonumber(ARGV[11])
if width == 0 then return {{loads}, idx} end
local bucket = ARGV[10] .. bucket_now(width)
local n = #blob / 16
local function field(x) return string.sub(blob, 16 * x - 15, 16 * x) end
-- the longest prefix some replica holds under its current epoch (the walk the gateway makes
-- of the reply; a value is decoded only when its bytes differ from the previous block's)
local known = 0
if #idx > 1 then
  local names, epochs, vals = idx[2], idx[3], idx[4]
  local live, any = {}, false
  local first = cmsgpack.unpack(vals[1])
  for i = 1, #names do
    local e, v = tonumber(epochs[i]) or 0, first[names[i]]
    if v and v % 8 ~= 0 and math.floor(v / 8) == e then live[names[i]] = e; any = true end
  end
  if any then
    known = 1
    local last = vals[1]
    while known < n do
      local raw = vals[known + 1]
      if not raw then break end
      if raw ~= last then
        local d, kept = cmsgpack.unpack(raw), false
        for r, e in pairs(live) do
          local v = d[r]
          if v and v % 8 ~= 0 and math.floor(v / 8) == e then kept = true else live[r] = nil end
        end
        if not kept then break end
        last = raw
      end
      known = known + 1
    end
  end
end
-- per replica claiming the first key, how many leading keys it claims: {r1, d1, r2, d2, ..}
local claims, cur = {}, nil
local r = redis.call('HGET', bucket, field(1))
if r and string.sub(r, 1, 1) ~= '~' then
  cur = read_claims(ARGV[10], bucket_now(width), split16(blob))
  local live, depth, last = {}, 1, r
  for x in string.gmatch(r, '[^\\n]+') do live[x] = true end
  while next(live) ~= nil and depth < n do
    local v = cur[depth + 1]
    if v ~= last then  -- along one claimed prompt the lists repeat: checked once
      local padded = v and ('\\n' .. v .. '\\n')
      for x, _ in pairs(live) do
        if not padded or not string.find(padded, '\\n' .. x .. '\\n', 1, true) then
          claims[#claims + 1] = x; claims[#claims + 1] = depth; live[x] = nil
          if depth > known then known = depth end
        end
      end
      last = v
    end
    depth = depth + 1
  end
  for x, _ in pairs(live) do claims[#claims + 1] = x; claims[#claims + 1] = depth; known = math.max(known, depth) end
end
if known == n then return {{loads, claims, false, false, false}, idx} end
local f = field(known + 1)
local holder
if known == 0 then holder = r elseif cur then holder = cur[known + 1] else holder = redis.call('HGET', bucket, f) end
if not holder then
  holder = '~' .. ARGV[7]
  if redis.call('HSETNX', bucket, f, holder) == 1 then
    redis.call('PEXPIRE', bucket, 2 * width + 1000)
  else
    holder = redis.call('HGET', bucket, f)
  end
end
local placing = false
if ARGV[13] ~= '' and 2 * known < n and holder == '~' .. ARGV[7] then
  placing = take_placement(ARGV[12], ARGV[7], ARGV[13], tonumber(ARGV[14]))
end
return {{loads, claims, known, holder, placing}, idx}
"""
)

#: A gateway's claim: every key of a prompt it just routed -> the replica, in the current bucket
#: and the next (ARGV[5] 'set'; with a placement token, its cold placement ends and its load is
#: published in the same run), a read of the claims on the keys ('read': the values), or a
#: waiter's poll ('wait': {the values, another gateway placing or false (then this one took the
#: placement), the others' loads}).
_CLAIM_LUA = (
    _EXCHANGE_FN
    + """
-- ARGV[1] bucket prefix, ARGV[2] keys hex, ARGV[3] replica, ARGV[4] bucket width ms, ARGV[5]
-- mode, ARGV[6] most replicas one key keeps; 'set' and 'wait' also: ARGV[7] placements hash,
-- ARGV[8] this instance, ARGV[9] placement token ('' = none), ARGV[10] lease ms, ARGV[11] set
-- of gateway instances, ARGV[12] load key prefix, ARGV[13] load to publish ('' = none),
-- ARGV[14] its TTL ms, ARGV[15] its number (see publish)
local width = tonumber(ARGV[4])
local b = bucket_now(width)
local fields = split16(ARGV[2])
if ARGV[5] == 'read' then return read_claims(ARGV[1], b, fields) end
if ARGV[5] == 'wait' then
  local placing = false
  if ARGV[9] ~= '' then placing = take_placement(ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])) end
  return {read_claims(ARGV[1], b, fields), placing, loads_exchange(ARGV[11], ARGV[12], ARGV[8], '', ARGV[14], 0)}
end
-- each key's value: the replicas that claim it, newline-separated, this claim first, at most
-- MAX_CLAIMS (a mark is replaced); keys whose list does not change are not rewritten
local me, cap = ARGV[3], tonumber(ARGV[6])
for _, bucket in ipairs({b, b + 1}) do
  local cur = read_claims(ARGV[1], bucket, fields)
  local args, last, last_new = {}, nil, nil
  for x = 1, #fields do
    local v = cur[x]
    local new
    if x > 1 and v == last then
      new = last_new
    else
      new = me
      if v and string.sub(v, 1, 1) ~= '~' then
        local count = 1
        for r in string.gmatch(v, '[^\\n]+') do
          if r ~= me and count < cap then new = new .. '\\n' .. r; count = count + 1 end
        end
      end
    end
    if new ~= v then args[#args + 1] = fields[x]; args[#args + 1] = new end
    last, last_new = v, new
  end
  local key = ARGV[1] .. bucket
  for j = 1, #args, 1000 do redis.call('HSET', key, unpack(args, j, math.min(j + 999, #args))) end
  if #args > 0 then redis.call('PEXPIRE', key, 3 * width + 1000) end
end
if ARGV[13] and ARGV[13] ~= '' then publish(ARGV[11], ARGV[12], ARGV[8], ARGV[13], ARGV[14], tonumber(ARGV[15]) or 0) end
if ARGV[9] and ARGV[9] ~= '' then redis.call('HDEL', ARGV[7], ARGV[8] .. '|' .. ARGV[9]) end
return 0
"""
)

log = logging.getLogger("kvgate.redis_index")


class RedisIndexUnavailable(IndexUnavailableError, RedisError):
    """Redis did not answer (connection refused or lost, timeout, still loading)."""


def _redacted(url: str) -> str:
    """``url`` without its password, for error messages."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, _, _ = head.partition("://")
    return f"{scheme}://***@{tail}"


#: A block's speculative claim names at most this many replicas (the latest routed first), as
#: the gateway's own speculative memory keeps every replica a block was routed to.
MAX_CLAIMS = 8

#: At most this many TTL refreshes ride along with one lookup.
REFRESH_PER_LOOKUP = 64

_ENCODE = msgspec.msgpack.Encoder().encode


def hash_field(h: BlockHash) -> str:
    """An engine block hash as a field of the replica's map: 16 hex digits for an int, the
    digest's hex for raw bytes (32 or 64 digits, so the two forms cannot collide)."""
    if isinstance(h, int):
        return f"{h:016x}"
    return bytes(h).hex() or "--"


def hex_keys(keys: Sequence[int]) -> str:
    """Our keys as one string of 16 hex digits each (one C call, not one format per key)."""
    return struct.pack(f">{len(keys)}Q", *keys).hex()


def hash_runs(hashes: Sequence[BlockHash]) -> Iterator[tuple[int, int, str, int]]:
    """Engine hashes as (start, end, hex, width) runs of equal hex width: one run in practice
    (all ints, or all digests of one algorithm); odd input is split, never rejected."""
    if not hashes:
        return
    try:
        yield 0, len(hashes), struct.pack(f">{len(hashes)}Q", *hashes).hex(), 16
        return
    except (struct.error, TypeError):
        pass
    fields = [hash_field(h) for h in hashes]
    start = 0
    for i in range(1, len(fields) + 1):
        if i == len(fields) or len(fields[i]) != len(fields[start]):
            yield start, i, "".join(fields[start:i]), len(fields[start])
            start = i


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
        count_cache_s: float = 30.0,
    ) -> None:
        """``socket_timeout`` and ``retries`` are small on purpose: while Redis is down every
        call should fail within about a second so routing falls back to load-only scoring
        (redis-py's default would retry ten times with up to 1 s backoff).
        ``local_cache_ms`` > 0 reuses a lookup's answer for that long (bounded staleness,
        ``local_cache_entries`` answers); ``map_cache_blocks`` bounds the local copy of each
        replica's engine-hash map.
        """
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
        self.count_cache_s = count_cache_s
        self._count: tuple[float, int] | None = None
        # A blocking pool: past max_connections a burst of lookups waits (up to
        # socket_timeout) for a connection instead of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.005, cap=0.05), retries),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._apply_script = _Script(_APPLY_LUA)
        self._lookup_script = _Script(_LOOKUP_LUA)
        self._shared_lookup_script = _Script(_SHARED_LOOKUP_LUA)
        self._claim_script = _Script(_CLAIM_LUA)
        self._epochs_key = f"{namespace}:epochs"
        self._epochs_seen: dict[str, int] | None = None  # check_epochs' reference
        self._sizes_key = f"{namespace}:block_sizes"
        self._gen_key = f"{namespace}:generation"
        self._generation: bytes | None = None  # the marker's token as this process first saw it
        self._lost = False  # a changed marker was seen and not yet reported by data_lost
        self._maps: dict[str, dict[BlockHash, int]] = {}  # local cache of each replica's map
        self._locks: dict[str, asyncio.Lock] = {}
        self._read_cache: dict[tuple[str, int, int], tuple[float, dict[str, PrefixMatch]]] = {}
        self._refresh_queue: dict[str, None] = {}  # block keys to re-arm (an ordered set)
        self._refreshed: dict[int, float] = {}  # our key -> when we last queued its re-arm
        self._decode = msgspec.msgpack.Decoder(dict[str, int]).decode
        #: says, once per change (and every 30 s while down), that Redis went away or came back,
        #: whoever noticed: a lookup (a gateway with ``ingest: false`` too), a write, the
        #: subscriber's loss check (``kvgate indexer`` with idle replicas too), ``ping``.
        #: Callers that see a failure the index cannot (a lookup abandoned at its deadline)
        #: may report it here as well: a state already known adds no line.
        self.outage = StateLog(log, f"Redis index at {_redacted(url)}")

    @contextlib.contextmanager
    def _reachable(self, what: str) -> Iterator[None]:
        """Turn "Redis is not there" errors into ``RedisIndexUnavailable`` with a clear message
        (other Redis errors, e.g. a script error, pass unchanged), and tell ``outage``."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            err = RedisIndexUnavailable(
                f"Redis index at {_redacted(self.url)} unavailable ({what}): {exc or type(exc).__name__}; routing falls back to load-only until it answers"
            )
            self.outage.down(f"{exc or type(exc).__name__} ({what}); routing falls back to load-only until it answers")
            raise err from exc
        self.outage.up()

    # ---------------------------------------------------------------- key names

    def _block_prefix(self, model: str) -> str:
        return f"{self.namespace}:{model}:b:"

    def _map_key(self, replica: str) -> str:
        return f"{self.namespace}:m:{replica}"

    # ---------------------------------------------------------------- writes

    async def apply(self, replica: str, batch: EventBatch, *, model: str) -> ApplyStats:
        """Apply a batch in one EVALSHA (plus one HMGET if a parent hash is not cached here).

        Calls for one replica are serialised by a lock: with a connection pool two
        overlapping scripts could otherwise reach Redis out of order.
        """
        stats = ApplyStats()
        events = [ev for ev in batch.events if isinstance(ev, AllBlocksCleared) or is_primary_group(ev.group_idx)]
        lock = self._locks.get(replica)
        if lock is None:
            lock = self._locks[replica] = asyncio.Lock()
        async with lock:
            with self._reachable("apply"):
                await self._apply_locked(replica, events, model, stats)
        if stats.cleared:
            self._read_cache.clear()
        return stats

    async def _apply_locked(self, replica: str, events: list[Any], model: str, stats: ApplyStats) -> None:
        local = self._maps.setdefault(replica, {})
        start = 0
        while start < len(events):
            end, missing = plan_segment(events, start, local)
            fetched = await self._fetch_map(replica, missing) if missing else {}
            ops, block_size = self._ops(events[start:end], local, fetched, model, stats)
            if ops:
                removed, gen = await self._apply_script(
                    self._redis,
                    (self._epochs_key, self._map_key(replica), self._sizes_key, self._gen_key),
                    (replica, self.ttl_s, self._block_prefix(model), model, block_size, _ENCODE(ops), uuid.uuid4().hex),
                )
                stats.removed += int(removed)
                self._observe_generation(gen)
            start = end
        if len(local) > self.map_cache_blocks:
            evict_oldest(local, self.map_cache_blocks)

    def _ops(
        self,
        events: Sequence[Any],
        local: dict[BlockHash, int],
        fetched: dict[BlockHash, int],
        model: str,
        stats: ApplyStats,
    ) -> tuple[list[list[Any]], int]:
        """The apply script's ops for ``events`` (our keys computed here), and the block size."""
        ops: list[list[Any]] = []
        block_size = 0
        for ev in events:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                if parent is None:
                    known = None
                    if needs_known_first(ev):
                        first = ev.block_hashes[0]
                        known = local.get(first, fetched.get(first))
                    keys = stored_keys(ev, None, model, known, self._root_checks.get(model))
                else:
                    keys = stored_keys(ev, local.get(parent, fetched.get(parent)), model, check=self._root_checks.get(model))
                if keys is None:
                    stats.orphaned += len(ev.block_hashes)
                    continue
                hashes = ev.block_hashes[: len(keys)]
                keys = keys[: len(hashes)]
                stats.orphaned += len(ev.block_hashes) - len(hashes)
                stats.stored += len(hashes)
                block_size = pack_geometry(ev.block_size, lookahead_of(ev))
                self._note_geometry(model, block_size)
                local.update(zip(hashes, keys, strict=True))
                tier = medium_tier(ev.medium)
                for lo, hi, fields, width in hash_runs(hashes):
                    ops.append(["S", tier, hex_keys(keys[lo:hi]), fields, width])
            elif isinstance(ev, BlockRemoved):
                tier = medium_tier(ev.medium)
                for _, _, fields, width in hash_runs(ev.block_hashes):
                    ops.append(["R", tier, fields, width])
                for h in ev.block_hashes:  # the block may still be in another tier: Redis knows
                    local.pop(h, None)
            else:
                ops.append(["C"])
                local.clear()
                fetched.clear()
                stats.cleared += 1
        return ops, block_size

    async def _fetch_map(self, replica: str, hashes: list[BlockHash]) -> dict[BlockHash, int]:
        """Our keys for engine hashes this process has not seen, from Redis's copy of the map."""
        values = await self._redis.hmget(self._map_key(replica), [hash_field(h) for h in hashes])
        return {h: int(v, 16) for h, v in zip(hashes, values, strict=True) if v is not None}

    # ---------------------------------------------------------------- loss of the data

    def _observe_generation(self, gen: bytes) -> None:
        """Compare the marker's token with the one this process knows (adopting the first)."""
        if self._generation is None:
            self._generation = gen
        elif gen != self._generation:
            log.info("Redis index at %s: generation marker %s, was %s: its data is gone", _redacted(self.url), gen, self._generation)
            self._generation = gen
            self._lost = True
            # cached answers are stale; the engine-hash maps stay right (our keys depend only on
            # tokens) until the subscriber's rebuild forgets each before replaying (forget_local)
            self._read_cache.clear()
            self._refresh_queue.clear()
            self._refreshed.clear()
            self._count = None

    async def data_lost(self) -> bool:
        """One MULTI round trip: create the marker if missing (our fresh token), read it back."""
        with self._reachable("data_lost"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._gen_key, uuid.uuid4().hex, nx=True)
                pipe.get(self._gen_key)
                _, gen = await pipe.execute()
        self._observe_generation(gen)
        lost, self._lost = self._lost, False
        return lost

    def forget_local(self, replica: str) -> None:
        self._maps.pop(replica, None)

    async def drop_replica(self, replica: str) -> None:
        self._maps.pop(replica, None)  # stale either way
        with self._reachable("drop_replica"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self._epochs_key, replica, 1)
                pipe.delete(self._map_key(replica))
                await pipe.execute()
        self._read_cache.clear()

    async def mark_untrusted(self, replica: str) -> None:
        with self._reachable("mark_untrusted"):
            await self._redis.hincrby(self._epochs_key, replica, 1)
        self._read_cache.clear()

    async def check_epochs(self) -> list[str]:
        """Read every replica's epoch; call ``cache_lost`` for (and return) each one whose epoch
        moved since the previous call, by whichever process moved it (an indexer applying an
        AllBlocksCleared, a restart, a distrust). The first call only takes the reference."""
        with self._reachable("check_epochs"):
            raw = await self._redis.hgetall(self._epochs_key)
        now = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        seen, self._epochs_seen = self._epochs_seen, now
        if seen is None:
            return []
        moved = [r for r, e in now.items() if e != seen.get(r, 0)]  # no field yet: epoch 0
        for r in moved:
            self.cache_lost(r)
        return moved

    # ---------------------------------------------------------------- reads

    async def lookup(self, keys: Sequence[int], *, model: str = "") -> dict[str, PrefixMatch]:
        """One EVALSHA, then the longest-prefix walk here; with ``local_cache_ms`` > 0 a
        recent identical lookup is reused (keyed by model, length and last key: chained keys
        make the last key stand for the whole prefix)."""
        if not keys:
            return {}
        now = time.monotonic()
        ck = (model, len(keys), keys[-1]) if self.local_cache_ms > 0 else None
        if ck is not None:
            hit = self._read_cache.get(ck)
            if hit is not None and hit[0] > now:
                return dict(hit[1])
        prefix = self._block_prefix(model)
        with self._reachable("lookup"):
            reply = await self._lookup_script(
                self._redis,
                [self._epochs_key, self._sizes_key, *self._due_refreshes()],
                (prefix, hex_keys(keys), self.ttl_s, model),
            )
        out = self._lookup_reply(reply, keys, model, prefix, now)
        if ck is not None:
            cache = self._read_cache
            cache[ck] = (now + self.local_cache_ms / 1000.0, dict(out))
            if len(cache) > self.local_cache_entries:
                evict_oldest(cache, self.local_cache_entries)
        return out

    def _lookup_reply(self, reply: list[Any], keys: Sequence[int], model: str, prefix: str, now: float) -> dict[str, PrefixMatch]:
        """The lookup script's reply as matches (noting the model's geometry and the hits to re-arm)."""
        if reply[0] is not None:  # learnt from the indexer, wherever it runs
            self._note_geometry(model, int(reply[0]))
        out = _walk(reply[1:], self._decode) if len(reply) > 1 else {}
        if self.refresh_on_hit and out:
            self._note_hits(prefix, keys[: max(m.blocks for m in out.values())], now)
        return out

    # ---------------------------------------------------------------- several gateways

    def _exchange_args(self, share: Share, model: str) -> tuple[Any, ...]:
        return (
            f"{self.namespace}:gateways",
            f"{self.namespace}:load:",
            share.instance,
            share.load or b"",
            share.load_ttl_ms,
            self._claims_prefix(model),
            share.claim_width_ms,
            self._placing_key(model),
            share.placing_token,
            share.placing_lease_ms,
            share.load_version,
        )

    def _claims_prefix(self, model: str) -> str:
        return f"{self.namespace}:{model}:s:"

    def _placing_key(self, model: str) -> str:
        return f"{self.namespace}:{model}:placing"

    async def lookup_shared(self, keys: Sequence[int], *, model: str, share: Share) -> tuple[dict[str, PrefixMatch], Shared]:
        """``lookup`` and the exchange between gateways in ONE script run: publish this
        gateway's in-flight load (``share.load``, when given), read the others', read the
        claims on ``keys`` (what some gateway just routed where) and mark the prompt's frontier
        (see ``_SHARED_LOOKUP_LUA``). No local read cache: the load must be fresh. ``keys``
        empty: the load exchange alone."""
        now = time.monotonic()
        prefix = self._block_prefix(model)
        blob = hex_keys(keys) if keys else ""
        with self._reachable("lookup"):
            reply = await self._shared_lookup_script(
                self._redis,
                [self._epochs_key, self._sizes_key, *(self._due_refreshes() if keys else ())],
                (prefix, blob, self.ttl_s, model, *self._exchange_args(share, model)),
            )
        ex = reply[0]
        shared = Shared(list(ex[0]))
        if len(ex) > 1:
            flat = ex[1]
            shared.claims = {flat[j].decode(): int(flat[j + 1]) for j in range(0, len(flat), 2)}
            if ex[2] is not None:
                shared.frontier = int(ex[2])
                holder = ex[3]
                shared.holder = holder[1:].decode() if holder and holder[:1] == b"~" else None
                if len(ex) > 4 and ex[4] is not None:
                    shared.placing = ex[4].decode()
        out = self._lookup_reply(reply[1], keys, model, prefix, now) if len(reply) > 1 else {}
        return out, shared

    async def claim(self, keys: Sequence[int], *, model: str, replica: str, width_ms: int, share: Share | None = None) -> None:
        """Record that the prompt of ``keys`` was just routed to ``replica``: a claim every
        gateway reads with its lookups for one to two ``width_ms``. With ``share``, the same
        run publishes ``share.load`` (when given) and then ends the placement of
        ``share.placing_token`` (when given): a gateway waiting for it reads the load that
        includes this request."""
        args: tuple[Any, ...] = (self._claims_prefix(model), hex_keys(keys), replica, width_ms, "set", MAX_CLAIMS)
        if share is not None:
            args += self._placement_args(share, model)
        with self._reachable("claim"):
            await self._claim_script(self._redis, [], args)

    def _placement_args(self, share: Share, model: str) -> tuple[Any, ...]:
        ns = self.namespace
        return (
            self._placing_key(model),
            share.instance,
            share.placing_token,
            share.placing_lease_ms,
            f"{ns}:gateways",
            f"{ns}:load:",
            share.load or b"",
            share.load_ttl_ms,
            share.load_version,
        )

    async def poll_shared(self, keys: Sequence[int], *, model: str, share: Share) -> tuple[dict[str, int], list[bytes | None], str | None, list[bytes]]:
        """A waiting gateway's poll, one script run: the claims on ``keys`` (per replica, and
        the raw value per key), whether another gateway is still placing a cold prompt (its
        instance; else None, and this one took the placement of ``share.placing_token`` when
        given), and the others' loads."""
        args = (self._claims_prefix(model), hex_keys(keys), "", share.claim_width_ms, "wait", MAX_CLAIMS, *self._placement_args(share, model))
        with self._reachable("claims"):
            cur, placing, loads = await self._claim_script(self._redis, [], args)
        return claimed_prefix(cur), cur, placing.decode() if placing is not None else None, list(loads)

    async def claims(self, keys: Sequence[int], *, model: str, width_ms: int) -> tuple[dict[str, int], list[bytes | None]]:
        """The claims on ``keys``: the longest prefix per replica, and the raw value per key
        (a replica, a gateway's mark, None) for a caller waiting on one key."""
        with self._reachable("claims"):
            cur = await self._claim_script(self._redis, [], (self._claims_prefix(model), hex_keys(keys), "", width_ms, "read", MAX_CLAIMS))
        return claimed_prefix(cur), cur

    async def leave(self, instance: str) -> None:
        """Withdraw ``instance``'s published load at once (a clean shutdown; a crash lets it expire)."""
        with self._reachable("leave"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(f"{self.namespace}:load:{instance}")
                pipe.srem(f"{self.namespace}:gateways", instance)
                await pipe.execute()

    def _note_hits(self, prefix: str, keys: Sequence[int], now: float) -> None:
        """Queue a TTL re-arm for matched blocks this process has not re-armed in ttl/4."""
        period = self.ttl_s / 4
        refreshed, queue = self._refreshed, self._refresh_queue
        for k in keys:
            t = refreshed.get(k)
            if t is None or now - t > period:
                refreshed.pop(k, None)
                refreshed[k] = now  # counted as re-armed once sent with the next lookup
                queue[f"{prefix}{k:016x}"] = None
        if len(queue) > self.local_cache_entries:
            evict_oldest(queue, self.local_cache_entries)
        if len(refreshed) > 8 * self.local_cache_entries:
            evict_oldest(refreshed, 8 * self.local_cache_entries)

    def _due_refreshes(self) -> list[str]:
        """Up to REFRESH_PER_LOOKUP queued block keys to re-arm in this lookup's script."""
        queue = self._refresh_queue
        if not queue:
            return []
        names = list(islice(queue, REFRESH_PER_LOOKUP))
        for name in names:
            del queue[name]
        return names

    async def block_count(self) -> int:
        """Distinct block keys in this namespace. A SCAN is O(keys), so the answer is reused
        for ``count_cache_s`` (it feeds a gauge that may be scraped often)."""
        now = time.monotonic()
        if self._count is not None and now - self._count[0] < self.count_cache_s:
            return self._count[1]
        n = 0
        with self._reachable("block_count"):
            async for _ in self._redis.scan_iter(match=f"{self.namespace}:*:b:*", count=10_000):
                n += 1
        self._count = (now, n)
        return n

    async def ping(self) -> bool:
        """True if Redis answers; also refreshes block sizes learnt by other processes."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.hgetall(self._sizes_key)
                _, sizes = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.outage.down(f"{exc or type(exc).__name__} (ping)")
            return False
        self.outage.up()
        for model, size in sizes.items():
            self._note_geometry(model.decode(), int(size))
        return True

    async def close(self) -> None:
        await self._redis.aclose()


def plan_segment(events: Sequence[Any], start: int, local: dict[BlockHash, int]) -> tuple[int, list[BlockHash]]:
    """Where the next script run must end, and the parent hashes to fetch from Redis first.

    A parent resolves locally (our cache, or a block stored earlier in the run) or must be
    fetched from Redis's copy of the map; for a prompt-starting event without extra keys the
    first block's own hash plays the parent's part (see ``stored_keys``). The run ends early, before a BlockStored whose
    parent this run removed: whether that block left its last tier is only known once
    Redis has applied the removal. After an AllBlocksCleared nothing is fetched (the map is
    gone: only later events of the batch resolve parents).
    """
    seen: set[BlockHash] = set()
    gone: set[BlockHash] = set()
    need: list[BlockHash] = []
    cleared = False
    for i in range(start, len(events)):
        ev = events[i]
        if isinstance(ev, AllBlocksCleared):
            cleared = True
            seen.clear()
            gone.clear()
        elif isinstance(ev, BlockRemoved):
            gone.update(ev.block_hashes)
            seen.difference_update(ev.block_hashes)
        elif isinstance(ev, BlockStored):
            # the parent, or for a prompt start without extra keys the first block itself
            p = ev.block_hashes[0] if needs_known_first(ev) else ev.parent_block_hash
            if p is not None and p not in seen and (cleared or p not in local or p in gone):
                if p in gone:
                    return i, need
                if not cleared:
                    need.append(p)
                    seen.add(p)
            seen.update(ev.block_hashes)
    return len(events), need


@dataclass(slots=True)
class Share:
    """What a gateway sends with a lookup when several share this Redis."""

    #: this gateway process's name (its load key)
    instance: str
    #: its in-flight load to publish (opaque bytes), None = unchanged since the last publish
    load: bytes | None
    #: the load key's TTL: a gateway that dies stops counting after this
    load_ttl_ms: int
    #: speculative claims live one to two of these (0: not read)
    claim_width_ms: int
    #: names this request's cold placement, if it is one ('' = placements not serialised)
    placing_token: str = ""
    #: a placement whose claim never comes stops holding the others after this
    placing_lease_ms: int = 0
    #: ``load``'s number among this gateway's publishes (rising): an older one reaching Redis
    #: after a newer is dropped
    load_version: int = 0


@dataclass(slots=True)
class Shared:
    """What comes back: the other gateways' published loads, and per replica the longest
    prefix of the request's keys some gateway just routed there."""

    loads: list[bytes] = field(default_factory=list)
    claims: dict[str, int] = field(default_factory=dict)
    #: the first key (0-based) of the request neither the index nor a claim covers, None if all are
    frontier: int | None = None
    #: the gateway instance whose mark is on it (this one when it just marked it), None: a claim is
    holder: str | None = None
    #: another gateway placing a cold prompt at this instant (this request, cold too, waits for
    #: its claim); None: none, or this request is no cold placement, or it took the placement
    placing: str | None = None


def claimed_prefix(values: Sequence[bytes | None]) -> dict[str, int]:
    """Per replica claiming a prompt's first key, how many leading keys it claims (each value
    lists replicas, newline-separated; a gateway's mark, ``~instance``, is no claim)."""
    first = values[0] if values else None
    if not first or first[:1] == b"~":
        return {}
    live = set(first.split(b"\n"))
    out: dict[str, int] = {}
    depth = 1
    last: bytes | None = first
    while live and depth < len(values):
        v = values[depth]
        if v != last:
            here = set(v.split(b"\n")) if v else set()
            for r in live - here:
                out[r.decode()] = depth
            live &= here
            last = v
        depth += 1
    out.update((r.decode(), depth) for r in live)
    return out


def _walk(reply: list[Any], decode: Callable[[bytes], dict[str, int]]) -> dict[str, PrefixMatch]:
    """The longest-prefix walk over the lookup script's reply (same rules as MemoryIndex).

    ``reply`` = [replicas of block 0, their current epochs, raw values of every block]. Along
    a shared prefix consecutive blocks usually carry byte-identical values, so a value is
    decoded only when its bytes differ from the previous block's, and the per-replica checks
    run only when the decoded map differs too.
    """
    first_names, first_epochs, values = reply
    epochs = {r.decode(): int(e) if e is not None else 0 for r, e in zip(first_names, first_epochs, strict=True)}
    prev_raw = values[0]
    prev = decode(prev_raw)
    names: list[str] = []
    expect: list[int] = []
    worst: list[int] = []
    for r, v in prev.items():
        ep = epochs.get(r)
        if ep is not None and v & 7 and v >> 3 == ep:
            names.append(r)
            expect.append(ep)
            worst.append(BEST_TIER[v & 7])
    out: dict[str, PrefixMatch] = {}
    depth, n = 1, len(values)
    while names and depth < n:
        raw = values[depth]
        if raw is None:
            break
        if raw != prev_raw:
            prev_raw = raw
            d = decode(raw)
            if d != prev:
                prev = d
                kept = []
                for j, r in enumerate(names):
                    held = d.get(r)
                    if held is not None and held & 7 and held >> 3 == expect[j]:
                        worst[j] |= BEST_TIER[held & 7]
                        kept.append(j)
                    else:
                        out[r] = PrefixMatch(depth, SLOWEST_TIER_NAME[worst[j]])
                if len(kept) < len(names):
                    names = [names[j] for j in kept]
                    expect = [expect[j] for j in kept]
                    worst = [worst[j] for j in kept]
        depth += 1
    for r, w in zip(names, worst, strict=True):
        out[r] = PrefixMatch(depth, SLOWEST_TIER_NAME[w])
    return out
