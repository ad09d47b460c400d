-- ARGV: now, ttl, owner ('' for any: the reaper and the worker's own time-outs).
-- Another owner's job is 'missing', untouched (records without an owner are "anonymous").
--#include common
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if ARGV[3] and ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'owner') or 'anonymous') ~= ARGV[3] then
  return 'missing'
end
if terminal[st] then return 'terminal:' .. st end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'finish_reason', 'canceled')
  close('canceled', ARGV[1], ARGV[2])
  return 'canceled'
end
return 'canceling'
