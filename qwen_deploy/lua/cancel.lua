-- ARGV: now, ttl
--#include common
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if terminal[st] then return 'terminal:' .. st end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'finish_reason', 'canceled')
  close('canceled', ARGV[1], ARGV[2])
  return 'canceled'
end
return 'canceling'
