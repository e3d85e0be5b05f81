"""Every Lua script the gateway runs, in one place (run with EVALSHA by `RedisStore.script`).

Every key a script touches is passed in KEYS, so a script runs on a Redis Cluster too as long as
its keys share a slot (the cluster layout, `store/keys.py`, gives each call keys of one slot).
Each script is sized by its caller to hold Redis for about half a millisecond a call: token loads
queue behind it.
"""
from __future__ import annotations

# Writes each (digest, time) pair of a flat list into the `used` hash unless the time there is
# newer: a late or slower instance never moves `accessed` back. Answers how many pairs it read.
KEEP_NEWER = """
local function keep_newer(hash, flat)
  for i = 1, #flat, 2 do
    local old = redis.call('HGET', hash, flat[i])
    if not old or tonumber(old) < tonumber(flat[i + 1]) then
      redis.call('HSET', hash, flat[i], flat[i + 1])
    end
  end
  return #flat / 2
end
"""
# KEYS[1]: the `used` hash; ARGV: digest, time, digest, time...
TOUCH = KEEP_NEWER + "return keep_newer(KEYS[1], ARGV)\n"
# KEYS[1]: the old `accessed` sorted set, KEYS[2]: the `used` hash; ARGV[1]: how many to move.
# Pops the oldest members and keeps each one's newer time: atomic, so nothing is lost to an old
# instance still writing the sorted set meanwhile.
FOLD_ACCESSED = KEEP_NEWER + "return keep_newer(KEYS[2], redis.call('ZPOPMIN', KEYS[1], ARGV[1]))\n"

# KEYS: lists; ARGV, for each key in turn: its cap, how many lines, the lines. RPUSH answers the
# list's length, so only a list past its cap is trimmed. unpack() goes 500 lines at a time: Lua's
# C stack holds some 8,000 values.
LOG_PUSH = """
local at = 1
for i = 1, #KEYS do
  local cap, n = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local first, last, length = at + 2, at + 1 + n, 0
  for s = first, last, 500 do
    length = redis.call('RPUSH', KEYS[i], unpack(ARGV, s, math.min(s + 499, last)))
  end
  if length > cap then
    redis.call('LTRIM', KEYS[i], -cap, -1)
  end
  at = last + 1
end
return #KEYS
"""

