-- The deadline sweep: jobs past their deadline that are still queued end `canceled` with error
-- deadline_exceeded (no worker needed); a running one gets its cancel flag (the engine stops it within
-- its next 50 ms sync and keeps the partial text).
-- KEYS: deadlines (zset: job id -> deadline), stats, active, pending.
-- ARGV: prefix, now, ttl, limit, job ids... (none: the entries of the deadlines set that are due).
-- Returns the ids closed.
--#include common
local prefix, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local ids = {}
if #ARGV > 4 then
  for i = 5, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
end
local closed = {}
for _, id in ipairs(ids) do
  local job = prefix .. ':job:' .. id
  local st = redis.call('HGET', job, 'status')
  if (not st) or terminal[st] then
    redis.call('ZREM', KEYS[1], id)
  elseif past_deadline(job, now) then
    if st == 'queued' then
      close_at_deadline(job, KEYS[2], KEYS[3], KEYS[4], now, ttl)
      closed[#closed + 1] = id
    else
      redis.call('HSET', job, 'cancel', '1')
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
return closed
