-- KEYS: subject hash (job or batch), due zset, delivery hash. ARGV: now, kind, event, delivery id.
-- Adds a delivery (a snapshot of the subject) unless the subject has no webhook, the delivery exists,
-- or the subject is not in the right state: `completed` needs a terminal batch; `output` a running job
-- whose tokens or progress changed since its last output event.
local url = redis.call('HGET', KEYS[1], 'webhook')
if (not url) or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local st = redis.call('HGET', KEYS[1], 'status')
if ARGV[3] == 'output' then
  if st ~= 'running' then return 0 end
  local mark = (redis.call('HGET', KEYS[1], 'tokens') or '') .. '|' .. (redis.call('HGET', KEYS[1], 'progress') or '')
  if mark == redis.call('HGET', KEYS[1], 'webhook_mark') then return 0 end
  redis.call('HSET', KEYS[1], 'webhook_mark', mark)
elseif not (st == 'completed' or st == 'cancelled' or st == 'failed' or st == 'expired') then
  return 0
end
redis.call('HSET', KEYS[3], 'kind', ARGV[2], 'subject', redis.call('HGET', KEYS[1], 'id'), 'event', ARGV[3],
           'time', ARGV[1], 'url', url, 'attempt', 0, 'record', cjson.encode(redis.call('HGETALL', KEYS[1])))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
return 1