# One usage exchange in one round trip (the totals come back with the increments, so an instance
# near a limit learns the others' counts as soon as it sends its own). KEYS: first the usage hashes
# added to, then the hashes to read back (accounts' usage, the blocked tokens), then the lease
# hashes of the accounts whose calls are leased; ARGV[1]: seconds to keep the hashes added to,
# ARGV[2]: how many KEYS are added to; then for each of those, how many tokens and for each token
# its id, calls and bytes (added to the fields c:<id> and b:<id>). Returns the contents of each hash
# read, in order, as HGETALL gives them.
#
# Then, optionally: how many leases; the time now (ms), how long a lease lasts (ms), this
# instance's name; and for each lease the index of its account's usage among the hashes read, the
# account's calls limit, the least the grant must be (what the instance may serve while this call
# is in flight) and 1 if it wants more (it served or refused calls since its last exchange). KEYS
# then end with the lease hashes and the instance registry (instance -> when it last leased, ms).
# A lease is the calls an instance may serve before it must exchange again: for one that wants
# more, its share of what the limit leaves after every call counted (tokens not blocked), divided
# by the instances that leased within a lease's time, at least 1, and never more than the other
# instances' leases not yet ended leave; for one that does not, only the least (an idle lease is
# given back). The lease hash holds g:<instance> (granted) and e:<instance> (ends, ms); ended ones
# are removed. One more reply then follows the hashes: for each lease, the grant and the sum of
# the other leases.
#
# On a Redis Cluster (one account a call, its keys in its slot) the registry is the account's own
# (`lease_instances_of`), no blocked hash is read, and ARGV ends, after the lease, with how many
# blocked tokens follow and their ids (what the instance knows is blocked: one it does not know of
# yet only counts as used, which makes the grant smaller, never larger).
USAGE_EXCHANGE = """
local keep, adds, at = ARGV[1], tonumber(ARGV[2]), 3
for i = 1, adds do
  local key = KEYS[i]
  for _ = 1, tonumber(ARGV[at]) do
    redis.call('HINCRBY', key, 'c:' .. ARGV[at + 1], ARGV[at + 2])
    redis.call('HINCRBY', key, 'b:' .. ARGV[at + 1], ARGV[at + 3])
    at = at + 3
  end
  at = at + 1
  redis.call('EXPIRE', key, keep)
end
local leases = tonumber(ARGV[at] or 0)
local extra = 0
if leases > 0 then
  extra = leases + 1
end
local read = {}
for i = adds + 1, #KEYS - extra do
  read[#read + 1] = redis.call('HGETALL', KEYS[i])
end
if leases == 0 then
  return read
end
local now, ttl, me = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), ARGV[at + 3]
at = at + 4
local registry = KEYS[#KEYS]
redis.call('HSET', registry, me, now)
local seen = redis.call('HGETALL', registry)
local instances = 0
for j = 1, #seen, 2 do
  if tonumber(seen[j + 1]) > now - ttl then
    instances = instances + 1
  else
    redis.call('HDEL', registry, seen[j])
  end
end
redis.call('EXPIRE', registry, keep)
local blocked = {}
local given = at + 4 * leases
if ARGV[given] then
  for j = given + 1, given + tonumber(ARGV[given]) do
    blocked[ARGV[j]] = true
  end
else
  local listed = read[#read]
  for j = 1, #listed, 2 do
    blocked[listed[j]] = true
  end
end
local grants = {}
for l = 1, leases do
  local usage, limit, least = read[tonumber(ARGV[at])], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local wants = ARGV[at + 3] == '1'
  at = at + 4
  local key = KEYS[#KEYS - extra + l]
  local used = 0
  for j = 1, #usage, 2 do
    local field = usage[j]
    if string.sub(field, 1, 2) == 'c:' and not blocked[string.sub(field, 3)] then
      used = used + tonumber(usage[j + 1])
    end
  end
  local held = redis.call('HGETALL', key)
  local granted, ends = {}, {}
  for j = 1, #held, 2 do
    local kind, who = string.sub(held[j], 1, 2), string.sub(held[j], 3)
    if kind == 'g:' then
      granted[who] = tonumber(held[j + 1])
    elseif kind == 'e:' then
      ends[who] = tonumber(held[j + 1])
    end
  end
  local others = 0
  for who, ending in pairs(ends) do
    if who ~= me then
      if ending > now then
        others = others + (granted[who] or 0)
      else
        redis.call('HDEL', key, 'g:' .. who, 'e:' .. who)
      end
    end
  end
  local left = limit - used - others
  local grant = 0
  if left >= 1 and wants then
    grant = math.min(left, math.max(1, math.floor((limit - used) / instances), least))
  elseif left >= 1 then
    grant = math.min(left, least)
  end
  redis.call('HSET', key, 'g:' .. me, grant, 'e:' .. me, now + ttl)
  redis.call('EXPIRE', key, keep)
  grants[#grants + 1] = {grant, others}
end
read[#read + 1] = grants
return read
"""

# Redis Cluster layout (`store/sharded.py`), each on one id bucket's slot.
# KEYS[1]: an id bucket of `ids`; ARGV: the id, the digest it must name, the new digest. 0 if it
# names another (the token was rotated or deleted meanwhile).
SWAP_ID = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
# KEYS: an id bucket of `ids`, the same bucket of `expiry`; ARGV: the id, the digest. Removes the
# id from both if `ids` still names that digest (an index entry whose record is missing).
CLEAR_ORPHAN = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


# What the writers and the cluster store send with `TokenStore.scripts`: loaded on each cluster
# master's lean connection as it opens (`RespClient` preload).
BATCHED_SCRIPTS = (TOUCH, LOG_PUSH, USAGE_EXCHANGE, SWAP_ID, CLEAR_ORPHAN)

# `gateway migrate`'s lock on its source (`store/migrate.py`). KEYS[1]: the `migrating` marker;
# ARGV[1]: the value this migration set. Only the holder extends (ARGV[2]: ms) or removes it: a
# migration whose marker expired and was taken by another must not touch the other's.
EXTEND_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
DELETE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
