-- A per-owner byte quota: what is counted (files, open batches), each entry until it is released or lapses.
-- KEYS[1] amounts (zset: entry -> bytes), KEYS[2] lapse times (zset: entry -> unix time), KEYS[3] the total.
-- ARGV[1] now, ARGV[2] the limit, ARGV[3] the entry to add ('' for none), ARGV[4] its bytes, ARGV[5] when it
-- lapses, ARGV[6..] entries to release. Lapsed and released entries leave first, then the entry is added when
-- the total stays within the limit. Returns {1 added (or nothing to add) | 0 refused, the total before it}.
local function drop(entry)
  local bytes = redis.call('ZSCORE', KEYS[1], entry)
  if bytes then
    redis.call('ZREM', KEYS[1], entry)
    redis.call('ZREM', KEYS[2], entry)
    redis.call('DECRBY', KEYS[3], math.floor(tonumber(bytes)))
  end
end
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)) do drop(entry) end
for i = 6, #ARGV do drop(ARGV[i]) end
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[3] == '' or redis.call('ZSCORE', KEYS[1], ARGV[3]) then return {1, total} end
local bytes = math.floor(tonumber(ARGV[4]))
if total + bytes > tonumber(ARGV[2]) then return {0, total} end
redis.call('ZADD', KEYS[1], bytes, ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
redis.call('INCRBY', KEYS[3], bytes)
local life = math.ceil(tonumber(ARGV[5]) - tonumber(ARGV[1])) + 60
for i = 1, 3 do
  if redis.call('TTL', KEYS[i]) < life then redis.call('EXPIRE', KEYS[i], life) end
end
return {1, total}
