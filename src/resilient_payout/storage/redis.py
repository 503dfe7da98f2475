"""Redis storage (``redis://...``). The status-check budget shared through Redis,
:class:`~resilient_payout.reconcile.redis.RedisCheckBudget`, is still importable from here.

:class:`RedisStorage` makes every decision in one Lua script (create-if-absent, compare-and-set
with its outbox entry, each claim, ack, retry), and Redis runs a script as one atomic step, so
any number of instances may share a server. Plain reads are single commands. Needs Redis 6.2
or newer (``ZRANGE ... BYSCORE``).

Keys, all under ``prefix``: a hash per payout (``p:<id>``: version, JSON document, status,
lease) and per outbox entry (``o:<id>``), sorted sets of due payouts (``idx:due``; split into
``idx:ready`` and ``idx:leased`` so a claim never rescans payouts in flight), of undelivered
entries (``idx:outbox``) and dead-lettered ones (``idx:dead``), a hash of counts per status
(``counts``), a set per lease owner of the hashes it leases (``leases:<owner>``), and the
instance liveness registry, a hash of instance id -> mark (``instances``). Keys written
before dead-lettering existed need no change: an entry without a ``dead_at`` field is alive,
and a missing ``idx:dead`` counts zero. Scripts also touch keys
they compute from the prefix; on Redis Cluster put a hash tag in it (``{rp}:``) so every key
lands in one slot.

redis-py retries a command after a dropped connection. That is safe here even if the first try
did run: a repeated create finds the record (``created=False``, as for a repeat request), a
repeated compare-and-set finds the version moved on (a lost race: the caller re-reads), and a
repeated claim leaves the first claim's payouts leased until their lease ends.

Durability is Redis's: with ``appendonly yes`` and the default ``appendfsync everysec``, a
crash of the server can lose the last second of decisions, and a lost decision can mean a
second payment (see docs/storage.md, "Durability and money"). :meth:`RedisStorage.open` checks
the server's settings and logs a warning unless they are ``appendonly yes`` and ``appendfsync
always``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from .._errors import PartnerReferenceTaken, StorageError
from .._extras import needs_extra
from .._model import OutboxEntry, Payout, PayoutStatus
from .._urls import redact_url as _redacted
from ._codec import decode_outbox, decode_payout, encode_payout, translated
from ._query import OpsSnapshot, PayoutPage, PayoutQuery, encode_cursor, has_conflict, page_of

with needs_extra("redis", "Redis storage (redis:// URLs)"):
    import redis.asyncio as aioredis
    import redis.exceptions as rex
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

if TYPE_CHECKING:
    from ..reconcile.redis import RedisCheckBudget as RedisCheckBudget

__all__ = ["RedisCheckBudget", "RedisStorage"]

log = logging.getLogger("resilient_payout.storage")

# "Not now": unreachable, loading, read-only after a failover, out of memory, cluster trouble.
_UNAVAILABLE: Final = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.TryAgainError,
    rex.ClusterDownError,
    OSError,
)

# The operator indexes of one payout after a write (create, compare-and-set, re-index): every
# list is scored by created_at (c), except idx:final (by updated_at, for prune) and idx:attempt
# (by attempt_started_at, for the alert figure). `old` is what the hash held before ({} for a
# new payout); the partner reference follows the record, and a record without one keeps it.
_INDEX = """
local function index(pre, id, old, st, c, u, as, cf, ref, final)
  local moved = old.c ~= c
  if moved or old.status ~= st then
    if old.status then redis.call('ZREM', pre .. 'idx:st:' .. old.status, id) end
    redis.call('ZADD', pre .. 'idx:st:' .. st, c, id)
  end
  if moved then
    redis.call('ZADD', pre .. 'idx:created', c, id)
    if redis.call('ZSCORE', pre .. 'idx:undelivered', id) then
      redis.call('ZADD', pre .. 'idx:undelivered', c, id)
    end
    if old.cf == '1' then redis.call('ZADD', pre .. 'idx:conflict', c, id) end
  end
  if cf == '1' and (moved or old.cf ~= '1') then
    redis.call('ZADD', pre .. 'idx:conflict', c, id)
  end
  if final == '1' then
    redis.call('ZADD', pre .. 'idx:final', u, id)
    redis.call('ZREM', pre .. 'idx:attempt', id)
  else
    if old.final == '1' then redis.call('ZREM', pre .. 'idx:final', id) end
    if as ~= '' then
      redis.call('ZADD', pre .. 'idx:attempt', as, id)
    else
      redis.call('ZREM', pre .. 'idx:attempt', id)
    end
  end
  local fields = {'c', c, 'u', u}
  if cf == '1' then fields[#fields + 1] = 'cf'; fields[#fields + 1] = '1' end
  if ref ~= '' and old.ref ~= ref then
    if old.ref and redis.call('GET', pre .. 'ref:' .. old.ref) == id then
      redis.call('DEL', pre .. 'ref:' .. old.ref)
    end
    redis.call('SET', pre .. 'ref:' .. ref, id)
    fields[#fields + 1] = 'ref'; fields[#fields + 1] = ref
  end
  redis.call('HSET', pre .. 'p:' .. id, unpack(fields))
end

local function ref_holder(pre, id, ref)
  if ref == '' then return nil end
  local holder = redis.call('GET', pre .. 'ref:' .. ref)
  if holder and holder ~= id then return holder end
  return nil
end
"""

# Who holds what: a set per lease owner (``leases:<owner>``) of the hashes it leases (``p:<id>``,
# ``o:<id>``), kept in step with the ``lo`` field by every script that writes or ends a lease,
# so that release_leases reads only the owner's own leases.
_LEASES = """
local function lease(pre, key, member, owner, lu)
  local lo = redis.call('HGET', key, 'lo')
  if lo and lo ~= owner then redis.call('SREM', pre .. 'leases:' .. lo, member) end
  redis.call('HSET', key, 'lo', owner, 'lu', lu)
  redis.call('SADD', pre .. 'leases:' .. owner, member)
end

local function unlease(pre, key, member)
  local lo = redis.call('HGET', key, 'lo')
  if lo then redis.call('SREM', pre .. 'leases:' .. lo, member) end
  redis.call('HDEL', key, 'lo', 'lu')
end
"""

_CREATE = (
    _INDEX
    + """
local found = redis.call('HMGET', KEYS[1], 'v', 'doc')
if found[1] then return {0, found[1], found[2]} end
local holder = ref_holder(ARGV[6], ARGV[1], ARGV[11])
if holder then return {2, holder} end
redis.call('HSET', KEYS[1], 'v', '1', 'doc', ARGV[4], 'status', ARGV[2])
if ARGV[3] ~= '' and ARGV[5] == '0' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
index(ARGV[6], ARGV[1], {}, ARGV[2], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[5])
return {1}
"""
)

_CAS = (
    _INDEX
    + _LEASES
    + """
local cur = redis.call('HMGET', KEYS[1], 'v', 'status', 'c', 'cf', 'ref')
local v = cur[1]
if not v or tonumber(v) ~= tonumber(ARGV[2]) then return false end
local pre = ARGV[15]
local holder = ref_holder(pre, ARGV[1], ARGV[20])
if holder then return {'taken', holder} end
local old = cur[2]
local was = {status = old, c = cur[3], cf = cur[4], ref = cur[5], final = '0'}
if old == 'completed' or old == 'declined' or old == 'failed' then was.final = '1' end
local nv = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'doc', ARGV[5])
unlease(pre, KEYS[1], 'p:' .. ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[4] ~= '' and ARGV[6] == '0' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if old ~= ARGV[3] then
  redis.call('HINCRBY', KEYS[5], old, -1)
  redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('HSET', KEYS[6], 'status', ARGV[8], 'created_at', ARGV[9], 'at', ARGV[10],
             'attempts', ARGV[11])
  if ARGV[12] ~= '' then
    redis.call('HSET', KEYS[6], 'delivered_at', ARGV[12])
  elseif ARGV[14] ~= '' then
    redis.call('HSET', KEYS[6], 'dead_at', ARGV[14])
    redis.call('ZADD', KEYS[8], ARGV[14], ARGV[1])
  else
    redis.call('ZADD', KEYS[7], ARGV[10], ARGV[1])
  end
  if ARGV[13] ~= '' then redis.call('HSET', KEYS[6], 'error', string.sub(ARGV[13], 2)) end
  if ARGV[12] == '' then
    redis.call('ZADD', pre .. 'idx:undelivered', ARGV[16], ARGV[1])
    if ARGV[14] == '' and tonumber(ARGV[11]) > 0 then
      redis.call('ZADD', pre .. 'idx:failing', ARGV[9], ARGV[1])
    end
  end
end
index(pre, ARGV[1], was, ARGV[3], ARGV[16], ARGV[17], ARGV[18], ARGV[19], ARGV[20], ARGV[6])
return nv
"""
)

# Expired leases first go back among the candidates (idx:ready); a candidate whose lease is
# still running (only if `now` went back in time) goes back to idx:leased. Numbers are passed
# on as the strings they came in: Lua would print them with 14 digits only.
_CLAIM_DUE = (
    _LEASES
    + """
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE')) do
  redis.call('ZREM', KEYS[2], id)
  local nca = redis.call('ZSCORE', KEYS[3], id)
  if nca then redis.call('ZADD', KEYS[1], nca, id) end
end
local limit = tonumber(ARGV[4])
local out = {}
while #out < limit do
  local batch = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE',
                           'LIMIT', 0, limit - #out)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    local key = ARGV[5] .. id
    redis.call('ZREM', KEYS[1], id)
    local lu = redis.call('HGET', key, 'lu')
    if lu and tonumber(lu) > now then
      redis.call('ZADD', KEYS[2], lu, id)
    else
      local v = redis.call('HINCRBY', key, 'v', 1)
      lease(ARGV[6], key, 'p:' .. id, ARGV[2], ARGV[3])
      redis.call('ZADD', KEYS[2], ARGV[3], id)
      out[#out + 1] = {v, redis.call('HGET', key, 'doc')}
    end
  end
end
return out
"""
)

# The lease end becomes the next attempt, so a dead claimer's entry comes back by itself.
_CLAIM_OUTBOX = (
    _LEASES
    + """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE',
                               'LIMIT', 0, ARGV[4])) do
  local key = ARGV[5] .. id
  redis.call('HSET', key, 'at', ARGV[3])
  lease(ARGV[6], key, 'o:' .. id, ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  local e = redis.call('HMGET', key, 'status', 'created_at', 'at', 'attempts',
                       'delivered_at', 'error', 'dead_at')
  out[#out + 1] = {id, e[1], e[2], e[3], e[4], e[5], e[6], e[7]}
end
return out
"""
)

# Every lease in the owner's set ends (outbox ones only if ARGV[4] is '1'); a member whose
# hash names another owner (or none) is only dropped: left by a version without these sets.
# A payout goes back among the claim candidates; an entry's next attempt (the lease end)
# becomes now if it was later.
_RELEASE_LEASES = """
local pre, owner, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries = ARGV[4] == '1'
local running = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = pre .. m
  local f = redis.call('HMGET', key, 'lo', 'lu', 'at')
  local kept = not entries and string.sub(m, 1, 2) == 'o:'
  if not kept then redis.call('SREM', KEYS[1], m) end
  if not kept and f[1] == owner then
    redis.call('HDEL', key, 'lo', 'lu')
    if f[2] and tonumber(f[2]) > now then running = running + 1 end
    local id = string.sub(m, 3)
    if string.sub(m, 1, 2) == 'p:' then
      redis.call('ZREM', pre .. 'idx:leased', id)
      local nca = redis.call('ZSCORE', pre .. 'idx:due', id)
      if nca then redis.call('ZADD', pre .. 'idx:ready', nca, id) end
    elseif tonumber(f[3]) > now and redis.call('ZSCORE', pre .. 'idx:outbox', id) then
      redis.call('HSET', key, 'at', ARGV[3])
      redis.call('ZADD', pre .. 'idx:outbox', ARGV[3], id)
    end
  end
end
return running
"""

_ACK_OUTBOX = (
    _LEASES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'delivered_at') == 1
then return 0 end
redis.call('HSET', KEYS[1], 'delivered_at', ARGV[2])
unlease(ARGV[3], KEYS[1], 'o:' .. ARGV[1])
redis.call('HDEL', KEYS[1], 'dead_at')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', ARGV[3] .. 'idx:undelivered', ARGV[1])
redis.call('ZREM', ARGV[3] .. 'idx:failing', ARGV[1])
return 1
"""
)

# Delivered or dead entries are left alone by a retry and by a dead-lettering.
_LIVE_OUTBOX_ONLY = (
    _LEASES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'delivered_at') == 1
   or redis.call('HEXISTS', KEYS[1], 'dead_at') == 1
then return 0 end
"""
)

_RETRY_OUTBOX = (
    _LIVE_OUTBOX_ONLY
    + """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'at', ARGV[2], 'error', ARGV[3])
unlease(ARGV[4], KEYS[1], 'o:' .. ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', ARGV[4] .. 'idx:failing', redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
"""
)

# Out of idx:outbox (never claimed again), into idx:dead (counted).
_DEAD_LETTER_OUTBOX = (
    _LIVE_OUTBOX_ONLY
    + """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'dead_at', ARGV[2], 'error', ARGV[3])
unlease(ARGV[4], KEYS[1], 'o:' .. ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZREM', ARGV[4] .. 'idx:failing', ARGV[1])
return 1
"""
)

# A fresh schedule: the round counter starts again (the error stays, as history).
_REQUEUE_OUTBOX = (
    _LEASES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
unlease(ARGV[3], KEYS[1], 'o:' .. ARGV[1])
redis.call('HDEL', KEYS[1], 'dead_at', 'delivered_at')
redis.call('HSET', KEYS[1], 'at', ARGV[2], 'attempts', '0')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREM', ARGV[3] .. 'idx:failing', ARGV[1])
local c = redis.call('HGET', ARGV[3] .. 'p:' .. ARGV[1], 'c')
if c then redis.call('ZADD', ARGV[3] .. 'idx:undelivered', c, ARGV[1]) end
return 1
"""
)

# One page from the listing indexes in KEYS, merged: after the cursor (ARGV[2], ARGV[3]), in
# the score range [ARGV[4], ARGV[5]], the first ARGV[6] matches of all indexes together, reading
# at most ARGV[7] entries per index. An index that hit the budget bounds the page: matches past
# the last entry it read are unknown, so nothing past it is returned, and the bound comes back
# as where to resume. Returns {bounded, bound score, bound id, id, score, version, doc, ...}.
# Ids compare byte-wise, as Redis orders equal scores (Lua's own < on strings follows the
# server's locale).
_LIST = """
local function before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function earlier(x, y)  -- {score number, id}
  if x[1] ~= y[1] then return x[1] < y[1] end
  return before(x[2], y[2])
end
local pre = ARGV[1]
local cur_s = tonumber(ARGV[2])
local cur_id = ARGV[3]
local need, budget = tonumber(ARGV[6]), tonumber(ARGV[7])
local statuses = nil
if ARGV[8] ~= '' then
  statuses = {}
  for st in string.gmatch(ARGV[8], '[^,]+') do statuses[st] = true end
end
local u_low, u_high = tonumber(ARGV[11]), tonumber(ARGV[12])
local function matches(id)
  local f = redis.call('HMGET', pre .. 'p:' .. id, 'v', 'status', 'u', 'cf')
  if not f[1] then return false end
  if statuses and not statuses[f[2]] then return false end
  if ARGV[9] == '1' and f[4] ~= '1' then return false end
  if u_low or u_high then
    local u = tonumber(f[3])
    if not u or (u_low and u < u_low) or (u_high and u >= u_high) then return false end
  end
  if ARGV[10] == '1' then
    local o = pre .. 'o:' .. id
    if redis.call('EXISTS', o) == 0 or redis.call('HEXISTS', o, 'delivered_at') == 1 then
      return false
    end
  end
  return true
end
local found, bound = {}, nil
for k = 1, #KEYS do
  local n, scanned, offset, last = 0, 0, 0, nil
  local stop = false
  while not stop do
    local batch = redis.call('ZRANGE', KEYS[k], ARGV[4], ARGV[5], 'BYSCORE',
                             'LIMIT', offset, 256, 'WITHSCORES')
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      local id, sc = batch[i], batch[i + 1]
      local at = tonumber(sc)
      offset = offset + 1
      if not (cur_s and at == cur_s and not before(cur_id, id)) then
        scanned = scanned + 1
        last = {at, id, sc}
        if matches(id) then
          n = n + 1
          found[#found + 1] = last
          if n >= need then stop = true; break end
        end
        if scanned >= budget then
          if not bound or earlier(last, bound) then bound = last end
          stop = true; break
        end
      end
    end
  end
end
table.sort(found, earlier)
local out = {0, '', ''}
if bound then out = {1, bound[3], bound[2]} end
local taken = 0
for _, row in ipairs(found) do
  if taken >= need or (bound and earlier(bound, row)) then break end
  local f = redis.call('HMGET', pre .. 'p:' .. row[2], 'v', 'doc')
  out[#out + 1] = row[2]; out[#out + 1] = row[3]; out[#out + 1] = f[1]; out[#out + 1] = f[2]
  taken = taken + 1
end
return out
"""

# Deletes up to ARGV[3] final payouts updated before ARGV[2] whose outbox entry is delivered (or
# absent), with every key and index entry they have; reads at most ARGV[4] candidates.
_PRUNE = """
local pre = ARGV[1]
local limit, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local doomed, offset = {}, 0
while #doomed < limit and offset < budget do
  local batch = redis.call('ZRANGE', pre .. 'idx:final', '-inf', '(' .. ARGV[2], 'BYSCORE',
                           'LIMIT', offset, 256)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    offset = offset + 1
    local o = pre .. 'o:' .. id
    if redis.call('EXISTS', o) == 0 or redis.call('HEXISTS', o, 'delivered_at') == 1 then
      doomed[#doomed + 1] = id
      if #doomed >= limit then break end
    end
  end
end
local sets = {'idx:created', 'idx:conflict', 'idx:undelivered', 'idx:final', 'idx:attempt',
              'idx:failing', 'idx:outbox', 'idx:dead', 'idx:due', 'idx:ready', 'idx:leased'}
for _, id in ipairs(doomed) do
  local key = pre .. 'p:' .. id
  local f = redis.call('HMGET', key, 'status', 'ref')
  if f[1] then
    redis.call('HINCRBY', pre .. 'counts', f[1], -1)
    redis.call('ZREM', pre .. 'idx:st:' .. f[1], id)
  end
  if f[2] and redis.call('GET', pre .. 'ref:' .. f[2]) == id then
    redis.call('DEL', pre .. 'ref:' .. f[2])
  end
  for _, name in ipairs(sets) do redis.call('ZREM', pre .. name, id) end
  for _, m in ipairs({'p:' .. id, 'o:' .. id}) do
    local lo = redis.call('HGET', pre .. m, 'lo')
    if lo then redis.call('SREM', pre .. 'leases:' .. lo, m) end
  end
  redis.call('DEL', key, pre .. 'o:' .. id)
end
return #doomed
"""

# Files one payout written before these indexes existed (or re-files it: idempotent), from its
# document; KEYS[1] is its hash.
_REINDEX = (
    _INDEX
    + """
local f = redis.call('HMGET', KEYS[1], 'doc', 'status', 'c', 'cf', 'ref')
if not f[1] then return 0 end
local d = cjson.decode(f[1])
local function num(x)
  if type(x) == 'number' then return string.format('%.17g', x) end
  return ''
end
local cf = '0'
if type(d.audit) == 'table' then
  for _, a in ipairs(d.audit) do if a.conflict == true then cf = '1' end end
end
local ref = ''
if type(d.partner_ref) == 'string' then ref = d.partner_ref end
local st = f[2]
local final = '0'
if st == 'completed' or st == 'declined' or st == 'failed' then final = '1' end
local pre, id = ARGV[1], ARGV[2]
local was = {c = f[3], cf = f[4], ref = f[5], final = '0'}
if f[3] then was.status = st end
index(pre, id, was, st, num(d.created_at), num(d.updated_at), num(d.attempt_started_at), cf,
      ref, final)
local o = pre .. 'o:' .. id
if redis.call('EXISTS', o) == 1 and redis.call('HEXISTS', o, 'delivered_at') == 0 then
  redis.call('ZADD', pre .. 'idx:undelivered', num(d.created_at), id)
  if redis.call('HEXISTS', o, 'dead_at') == 0 and tonumber(redis.call('HGET', o, 'attempts')) > 0
  then
    redis.call('ZADD', pre .. 'idx:failing', redis.call('HGET', o, 'created_at'), id)
  end
end
return 1
"""
)

_INDEX_VERSION: Final = "2"
"""Stored at ``<prefix>schema`` once every payout is filed in the operator indexes."""

_LIST_BUDGET: Final = 5_000
"""Index entries one listing call reads at most per index (a Lua script blocks the server)."""
_PRUNE_BUDGET: Final = 20_000

_OUTBOX_FIELDS: Final = (
    "status",
    "created_at",
    "at",
    "attempts",
    "delivered_at",
    "error",
    "dead_at",
)


def _num(value: float) -> str:
    """A float as the exact decimal string Redis and Lua parse back to the same double."""
    return repr(float(value))


def _index_args(payout: Payout) -> list[str | int]:
    """``created_at, updated_at, attempt_started_at, has_conflict, partner_ref`` as the index
    function of the write scripts takes them."""
    started = payout.attempt_started_at
    return [
        _num(payout.created_at),
        _num(payout.updated_at),
        "" if started is None else _num(started),
        "1" if has_conflict(payout) else "0",
        payout.partner_ref or "",
    ]


def _glob_escaped(text: str) -> str:
    """``text`` matched literally by SCAN's glob pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _translated() -> contextlib.AbstractContextManager[None]:
    # Wrong credentials are a configuration error (redis-py files them under connection
    # errors): retrying won't help.
    return translated(
        "Redis",
        _UNAVAILABLE,
        (rex.RedisError,),
        fatal=(rex.AuthenticationError, rex.AuthorizationError),
    )


def _client(
    url: str, *, retries: int, socket_timeout: float, max_connections: int
) -> aioredis.Redis:
    # A *blocking* pool: a burst of background work waits for a free connection (up to
    # socket_timeout) instead of failing with MaxConnectionsError, which would surface as
    # StorageUnavailable (503) under load.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        client_name="resilient_payout",
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisStorage:
    """The :class:`~resilient_payout.storage.Storage` contract on a Redis server.

    ``url`` is anything redis-py accepts (``redis://:pw@host:6379/0``, ``rediss://`` for TLS).
    Every key starts with ``prefix``, so deployments can share a database. A dropped connection
    is retried ``retries`` times (with backoff) before
    :class:`~resilient_payout.StorageUnavailable`; ``socket_timeout`` bounds each command and the
    wait for one of the ``max_connections`` pooled connections.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rp:",
        retries: int = 3,
        socket_timeout: float = 5.0,
        max_connections: int = 50,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        self._url = url
        self._prefix = prefix
        self._retries = retries
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._lock = anyio.Lock()
        self._due = prefix + "idx:due"
        self._ready = prefix + "idx:ready"
        self._leased = prefix + "idx:leased"
        self._outbox_due = prefix + "idx:outbox"
        self._outbox_dead = prefix + "idx:dead"
        self._counts = prefix + "counts"
        self._instances = prefix + "instances"

    @classmethod
    def from_url(cls, url: str) -> RedisStorage:
        """``redis://`` or ``rediss://`` URLs; option ``?prefix=`` (default ``rp:``). Other
        query parameters go to redis-py (``socket_timeout``, ``db``...)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.netloc:
            raise ValueError(f"not a Redis URL: {url!r} (use redis://host:6379/0)")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in reversed(query) if k == "prefix"), "rp:")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        return cls(urlunsplit(parts._replace(query=rest)), prefix=prefix)

    @property
    def prefix(self) -> str:
        return self._prefix

    def __repr__(self) -> str:
        return f"RedisStorage({_redacted(self._url)!r}, prefix={self._prefix!r})"

    def _payout_key(self, payout_id: str) -> str:
        return f"{self._prefix}p:{payout_id}"

    def _outbox_key(self, payout_id: str) -> str:
        return f"{self._prefix}o:{payout_id}"

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check the server answers. Idempotent; there is no schema to create."""
        async with self._lock:
            if self._redis is not None:
                return
            client = _client(
                self._url,
                retries=self._retries,
                socket_timeout=self._socket_timeout,
                max_connections=self._max_connections,
            )
            try:
                with _translated():
                    await client.ping()
                    await self._check_durability(client)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self._scripts = {
                name: client.register_script(source)
                for name, source in {
                    "create": _CREATE,
                    "cas": _CAS,
                    "claim_due": _CLAIM_DUE,
                    "claim_outbox": _CLAIM_OUTBOX,
                    "release_leases": _RELEASE_LEASES,
                    "ack_outbox": _ACK_OUTBOX,
                    "retry_outbox": _RETRY_OUTBOX,
                    "dead_letter_outbox": _DEAD_LETTER_OUTBOX,
                    "requeue_outbox": _REQUEUE_OUTBOX,
                    "list": _LIST,
                    "prune": _PRUNE,
                    "reindex": _REINDEX,
                }.items()
            }
            try:
                with _translated():
                    if await client.get(self._prefix + "schema") != _INDEX_VERSION:
                        await self._reindex(client)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self._redis = client

    async def _reindex(self, client: aioredis.Redis) -> None:
        """File every payout written before the operator indexes existed (idempotent: several
        instances may do it at once), then record that it is done."""
        script = self._scripts["reindex"]
        start = self._prefix + "p:"
        done = 0
        batch: list[str] = []
        async for key in client.scan_iter(match=_glob_escaped(start) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                done += await self._reindex_batch(client, script, batch, len(start))
                batch = []
        if batch:
            done += await self._reindex_batch(client, script, batch, len(start))
        await client.set(self._prefix + "schema", _INDEX_VERSION)
        if done:
            log.info("Redis prefix %r: filed %d payouts in operator indexes", self._prefix, done)

    async def _reindex_batch(
        self, client: aioredis.Redis, script: Any, keys: list[str], cut: int
    ) -> int:
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                await script(keys=[key], args=[self._prefix, key[cut:]], client=pipe)
            results = await pipe.execute()
        return sum(int(r) for r in results)

    async def _check_durability(self, client: aioredis.Redis) -> None:
        """Log (once per open) whether the server keeps every acknowledged write on disk."""
        try:
            found = await client.config_get("append*")  # one pattern: Redis 6.2 takes only one
        except rex.ResponseError as exc:  # CONFIG renamed or refused (managed Redis, ACLs)
            found, reason = {}, f"CONFIG GET refused: {exc}"
        else:
            reason = "CONFIG GET did not return appendonly and appendfsync"
        appendonly, appendfsync = found.get("appendonly"), found.get("appendfsync")
        if appendonly is None or appendfsync is None:
            log.info(
                "Redis %s: durability could not be verified (%s); make sure it runs with "
                "appendonly yes and appendfsync always",
                _redacted(self._url),
                reason,
            )
            return
        if (appendonly.lower(), appendfsync.lower()) != ("yes", "always"):
            log.warning(
                "Redis %s runs with appendonly %s, appendfsync %s: a restart or failover can roll "
                "recent decisions back, so a payout already being submitted can return to "
                "'received' and be POSTed to the partner again (a second payment), and a "
                "delivered outcome can return to undelivered and be pushed to the app again. "
                "Use appendonly yes and appendfsync always (docs/storage.md, Durability and "
                "money)",
                _redacted(self._url),
                appendonly,
                appendfsync,
            )

    async def close(self) -> None:
        async with self._lock:
            client, self._redis = self._redis, None
            if client is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*_UNAVAILABLE):
                    await client.aclose()

    def _conn(self) -> aioredis.Redis:
        if self._redis is None:
            raise StorageError("RedisStorage is not open: call open() first")
        return self._redis

    async def _run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        self._conn()
        with _translated():
            return await self._scripts[script](keys=keys, args=args)

    # -- the contract -------------------------------------------------------------------------

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        doc = encode_payout(payout)
        nca = "" if payout.next_check_at is None else _num(payout.next_check_at)
        result = await self._run(
            "create",
            [self._payout_key(payout.id), self._due, self._ready, self._counts],
            [
                payout.id,
                payout.status.value,
                nca,
                doc,
                "1" if payout.is_final else "0",
                self._prefix,
                *_index_args(payout),
            ],
        )
        if result[0] == 1:
            return decode_payout(1, doc), True
        if result[0] == 2:
            assert payout.partner_ref is not None
            raise PartnerReferenceTaken(payout.partner_ref, str(result[1]))
        return decode_payout(result[1], result[2]), False

    async def get(self, payout_id: str) -> Payout | None:
        client = self._conn()
        with _translated():
            version, doc = await client.hmget(self._payout_key(payout_id), ["v", "doc"])
        return None if version is None or doc is None else decode_payout(version, doc)

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        doc = encode_payout(payout)
        nca = "" if payout.next_check_at is None else _num(payout.next_check_at)
        args: list[str | int] = [
            payout.id,
            expected_version,
            payout.status.value,
            nca,
            doc,
            "1" if payout.is_final else "0",
        ]
        if outbox is None:
            args += ["0", "", "", "", 0, "", "", ""]  # ARGV 7-14
        else:
            args += [
                "1",
                outbox.status.value,
                _num(outbox.created_at),
                _num(outbox.next_attempt_at),
                outbox.attempts,
                "" if outbox.delivered_at is None else _num(outbox.delivered_at),
                # A leading "=" tells an empty error from no error.
                "" if outbox.last_error is None else "=" + outbox.last_error,
                "" if outbox.dead_at is None else _num(outbox.dead_at),
            ]
        args += [self._prefix, *_index_args(payout)]  # ARGV 15-20
        keys = [
            self._payout_key(payout.id),
            self._due,
            self._ready,
            self._leased,
            self._counts,
            self._outbox_key(payout.id),
            self._outbox_due,
            self._outbox_dead,
        ]
        version = await self._run("cas", keys, args)
        if isinstance(version, list):  # {'taken', holder}
            assert payout.partner_ref is not None
            raise PartnerReferenceTaken(payout.partner_ref, str(version[1]))
        return None if version is None else decode_payout(version, doc)

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        if limit <= 0:
            return []
        rows = await self._run(
            "claim_due",
            [self._ready, self._leased, self._due],
            [_num(now), owner, _num(now + lease_seconds), limit, self._prefix + "p:", self._prefix],
        )
        return [decode_payout(version, doc) for version, doc in rows]  # already earliest first

    async def next_due_at(self) -> float | None:
        client = self._conn()
        with _translated():
            first = await client.zrange(self._due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        rows = await self._run(
            "claim_outbox",
            [self._outbox_due],
            [_num(now), owner, _num(now + lease_seconds), limit, self._prefix + "o:", self._prefix],
        )
        entries = [decode_outbox(*row) for row in rows]
        entries.sort(key=lambda e: e.payout_id)  # all share next_attempt_at == lease end
        return entries

    async def release_leases(self, owner: str, now: float, *, outbox: bool = True) -> int:
        released = await self._run(
            "release_leases",
            [f"{self._prefix}leases:{owner}"],
            [self._prefix, owner, _num(now), "1" if outbox else "0"],
        )
        return int(released)

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await self._run(
            "ack_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(delivered_at), self._prefix],
        )

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await self._run(
            "retry_outbox",
            [self._outbox_key(payout_id), self._outbox_due],
            [payout_id, _num(next_attempt_at), error, self._prefix],
        )

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await self._run(
            "dead_letter_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(at), error, self._prefix],
        )

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        done = await self._run(
            "requeue_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(next_attempt_at), self._prefix],
        )
        return bool(done)

    async def count_dead_outbox(self) -> int:
        client = self._conn()
        with _translated():
            n = await client.zcard(self._outbox_dead)
        return int(n)

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        client = self._conn()
        with _translated():
            fields = await client.hmget(self._outbox_key(payout_id), list(_OUTBOX_FIELDS))
        return None if fields[0] is None else decode_outbox(payout_id, *fields)

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        client = self._conn()
        with _translated():
            stored = await client.hgetall(self._counts)
        counts = dict.fromkeys(PayoutStatus, 0)
        for status, n in stored.items():
            counts[PayoutStatus(str(status))] = int(n)
        return counts

    # -- operators -------------------------------------------------------------------------------

    async def get_by_partner_ref(self, partner_ref: str) -> Payout | None:
        client = self._conn()
        with _translated():
            holder = await client.get(f"{self._prefix}ref:{partner_ref}")
        return None if holder is None else await self.get(str(holder))

    def _listing_index(self, query: PayoutQuery) -> tuple[list[str], bool]:
        """The sorted sets a query reads (the most selective filter's), and whether the script
        must still check the status."""
        if query.undelivered_only:
            return [self._prefix + "idx:undelivered"], query.statuses is not None
        if query.conflicts_only:
            return [self._prefix + "idx:conflict"], query.statuses is not None
        if query.statuses is not None:
            return [f"{self._prefix}idx:st:{s.value}" for s in sorted(query.statuses)], False
        return [self._prefix + "idx:created"], False

    async def list_payouts(self, query: PayoutQuery) -> PayoutPage:
        self._conn()
        keys, check_status = self._listing_index(query)
        low: float | None = query.created_after
        cursor_s, cursor_id = "", ""
        if query.after is not None:
            cursor_s, cursor_id = _num(query.after[0]), query.after[1]
            if low is None or query.after[0] >= low:
                low = query.after[0]
        args: list[str | int] = [
            self._prefix,
            cursor_s,
            cursor_id,
            "-inf" if low is None else _num(low),
            "+inf" if query.created_before is None else "(" + _num(query.created_before),
            query.limit + 1,
            _LIST_BUDGET,
            ",".join(s.value for s in query.statuses or ()) if check_status else "",
            "1" if query.conflicts_only else "0",
            "1" if query.undelivered_only else "0",
            "" if query.updated_after is None else _num(query.updated_after),
            "" if query.updated_before is None else _num(query.updated_before),
        ]
        with _translated():
            bounded, bound_s, bound_id, *flat = await self._scripts["list"](keys=keys, args=args)
        rows = (decode_payout(flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4))
        page = page_of(rows, query.limit)
        if page.next_cursor is None and int(bounded):
            # The work bound was reached before the page filled: resume where it stopped.
            return PayoutPage(page.items, encode_cursor(float(bound_s), str(bound_id)))
        return page

    async def ops_snapshot(
        self, now: float, *, late_after: float, failing_after: float
    ) -> OpsSnapshot:
        client = self._conn()
        pre = self._prefix
        open_ = [s for s in PayoutStatus if not s.is_final]
        with _translated():
            async with client.pipeline(transaction=True) as pipe:  # MULTI: one moment
                for s in open_:
                    pipe.zrange(f"{pre}idx:st:{s.value}", 0, 0, withscores=True)
                pipe.zcount(pre + "idx:attempt", "-inf", "(" + _num(now - late_after))
                pipe.zcard(pre + "idx:conflict")
                pipe.zcount(pre + "idx:failing", "-inf", "(" + _num(now - failing_after))
                pipe.zcard(self._outbox_dead)
                *firsts, late, conflicts, failing, dead = await pipe.execute()
        oldest = [f[0][1] for f in firsts if f]
        return OpsSnapshot.of(now, oldest, late, conflicts, failing, dead)

    async def prune(self, before: float, *, dry_run: bool, limit: int) -> int:
        if limit <= 0:
            return 0
        if not dry_run:
            n = await self._run(
                "prune", [self._payout_key("")], [self._prefix, _num(before), limit, _PRUNE_BUDGET]
            )
            return int(n)
        # A count only: read in pages outside any script, so a large one never blocks Redis.
        client = self._conn()
        counted, offset = 0, 0
        with _translated():
            while counted < limit:
                ids = await client.zrange(
                    self._prefix + "idx:final",
                    "-inf",
                    "(" + _num(before),
                    byscore=True,
                    offset=offset,
                    num=1000,
                )
                if not ids:
                    break
                offset += len(ids)
                async with client.pipeline(transaction=False) as pipe:
                    for pid in ids:
                        pipe.hmget(self._outbox_key(str(pid)), ["status", "delivered_at"])
                    entries = await pipe.execute()
                counted += sum(1 for e in entries if e[0] is None or e[1] is not None)
        return min(counted, limit)

    # -- instance liveness ----------------------------------------------------------------------

    async def beat(self, instance_id: str, mark: float) -> None:
        client = self._conn()
        with _translated():
            await client.hset(self._instances, instance_id, _num(mark))

    async def instances(self) -> dict[str, float]:
        client = self._conn()
        with _translated():
            stored = await client.hgetall(self._instances)
        return {str(i): float(m) for i, m in stored.items()}

    async def forget_instance(self, instance_id: str) -> None:
        client = self._conn()
        with _translated():
            await client.hdel(self._instances, instance_id)


def __getattr__(name: str) -> Any:
    # RedisCheckBudget moved to reconcile.redis, which imports this module's client and error
    # translation: resolved on first use, so neither module needs the other half-imported.
    if name == "RedisCheckBudget":
        from ..reconcile.redis import RedisCheckBudget

        return RedisCheckBudget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
