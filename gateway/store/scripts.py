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
# added to, then the hashes to read back (accounts' usage, the blocked tokens); ARGV[1]: seconds to
# keep the hashes added to, ARGV[2]: how many KEYS are added to; then for each of those, how many
# tokens and for each token its id, calls and bytes (added to the fields c:<id> and b:<id>).
# Returns the contents of each hash read, in order, as HGETALL gives them.
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
local read = {}
for i = adds + 1, #KEYS do
  read[#read + 1] = redis.call('HGETALL', KEYS[i])
end
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
