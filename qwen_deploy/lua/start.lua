-- ARGV: now, worker, max_deliveries, exhausted error json, ttl, reap at (if the worker vanishes)
--#include common
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', ''} end
if terminal[st] then return {'skip', st} end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
if n > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
  close('failed', ARGV[1], ARGV[5])
  return {'exhausted', tostring(n)}
end
if n == 1 then observe('queue_seconds', tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'created_at'))) end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2],
           'tokens', 0, 'text', '')
redis.call('ZADD', KEYS[4], ARGV[6], redis.call('HGET', KEYS[1], 'id'))
redis.call('XADD', KEYS[2], '*', 'type', 'status', 'status', 'running', 'attempt', n)
notify('start', ARGV[1])
return {'run', redis.call('HGET', KEYS[1], 'request')}
